"""Groups: runs that share one compiled program, from the plan to the programs.

A group is one (backbone, method) of the sweep (`plan`); its runs are all scales x seeds x
degradation levels, each run carrying its own pairs (see train.py). `build_program` lays a group's
runs out on the devices in chunks (`layout`) and compiles its three programs (init, train_epoch,
evaluate) from shapes alone; `CompiledAhead` builds the groups in worker threads while earlier
groups train. On a CPU with one device, `Lanes` trains shares of the chunks side by side.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from fusion_jax.data import FeatureSet, Pairs, build_pairs
from fusion_jax.files import safe_name
from fusion_jax.programs import Later, ProgramCache
from fusion_jax.train import Trainer, make_train, pair_arrays, run_key, steps_per_epoch
from fusion_jax.validate import ConfigError

log = logging.getLogger("fusion_jax")


class NonFinite(FloatingPointError):
    """A group's features or training loss hold NaN or Inf; the message names the group and runs."""


class FeaturesTooLarge(MemoryError):
    """A backbone's feature arrays alone exceed a device's memory: none of its groups can train there."""


def own_failure(error: BaseException | None) -> bool:
    """Whether `error` is XLA's failing to compile or run a group's programs (out of memory, say; also where a
    compilation's error is wrapped as its cause), which fails that group alone. Anything else (the workdir, a
    callback, a bug) is the sweep's."""
    while error is not None and not isinstance(error, ConfigError):  # the workdir's, whatever its cause
        if isinstance(error, (MemoryError, jax.errors.JaxRuntimeError)):
            return True
        error = error.__cause__
    return False


@dataclasses.dataclass(frozen=True)
class RunSpec:
    backbone: str
    method: str
    scale: int
    seed: int
    kind: str
    level: float


@dataclasses.dataclass(frozen=True)
class Group:
    """Runs that share one compiled program: the same backbone and method."""

    backbone: str
    method: str
    runs: tuple[RunSpec, ...]
    part: tuple[int, int] | None = None  # (index, count) when max_runs_per_program split the group
    scale: int | None = None  # the one scale of its runs, when split_by_scale split the group

    @property
    def name(self) -> str:
        scale = "" if self.scale is None else f"-s{self.scale}"
        part = "" if self.part is None else f"-part{self.part[0] + 1}of{self.part[1]}"
        return safe_name(f"{self.backbone}-{self.method}{scale}{part}")

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(sorted({r.scale for r in self.runs}))

    @property
    def noisy(self) -> bool:
        """Whether a run has a nonzero noise level: only then does the group's program draw noise."""
        return any(r.level != 0 for r in self.runs)


def plan(config: ml_collections.ConfigDict) -> list[Group]:
    """The sweep's groups, in a fixed order; each holds scales x seeds x degradation levels (level 0
    alone for a backbone or scale outside a non-empty `degradation.backbones` or `degradation.scales`),
    or with `split_by_scale` the seeds x levels of one scale."""
    d = config.degradation
    noisy = lambda b, s: (not d.backbones or b in d.backbones) and (not d.scales or s in d.scales)
    groups = [Group(b, m, tuple(RunSpec(b, m, s, seed, d.kind, float(level))
                                for s in config.scales for seed in config.seeds
                                for level in (d.levels if noisy(b, s) else (0.0,))))
              for b in config.backbones for m in config.methods]
    if config.split_by_scale:
        groups = split_by_scale(groups)
    cap = config.max_runs_per_program
    if cap and any(len(g.runs) > cap for g in groups):
        log.info("max_runs_per_program=%d: splitting groups of more runs into programs of at most %d", cap, cap)
        groups = [dataclasses.replace(g, runs=g.runs[i:i + cap], part=(i // cap, -(-len(g.runs) // cap)))
                  for g in groups for i in range(0, len(g.runs), cap)]
    return groups


def split_by_scale(groups: list[Group]) -> list[Group]:
    """Each group as one group per scale of its runs, in scale order (config.split_by_scale)."""
    return [dataclasses.replace(g, runs=tuple(r for r in g.runs if r.scale == s), scale=s)
            for g in groups for s in g.scales]


def group_pairs(config: ml_collections.ConfigDict, group: Group, features: FeatureSet) -> dict[int, Pairs]:
    """The pairs of each scale of `group`, with a NonFinite error for features they would read (row 0
    too: padding pairs read it, with zero weight, and 0 x NaN is NaN)."""
    pairs = {s: build_pairs(features.caption_image, features.n_images, s, **config.pairs) for s in group.scales}
    for name, x in (("image", features.image), ("text", features.text)):
        rows = np.unique(np.concatenate([[0]] + [p.image_idx if name == "image" else p.caption_idx
                                                 for p in pairs.values()]))
        bad = rows[~np.isfinite(x[rows]).reshape(len(rows), -1).all(axis=1)]
        if len(bad):
            raise NonFinite(f"group {group.name}: {name} features of backbone {group.backbone!r} hold NaN or Inf "
                            f"(rows {bad[:5].tolist()}{'...' if len(bad) > 5 else ''}); every run of the group stops")
    return pairs


def stack_runs(runs: tuple[RunSpec, ...], pairs: dict[int, Pairs]) -> dict:
    """Per-run values of a group as stacked host arrays: key [runs, 2], noise_level [runs],
    n_train / n_val [runs], train / val {image_idx, caption_idx, label} [runs, largest split]."""
    n_train = {s: p.n_train for s, p in pairs.items()}
    max_train, max_val = max(n_train.values()), max(s - n for s, n in n_train.items())
    split = lambda name, size: {k: np.stack([pair_arrays(pairs[r.scale].split(name), size)[k] for r in runs])
                                for k in ("image_idx", "caption_idx", "label")}
    keys = jax.vmap(run_key)(np.asarray([r.seed for r in runs]), np.asarray([r.scale for r in runs]))
    return {"key": np.asarray(keys),
            "noise_level": np.asarray([r.level for r in runs], np.float32),
            "n_train": np.asarray([n_train[r.scale] for r in runs], np.int32),
            "n_val": np.asarray([r.scale - n_train[r.scale] for r in runs], np.int32),
            "train": split("train", max_train), "val": split("val", max_val)}


def group_data(features: FeatureSet, sharding: NamedSharding | None = None) -> dict:
    """What every run reads: the feature arrays (and token masks), put on the device(s) once (with
    `sharding`, e.g. replicated over a mesh)."""
    return jax.device_put(features.arrays(), sharding)


def device_memory(device: jax.Device) -> int | None:
    """The bytes a device's allocator can hold (`bytes_limit` of its memory_stats), or None where it says nothing
    (a CPU; a plugin that fails to say)."""
    try:
        return (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - a backend's own error: the check is skipped, as where none is reported
        return None


def check_fits(group: Group, features: FeatureSet, devices: Any) -> None:
    """Raise FeaturesTooLarge, before anything compiles, where the group's features (which every device holds
    whole: `group_data`) exceed a device's memory (`device_memory`)."""
    arrays = features.arrays()
    need = sum(a.nbytes for a in arrays.values())
    for device in devices:
        limit = device_memory(device)
        if limit is not None and need > limit:
            size = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"
            parts = ", ".join(f"{name} {list(a.shape)} {a.dtype}: {size(a.nbytes)}" for name, a in arrays.items())
            raise FeaturesTooLarge(
                f"group {group.name}: the features of backbone {group.backbone!r} take {size(need)} ({parts}) and "
                f"device {device} holds at most {size(limit)}: every device holds them whole, so no group of this "
                "backbone can train there (smaller features: pooled, or fewer tokens; or devices with more memory: "
                "launch/README.md, 'Memory')")


def run_mesh() -> Mesh:
    """A 1-D mesh over this process's devices; a group's run axis is sharded over it."""
    return Mesh(np.array(jax.local_devices()), ("runs",))


def runs_per_chunk(config: ml_collections.ConfigDict, on_cpu: bool) -> int:
    """Runs a device steps together: config.runs_per_chunk, or (0) 2 on CPUs and 0 (all its runs) on
    accelerators. A CPU trains fastest when a chunk's parameters and moments stay in its cache."""
    if config.runs_per_chunk:
        return config.runs_per_chunk
    return 2 if on_cpu else 0


def usable_cores() -> int:
    """The cores this process may use (taskset, cgroups, SLURM); all of them where the platform has no
    affinity call (macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def lanes(config: ml_collections.ConfigDict, platform: str, n_devices: int, n_runs: int, k: int) -> int:
    """Programs that train shares of a device's chunks side by side (`Lanes`): on a CPU with one device,
    config.lanes or (0) one per core this process may use, at most one per full chunk of k runs (so
    that `layout` keeps chunks of k, and each chunk its bits); 1 on accelerators and on several
    devices, whose programs already fill them."""
    if platform != "cpu" or n_devices > 1:
        return 1
    return max(1, min(config.lanes or usable_cores(), n_runs // k))


def layout(run_steps: list[int], n_devices: int, k: int) -> tuple[np.ndarray, int]:
    """A group's slots on `n_devices` devices in chunks of `k` runs: (run indices [n_devices * chunks
    * k], device after device, -1 for an empty slot; the chunk size used). k is at most a device's
    share of the runs (0: that share, one chunk per device).

    Runs sorted by their steps (largest first, otherwise in group order) are cut into chunks, so a
    chunk's runs stop together; each chunk goes to the device with the fewest steps so far, and the
    devices are filled up to the same number of chunks with empty ones (which cost nothing)."""
    n = len(run_steps)
    k = min(k or n, -(-n // n_devices))
    order = sorted(range(n), key=lambda i: -run_steps[i])
    chunks = [order[i:i + k] for i in range(0, n, k)]
    load, devices = [0] * n_devices, [[] for _ in range(n_devices)]
    for chunk in chunks:
        d = load.index(min(load))
        devices[d].append(chunk + [-1] * (k - len(chunk)))
        load[d] += run_steps[chunk[0]]
    per_device = max(len(d) for d in devices)
    slots = [i for d in devices for c in d + [[-1] * k] * (per_device - len(d)) for i in c]
    return np.asarray(slots, np.int32), k


def run_slots(slots: np.ndarray) -> np.ndarray:
    """Each run's slot [runs], from `layout`'s slots (the run of each slot, -1 for an empty one)."""
    index = np.empty(int((slots >= 0).sum()), np.int64)
    index[slots[slots >= 0]] = np.flatnonzero(slots >= 0)
    return index


@dataclasses.dataclass
class GroupProgram:
    """A group's compiled programs and per-slot inputs (`layout`).

    slots: [slots] the run of each slot (-1: empty), in chunks of `chunk` runs; index: [runs] each
    run's slot; runs: host arrays [slots, ...] (an empty slot has no training or validation pairs);
    state: the abstract state tree [slots, ...]; init / evaluate: the compiled programs (evaluate a
    `Later` with build_program's evaluate_later); train_epoch: a `Lanes` over the compiled epoch
    program; compile_seconds: of init and train_epoch, and of evaluate when it was compiled then."""

    group: Group
    trainer: Trainer
    slots: np.ndarray
    chunk: int
    index: np.ndarray
    runs: dict
    state: Any
    init: Any
    train_epoch: Any
    evaluate: Any
    by_run: NamedSharding
    replicated: NamedSharding
    compile_seconds: float


class Lanes:
    """train_epoch over all slots as `lanes` calls of `program` side by side, one thread each, on equal
    contiguous shares of the slots (layout's devices): (state, runs, data) -> (state, losses) [slots, ...].
    split and join: compiled `shares` and `joined` of the group's shapes (None with one lane).

    XLA:CPU runs a program's kernels one after another and spreads only the large ones over the
    cores, so a CPU's cores idle through a chunk's many small kernels; programs side by side fill
    them. Each chunk computes what it computes in one program: the same numbers, bit for bit."""

    def __init__(self, program: Callable, lanes: int, split: Callable | None = None, join: Callable | None = None):
        self.program, self.lanes, self.split, self.join = program, lanes, split, join

    def __call__(self, state, runs, data):
        if self.lanes == 1:
            return self.program(state, runs, data)
        run = lambda share: jax.block_until_ready(self.program(*share, data))
        with concurrent.futures.ThreadPoolExecutor(self.lanes, thread_name_prefix="fusion_jax-lane") as pool:
            return self.join(list(pool.map(run, self.split((state, runs)))))


def shares(tree: Any, n: int) -> list:
    """tree's leaves [slots, ...] cut into n equal contiguous shares: n trees of [slots / n, ...]."""
    return [jax.tree_util.tree_map(lambda x: x.reshape(n, -1, *x.shape[1:])[i], tree) for i in range(n)]


def joined(parts: list) -> Any:
    """The inverse of `shares`: n trees of [slots / n, ...] -> one of [slots, ...]."""
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)


def _chunked(f: Callable, k: int, mesh: Mesh) -> Callable:
    """f(state, runs, data) of a chunk of k runs over every slot: each device takes its slots chunk after chunk
    (train_epoch steps them; evaluate's activations are then k runs', not all of the device's)."""
    def on_device(state, runs, data):
        chunk = lambda x: x.reshape(-1, k, *x.shape[1:])
        out = jax.lax.map(lambda c: f(*c, data), jax.tree_util.tree_map(chunk, (state, runs)))
        return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), out)
    # check_vma=False: the trainer's loops need no annotations of what varies across devices.
    return jax.shard_map(on_device, mesh=mesh, in_specs=(P("runs"), P("runs"), P()), out_specs=P("runs"),
                         check_vma=False)


# init and evaluate run once per group: on XLA:CPU, LLVM at level 1 compiles them in about half the
# time of the default 3, with the same bits out (tests/test_sweep.py); level 0 changes init's draws.
ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}
# On a GPU, choosing and building Triton kernels for the heads' small matmuls is about half of each
# program's compilation; cuBLAS needs none (results/bench/xla_flags/nvidia-h100-gpu-options.log).
# XLA's GPU cost analysis misses cuBLAS calls: cost.py's FLOP counts compile for the host CPU.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def compiler_options(platform: str) -> tuple[dict | None, dict | None]:
    """XLA compile options of a group's programs on `platform`: (init, evaluate and the lanes' split and
    join, which run once per group; train_epoch, which runs every epoch). None: XLA's defaults."""
    return {"cpu": (ONCE_COMPILER_OPTIONS, None),
            "gpu": (GPU_COMPILER_OPTIONS, GPU_COMPILER_OPTIONS)}.get(platform, (None, None))


def per_run_program(f: Callable, in_axes: tuple, by_run: NamedSharding) -> Callable:
    """f vmapped over the runs axis and jitted, outputs sharded by run (init)."""
    return jax.jit(jax.vmap(f, in_axes=in_axes), out_shardings=by_run)


def build_program(config: ml_collections.ConfigDict, group: Group, features: FeatureSet,
                  mesh: Mesh | None = None, evaluate_later: bool = False,
                  programs: ProgramCache | None = None) -> GroupProgram:
    """The trainer, per-slot inputs and three compiled programs of `group` (from shapes alone: no device
    data). evaluate_later: evaluate is a `Later`, to compile once the group can start training;
    programs: where to take programs that an earlier group of the same shapes compiled."""
    mesh = mesh or run_mesh()
    check_fits(group, features, mesh.devices.flat)
    pairs = group_pairs(config, group, features)
    by_run, replicated = NamedSharding(mesh, P("runs")), NamedSharding(mesh, P())
    batch, platform = config.train.batch_size, mesh.devices.flat[0].platform
    on_cpu = platform == "cpu"
    k = runs_per_chunk(config, on_cpu)
    n_lanes = lanes(config, platform, mesh.size, len(group.runs), k)
    slots, k = layout([steps_per_epoch(pairs[r.scale].n_train, batch) for r in group.runs], mesh.size * n_lanes, k)
    runs = stack_runs(tuple(group.runs[max(i, 0)] for i in slots), pairs)
    for name in ("n_train", "n_val"):
        runs[name][slots < 0] = 0
    index = run_slots(slots)
    trainer = make_train(config, group.method, int(runs["n_train"].max()), int(runs["n_val"].max()),
                         noisy=group.noisy, skip_idle=on_cpu)
    shaped = lambda tree, sharding, parts=1: jax.tree_util.tree_map(  # parts > 1: a lane's share of the slots
        lambda x: jax.ShapeDtypeStruct((np.shape(x)[0] // parts, *np.shape(x)[1:]), x.dtype, sharding=sharding),
        tree)
    runs_s, data_s = shaped(runs, by_run), shaped(features.arrays(), replicated)
    per_run = lambda f, axes: per_run_program(f, axes, by_run)
    once, every = compiler_options(platform)
    compile_program = programs or (lambda lowered, options=None: lowered.compile(options))
    t0 = time.perf_counter()
    lowered = per_run(trainer.init, (0, None)).lower(runs_s, data_s)
    init, state_s = compile_program(lowered, once), shaped(lowered.out_info, by_run)
    lowered = jax.jit(_chunked(trainer.train_epoch, k, mesh)).lower(
        shaped(state_s, by_run, n_lanes), shaped(runs_s, by_run, n_lanes), data_s)
    train_epoch = Lanes(compile_program(lowered, every), n_lanes)
    if n_lanes > 1:  # compiled here, ahead, not in the first epoch
        split = jax.jit(functools.partial(shares, n=n_lanes)).lower((state_s, runs_s))
        join = jax.jit(joined).lower([shaped(lowered.out_info, by_run)] * n_lanes)
        train_epoch.split, train_epoch.join = compile_program(split, once), compile_program(join, once)
    lowered = jax.jit(_chunked(jax.vmap(trainer.evaluate, (0, 0, None)), k, mesh)).lower(state_s, runs_s, data_s)
    evaluate = (Later(f"group {group.name}: evaluate", lambda: compile_program(lowered, once)) if evaluate_later
                else compile_program(lowered, once))
    return GroupProgram(group, trainer, slots, k, index, runs, state_s, init, train_epoch, evaluate, by_run,
                        replicated, time.perf_counter() - t0)


def compile_workers(config: ml_collections.ConfigDict) -> int:
    """Threads that compile groups ahead: config.compile_workers, or (0) half the cores, at least 1."""
    return config.compile_workers or max(1, usable_cores() // 2)


class CompiledAhead:
    """The programs of `groups`, built by worker threads from the start, and each backbone's features
    put on the devices once. Ask in the groups' order: `program(i)` waits for group i's init and
    train_epoch (and raises what the build raised: NonFinite for bad features); the build's thread
    then compiles its evaluate (a `Later`) before the next build. Groups of the same shapes share
    their programs (`programs`, a ProgramCache, cleared once every group is built). `data(program)` gives its features. The builds take
    the float32 matmul precision in force where this is made (`jax.default_matmul_precision` sets it for
    one thread only), and a build that fails names its group."""

    def __init__(self, config: ml_collections.ConfigDict, groups: list[Group], features: dict[str, FeatureSet],
                 workers: int):
        self._features, self._data, mesh = features, (None, None), run_mesh()
        jobs = [(g, features[g.backbone], concurrent.futures.Future()) for g in groups]
        self._futures = [handover for *_, handover in jobs]
        self.programs = ProgramCache()
        self._unbuilt, self._unbuilt_lock = len(groups), threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fusion_jax-compile")
        self._closing, precision = threading.Event(), jax.config.jax_default_matmul_precision
        for g, fs, handover in jobs:
            self._pool.submit(self._build, config, g, fs, mesh, handover, precision)

    def _build(self, config, group, features, mesh, handover: concurrent.futures.Future, precision) -> None:
        try:
            self._build_one(config, group, features, mesh, handover, precision)
        finally:
            with self._unbuilt_lock:
                self._unbuilt -= 1
                last = self._unbuilt == 0
            if last:  # no group is left to share a program with
                self.programs.clear()

    def _build_one(self, config, group, features, mesh, handover: concurrent.futures.Future, precision) -> None:
        if not handover.set_running_or_notify_cancel():
            return
        with jax.default_matmul_precision(precision):
            try:
                program = build_program(config, group, features, mesh, evaluate_later=True, programs=self.programs)
            except BaseException as e:
                e.add_note(f"fusion_jax: while building the programs of group {group.name}")
                handover.set_exception(e)
                return
            handover.set_result(program)
            if not self._closing.is_set():  # after an error or a stop, its group will not evaluate
                program.evaluate.compile()
                program.evaluate.settle()  # a call compiling it meanwhile has taken its program from the cache

    def ready(self, i: int) -> bool:
        """Whether group i's program is built (`program(i)` returns at once)."""
        return self._futures[i] is not None and self._futures[i].done()

    def program(self, i: int) -> GroupProgram:
        future, self._futures[i] = self._futures[i], None  # a used program is freed with its group
        if future is None:
            raise RuntimeError(f"group {i}'s program was already taken")
        return future.result()

    def data(self, program: GroupProgram) -> dict:
        backbone = program.group.backbone
        if self._data[0] != backbone:
            self._data = None, None
            self._data = backbone, group_data(self._features[backbone], program.replicated)
        return self._data[1]

    def __enter__(self) -> "CompiledAhead":
        return self

    def __exit__(self, *exc) -> None:
        # Builds not started are dropped; those in progress (after an error or a stop, up to one per worker)
        # end with the compilation under way (ProgramCache.close), which is waited for: no compilation
        # outlives the sweep that asked for it.
        self._closing.set()
        self.programs.close()
        for future in self._futures:
            if future is not None:
                future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
