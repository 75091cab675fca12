"""The feature cache: arrays on disk keyed by what made them, verified by a content hash.

An entry lives in `<root>/<label>-<hash of key>/`: `key.json` (what made it), `features.npz` and
`features.sha256`. Extraction writes shards (`shards/<start>-<stop>.npz` + `.sha256`, items
start..stop-1) as it goes, so an interrupted extraction resumes from its last shard (with the same
batch size: shards are named by their item ranges). A file whose hash does not match, or a shard or entry with the wrong number of
items, is reported, deleted and rebuilt, never used; what a kill leaves beside a finished entry (shards, a
temporary file) is removed when the entry is next reused. Processes that share the cache may extract the
same entry at once: they take turns (a file lock on the entry) to read and write its shards and to
join them, each computes the shards no other has claimed (`claim_shard`), and the first to finish
provides the entry to the others, who read it at once (a finished entry is only ever read).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
from typing import IO

import numpy as np

from fusion_jax.data.aligned import aligned_empty, npz_array
from fusion_jax.files import atomic_write_json, atomic_write_npz, atomic_write_text, fcntl, locked, sha256

log = logging.getLogger("fusion_jax")


def default_root() -> str:
    """$FUSION_JAX_CACHE, else $XDG_CACHE_HOME/fusion_jax, else ~/.cache/fusion_jax."""
    return default_root_and_origin()[0]


def default_root_and_origin() -> tuple[str, str]:
    """(default_root(), which of its three it is, as the docstring names it: for messages)."""
    if os.environ.get("FUSION_JAX_CACHE"):
        return os.environ["FUSION_JAX_CACHE"], "$FUSION_JAX_CACHE"
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.environ["XDG_CACHE_HOME"], "fusion_jax"), "$XDG_CACHE_HOME/fusion_jax"
    return os.path.join(os.path.expanduser("~/.cache"), "fusion_jax"), "~/.cache/fusion_jax"


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> str:
    """Write arrays atomically; return the file's sha256."""
    atomic_write_npz(path, arrays)
    return sha256(path)


def _load_verified(path: str, digest_path: str, n: int | None = None) -> dict[str, np.ndarray] | None:
    """Arrays of `path` if its sha256 matches the one recorded (and, given `n`, each array has n
    items); None (and both files gone) if not. An error of the system's while reading (an OSError
    with an errno other than a vanished file: EIO, a stale network handle, permissions) is raised as
    it is, the entry kept: it may be good."""
    if not (os.path.exists(path) and os.path.exists(digest_path)):
        return None
    try:
        with open(digest_path) as f:
            want = f.read().strip()
        if sha256(path) == want:
            with np.load(path) as z:
                arrays = {k: npz_array(z, k) for k in z.files}
            if n is None or (arrays and all(len(a) == n for a in arrays.values())):
                return arrays
            problem = f"holds {sorted({len(a) for a in arrays.values()})} items instead of {n}"
        else:
            problem = "content hash mismatch"
    except FileNotFoundError:
        return None  # removed meanwhile by a process that finished the same entry
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        problem = f"cannot read it: {e}"
    log.warning("feature cache: %s is corrupt (%s); rebuilding it", path, problem)
    for p in (path, digest_path):
        with contextlib.suppress(FileNotFoundError):  # another process found it corrupt too
            os.unlink(p)
    return None


class FeatureCache:
    """One cache entry for `key` (a JSON-able dict: dataset, backbone, model, revision, preprocessing...)."""

    def __init__(self, root: str, label: str, key: dict):
        self.key = key
        self.dir = os.path.join(root, f"{label}-{key_hash(key)}")
        self._final = os.path.join(self.dir, "features.npz")
        self._final_digest = os.path.join(self.dir, "features.sha256")

    def finished(self) -> bool:
        """Whether the final entry has been written (both files; not verified: see load)."""
        return os.path.exists(self._final_digest) and os.path.exists(self._final)

    def load(self, n: int | None = None) -> dict[str, np.ndarray] | None:
        """The finished entry, verified (given `n`: of n items); None if absent or corrupt."""
        return _load_verified(self._final, self._final_digest, n)

    def _left(self) -> list[str]:
        """What an extraction left in the entry's folder besides the entry: its shards, half-written files."""
        return sorted(n for n in os.listdir(self.dir) if n.startswith(".tmp-") or n == "shards")

    def tidy(self) -> None:
        """Remove what a killed extraction left beside the finished entry (its shards, a half-written
        file), which would only take space: under the lock, where nobody writes to a finished entry. An
        entry with nothing left is not locked, so that a cache this process may only read (read-only,
        another user's) serves it; one it cannot tidy is left as it is."""
        try:
            if not self._left():
                return
            with self.lock():
                if not self.finished():
                    return
                left = self._left()
                for name in left:
                    path = os.path.join(self.dir, name)
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
        except OSError as e:
            log.info("feature cache: cannot tidy %s (%s); the entry is used as it is", self.dir, e)
            return
        if left:
            log.info("feature cache: removed %s, left in %s by an interrupted extraction", ", ".join(left), self.dir)

    def lock(self) -> contextlib.AbstractContextManager:
        """Exclusive use of the entry's shards and files among processes (flock on `<entry>/.lock`):
        hold it around load_shard, save_shard and finish."""
        return locked(os.path.join(self.dir, ".lock"))

    def _shard(self, start: int, stop: int, suffixes: tuple[str, ...] = (".npz", ".sha256")) -> tuple[str, ...]:
        """The shard's files: its arrays and hash (or those of `suffixes`)."""
        return tuple(os.path.join(self.dir, "shards", f"{start:09d}-{stop:09d}{s}") for s in suffixes)

    def claim_shard(self, start: int, stop: int) -> IO | None:
        """This process's claim to compute the shard of items start..stop-1, so that processes sharing the cache
        split an entry's shards: an open file holding an flock (closing it releases the claim, as does the
        holder's death), or None while another holds it. Take it under lock(), once the shard is not on disk."""
        os.makedirs(os.path.join(self.dir, "shards"), exist_ok=True)
        claim = open(self._claim_path(start, stop), "a")
        if fcntl is not None:
            try:
                fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                claim.close()
                return None
        claim.truncate(0)
        claim.write(f"process {os.getpid()} on {socket.gethostname()}\n")  # for those who wait (claimant)
        claim.flush()
        return claim

    def _claim_path(self, start: int, stop: int) -> str:
        return self._shard(start, stop, (".claim",))[0]

    def claimant(self, start: int, stop: int) -> str:
        """Who holds the claim on a shard, as its claim file says ("process PID on HOST"), or "another process"."""
        try:
            with open(self._claim_path(start, stop)) as f:
                return f.read().strip() or "another process"
        except OSError:
            return "another process"

    def load_shard(self, start: int, stop: int) -> dict[str, np.ndarray] | None:
        """The shard of items start..stop-1, verified; None if absent or corrupt."""
        return _load_verified(*self._shard(start, stop), stop - start)

    def save_shard(self, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
        os.makedirs(os.path.join(self.dir, "shards"), exist_ok=True)
        atomic_write_json(os.path.join(self.dir, "key.json"), self.key)
        path, digest = self._shard(start, stop)
        atomic_write_text(digest, _save_npz(path, arrays))

    def finish(self, bounds: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Join the shards of `bounds` ((start, stop) in order, covering 0..n-1) into the final entry,
        drop the shards, return the arrays. Call it under lock(), once the entry is not `finished()`."""
        n = bounds[-1][1]
        arrays = None  # filled shard by shard: one shard in memory beside the entry, not all of them
        for start, stop in bounds:
            shard = self.load_shard(start, stop)
            if shard is None:
                raise RuntimeError(f"feature cache {self.dir}: a shard vanished before it was joined; rerun to "
                                   "extract it again")
            if arrays is None:
                arrays = {k: aligned_empty((n, *a.shape[1:]), a.dtype) for k, a in shard.items()}
            if {(k, a.shape[1:], a.dtype) for k, a in shard.items()} != {(k, a.shape[1:], a.dtype)
                                                                           for k, a in arrays.items()}:
                shutil.rmtree(os.path.join(self.dir, "shards"), ignore_errors=True)
                raise RuntimeError(f"feature cache {self.dir}: its shards hold different arrays (names, shapes or "
                                   "types: made by other code?); they are removed: rerun to extract them again")
            for k, a in shard.items():
                arrays[k][start:stop] = a
        atomic_write_text(self._final_digest, _save_npz(self._final, arrays))
        shutil.rmtree(os.path.join(self.dir, "shards"), ignore_errors=True)
        return arrays
