"""Atomic file writes (a reader, or a restart after a kill, never sees a half-written file), and file hashes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from typing import IO, Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no lock, one process at a time
    fcntl = None


def safe_name(name: str) -> str:
    """`name` for a file or group name: every character but letters, digits and _ . = - as '_'."""
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", name)


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Exclusive among processes while the block runs: an flock on the file `path` (made if missing), which
    the system releases when a holder dies."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def blocked_at(path: str) -> str | None:
    """The nearest existing path at or above `path` (absolute) when it keeps a folder at `path` from being
    written, made if missing: a file, or a folder this user cannot write to; None when nothing does."""
    found = os.path.abspath(path)
    while not os.path.exists(found) and os.path.dirname(found) != found:
        found = os.path.dirname(found)
    return None if os.path.isdir(found) and os.access(found, os.W_OK | os.X_OK) else found


def unwritable_folder(path: str) -> str | None:
    """Why `path` (a command line's output folder) cannot be a folder to write into, made if missing, in words
    that follow the path; None when it can. An empty path is refused: it is what an unset variable gives."""
    if not path.strip():
        return "is empty (an unset variable?): give a folder"
    if (found := blocked_at(path)) is None:
        return None
    if found == os.path.abspath(path):
        return "is a folder this user cannot write to" if os.path.isdir(found) else "is a file, not a folder"
    return f"cannot be made: {found!r} is " + ("not writable" if os.path.isdir(found) else "a file")


# A write's errors that free space (or a writable file system) mends: a full disk, a quota, a read-only mount.
NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def made_folder(path: str) -> str | None:
    """Make `path` (a command line's output folder, passed by `unwritable_folder`) now, before any work: None
    once it exists, else why not in the same words (a read-only or special file system that permissions do
    not show, as /proc to root)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return f"cannot be made: {e.strerror or e}"
    return None


def sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _written_beside(path: str, write: Callable[[IO], None], binary: bool) -> str:
    """write(f) into a temporary file of this writer's own beside `path` (its folder made if missing), fsynced
    and readable by all (mkstemp makes 0600 files; results are for everyone to read); its path."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:  # (a read-only file system, a full one) named as the file being written, not its temporary one
        raise OSError(e.errno, e.strerror, path) from e
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, tmp):  # a write's names no file
            raise OSError(e.errno, e.strerror, path) from e
        raise
    return tmp


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """write(f) into a temporary file beside `path`, then rename it over `path`."""
    tmp = _written_beside(path, write, binary)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # an interrupt just after the rename
            os.unlink(tmp)
        raise


def atomic_create_json(path: str, obj: Any) -> bool:
    """Write `obj` to `path` as atomic_write_json does, unless `path` exists: of writers racing to create it,
    one wins and the others leave it as it is (a hard link, which fails where the name exists; on a file
    system without them, a check then a rename). True where this call created it."""
    tmp = _written_beside(path, lambda f: f.write(_json_text(obj)), False)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (EPERM, ENOTSUP): a narrow race remains
        if os.path.exists(path):
            return False
        os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, _json_text(obj))


def atomic_write_npz(path: str, arrays: dict[str, Any]) -> None:
    """Named arrays as np.savez writes them (numpy's .npz), atomically."""
    import numpy as np

    atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"
