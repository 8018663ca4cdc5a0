"""Safe output files: name rules, containment, and atomic never-overwrite writes (robustness.md 2.12, 3.3, S3-S7).

Every file the pack writes goes through `atomic_write`: the bytes land in a hidden temporary file in the target
folder, are flushed and fsynced, and only then appear under their final name. By default the final name is
published with `os.link`, which fails atomically when the name already exists, so an existing file is never
replaced, not even by a concurrent writer. Any error, including KeyboardInterrupt, removes the temporary file.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .errors import OutputExistsError, OutputPathError

log = logging.getLogger(__name__)

MAX_NAME_BYTES = 200  # robustness.md 3.3: names over 200 bytes are rejected
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_WINDOWS_BAD_CHARS = set('<>:"|?*')
_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')
_LINK_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EMLINK}
_WRITE_BUFFER = 1 << 20


def name_problem(name: str) -> str | None:
    """Why `name` is not acceptable as one output file or folder name, or None when it is."""
    if not name or not name.strip():
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} is a folder reference, not a file name"
    if "/" in name or "\\" in name:
        return "it contains a path separator, so it is a path (one with '..' leads outside the output folder)"
    if name.startswith("."):
        return "it starts with '.', which makes a hidden file"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "it contains a NUL or control character"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"it is {len(name.encode('utf-8', 'surrogatepass'))} bytes long (at most {MAX_NAME_BYTES})"
    if _WINDOWS_BAD_CHARS & set(name):
        return f"it contains one of {''.join(sorted(_WINDOWS_BAD_CHARS))}, not allowed in Windows file names"
    if name.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        return "it is a reserved device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9)"
    if name.endswith((" ", ".")):
        return "it ends with a space or '.', which Windows strips"
    return None


def check_output_name(name: str) -> str:
    """Return `name` unchanged when it is a safe single file name, else raise OutputPathError with the reason."""
    reason = name_problem(str(name))
    if reason is not None:
        raise OutputPathError(
            f"output file name {name!r} is not allowed: {reason}; choose a plain name such as 'layers_00001_.psd'"
        )
    return name


def safe_name(name: str, *, fallback: str = "untitled", max_bytes: int = 80) -> str:
    """A file-name-safe version of any text (layer names): unsafe characters become '_', length capped in bytes."""
    text = unicodedata.normalize("NFC", str(name))
    text = _UNSAFE_CHARS.sub("_", text)
    text = "".join("_" if unicodedata.category(c) in ("Cc", "Cs") else c for c in text)
    text = text.strip(" .")
    raw = text.encode("utf-8")
    if len(raw) > max_bytes:
        text = raw[:max_bytes].decode("utf-8", "ignore").rstrip(" .")
    if not text:
        text = fallback
    if text.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        text = "_" + text
    return text


def ensure_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path:
    """The real path of `path`, after checking it lies inside the real path of `root` (symlinks followed)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise OutputPathError(
            f"output path {os.fspath(path)!r} resolves to {real!r}, outside the output folder "
            f"{real_root!r} (through '..' or a symbolic link); use a name inside that folder"
        )
    return Path(real)


def next_counter(folder: str | os.PathLike[str], base: str) -> int:
    """ComfyUI's counter rule: one past the highest `{base}_NNNNN_...` in `folder` (1 when none or no folder)."""
    pattern = re.compile(re.escape(base) + r"_(\d+)_", re.IGNORECASE if os.name == "nt" else 0)
    try:
        found = [int(m.group(1)) for n in os.listdir(folder) if (m := pattern.match(n))]
    except FileNotFoundError:
        return 1
    return max(found, default=0) + 1


def _translate(err: OSError, path: Path) -> OutputPathError:
    """An OSError from writing `path` as an OutputPathError that names the path and the fix."""
    code = err.errno
    where = f"cannot write {os.fspath(path)!r}"
    if code == errno.EEXIST:
        return OutputExistsError(
            f"{where}: a file with that name already exists and was left untouched; "
            f"choose another name, or allow replacing it (--overwrite on the command line, "
            f"overwrite=True in Python)"
        )
    if code == errno.ENOTDIR:
        return OutputPathError(f"{where}: a part of the folder path is a file, not a folder; choose another folder")
    if code == errno.ENOENT:
        return OutputPathError(f"{where}: the folder {os.fspath(path.parent)!r} does not exist; create it first")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputPathError(
            f"{where}: the folder is read-only or not writable by this user ({err.strerror}); "
            f"choose a writable output folder"
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        return OutputPathError(f"{where}: the disk is full ({err.strerror}); free some space or choose another disk")
    if code == errno.EFBIG:
        return OutputPathError(
            f"{where}: the file is larger than this system allows ({err.strerror}: file size "
            f"limit or file system limit); use a smaller canvas or another disk"
        )
    if code == errno.ENAMETOOLONG:
        return OutputPathError(f"{where}: the file name or path is too long; choose a shorter name")
    if code == errno.EISDIR:
        return OutputPathError(f"{where}: a folder with that name exists; choose another name")
    return OutputPathError(f"{where}: {err.strerror or err} (errno {code}); check the folder and the disk")


def _remove_quietly(path: Path) -> None:
    """Remove a temporary file if it is still there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_folder(folder: Path) -> None:
    """Make the new directory entry durable (best effort: not every OS or file system can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        log.debug("fsync of folder %s failed: %s", folder, err)
    finally:
        os.close(fd)


def _check_folder(folder: Path, path: Path, make_dirs: bool) -> None:
    """Fail early with a clear message when the target folder is missing, a file, or not a folder."""
    if make_dirs:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _translate(err, path) from err
    if not folder.exists():
        # exists() is False both for a missing folder and for a path that runs through a regular file.
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise _translate(OSError(errno.ENOTDIR, "Not a directory"), path)
        raise _translate(OSError(errno.ENOENT, "No such file or directory"), path)
    if not folder.is_dir():
        raise _translate(OSError(errno.ENOTDIR, "Not a directory"), path)


def _write_temp(folder: Path, final_name: str, write: Callable[[BinaryIO], None]) -> Path:
    """Write through `write` into a new hidden temporary file in `folder`, fsynced; removed again on any error."""
    while True:
        tmp = folder / f".{final_name[:60]}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as err:
            raise _translate(err, folder / final_name) from err
        break
    try:
        with os.fdopen(fd, "wb", buffering=_WRITE_BUFFER) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        _remove_quietly(tmp)
        raise _translate(err, folder / final_name) from err
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def publish_exclusive(tmp: Path, final: Path) -> bool:
    """Give the finished file `tmp` the name `final` unless that name exists (then False, `tmp` kept). Atomic.

    A hard link fails with EEXIST instead of replacing. Where links are unsupported (FAT, some network or FUSE
    file systems) the name is first reserved with an exclusive create, then the data is moved onto it.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in _LINK_UNSUPPORTED:
            raise
        try:
            os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        os.replace(tmp, final)
        return True
    os.unlink(tmp)
    return True


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Give the finished temporary file its final name; never replaces an existing file unless `overwrite`."""
    if overwrite:
        os.replace(tmp, final)
    elif not publish_exclusive(tmp, final):
        raise FileExistsError(errno.EEXIST, "File exists", os.fspath(final))


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], None],
    *,
    overwrite: bool = False,
    make_dirs: bool = False,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write a file through `write(f)` atomically; an existing file is never touched unless `overwrite`.

    `check(tmp_path)`, when given, inspects the finished temporary file and raises to stop publishing it.
    """
    final = Path(path)
    check_output_name(final.name)
    folder = final.parent
    _check_folder(folder, final, make_dirs)
    if not overwrite and os.path.lexists(final):
        raise _translate(OSError(errno.EEXIST, "File exists"), final)
    sweep_stale(folder)
    tmp = _write_temp(folder, final.name, write)
    try:
        if check is not None:
            check(tmp)
        _publish(tmp, final, overwrite)
    except OSError as err:
        _remove_quietly(tmp)
        raise _translate(err, final) from err
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_folder(folder)
    return final


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> Path:
    """`atomic_write` of ready bytes."""

    def write(f: BinaryIO) -> None:
        f.write(data)

    return atomic_write(path, write, overwrite=overwrite)


def _claim(tmp: Path, target: Path) -> bool:
    """Move a finished temp file or folder to `target` unless `target` exists (False then). Never overwrites."""
    if tmp.is_dir():
        try:
            target.mkdir()  # exclusive: fails when the name is taken
        except FileExistsError:
            return False
        for child in tmp.iterdir():
            os.replace(child, target / child.name)
        tmp.rmdir()
        return True
    return publish_exclusive(tmp, target)  # atomic, never replaces an existing file


def publish_group(
    folder: str | os.PathLike[str],
    base: str,
    writers: Sequence[tuple[str, Callable[[Path], Any]]],
    *,
    counter: int | None = None,
    max_tries: int = 1000,
    label: str | None = None,
) -> list[Path]:
    """Write files (or folders) sharing one counter, e.g. `.psd` + `.png`, named `{base}_{counter:05}_{suffix}`.

    The one counter-named publisher (ComfyUI's `filename_prefix_00001_` names). Each writer fills a path that does
    not exist yet in a hidden staging folder beside the targets; then every result is claimed exclusively, from
    `counter` (default: `next_counter`). On a collision with another process the ones already claimed are moved
    back and the next counter is tried. Never overwrites; an error leaves no partial file. `label` names the
    group in messages (default: `base`). Returns the published paths in `writers` order.
    """
    folder = Path(folder)
    label = base if label is None else label
    suffixes = [suffix for suffix, _ in writers]
    if len(set(suffixes)) != len(suffixes):
        raise ValueError(f"publish_group: suffixes must differ, got {suffixes}")
    counter = next_counter(folder, base) if counter is None else max(int(counter), 0)
    for suffix in suffixes:
        check_output_name(f"{base}_{counter:05}_{suffix}")
    sweep_stale(folder)  # leftovers of a writer killed mid-save (SIGKILL, power loss), ours only
    staging = make_staging(folder)
    try:
        tmps = [staging / f"{base}_{counter:05}_{suffix}" for suffix in suffixes]  # the planned names, for messages
        for tmp, (_, write) in zip(tmps, writers):
            write(tmp)
            if not tmp.exists():
                raise OutputPathError(f"internal error: the writer for {tmp.name!r} wrote nothing")
        for _ in range(max_tries):
            names = [f"{base}_{counter:05}_{suffix}" for suffix in suffixes]
            claimed: list[Path] = []
            for tmp, name in zip(tmps, names):
                if not _claim(tmp, folder / name):
                    break
                claimed.append(folder / name)
            else:
                _fsync_folder(folder)
                return claimed
            for path, tmp in zip(claimed, tmps):  # undo our partial group, then try the next counter
                os.replace(path, tmp)
            counter += 1
        raise OutputPathError(f"no free file name for {label!r} in {folder} after {max_tries} counters")
    except OSError as e:
        raise OutputPathError(
            f"could not write {label!r} into {folder}: {e.strerror or e}; check free space "
            "and permissions of the output folder"
        ) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_free(paths: Sequence[Path], *, overwrite: bool) -> None:
    """Fail before any work when an output name is unsafe, or exists and `overwrite` is off."""
    for p in paths:
        check_output_name(p.name)
        if p.is_dir():
            raise OutputPathError(f"output {os.fspath(p)!r} is a folder; give a file name")
        if not overwrite and os.path.lexists(p):
            raise OutputPathError(
                f"output {os.fspath(p)!r} already exists and was left untouched; pass --overwrite to replace it"
            )


# --- groups of files: all or nothing -------------------------------------------------------------------------

STAGING_PREFIX = ".qil-staging-"
STALE_AFTER_S = 6 * 3600  # our temporary files older than this are left over by a killed writer
_OUR_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def make_staging(folder: Path) -> Path:
    """A new hidden staging folder inside `folder` (same file system, so its files move in by rename)."""
    try:
        return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    except OSError as err:
        raise _translate(err, folder / STAGING_PREFIX) from err


def sweep_stale(folder: str | os.PathLike[str], *, older_than_s: float = STALE_AFTER_S) -> int:
    """Remove our own leftovers in `folder` (`.NAME.<12 hex>.tmp` files, `.qil-staging-*` folders) older than
    `older_than_s`, as a killed writer (SIGKILL, power loss) leaves them. Other files are never touched.
    Returns how many were removed; errors are logged and ignored."""
    removed, now = 0, time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        ours_dir = entry.name.startswith(STAGING_PREFIX) and entry.is_dir(follow_symlinks=False)
        ours_file = _OUR_TEMP.match(entry.name) is not None and entry.is_file(follow_symlinks=False)
        if not (ours_dir or ours_file):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than_s:
                continue  # may belong to a writer still running
            if ours_dir:
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError as err:
            log.debug("could not remove stale %s: %s", entry.path, err)
    if removed:
        log.info("removed %d stale temporary file(s) of an interrupted earlier run in %s", removed, folder)
    return removed


def _keep_copy(path: Path, backup: Path) -> None:
    """Keep the current `path` as `backup`: a hard link (no data copied), or a copy where links are unsupported."""
    try:
        os.link(path, backup)
    except OSError as err:
        if err.errno not in _LINK_UNSUPPORTED:
            raise
        shutil.copy2(path, backup)


def write_group(
    items: Sequence[tuple[str | os.PathLike[str], Callable[[Path], object]]],
    *,
    overwrite: bool = False,
    make_dirs: bool = False,
) -> list[Path]:
    """Write several files as one group: all appear (or replace their old versions), or none changes.

    Each `(path, write)` item's `write(staged)` fills `staged`, a path that does not exist yet inside a hidden
    staging folder beside the target (it may use `atomic_write` itself). Only when every file is written are they
    moved in, each by one rename; if a move fails, the ones already moved are undone. With `overwrite`, the
    old files are kept as hard links in the staging folder until the whole group is in place, so a failure at
    any point (disk full, Ctrl+C, a collision) leaves the old files byte-identical. Returns the final paths.
    """
    finals = [Path(p) for p, _ in items]
    if len({os.path.abspath(p) for p in finals}) != len(finals):
        raise OutputPathError(f"a group of outputs names one file twice: {[os.fspath(p) for p in finals]}")
    for final in finals:
        check_output_name(final.name)
        _check_folder(final.parent, final, make_dirs)
        if os.path.isdir(final):
            raise _translate(OSError(errno.EISDIR, "Is a directory"), final)
        if not overwrite and os.path.lexists(final):
            raise _translate(OSError(errno.EEXIST, "File exists"), final)
    stagings: dict[Path, Path] = {}
    done: list[tuple[Path, Path | None]] = []  # (final, backup of the old file or None) already moved in
    try:
        for final in finals:
            if final.parent not in stagings:
                sweep_stale(final.parent)
                stagings[final.parent] = make_staging(final.parent)
        staged = [stagings[f.parent] / f.name for f in finals]
        for (_, write), tmp in zip(items, staged):
            write(tmp)
            if not tmp.is_file():
                raise OutputPathError(f"internal error: the writer for {tmp.name!r} wrote nothing")
        for final, tmp in zip(finals, staged):
            backup = None
            if overwrite and os.path.lexists(final):
                backup = tmp.with_name(f".old.{final.name}")
                _keep_copy(final, backup)
            try:
                _publish(tmp, final, overwrite)
            except BaseException:
                if backup is not None:
                    os.unlink(backup)
                raise
            done.append((final, backup))
    except BaseException as exc:
        for final, backup in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, final)
                else:
                    os.unlink(final)
            except OSError as err:  # pragma: no cover - only when the folder itself broke meanwhile
                log.error("could not restore %s after a failed group write: %s", final, err)
        for staging in stagings.values():
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputPathError):
            raise _translate(exc, finals[len(done)] if len(done) < len(finals) else finals[-1]) from exc
        raise
    for staging in stagings.values():
        shutil.rmtree(staging, ignore_errors=True)
    for folder in stagings:
        _fsync_folder(folder)
    return finals
