"""Opening safetensors checkpoints: single files, sharded folders, pipeline subfolders (robustness L1-L6, L12).

A `Checkpoint` is a lazy view: it reads only the headers when opened. `get` returns memory-mapped tensors
(no copy); `read` streams a tensor through a small buffer into a new tensor of another dtype or device, so a
dtype-converting load never holds the file pages and the converted copy at once. Only safetensors is ever
read; pickle-based formats are refused, never loaded.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ...errors import CorruptFileError, ModelFileNotFoundError, WeightsError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers components, transformers models
CHUNK_BYTES = 16 * 2**20  # streaming buffer for dtype/device conversion
# Safetensors metadata key that marks a file of random (test/demo) weights: tiny.py writes it, the loader warns.
RANDOM_WEIGHTS_KEY = "qil_random_weights"

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E8M0": torch.float8_e8m0fnu,  # mxfp8 block scales as ComfyUI saves them
}  # fmt: skip
_MAGIC = (
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GGUF", "a GGUF file"),
    (b"PK\x03\x04", "a zip archive (PyTorch .ckpt/.pt)"), (b"\x80", "a Python pickle (PyTorch .ckpt/.pt/.bin)"),
)  # fmt: skip
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in that file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return self.end - self.start


def _sniff(path: Path) -> str | None:
    with path.open("rb") as f:
        head = f.read(8)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    return None


def _corrupt(path: Path, reason: str, expected: int | None = None) -> CorruptFileError:
    size = path.stat().st_size
    exp = f", expected {expected:,} bytes from its header" if expected is not None else ""
    what = _sniff(path) if size else None
    kind = f" It looks like {what} renamed to .safetensors, not a safetensors file." if what else ""
    return CorruptFileError(
        f"{path}: corrupt or incomplete file, re-download it (size {size:,} bytes{exp}; {reason}).{kind} "
        "Only .safetensors files are loaded; they are never opened as pickles."
    )


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse the safetensors header ourselves (duplicate keys included); return (header, data start offset)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _corrupt(path, "header too small")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise _corrupt(path, "header length larger than the file")
        text = f.read(n)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise _corrupt(path, f"duplicate tensor names in the header: {sorted(dup)[:5]}")
        return dict(pairs)

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"unreadable header: {e}") from None
    return header, 8 + n


def _open_one(path: Path) -> tuple[Any, dict[str, TensorInfo], dict[str, str]]:
    """Validate one file with safetensors and index its tensors; wrap every failure in CorruptFileError."""
    if path.stat().st_size == 0:
        raise _corrupt(path, "the file is empty")
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        expected = None
        try:
            header, base = _read_header(path)
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            expected = base + max(ends, default=0)
        except (CorruptFileError, KeyError, TypeError, IndexError):
            pass
        raise _corrupt(path, str(e), expected) from None
    header, base = _read_header(path)
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise WeightsError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which this loader does not support")
        start, end = entry["data_offsets"]
        infos[key] = TensorInfo(path, dtype, tuple(entry["shape"]), base + start, base + end)
    return handle, infos, dict(handle.metadata() or {})


class Checkpoint:
    """Lazy, memory-mapped view over the safetensors file(s) of one model component."""

    def __init__(
        self, files: Sequence[Path], source: str, folder: Path | None = None, weight_map: dict[str, str] | None = None
    ) -> None:
        self.files = list(files)
        self.source = source
        self.folder = folder  # the component folder (config.json lives there), None for bare files
        self.metadata: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[Path, Any] = {}
        self._streams: dict[Path, io.FileIO] = {}
        self._buffer: torch.Tensor | None = None
        for path in self.files:
            handle, infos, metadata = _open_one(path)
            self._handles[path] = handle
            for key, info in infos.items():
                if key in self._infos:
                    raise CorruptFileError(
                        f"{source}: tensor {key!r} is in both {self._infos[key].file.name} and {path.name}; "
                        "the shards do not belong together, re-download the folder"
                    )
                self._infos[key] = info
            self.metadata.update(metadata)
        for key, name in (weight_map or {}).items():
            found = self._infos.get(key)
            if found is None or found.file.name != name:
                where = f"is in {found.file.name}" if found else "is in no shard"
                raise CorruptFileError(
                    f"{source}: the shard index puts {key!r} in {name} but it {where}; the index and the shards do "
                    "not match, re-download the folder"
                )

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self.files)} file(s), {len(self._infos)} tensors)"

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        """File, dtype, shape and byte range of one tensor."""
        return self._infos[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{key: shape} for every tensor."""
        return {k: i.shape for k, i in self._infos.items()}

    def file_of(self, key: str) -> Path:
        """The file a tensor lives in."""
        return self._infos[key].file

    def get(self, key: str) -> torch.Tensor:
        """The tensor as stored, memory-mapped from its file (no copy; pages load on first touch)."""
        info = self._infos[key]
        return self._handles[info.file].get_tensor(key)

    def read(
        self, key: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", *, copy: bool = False
    ) -> torch.Tensor:
        """The tensor in `dtype` on `device`: zero-copy from the map when nothing changes (unless `copy`),
        else a new tensor filled through a 16 MB buffer, so the file's pages never count on top of it.
        Not thread-safe (one buffer per checkpoint)."""
        info = self._infos[key]
        dtype = dtype or info.dtype
        dev = torch.device(device)
        if dtype == info.dtype and dev.type == "cpu" and not copy:
            return self.get(key)
        out = torch.empty(info.shape, dtype=dtype, device=dev)
        flat = out.view(-1)
        item = info.dtype.itemsize
        per_chunk = max(CHUNK_BYTES // item, 1)
        if self._buffer is None:
            self._buffer = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
        stream = self._streams.get(info.file)
        if stream is None:
            stream = self._streams[info.file] = info.file.open("rb", buffering=0)
        stream.seek(info.start)
        buf = self._buffer.numpy()
        for pos in range(0, flat.numel(), per_chunk):
            n = min(per_chunk, flat.numel() - pos)
            got = stream.readinto(buf.data[: n * item])
            if got != n * item:
                raise _corrupt(info.file, f"tensor {key!r} ends early ({got} of {n * item} bytes read)")
            flat[pos : pos + n].copy_(self._buffer[: n * item].view(info.dtype))
        return out

    def close(self) -> None:
        """Release file handles and the streaming buffer; memory-mapped tensors already handed out stay valid."""
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
        self._handles.clear()
        self._buffer = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shard_label(name: str, position: int, total: int) -> str:
    m = re.search(r"-(\d+)-of-(\d+)\.", name)
    return f"shard {int(m.group(1))} of {int(m.group(2))}" if m else f"shard {position} of {total}"


def _resolve_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{index}: the shard index is not valid JSON ({e}); re-download it") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptFileError(f'{index}: the shard index has no usable "weight_map" (key -> file); re-download it')
    names = sorted(set(weight_map.values()))
    missing = [(i, n) for i, n in enumerate(names, 1) if not (index.parent / n).is_file()]
    if missing:
        i, n = missing[0]
        labels = ", ".join(f"{_shard_label(m, j, len(names))} missing ({m})" for j, m in missing)
        raise ModelFileNotFoundError(
            f"{index.parent}: {labels}; looked for {index.parent / n}. "
            f"download all {len(names)} shards listed in {index.name}"
        )
    return [index.parent / n for n in names], weight_map


def _check_suffix(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise WeightsError(
            f"{path}: only .safetensors is supported; {suffix} files are pickles that can run code when loaded. "
            "Download the .safetensors version of this model."
        )
    if suffix not in SAFETENSORS_SUFFIXES and not path.name.endswith(".index.json"):
        raise WeightsError(f"{path}: unsupported file type {suffix or '(none)'}; only .safetensors is supported")


def resolve_files(
    source: PathLike | Sequence[PathLike], *, subfolder: str | None = None, default_subfolder: str | None = None
) -> tuple[list[Path], Path | None, dict[str, str] | None]:
    """Find the safetensors file(s) of a component: (files, its folder or None for bare files, shard weight_map).

    `source` is a .safetensors file, a list of them, a shard index, a component folder, or a diffusers
    pipeline folder (then `subfolder`, or `default_subfolder` when the folder has a model_index.json).
    """
    if isinstance(source, (list, tuple)):
        files = [Path(p) for p in source]
        for p in files:
            if not p.is_file():
                raise ModelFileNotFoundError(f"model file not found: {p} (looked in {p.parent})")
            _check_suffix(p)
        return files, None, None
    path = Path(source)  # type: ignore[arg-type]
    looked = [path]
    if path.is_dir():
        own_weights = any(p.suffix.lower() in SAFETENSORS_SUFFIXES for p in path.iterdir())
        if (
            subfolder is None
            and default_subfolder
            and ((path / "model_index.json").is_file() or ((path / default_subfolder).is_dir() and not own_weights))
        ):
            subfolder = default_subfolder
        if subfolder:
            path = path / subfolder
            looked.append(path)
    if not path.exists():
        raise ModelFileNotFoundError(
            f"model not found: {path} (looked in: {', '.join(str(p) for p in looked)}). "
            "Check the name, or put the file into your models folder."
        )
    if path.is_file():
        _check_suffix(path)
        if path.name.endswith(".index.json"):
            files, weight_map = _resolve_index(path)
            return files, path.parent, weight_map
        return [path], None, None
    for stem in WEIGHT_NAMES:
        index = path / f"{stem}.safetensors.index.json"
        if index.is_file():
            files, weight_map = _resolve_index(index)
            return files, path, weight_map
    for stem in WEIGHT_NAMES:
        for suffix in SAFETENSORS_SUFFIXES:
            if (path / f"{stem}{suffix}").is_file():
                return [path / f"{stem}{suffix}"], path, None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() in SAFETENSORS_SUFFIXES)
    if len(found) == 1:
        return found, path, None
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        raise WeightsError(
            f"{path}: several .safetensors files and no shard index ({', '.join(p.name for p in found[:6])}); "
            "select one file, or restore the *.safetensors.index.json"
        )
    if pickles:
        raise WeightsError(f"{path}: only .safetensors is supported, found only {', '.join(pickles[:4])}")
    if (path / "model_index.json").is_file():
        raise ModelFileNotFoundError(
            f"{path} is a diffusers pipeline folder; name the component subfolder (transformer, vae, text_encoder)"
        )
    raise ModelFileNotFoundError(
        f"no .safetensors weights in {path} (looked for {WEIGHT_NAMES[0]}.safetensors, "
        f"{WEIGHT_NAMES[0]}.safetensors.index.json and {WEIGHT_NAMES[1]}.safetensors[.index.json])"
    )


def open_checkpoint(
    source: PathLike | Sequence[PathLike], *, subfolder: str | None = None, default_subfolder: str | None = None
) -> Checkpoint:
    """Open a component's safetensors file(s) lazily (headers only); see `resolve_files` for `source`."""
    files, folder, weight_map = resolve_files(source, subfolder=subfolder, default_subfolder=default_subfolder)
    label = str(folder) if folder is not None else ", ".join(str(f) for f in files)
    return Checkpoint(files, label, folder, weight_map)


def checkpoint_fingerprint(
    source: PathLike | Sequence[PathLike], *, subfolder: str | None = None, default_subfolder: str | None = None
) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime_ns, size) of every file a load would read, index and config included: a cache key (L10)."""
    files, folder, _ = resolve_files(source, subfolder=subfolder, default_subfolder=default_subfolder)
    extra = [folder / n for n in ("config.json",)] if folder is not None else []
    extra += [f for f in (folder.iterdir() if folder is not None else []) if f.name.endswith(".index.json")]
    out = []
    for p in sorted(set(files) | {e for e in extra if e.is_file()}):
        st = p.stat()
        out.append((str(p.resolve()), st.st_mtime_ns, st.st_size))
    return tuple(out)


def read_config(folder: Path | None) -> dict[str, Any] | None:
    """The component's config.json as a dict, or None when there is none; CorruptFileError when unreadable."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{folder / 'config.json'}: not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{folder / 'config.json'}: expected a JSON object")
    return data
