"""The feature cache: arrays on disk keyed by what made them, verified by a content hash.

An entry lives in `<root>/<label>-<hash of key>/`: `key.json` (what made it), `features.npz` and
`meta.json` (its sha256). Extraction writes shards (`shards/00000.npz` + `.sha256`) as it goes,
so an interrupted extraction resumes from its last shard. A file whose hash does not match is
reported, deleted and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np

from fusion_jax.files import atomic_write_json, atomic_write_text

log = logging.getLogger("fusion_jax")


def default_root() -> str:
    """$FUSION_JAX_CACHE, else $XDG_CACHE_HOME/fusion_jax, else ~/.cache/fusion_jax."""
    if os.environ.get("FUSION_JAX_CACHE"):
        return os.environ["FUSION_JAX_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fusion_jax")


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> str:
    """Write arrays atomically; return the file's sha256."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return _sha256(path)


def _load_verified(path: str, digest_path: str) -> dict[str, np.ndarray] | None:
    """Arrays of `path` if its sha256 matches the one recorded; None (and both files gone) if not."""
    if not (os.path.exists(path) and os.path.exists(digest_path)):
        return None
    with open(digest_path) as f:
        want = f.read().strip()
    try:
        if _sha256(path) == want:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        log.warning("feature cache: cannot read %s (%s)", path, e)
    log.warning("feature cache: %s is corrupt (content hash mismatch); rebuilding it", path)
    for p in (path, digest_path):
        if os.path.exists(p):
            os.unlink(p)
    return None


class FeatureCache:
    """One cache entry for `key` (a JSON-able dict: dataset, backbone, model, revision, preprocessing...)."""

    def __init__(self, root: str, label: str, key: dict):
        self.key = key
        self.dir = os.path.join(root, f"{label}-{key_hash(key)}")
        self._final = os.path.join(self.dir, "features.npz")
        self._final_digest = os.path.join(self.dir, "features.sha256")

    def load(self) -> dict[str, np.ndarray] | None:
        """The finished entry, verified; None if absent or corrupt."""
        return _load_verified(self._final, self._final_digest)

    def _shard(self, i: int) -> tuple[str, str]:
        base = os.path.join(self.dir, "shards", f"{i:05d}")
        return base + ".npz", base + ".sha256"

    def load_shard(self, i: int) -> dict[str, np.ndarray] | None:
        return _load_verified(*self._shard(i))

    def save_shard(self, i: int, arrays: dict[str, np.ndarray]) -> None:
        os.makedirs(os.path.join(self.dir, "shards"), exist_ok=True)
        atomic_write_json(os.path.join(self.dir, "key.json"), self.key)
        path, digest = self._shard(i)
        atomic_write_text(digest, _save_npz(path, arrays))

    def finish(self, n_shards: int) -> dict[str, np.ndarray]:
        """Join shards 0..n_shards-1 into the final entry, drop the shards, return the arrays."""
        shards = [self.load_shard(i) for i in range(n_shards)]
        if any(s is None for s in shards):
            raise RuntimeError(f"feature cache {self.dir}: a shard vanished before it was joined")
        arrays = {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}
        atomic_write_text(self._final_digest, _save_npz(self._final, arrays))
        shutil.rmtree(os.path.join(self.dir, "shards"), ignore_errors=True)
        return arrays
