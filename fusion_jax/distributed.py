"""Multi-process sweeps: `jax.distributed` set-up, and which groups each process trains.

Runs are independent, so processes need no collectives: group i of the plan goes to process
i % process_count, each process trains its groups on its own devices and writes their results
to the shared workdir, and process 0 waits for every group's file, then writes results.json.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

log = logging.getLogger("fusion_jax")


def initialize(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """Start jax.distributed when the config or the environment asks for several processes.

    Config fields win; otherwise JAX's own detection runs where a cluster environment is present
    (SLURM_JOB_ID with SLURM_NTASKS > 1, or JAX_COORDINATOR_ADDRESS). Returns (index, count).
    """
    d = config.distributed
    in_cluster = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in os.environ
    if d.num_processes > 1 or in_cluster:
        if not jax.distributed.is_initialized():
            jax.distributed.initialize(
                coordinator_address=d.coordinator_address or None,
                num_processes=d.num_processes if d.num_processes > 1 else None,
                process_id=d.process_id if d.process_id >= 0 else None,
                initialization_timeout=d.timeout_seconds)
        log.info("process %d of %d (%d local devices)", jax.process_index(), jax.process_count(),
                 jax.local_device_count())
    return jax.process_index(), jax.process_count()


def mine(items: list, index: int, count: int) -> list:
    """The items of process `index` out of `count`: every count-th from position index."""
    return items[index::count]
