"""Multi-process sweeps: `jax.distributed` set-up, and which groups each process trains.

Runs are independent, so processes need no collectives: the i-th unfinished group of the plan goes to
process i % process_count, each process trains its groups on its own devices and writes their results
to the shared workdir, and process 0 waits for every group's file, then writes results.json.
Before training, the processes tell each other whether their start-up worked (`checked_start`);
a process that fails while training tells the others, and all wait for each other before they exit
(`failures_shared`, `wait_for_all`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Callable, Iterator, NoReturn

import jax
import ml_collections

from fusion_jax.config_base import ConfigError

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
    wanted = d.num_processes or (None if in_cluster() else 1)  # None: the cluster's count
    if jax.distributed.is_initialized() and (wanted not in (None, jax.process_count())
                                             or d.process_id not in (-1, jax.process_index())):
        asked = (f"process {d.process_id} of {wanted}" if d.process_id >= 0
                 else f"{wanted} process{'es' if wanted > 1 else ''}")
        field = "num_processes" if wanted not in (None, jax.process_count()) else "process_id"
        raise ConfigError(f"distributed.{field}",
                          f"asks for {asked}, but this Python process has joined a jax.distributed run already as "
                          f"process {jax.process_index()} of {jax.process_count()} (an earlier sweep in it, say), "
                          "which cannot be left: run this sweep in a new Python process")
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
            except RuntimeError as e:
                if "must be called before" not in str(e):
                    raise
                raise ConfigError("distributed.num_processes", "asks for several processes, but JAX has run in this "
                                  "Python process already, and jax.distributed starts only before that: run the sweep "
                                  "in a new Python process (the command line does)") from e
            except ValueError as e:
                if d.num_processes > 1:
                    raise
                # The environment asked for several processes, and no cluster JAX detects said how many.
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
                # As gRPC's listener: a port whose connections linger (TIME-WAIT, ~60 s after a coordinator
                # was killed) binds; one that a coordinator listens on does not.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
            return
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError("distributed.coordinator_address", f"port {port} is in use on this host (another "
                                  f"sweep's coordinator?): {advice}") from None
    # Neither family binds for another reason (no IPv6, say): jax.distributed says what it is.


def local_device_ids() -> list[int] | None:
    """[] (every device this process sees) where it is the only task on its node (SLURM_TASKS_PER_NODE
    all 1), where SLURM bound GPUs to each task (CUDA_VISIBLE_DEVICES shows it SLURM_GPUS_PER_TASK of them: its
    own) or CUDA_VISIBLE_DEVICES shows it one device; else None: JAX's default, which under SLURM
    gives each task the device numbered like its rank on the node (right for one task per GPU, but
    one GPU per node for one task per node, and past the end of a task's own GPUs where each has several).
    JAX_LOCAL_DEVICE_IDS, when set, wins (None: JAX reads it)."""
    if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    per_node = os.environ.get("SLURM_TASKS_PER_NODE", "1")  # e.g. "1(x2)" or "4(x2),2"
    alone = all(part.split("(")[0].strip() == "1" for part in per_node.split(","))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    per_task = os.environ.get("SLURM_GPUS_PER_TASK", "").rpartition(":")[2]  # "2", or typed: "a100:2"
    bound = per_task.isdigit() and visible is not None and len(visible.split(",")) == int(per_task)
    return [] if alone or bound or (visible is not None and len(visible.split(",")) == 1) else None


def _client():
    """The key-value store and barriers of jax.distributed (its coordination service)."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".replace("\n", " ")[:2000]


_sweep_call = 0  # the last checked_start's call: its sweep's key space (in step in every process)
stopped_in_step = False  # whether this process's last stop (Ctrl-C) came where every process stopped with it
_out_of_step = False  # this process leaves while the others may still work, or another has left so


def leaving_in_step() -> None:
    """Say that this process stops where every process stops with it (all came to the end of the sweep), so
    that `leave` exits through JAX's shutdown barrier, in step with them."""
    global stopped_in_step
    stopped_in_step = True


def _set_once(client, key: str) -> None:
    """Post `key` (a mark: "1") where it may have been posted already (the store refuses to overwrite)."""
    client.key_value_set(key, "1", allow_overwrite=True)


def _leaving(index: int) -> None:
    """This process leaves its sweep before the others are done: it exits at once (`leave`), and tells the
    others, which then stop waiting for it (`wait_for_all`) and leave at once too."""
    global _out_of_step
    _out_of_step = True
    _set_once(_client(), f"fusion_jax/end/{_sweep_call}/gone/{index}")


def _posted(client, prefix: str) -> dict[int, str]:
    """{process: value} of the keys `<prefix><process>` posted so far."""
    return {int(k[len(prefix):]): v for k, v in client.key_value_dir_get(prefix) if k[len(prefix):].isdigit()}


def _poll(client, prefix: str, count: int, deadline: float, waited_out: Callable[[], NoReturn],
          between: Callable[[], bool] | None = None) -> dict[int, str]:
    """`_posted(prefix)` once all `count` processes have posted, polling (a blocking call would hold off
    Ctrl-C, even a second one). between(): called between looks; True ends the wait early ({} returned).
    waited_out() raises once `deadline` has passed."""
    while len(posted := _posted(client, prefix)) < count:
        if between is not None and between():
            return {}
        if time.monotonic() > deadline:
            waited_out()
        time.sleep(0.5)
    return posted


def _waited_out_in_start_up() -> NoReturn:
    global _out_of_step
    _out_of_step = True
    raise WaitedOut("the other processes' start-up did not come within distributed.wait_seconds")


def share_failure(index: int, count: int, error: BaseException) -> None:
    """Tell the other processes that this one failed after its start-up (they finish their own groups, then
    stop naming it: `peer_failures`)."""
    if count > 1:
        _client().key_value_set(f"fusion_jax/end/{_sweep_call}/failed/{index}", _one_line(error))


def peer_failures(index: int, count: int) -> list[str]:
    """'process I: <error>' for each other process that has shared a failure in this sweep (`share_failure`)."""
    if count == 1:
        return []
    posted = _posted(_client(), f"fusion_jax/end/{_sweep_call}/failed/")
    return [f"process {i}: {error}" for i, error in sorted(posted.items()) if i != index]


class WaitedOut(TimeoutError):
    """The other processes did not come within distributed.wait_seconds."""


def share_stop(index: int) -> None:
    """Tell the other processes that this one was stopped (Ctrl-C): they stop before their next epoch too
    (`_PeerStops`), and all leave together."""
    _set_once(_client(), f"fusion_jax/end/{_sweep_call}/stopped/{index}")


def peers_stopped(index: int) -> list[int]:
    """The other processes that were stopped in this sweep (`share_stop`)."""
    return sorted(set(_posted(_client(), f"fusion_jax/end/{_sweep_call}/stopped/")) - {index})


class _PeerStops:
    """A thread that tells the others at once when this process is stopped (`stop`; not only once its epoch
    in progress is done), and sets `stop` once another process was stopped, so that this one stops before
    its next epoch too (or leaves its wait for the others' groups)."""

    def __init__(self, index: int, stop: threading.Event):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(index, stop), daemon=True,
                                        name="fusion_jax-peer-stops")
        self._thread.start()

    def _watch(self, index: int, stop: threading.Event) -> None:
        try:
            while not self._done.wait(0.5):
                if not stop.is_set() and (others := peers_stopped(index)):
                    log.warning("process %s was stopped (Ctrl-C): process %d stops too, before its next epoch",
                                ", ".join(map(str, others)), index)
                    stop.set()
                if stop.is_set():
                    share_stop(index)
                    return
        except RuntimeError as e:  # the coordination service failing (JaxRuntimeError): the sweep's calls meet it too
            log.warning("process %d: the coordination service failed (%s: %s); from now on a Ctrl-C of another "
                        "process does not reach this one, nor this one's the others", index, type(e).__name__,
                        str(e)[:300])

    def close(self) -> None:
        self._done.set()
        self._thread.join()


def wait_for_all(index: int, count: int, timeout_seconds: float, stop: threading.Event | None = None) -> list[str]:
    """With several processes, wait until every one has come here, and return `peer_failures`: a process that
    is done, or has failed, waits for the others rather than exit (at JAX's shutdown barrier, where it would
    wait otherwise, its client gives up after 5 minutes and aborts the process: results/multiprocess/; and a
    process gone before the others are done makes JAX abort them once it misses its heartbeats).

    Polls (a blocking call would hold off Ctrl-C). A Ctrl-C meanwhile (`stop`) is shared (`share_stop`): the
    others stop before their next epoch and come; a second one ends this process (SIGINT's default).
    WaitedOut comes after `timeout_seconds`: the others are told (`_leaving`), and a process told so stops
    waiting and leaves at once too (`leave`)."""
    global _out_of_step
    if count == 1:
        return []
    client, end = _client(), f"fusion_jax/end/{_sweep_call}/"
    client.key_value_set(f"{end}here/{index}", "1")

    def between() -> bool:
        if stop is not None and stop.is_set():
            share_stop(index)
        return bool(set(_posted(client, f"{end}gone/")) - {index})

    def waited_out() -> NoReturn:
        _leaving(index)
        raise WaitedOut(f"the other processes did not finish within distributed.wait_seconds={timeout_seconds:g} s "
                        "(one may have ended without telling: killed, or a second Ctrl-C)")

    _poll(client, f"{end}here/", count, time.monotonic() + timeout_seconds, waited_out, between)
    # One that came here and left (or never came), told: JAX's shutdown barrier would wait for it. (One told
    # between another's last look and this one's is missed: that one then meets JAX's abort.)
    if set(_posted(client, f"{end}gone/")) - {index}:
        _out_of_step = True
    return peer_failures(index, count)


def leave(code: int, interrupted: bool = False) -> NoReturn:
    """Exit with `code`: through JAX's shutdown barrier (sys.exit) where every process comes to it together; at
    once (os._exit) where this process leaves out of step with the others (`interrupted` after a shared
    start-up, waited out), or another has left so: that barrier would wait 5 minutes for them, then abort."""
    if jax.distributed.is_initialized() and (_out_of_step or (interrupted and not stopped_in_step)):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class Stopped(KeyboardInterrupt):
    """The sweep stopped between epochs (or shards of extracted features), or while waiting for the other
    processes, because it was asked to (`stop`, Ctrl-C on the command line)."""


class PeerFailed(RuntimeError):
    """Another process of the sweep failed (its start-up, or while training); this one stops with it."""


@contextlib.contextmanager
def failures_shared(index: int, count: int, timeout_seconds: float,
                    stop: threading.Event | None = None) -> Iterator[None]:
    """Around a process's training. An error in it is shared with the others (`share_failure`), which
    finish their own groups and then stop naming it, while this process waits for them (`wait_for_all`)
    and then raises its own error; process 0's WaitedOut (the others' groups missing after
    `timeout_seconds`) is shared without a second wait. A stop (Ctrl-C, Stopped) in any process stops every
    process before its next epoch (`share_stop`, `_PeerStops`), and all leave together."""
    global stopped_in_step
    if count == 1:
        yield
        return
    peers = _PeerStops(index, stop) if stop is not None else None
    try:
        yield
    except KeyboardInterrupt as e:
        share_stop(index)
        log.error("process %d of %d stopped (%s); it waits for the others to stop after their current epoch (a "
                  "second Ctrl-C ends it at once)", index, count, _one_line(e)[:300])
        wait_for_all(index, count, timeout_seconds)  # every process leaves here: JAX's shutdown is in step
        stopped_in_step = not _out_of_step
        raise
    except Exception as e:
        if not isinstance(e, PeerFailed):
            share_failure(index, count, e)
        if isinstance(e, WaitedOut):  # waited already: this process leaves, and the others with it
            _leaving(index)
            raise
        log.error("process %d of %d %s; it waits for the other processes to finish their groups (up to %g s) "
                  "before it exits, as they would be ended with it", index, count,
                  "stops" if isinstance(e, PeerFailed) else f"failed ({_one_line(e)[:300]})", timeout_seconds)
        try:
            others = wait_for_all(index, count, timeout_seconds, stop)
        except Exception as waiting:  # noqa: BLE001 - this process's own error is the one to raise
            log.error("process %d: waiting for the other processes ended with %s", index, _one_line(waiting))
        else:
            if others and not isinstance(e, PeerFailed):
                log.error("other processes failed too: %s", "; ".join(others))
        raise
    finally:
        if peers is not None:
            peers.close()


_starts = itertools.count()  # processes call checked_start in the same order: one key space per call
_starting: tuple[int, int] | None = None  # (call, count) while this process is in checked_start


@contextlib.contextmanager
def checked_start(index: int, count: int, timeout_seconds: float,
                  stop: threading.Event | None = None) -> Iterator[dict]:
    """Run this process's start-up (loading data, claiming the workdir) and share the outcome.

    With several processes, each posts "ok" or its error to the coordination service and reads
    everyone's before going on: a failure anywhere stops every process, each naming the failed ones,
    instead of leaving the others waiting for a process that has exited. The failed process says so at
    once, and the others stop at their next `raise_if_a_peer_failed_to_start` (after each shard of
    features they extract) or at the end of their start-up. The failed process re-raises its own error;
    the others raise PeerFailed. A stop (`stop`, Ctrl-C) while waiting for the others' start-up counts
    as a failure of this process's: all leave together.

    Yields a dict that process 0 may fill (JSON): once the start-up has passed, every process holds
    process 0's (one view of the shared workdir for all).
    """
    global _starting, stopped_in_step, _sweep_call, _out_of_step
    shared: dict = {}
    stopped_in_step = _out_of_step = False
    if count == 1:
        yield shared
        return
    client, call = _client(), next(_starts)
    own, _starting, _sweep_call = None, (call, count), call
    try:
        yield shared
    except (Exception, KeyboardInterrupt) as e:  # a stop (Ctrl-C) too: the others then stop with it
        own = e
        if not isinstance(e, PeerFailed):
            what = "was stopped during its start-up" if isinstance(e, KeyboardInterrupt) else "failed to start"
            log.error("process %d of %d %s (%s); the others stop at their next shard of features or at the end of "
                      "their start-up, and this process waits for that", index, count, what, _one_line(e))
    finally:
        _starting = None
    if index == 0 and own is None:  # before its status: an "ok" from process 0 says that this is there
        client.key_value_set(f"fusion_jax/start-shared/{call}", json.dumps(shared))
    client.key_value_set(f"fusion_jax/start/{call}/{index}", "ok" if own is None else _one_line(own))
    deadline, stopped = time.monotonic() + timeout_seconds, f"fusion_jax/start-stopped/{call}/"

    def mark_a_stop() -> bool:  # a stop while waiting, or in the start-up's last moments: posted (again) here
        if stop is not None and stop.is_set():
            _set_once(client, f"{stopped}{index}")
        return False

    statuses = _poll(client, f"fusion_jax/start/{call}/", count, deadline, _waited_out_in_start_up, mark_a_stop)
    mark_a_stop()
    client.key_value_set(f"fusion_jax/start-read/{call}/{index}", "1")  # all have read before any leaves
    # All statuses are in: the others read them within moments (a grace, should this one's wait be nearly out).
    _poll(client, f"fusion_jax/start-read/{call}/", count, max(deadline, time.monotonic() + 60),
          _waited_out_in_start_up)
    for i in _posted(client, stopped):  # posted before that process's read key: every process sees it
        if statuses[i] == "ok":
            statuses[i] = "Stopped: stopped while waiting for the other processes' start-up"
        if i == index and own is None:
            own = Stopped("stopped while waiting for the other processes' start-up")
    if own is not None:
        stopped_in_step = isinstance(own, KeyboardInterrupt)  # every process leaves here: none is left waiting
        raise own
    _raise_if_failed([statuses[i] for i in range(count)], count)
    if index != 0:
        shared.update(json.loads(client.blocking_key_value_get(f"fusion_jax/start-shared/{call}", 60_000)))


def raise_if_a_peer_failed_to_start() -> None:
    """Inside `checked_start`: PeerFailed once another process has posted a failed start-up, so that a long
    start-up (feature extraction) stops within a shard rather than at its end."""
    if _starting is not None:
        call, count = _starting
        posted = _posted(_client(), f"fusion_jax/start/{call}/")
        for i in _posted(_client(), f"fusion_jax/start-stopped/{call}/"):  # stopped while waiting for this one
            posted[i] = "Stopped: stopped while waiting for the other processes' start-up"
        _raise_if_failed([posted.get(i, "ok") for i in range(count)], count)


def _raise_if_failed(statuses: list[str], count: int) -> None:
    """PeerFailed naming the processes whose start-up status is not "ok" (those that stopped only because
    another failed are named only when no other is)."""
    failed = [f"process {i}: {status}" for i, status in enumerate(statuses) if status != "ok"]
    first = [f for f in failed if ": PeerFailed: " not in f] or failed
    if first:
        raise PeerFailed(f"{len(first)} of {count} processes failed to start, so this one stops too; "
                         + "; ".join(first))


def mine(items: list, index: int, count: int) -> list:
    """The items of process `index` out of `count`: every count-th from position index."""
    return items[index::count]
