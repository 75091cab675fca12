"""Atomic file writes (a reader, or a restart after a kill, never sees a half-written file), and file hashes."""

from __future__ import annotations

import contextlib
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


def sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """write(f) into a temporary file of this writer's own beside `path` (its folder made if missing),
    fsync it, make it readable by all (mkstemp makes 0600 files; results are for everyone to read),
    then rename it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
