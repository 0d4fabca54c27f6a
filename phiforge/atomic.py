"""Atomic file writes: a killed process never leaves a half-written file that looks complete.

Everything is written to a temporary sibling and then `os.replace`d into place (atomic on POSIX within one
filesystem). Directories are built under a temporary name and renamed at the end. Temporary names carry the
writer's pid (`.NAME.PID.XXXXXXXX.tmp`), so what a killed writer left behind can be told from a live one's
work: `remove_stale` clears it when the same command starts again on the same output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to `path`; on clean exit flush, fsync and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on clean exit it replaces `path` (an existing `path` is removed last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory mkdir's permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_name(path: str | os.PathLike, what: str = "drop") -> Path:
    """A temporary sibling name for `path` that `remove_stale` recognises (e.g. a directory renamed out of the way
    before it is deleted, so a kill mid-delete never leaves a half-deleted `path`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{what}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(parent: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove what killed atomic writes of `name` (a glob) left in `parent`: staging files and directories
    (`.NAME.PID.XXXXXXXX.tmp`) and replaced directories (`.NAME.old-PID`) whose process is gone (names from
    before pids were written are always stale). Returns what was removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for p in sorted(parent.glob(f".{name}.*.tmp")) + sorted(parent.glob(f".{name}.old-*")):
        if p.name.endswith(".tmp"):
            parts = p.name[: -len(".tmp")].rsplit(".", 2)
            pid = parts[1] if len(parts) == 3 else ""
        else:
            pid = p.name.rsplit(".old-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # a writer that is still at work
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed
