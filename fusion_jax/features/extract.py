"""Batched, resumable extraction into the feature cache, with a progress bar."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from fusion_jax.features.cache import FeatureCache

log = logging.getLogger("fusion_jax")


def extract_cached(cache: FeatureCache, n: int, encode: Callable[[np.ndarray], dict[str, np.ndarray]],
                   batch_size: int, desc: str, batches_per_shard: int = 16) -> dict[str, np.ndarray]:
    """encode(indices [<= batch_size]) -> arrays [len(indices), ...] over 0..n-1, cached in `cache`.

    A finished entry is reused; otherwise shards of `batches_per_shard` batches are written as they
    finish, and a rerun after an interruption computes only the missing shards.
    """
    hit = cache.load()
    if hit is not None:
        log.info("%s: reusing cached features %s", desc, cache.dir)
        return hit
    shard_size = batch_size * batches_per_shard
    n_shards = math.ceil(n / shard_size)
    seconds, computed = 0.0, 0
    with tqdm(total=n, desc=desc, unit="item", dynamic_ncols=True) as bar:
        for i in range(n_shards):
            idx = np.arange(i * shard_size, min(n, (i + 1) * shard_size))
            if cache.load_shard(i) is not None:
                bar.update(len(idx))
                continue
            t0, parts = time.perf_counter(), []
            for start in range(0, len(idx), batch_size):
                parts.append(encode(idx[start:start + batch_size]))
                bar.update(len(parts[-1][next(iter(parts[-1]))]))
            cache.save_shard(i, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
            computed, seconds = computed + len(idx), seconds + time.perf_counter() - t0
    log.info("%s: %d of %d items computed in %.1f s (%.1f per second), cached in %s", desc, computed, n, seconds,
             computed / max(seconds, 1e-9), cache.dir)
    return cache.finish(n_shards)
