"""JAX's persistent compilation cache for a block of work, and its hits and misses.

A sweep or benchmark given a folder loads the programs an earlier run compiled there (the same
programs: the same bits) instead of compiling them again.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache


@contextlib.contextmanager
def cache_events() -> Iterator[dict[str, int]]:
    """JAX's persistent compilation cache while the block runs, counted with jax.monitoring: {hits,
    misses}, filled when the block ends; a miss is a compilation that looked in the cache in vain."""
    counts, lock = {"requests": 0, "hits": 0}, threading.Lock()
    names = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
             "/jax/compilation_cache/cache_hits": "hits"}

    def listen(event: str, **_) -> None:
        if event in names:
            with lock:  # compile worker threads report too
                counts[names[event]] += 1

    out = {"hits": 0, "misses": 0}
    jax.monitoring.register_event_listener(listen)
    try:
        yield out
    finally:
        jax.monitoring.unregister_event_listener(listen)
        out.update(hits=counts["hits"], misses=counts["requests"] - counts["hits"])


@contextlib.contextmanager
def persistent_cache(folder: str | None) -> Iterator[None]:
    """JAX's persistent compilation cache at `folder` for every program compiled in the block, however
    short its compilation; None: no persistent cache in the block, whatever the process's setting
    (so a benchmark without one always compiles). The process's setting is back afterwards."""
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    try:
        if folder is None:
            jax.config.update("jax_enable_compilation_cache", False)
        else:
            jax.config.update("jax_enable_compilation_cache", True)
            compilation_cache.set_cache_dir(folder)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        compilation_cache.reset_cache()  # takes effect even after earlier compilations in this process
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
