"""Atomic file writes: temporary name, fsync, ``os.replace``, fsync of the folder.

The bottom layer of the package (no eegfast imports), shared by data preparation, training and
the benchmark reports. A crash or kill at any point leaves either the old file or the new one,
never a partial file; a killed writer's temporary (``.<name>.tmp-XXXX`` beside the target) is
found by :func:`is_temporary` and removed by :func:`remove_stale_temporaries`.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# numpy is imported by the one writer that needs it: `eegfast bench --help` imports this
# module without needing numpy
if TYPE_CHECKING:
    import numpy as np

TMP_MARK = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp makes files 0600


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def is_temporary(path: str | Path) -> bool:
    """Whether ``path`` is the temporary of an unfinished :func:`write_atomic`."""
    name = Path(path).name
    return name.startswith(".") and TMP_MARK in name


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)``, fsync it, then rename it over ``path`` (returned). What
    ``write`` returns is ignored (``Path.write_text`` returns a count).

    The file gets the permissions a plain ``open()`` would give it: those of the file it
    replaces (a private 0600 file stays private), else 0666 less the umask. An OSError (disk
    full, no permission) names ``path``: a write's own error names no file, or the deleted
    temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}")
    os.close(fd)
    try:
        write(Path(tmp))
        fsync_file(tmp)
        try:  # (open() on an existing file keeps its mode)
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = _FILE_MODE
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        named = None  # (made while the temporary still holds the space it filled)
        # only the plain OSError of an errno: a subclass of another kind keeps its type
        if (
            isinstance(err, OSError)
            and err.filename in (None, tmp)
            and type(err) is type(OSError(err.errno, ""))
        ):
            named = _naming(path, err)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if named is not None:
            raise named from err
        raise
    fsync_dir(path.parent)
    return path


def _naming(path: str | Path, err: OSError) -> OSError:
    """``err``, a failed write of ``path``, as an OSError that names ``path``: the same errno
    (and subclass: PermissionError...), or, without one (numpy's short write to a full disk:
    "N requested and M written"), its message and the space left there."""
    if err.errno is not None:
        return OSError(err.errno, err.strerror, str(path))
    return OSError(f"{path}: cannot write it ({err}{free_space_note(Path(path).parent)})")


def free_space_note(folder: str | Path) -> str:
    """``"; N bytes free on its disk"`` for a failed write's message (the likely cause of a write
    that failed without an errno is a full disk), or ``""`` where the disk cannot be asked."""
    try:
        return f"; {shutil.disk_usage(folder).free} bytes free on its disk"
    except OSError:
        return ""


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(
    path: str | Path,
    payload: Any,
    *,
    indent: int = 2,
    default: Callable[[Any], Any] | None = str,
) -> Path:
    """``payload`` as JSON; values JSON cannot hold go through ``default`` (``str``: paths,
    dtypes in reports), or raise TypeError with ``default=None``."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, default=default) + "\n")


def write_npy_atomic(path: str | Path, array: np.ndarray) -> Path:
    """``array`` as a .npy file (read back with ``np.load(mmap_mode=...)``), no pickles.

    One sequential write of header and data. (Filling a memory map of the temporary instead
    costs an extra msync per file.)
    """
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    return write_atomic(path, write)


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporaries that killed writers left in ``folder``; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in folder.iterdir():
        if is_temporary(p) and p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def unwritable_reason(folder: str | Path) -> str | None:
    """Why files cannot be created in ``folder`` (created with its parents if missing), or
    None when they can. Nothing is left behind: a missing folder is judged by its nearest
    existing ancestor, and the probe file is removed at once. The check tries a real file,
    not ``os.access``, which says yes to root on folders the kernel still refuses (``/sys``)."""
    folder = Path(folder)
    probe = folder
    try:
        while not probe.exists():  # `ancestor/missing/...`: mkdir would start in `ancestor`
            if probe.parent == probe:
                break
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            return f"{probe} is not a folder"
    except OSError as err:  # Path.exists raises for EACCES (a folder not to enter), ENAMETOOLONG
        return f"cannot look up {probe} ({err.strerror or err})"
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=f".probe{TMP_MARK}")
    except OSError as err:
        return f"cannot write in {probe} ({err.strerror or err})"
    os.close(fd)
    os.unlink(tmp)
    return None
