"""Multi-process sweeps: `jax.distributed` set-up, and which groups each process trains.

Runs are independent, so processes need no collectives: group i of the plan goes to process
i % process_count, each process trains its groups on its own devices and writes their results
to the shared workdir, and process 0 waits for every group's file, then writes results.json.
Before training, the processes tell each other whether their start-up worked (`checked_start`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import socket
from typing import Iterator

import jax
import ml_collections

log = logging.getLogger("fusion_jax")


def in_cluster() -> bool:
    """Whether the environment starts several processes (SLURM_NTASKS > 1, or JAX_COORDINATOR_ADDRESS)."""
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in os.environ


def initialize(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """Start jax.distributed when the config or the environment asks for several processes.

    Config fields win; otherwise JAX's own detection runs where a cluster environment is present
    (`in_cluster`), unless distributed.num_processes is 1. Returns (index, count).

    Devices: see `local_device_ids`.
    """
    d = config.distributed
    if d.num_processes > 1 or (d.num_processes == 0 and in_cluster()):
        if not jax.distributed.is_initialized():
            port = _coordinator_port(d)
            if port is not None:
                _refuse_a_taken_port(*port)
            # JAX's preemption service takes SIGTERM for a sync point of steps that every process
            # reaches; a sweep's processes checkpoint their own groups' epochs and never agree on one,
            # so SIGTERM (`kill`, a scheduler's cancel) was ignored. It now ends a process, as alone.
            jax.config.update("jax_enable_preemption_service", False)
            try:
                jax.distributed.initialize(
                    coordinator_address=d.coordinator_address or None,
                    num_processes=d.num_processes if d.num_processes > 1 else None,
                    process_id=d.process_id if d.process_id >= 0 else None,
                    local_device_ids=local_device_ids(),
                    initialization_timeout=int(d.timeout_seconds))
            except ValueError as e:
                if d.num_processes > 1:
                    raise
                # The environment asked for several processes, and no cluster JAX detects said how many.
                from fusion_jax.validate import ConfigError

                address = os.environ.get("JAX_COORDINATOR_ADDRESS")
                alone = f", or unset JAX_COORDINATOR_ADDRESS (={address}) to run alone" if address else ""
                raise ConfigError("distributed.num_processes", f"is 0 (from the cluster) and jax.distributed "
                                  f"cannot start: {e} Set distributed.num_processes, process_id and "
                                  f"coordinator_address{alone}") from e
        log.info("process %d of %d (%d local devices)", jax.process_index(), jax.process_count(),
                 jax.local_device_count())
    return jax.process_index(), jax.process_count()


def _coordinator_port(d: ml_collections.ConfigDict) -> tuple[int, str] | None:
    """(port, what chooses another) of the coordinator that this process is to start, where it is process 0:
    the config's, or under SLURM JAX's (JAX_COORDINATOR_PORT, else SLURM_JOB_ID % 4096 + 61440, which two
    jobs on one node can share); None otherwise (an address that is not HOST:PORT: jax.distributed says why)."""
    if d.coordinator_address:
        port = d.coordinator_address.rpartition(":")[2]
        return (int(port), "give each sweep a port of its own") if d.process_id == 0 and port.isdigit() else None
    env = os.environ
    if ("JAX_COORDINATOR_ADDRESS" in env or d.process_id > 0 or env.get("SLURM_PROCID") != "0"
            or not env.get("SLURM_JOB_ID", "").isdigit()):
        return None
    if env.get("JAX_COORDINATOR_PORT", "").isdigit():
        return int(env["JAX_COORDINATOR_PORT"]), "set JAX_COORDINATOR_PORT to another (free) port"
    return (int(env["SLURM_JOB_ID"]) % 4096 + 61440,
            f"JAX's port for SLURM job {env['SLURM_JOB_ID']}; set JAX_COORDINATOR_PORT to a free one")


def _refuse_a_taken_port(port: int, advice: str) -> None:
    """ConfigError when process 0 cannot have the coordinator's port: gRPC's server then crashed the process
    (a segfault), and the others waited out their timeout; a coordinator of another sweep on the port shares
    it, and the two sweeps' processes meet and kill each other."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):  # as gRPC binds: all addresses
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
            return
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                from fusion_jax.validate import ConfigError

                raise ConfigError("distributed.coordinator_address", f"port {port} is in use on this host (another "
                                  f"sweep's coordinator?): {advice}") from None
    # Neither family binds for another reason (no IPv6, say): jax.distributed says what it is.


def local_device_ids() -> list[int] | None:
    """[] (every device this process sees) where it is the only task on its node (SLURM_TASKS_PER_NODE
    all 1) or CUDA_VISIBLE_DEVICES shows it one device; else None: JAX's default, which under SLURM
    gives each task the device numbered like its rank on the node (right for one task per GPU, but
    one GPU per node for one task per node). JAX_LOCAL_DEVICE_IDS, when set, wins (None: JAX reads it)."""
    if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    per_node = os.environ.get("SLURM_TASKS_PER_NODE", "1")  # e.g. "1(x2)" or "4(x2),2"
    alone = all(part.split("(")[0].strip() == "1" for part in per_node.split(","))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [] if alone or (visible is not None and len(visible.split(",")) == 1) else None


_ends = itertools.count()


def wait_for_all(count: int, timeout_seconds: float) -> None:
    """With several processes, wait until every one has come here: a process that is done waits for the
    others rather than exit (at JAX's shutdown barrier, where it would wait otherwise, its client gives
    up after 5 minutes and aborts the process: results/multiprocess/)."""
    if count == 1:
        return
    from jax._src import distributed as jax_distributed

    jax_distributed.global_state.client.wait_at_barrier(f"fusion_jax/end/{next(_ends)}", int(timeout_seconds * 1000))


class PeerFailed(RuntimeError):
    """Another process of the sweep failed its start-up (data, workdir); this one stops with it."""


_starts = itertools.count()  # processes call checked_start in the same order: one key space per call


@contextlib.contextmanager
def checked_start(index: int, count: int, timeout_seconds: float) -> Iterator[None]:
    """Run this process's start-up (loading data, claiming the workdir) and share the outcome.

    With several processes, each posts "ok" or its error to the coordination service and reads
    everyone's before going on: a failure anywhere stops every process at once, each naming the
    failed ones, instead of leaving the others waiting for a process that has exited. The failed
    process re-raises its own error; the others raise PeerFailed.
    """
    if count == 1:
        yield
        return
    from jax._src import distributed as jax_distributed  # the key-value store of jax.distributed

    client, call = jax_distributed.global_state.client, next(_starts)
    own = None
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:  # a stop (Ctrl-C) too: the others then stop with it
        own = e
    client.key_value_set(f"fusion_jax/start/{call}/{index}",
                         "ok" if own is None else f"{type(own).__name__}: {own}".replace("\n", " ")[:2000])
    timeout_ms = int(timeout_seconds * 1000)
    statuses = [client.blocking_key_value_get(f"fusion_jax/start/{call}/{i}", timeout_ms) for i in range(count)]
    client.wait_at_barrier(f"fusion_jax/start/{call}", timeout_ms)  # all have read before any exits
    if own is not None:
        raise own
    failed = [f"process {i}: {status}" for i, status in enumerate(statuses) if status != "ok"]
    if failed:
        raise PeerFailed(f"{len(failed)} of {count} processes failed to start, so this one stops too; "
                         + "; ".join(failed))


def mine(items: list, index: int, count: int) -> list:
    """The items of process `index` out of `count`: every count-th from position index."""
    return items[index::count]
