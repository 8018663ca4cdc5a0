"""Vectorised PackBits (Apple RLE) for PSD channels: one row = one independent stream, no per-byte Python loop.

PackBits packets: header h in 0..127 -> h+1 literal bytes follow; h in 129..255 -> the next byte repeats
257-h times (2..128); 128 is a no-op. PSD stores each channel as a table of per-row byte counts followed by
the rows, so packets never cross a row.

Two encoders, chosen per channel by how many value changes it has:
- `runs`: exact run detection (every run of 3+ equal bytes becomes repeat packets, the rest literal packets
  of up to 128 bytes). Work and temporary memory grow with the number of runs, so it is used when runs are
  few (flat graphics, alpha channels, zeroed transparent areas), where it also compresses best.
- `blocks`: each row cut into fixed 128-byte blocks; a constant block becomes one 2-byte repeat packet, any
  other block one literal packet. Work is a few memory passes whatever the content (photographs, noise).
Both emit valid PackBits that Photoshop's and psd-tools' decoders read; the tests cross-check both.
"""

from __future__ import annotations

import numpy as np

from ...errors import PSDError

_BLOCK = 128
_U64_SPREAD = np.uint64(0x0101010101010101)
# Use the exact run encoder when runs are at most this fraction of the bytes.
_RUNS_FRACTION = 1 / 32


def encode_rows(a: np.ndarray, *, method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """PackBits-encode each row of a (h, w) uint8 array: returns (per-row byte counts (h,) int64, data uint8)."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    if a.ndim != 2:
        raise PSDError(f"encode_rows expects a (h, w) uint8 array, got shape {a.shape}")
    h, w = a.shape
    if h == 0 or w == 0:
        return np.zeros(h, np.int64), np.zeros(0, np.uint8)
    if method == "auto":
        changes = np.count_nonzero(a[:, 1:] != a[:, :-1]) if w > 1 else 0
        method = "runs" if changes + h <= a.size * _RUNS_FRACTION else "blocks"
    if method == "runs":
        return _encode_runs(a)
    if method == "blocks":
        return _encode_blocks(a)
    raise PSDError(f"unknown PackBits method {method!r}; use 'auto', 'runs' or 'blocks'")


def _encode_runs(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact run-based PackBits of a (h, w) uint8 array (see module docstring)."""
    h, w = a.shape
    flat = a.reshape(-1)
    n = flat.size
    starts = np.empty((h, w), bool)  # True where a run begins; every row start begins a run
    starts[:, 0] = True
    np.not_equal(a[:, 1:], a[:, :-1], out=starts[:, 1:])
    run_start = np.flatnonzero(starts)  # (R,)
    run_len = np.diff(run_start, append=n)
    is_long = run_len >= 3
    # A segment is one long run (repeat) or a maximal group of short runs inside one row (literal).
    row_start_run = run_start % w == 0
    prev_long = np.empty_like(is_long)
    prev_long[0] = True
    prev_long[1:] = is_long[:-1]
    seg_first = is_long | row_start_run | prev_long
    seg_idx = np.flatnonzero(seg_first)  # (S,)
    seg_src = run_start[seg_idx]
    seg_len = np.diff(seg_src, append=n)
    seg_rep = is_long[seg_idx]
    # Packets: ceil(len / 128) per segment, each 128 bytes but the last.
    seg_npk = (seg_len + _BLOCK - 1) // _BLOCK
    npk = int(seg_npk.sum())
    pk_seg = np.repeat(np.arange(seg_idx.size), seg_npk)  # (P,)
    first_pk = np.cumsum(seg_npk) - seg_npk
    k = np.arange(npk) - first_pk[pk_seg]
    size = np.minimum(_BLOCK, seg_len[pk_seg] - _BLOCK * k)
    rep = seg_rep[pk_seg]
    # A repeat segment of 128*q + 1 bytes would end on a 1-byte repeat, which PackBits cannot say: 127 + 2.
    odd = seg_rep & (seg_len % _BLOCK == 1)
    if odd.any():
        last = first_pk[odd] + seg_npk[odd] - 1
        size[last] += 1
        size[last - 1] -= 1
    src = seg_src[pk_seg] + _BLOCK * k
    out_size = np.where(rep, 2, 1 + size)
    dst = np.cumsum(out_size) - out_size
    total = int(out_size.sum())
    out = np.empty(total, np.uint8)
    # Literal bytes: the same bytes, in the same order, on both sides.
    lit_seg = ~seg_rep
    n_lit = int(seg_len[lit_seg].sum())
    if n_lit * 8 < n:  # few literals (alpha, flat graphics): explicit indices, no full-size masks
        ls, ll = seg_src[lit_seg], seg_len[lit_seg]
        src_idx = np.arange(n_lit) + np.repeat(ls - (np.cumsum(ll) - ll), ll)
        lp = ~rep
        pd, ps = dst[lp] + 1, size[lp]
        dst_idx = np.arange(n_lit) + np.repeat(pd - (np.cumsum(ps) - ps), ps)
        out[dst_idx] = flat[src_idx]
    else:  # many literals: two boolean masks over the input and the output
        src_lit = np.repeat(lit_seg, seg_len)
        dst_lit = np.repeat(
            np.stack([np.zeros(npk, bool), ~rep], 1).reshape(-1),
            np.stack([np.ones(npk, np.int64), np.where(rep, 1, size)], 1).reshape(-1),
        )
        out[dst_lit] = flat[src_lit]
    out[dst] = np.where(rep, 257 - size, size - 1).astype(np.uint8)
    out[dst[rep] + 1] = flat[src[rep]]
    counts = np.bincount(seg_src[pk_seg] // w, weights=out_size, minlength=h).astype(np.int64)
    return counts, out


def _encode_blocks(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block PackBits of a (h, w) uint8 array: 128-byte blocks, constant blocks as repeats (see module docstring)."""
    h, w = a.shape
    nb = (w + _BLOCK - 1) // _BLOCK
    tail = w - _BLOCK * (nb - 1)  # length of each row's last block, 1..128
    if tail == _BLOCK and a.ctypes.data % 8 == 0:
        padded = a
    else:
        padded = np.empty((h, nb * _BLOCK), np.uint8)
        padded[:, :w] = a
        padded[:, w:] = a[:, -1:]  # repeat the last byte so a constant tail block stays constant
    blocks = padded.reshape(h, nb, _BLOCK)
    words = padded.view(np.uint64).reshape(h, nb, _BLOCK // 8)
    const = (words == blocks[:, :, 0].astype(np.uint64)[:, :, None] * _U64_SPREAD).all(axis=2)  # (h, nb)
    if tail == 1:
        const[:, -1] = False  # a 1-byte repeat cannot be expressed; a 1-byte literal costs the same 2 bytes
    blen = np.full(nb, _BLOCK, np.int64)
    blen[-1] = tail
    full = np.empty((h, nb, _BLOCK + 1), np.uint8)  # header + up to 128 payload bytes per block
    full[:, :, 1:] = blocks
    full[:, :, 0] = (blen - 1).astype(np.uint8)
    n_const = int(np.count_nonzero(const))
    if n_const:
        full[:, :, 0][const] = np.broadcast_to((257 - blen).astype(np.uint8), (h, nb))[const]
    out_size = np.where(const, 2, 1 + blen[None, :])  # (h, nb)
    counts = out_size.sum(axis=1).astype(np.int64)
    if n_const == 0:
        if tail == _BLOCK:
            return counts, full.reshape(-1)
        rows = full.reshape(h, nb * (_BLOCK + 1))[:, : nb * (_BLOCK + 1) - (_BLOCK - tail)]
        return counts, np.ascontiguousarray(rows).reshape(-1)
    # Which of the 129 slots of each block to keep, looked up per block (a take is ~10x cheaper than a compare):
    # 0 = literal block (all), 1 = constant block (header + value), 2 = literal tail block (header + tail bytes).
    patterns = np.zeros((3, _BLOCK + 1), bool)
    patterns[0] = True
    patterns[1, :2] = True
    patterns[2, : 1 + tail] = True
    kind = const.view(np.uint8).copy()
    if tail != _BLOCK:
        kind[:, -1] = np.where(const[:, -1], 1, 2)
    keep = np.take(patterns, kind, axis=0)  # (h, nb, 129)
    return counts, full[keep]


def decode_rows(data: bytes | np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
    """Strictly decode PackBits rows: every row must give exactly `width` bytes from exactly its count of bytes.

    Returns (h, width) uint8. Raises PSDError naming the first bad row. Pure Python per packet; meant for
    checking files (lint, tests), not for reading large images (the reader uses psd-tools' C decoder).
    """
    buf = bytes(data)
    counts = np.asarray(counts, np.int64)
    h = counts.size
    if int(counts.sum()) != len(buf):
        raise PSDError(f"PackBits row counts add up to {int(counts.sum())} bytes, but the data has {len(buf)}")
    out = bytearray(h * width)
    pos = 0
    for row, count in enumerate(counts.tolist()):
        end = pos + count
        j = row * width
        row_end = j + width
        while pos < end:
            hdr = buf[pos]
            pos += 1
            if hdr < 128:
                n = hdr + 1
                if pos + n > end or j + n > row_end:
                    raise PSDError(
                        f"PackBits row {row}: literal packet of {n} bytes overruns the row "
                        f"(row has {count} encoded bytes for {width} pixels)"
                    )
                out[j : j + n] = buf[pos : pos + n]
                pos += n
                j += n
            elif hdr > 128:
                n = 257 - hdr
                if pos + 1 > end or j + n > row_end:
                    raise PSDError(
                        f"PackBits row {row}: repeat packet of {n} bytes overruns the row "
                        f"(row has {count} encoded bytes for {width} pixels)"
                    )
                out[j : j + n] = buf[pos : pos + 1] * n
                pos += 1
                j += n
        if j != row_end:
            raise PSDError(f"PackBits row {row} decodes to {j - row * width} bytes, expected {width}")
    return np.frombuffer(bytes(out), np.uint8).reshape(h, width)
