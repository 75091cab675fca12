"""Batched, resumable extraction into the feature cache, with a progress bar."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from fusion_jax.features.cache import FeatureCache

log = logging.getLogger("fusion_jax")


def extract_cached(cache: FeatureCache, n: int, encode: Callable[[np.ndarray], dict[str, np.ndarray]],
                   batch_size: int, desc: str, batches_per_shard: int = 16,
                   after_shard: Callable[[], None] = lambda: None, poll_seconds: float = 0.5,
                   wait_seconds: float = 600.0) -> dict[str, np.ndarray]:
    """encode(indices [<= batch_size]) -> arrays [len(indices), ...] over 0..n-1, cached in `cache`.

    A finished entry of n items is reused; otherwise shards of `batches_per_shard` batches are written
    as they finish, and a rerun after an interruption (with the same batch size) computes only the
    missing shards. Processes extracting the entry at once compute the shards none of them has claimed,
    then wait for the others' (polling every `poll_seconds`): one whose process died, or that another
    process has held for `wait_seconds` since this one began to wait (stopped, hung), is computed here.
    after_shard() runs after each shard computed here is cached, and between polls: it may raise to stop there.
    """
    hit = cache.load(n)
    if hit is not None:
        log.info("%s: reusing cached features %s", desc, cache.dir)
        cache.tidy()
        return hit
    shard_size = batch_size * batches_per_shard
    pending = [(start, min(n, start + shard_size)) for start in range(0, n, shard_size)]
    bounds, seconds, computed = list(pending), 0.0, 0
    waiting: dict[tuple[int, int], float] = {}  # shards claimed by others: since when this process waits
    with tqdm(total=n, desc=desc, unit="item", dynamic_ncols=True) as bar:
        while pending:
            others = []  # shards that other processes sharing the cache are computing
            for start, stop in pending:
                with cache.lock():
                    finished = cache.finished()  # another process sharing the cache finished the entry meanwhile
                    have = not finished and cache.load_shard(start, stop) is not None
                    claim = None if finished or have else cache.claim_shard(start, stop)
                if finished:
                    return _finished_elsewhere(cache, n, desc)
                if have:
                    bar.update(stop - start)
                    continue
                if claim is None:  # another process computes it
                    first_wait = not waiting
                    if time.monotonic() - waiting.setdefault((start, stop), time.monotonic()) < wait_seconds:
                        if first_wait:
                            log.info("%s: waiting for the shards that other processes sharing the cache compute "
                                     "(items %d-%d: %s)", desc, start, stop - 1, cache.claimant(start, stop))
                        others.append((start, stop))
                        continue
                    log.warning("%s: items %d-%d, claimed by %s, are still not cached after %.0f s of waiting; "
                                "computing them here", desc, start, stop - 1, cache.claimant(start, stop), wait_seconds)
                    claim = contextlib.nullcontext()
                with claim:
                    t0, idx, parts = time.perf_counter(), np.arange(start, stop), []
                    for b in range(0, len(idx), batch_size):
                        parts.append(encode(idx[b:b + batch_size]))
                        bar.update(len(parts[-1][next(iter(parts[-1]))]))
                    with cache.lock():
                        if not cache.finished():  # else the next shard's check returns the finished entry
                            cache.save_shard(start, stop, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
                computed, seconds = computed + len(idx), seconds + time.perf_counter() - t0
                after_shard()
            if others:
                after_shard()
                time.sleep(poll_seconds)
            pending = others
    log.info("%s: %d of %d items computed here in %.1f s (%.1f per second), cached in %s", desc, computed, n, seconds,
             computed / max(seconds, 1e-9), cache.dir)
    with cache.lock():
        if not cache.finished():
            return cache.finish(bounds)
    return _finished_elsewhere(cache, n, desc)


def _finished_elsewhere(cache: FeatureCache, n: int, desc: str) -> dict[str, np.ndarray]:
    """The entry another process finished, read outside the entry's lock: the processes that waited for it
    read it at once, not one after another (nothing writes to a finished entry)."""
    done = cache.load(n)
    if done is None:
        raise RuntimeError(f"feature cache {cache.dir}: the entry another process finished does not verify, and "
                           "is removed; rerun to extract it again")
    log.info("%s: another process finished %s; reusing it", desc, cache.dir)
    return done
