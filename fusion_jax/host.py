"""`on_host`: jax work that belongs on the host's CPU whatever device computes the sweep."""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax


def host_device() -> jax.Device | None:
    """The host's first CPU device, or None where jax has no CPU backend (JAX_PLATFORMS leaves it out)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


@contextlib.contextmanager
def on_host() -> Iterator[None]:
    """Run the jax operations inside on the host's CPU, where jax has one.

    For eager op-by-op work (the HF Flax classes initialise their weights so: hundreds of one-op programs
    even for a tiny model, each compiled apart, faster on a CPU than for a GPU) and for FLOP counts
    (XLA's GPU cost analysis leaves out the matmuls it hands to cuBLAS). On a CPU-only machine nothing changes;
    elsewhere random weights come out as such a machine draws them. Arrays made inside are uncommitted:
    a jitted call moves them to its device.
    """
    host = host_device()
    with jax.default_device(host) if host is not None else contextlib.nullcontext():
        yield
