"""Sweeps: plan the grid into groups, train each group as one vmapped program, resume, report.

A group is one (backbone, method); its runs are all scales x seeds x degradation levels, each run
carrying its own pairs (see train.py). The host loop only moves between epochs: progress,
checkpoints, resume. The groups' programs are compiled ahead, in worker threads, while earlier
groups train. Finished groups are kept in `<workdir>/groups/<group>.json`; an unfinished group
resumes from its last Orbax checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from fusion_jax import distributed
from fusion_jax import metrics as metrics_lib
from fusion_jax.checkpoint import GroupCheckpoints
from fusion_jax.data import FeatureSet, Pairs, build_pairs
from fusion_jax.data.sources import load_dataset, load_features
from fusion_jax.files import atomic_write_json
from fusion_jax.fusion import count_params
from fusion_jax.report import write_results
from fusion_jax.train import Trainer, make_train, pair_arrays, run_key, steps_per_epoch
from fusion_jax.validate import ConfigError, validate, validate_scales
from fusion_jax.xla_cache import cache_events, persistent_cache

log = logging.getLogger("fusion_jax")


class NonFinite(FloatingPointError):
    """A group's features or training loss hold NaN or Inf; the message names the group and runs."""


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
        return re.sub(r"[^A-Za-z0-9_.=-]", "_", f"{self.backbone}-{self.method}{scale}{part}")

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(sorted({r.scale for r in self.runs}))


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
    """The pairs of each scale of `group`, with a NonFinite error for features they would read."""
    pairs = {s: build_pairs(features.caption_image, features.n_images, s, config.pairs.split_seed,
                            config.pairs.train_fraction) for s in group.scales}
    for name, x in (("image", features.image), ("text", features.text)):
        rows = np.unique(np.concatenate([p.image_idx if name == "image" else p.caption_idx for p in pairs.values()]))
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


def run_mesh() -> Mesh:
    """A 1-D mesh over this process's devices; a group's run axis is sharded over it."""
    return Mesh(np.array(jax.local_devices()), ("runs",))


def runs_per_chunk(config: ml_collections.ConfigDict, on_cpu: bool) -> int:
    """Runs a device steps together: config.runs_per_chunk, or (0) 2 on CPUs and 0 (all its runs) on
    accelerators. A CPU trains fastest when a chunk's parameters and moments stay in its cache."""
    if config.runs_per_chunk:
        return config.runs_per_chunk
    return 2 if on_cpu else 0


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


@dataclasses.dataclass
class GroupProgram:
    """A group's compiled programs and per-slot inputs (sweep.layout).

    slots: [slots] the run of each slot (-1: empty), in chunks of `chunk` runs; index: [runs] each
    run's slot; runs: host arrays [slots, ...] (an empty slot has no training or validation pairs);
    state: the abstract state tree [slots, ...]; init / train_epoch / evaluate: the compiled programs
    (evaluate a `Later` when build_program was given an executor); compile_seconds: of init and
    train_epoch, and of evaluate when it was compiled then."""

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


def _chunked(train_epoch: Callable, k: int, mesh: Mesh) -> Callable:
    """train_epoch over every slot: each device steps its slots chunk after chunk, k runs at a time."""
    def on_device(state, runs, data):
        chunk = lambda x: x.reshape(-1, k, *x.shape[1:])
        state, losses = jax.lax.map(lambda c: train_epoch(*c, data),
                                    jax.tree_util.tree_map(chunk, (state, runs)))
        return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), (state, losses))
    # check_vma=False: the trainer's loops need no annotations of what varies across devices.
    return jax.shard_map(on_device, mesh=mesh, in_specs=(P("runs"), P("runs"), P()), out_specs=P("runs"),
                         check_vma=False)


class Later:
    """A program compiled after it is handed over (`compile()`, in the thread that built its group):
    a call waits for the compilation. `seconds`: the compilation's duration; `waited`: how long calls
    waited for it."""

    def __init__(self, name: str, lowered: Any, options: dict | None):
        self.name, self.seconds, self.waited = name, 0.0, 0.0
        self._lowered, self._options, self._future = lowered, options, concurrent.futures.Future()

    def compile(self) -> None:
        t0 = time.perf_counter()
        try:
            compiled, error = self._lowered.compile(self._options), None
        except Exception as e:
            compiled, error = None, RuntimeError(f"{self.name}: compilation failed: {e}")
            error.__cause__ = e
        self.seconds, self._lowered = time.perf_counter() - t0, None  # before a waiting call goes on
        if error is None:
            self._future.set_result(compiled)
        else:
            self._future.set_exception(error)

    def __call__(self, *args):
        t0 = time.perf_counter()
        compiled = self._future.result()
        self.waited += time.perf_counter() - t0
        return compiled(*args)


# init and evaluate run once per group: on XLA:CPU, LLVM at level 1 compiles them in about half the
# time of the default 3, with the same bits out (tests/test_sweep.py); level 0 changes init's draws.
ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def per_run_program(f: Callable, in_axes: tuple, by_run: NamedSharding) -> Callable:
    """f vmapped over the runs axis and jitted, outputs sharded by run (init and evaluate)."""
    return jax.jit(jax.vmap(f, in_axes=in_axes), out_shardings=by_run)


def build_program(config: ml_collections.ConfigDict, group: Group, features: FeatureSet,
                  mesh: Mesh | None = None, evaluate_later: bool = False) -> GroupProgram:
    """The trainer, per-slot inputs and three compiled programs of `group` (from shapes alone: no device
    data). evaluate_later: evaluate is a `Later`, to compile once the group can start training."""
    pairs = group_pairs(config, group, features)
    mesh = mesh or run_mesh()
    by_run, replicated = NamedSharding(mesh, P("runs")), NamedSharding(mesh, P())
    batch, on_cpu = config.train.batch_size, mesh.devices.flat[0].platform == "cpu"
    slots, k = layout([steps_per_epoch(pairs[r.scale].n_train, batch) for r in group.runs], mesh.size,
                      runs_per_chunk(config, on_cpu))
    runs = stack_runs(tuple(group.runs[max(i, 0)] for i in slots), pairs)
    for name in ("n_train", "n_val"):
        runs[name][slots < 0] = 0
    index = np.empty(len(group.runs), np.int64)
    index[slots[slots >= 0]] = np.flatnonzero(slots >= 0)
    trainer = make_train(config, group.method, int(runs["n_train"].max()), int(runs["n_val"].max()),
                         noisy=any(r.level != 0 for r in group.runs), skip_idle=on_cpu)
    shaped = lambda tree, sharding: jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)
    runs_s, data_s = shaped(runs, by_run), shaped(features.arrays(), replicated)
    per_run = lambda f, axes: per_run_program(f, axes, by_run)
    once = ONCE_COMPILER_OPTIONS if on_cpu else None
    t0 = time.perf_counter()
    init = per_run(trainer.init, (0, None)).lower(runs_s, data_s).compile(once)
    state_s = shaped(jax.eval_shape(jax.vmap(trainer.init, in_axes=(0, None)), runs_s, data_s), by_run)
    train_epoch = jax.jit(_chunked(trainer.train_epoch, k, mesh)).lower(state_s, runs_s, data_s).compile()
    evaluate = per_run(trainer.evaluate, (0, 0, None)).lower(state_s, runs_s, data_s)
    evaluate = Later(f"group {group.name}: evaluate", evaluate, once) if evaluate_later else evaluate.compile(once)
    return GroupProgram(group, trainer, slots, k, index, runs, state_s, init, train_epoch, evaluate, by_run,
                        replicated, time.perf_counter() - t0)


def compile_workers(config: ml_collections.ConfigDict) -> int:
    """Threads that compile groups ahead: config.compile_workers, or (0) half the cores, at least 1."""
    return config.compile_workers or max(1, (os.cpu_count() or 2) // 2)


class CompiledAhead:
    """The programs of `groups`, built by worker threads from the start, and each backbone's features
    put on the devices once. Ask in the groups' order: `program(i)` waits for group i's init and
    train_epoch (and raises what the build raised: NonFinite for bad features); the build's thread
    then compiles its evaluate (a `Later`) before the next build. `data(program)` gives its features."""

    def __init__(self, config: ml_collections.ConfigDict, groups: list[Group], features: dict[str, FeatureSet],
                 workers: int):
        self._features, self._data, mesh = features, (None, None), run_mesh()
        jobs = [(g, features[g.backbone], concurrent.futures.Future()) for g in groups]
        self._futures = [handover for *_, handover in jobs]
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fusion_jax-compile")
        for g, fs, handover in jobs:
            self._pool.submit(self._build, config, g, fs, mesh, handover)

    @staticmethod
    def _build(config, group, features, mesh, handover: concurrent.futures.Future) -> None:
        if not handover.set_running_or_notify_cancel():
            return
        try:
            program = build_program(config, group, features, mesh, evaluate_later=True)
        except BaseException as e:
            handover.set_exception(e)
            return
        handover.set_result(program)
        program.evaluate.compile()

    def program(self, i: int) -> GroupProgram:
        future, self._futures[i] = self._futures[i], None  # a used program is freed with its group
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
        # Builds not started are dropped; those in progress (after an error, up to one per worker)
        # are waited for, so no compilation outlives the sweep that asked for it.
        for future in self._futures:
            if future is not None:
                future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


def write_tsne_sample(workdir: str, backbone: str, fs: FeatureSet, n: int = 800, seed: int = 0) -> None:
    """`tsne_<backbone>.npz`: `n` matched pairs (image [n, d_v], text [n, d_t], pooled) for the report's t-SNE."""
    from fusion_jax.fusion import masked_mean

    rng = np.random.default_rng(seed)
    captions = rng.permutation(fs.n_captions)[:n]
    pooled = lambda x, m: np.asarray(masked_mean(jnp.asarray(x), None if m is None else jnp.asarray(m)))
    image = fs.image[fs.caption_image[captions]]
    image_mask = None if fs.image_mask is None else fs.image_mask[fs.caption_image[captions]]
    text_mask = None if fs.text_mask is None else fs.text_mask[captions]
    path = os.path.join(workdir, f"tsne_{re.sub(r'[^A-Za-z0-9_.=-]', '_', backbone)}.npz")
    np.savez(path, image=pooled(image, image_mask), text=pooled(fs.text[captions], text_mask))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


_MIN_FREE_BYTES = 64 * 2**20
# Config fields that do not change a sweep's results (split_by_scale and runs_per_chunk: to float rounding,
# as the device count).
_NOT_RESULTS = ("workdir", "distributed", "compile_workers", "split_by_scale", "runs_per_chunk", "compilation_cache")
# Fields added since the first release, at their defaults: a sweep.json saved without them is the same sweep.
_ADDED = {"degradation.scales": []}  # (compilation_cache is not a results field)


def prepare_workdir(workdir: str, config_dict: dict) -> None:
    """Create the workdir and claim it for this config; refuse one that holds a different sweep."""
    try:
        os.makedirs(os.path.join(workdir, "groups"), exist_ok=True)
        # A probe of this process's own: the processes of a multi-process sweep probe at once.
        fd, probe = tempfile.mkstemp(dir=workdir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError("workdir", f"cannot write to {workdir!r}: {e.strerror or e}") from None
    free = shutil.disk_usage(workdir).free
    if free < _MIN_FREE_BYTES:
        raise ConfigError("workdir", f"{workdir!r} has {free / 2**20:.0f} MiB free; checkpoints and results need "
                          f"at least {_MIN_FREE_BYTES / 2**20:.0f} MiB")
    fingerprint = {**_ADDED, **_flatten({k: v for k, v in config_dict.items() if k not in _NOT_RESULTS})}
    path = os.path.join(workdir, "sweep.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = {**_ADDED, **_flatten(json.load(f))}
        changed = sorted(k for k in set(previous) | set(fingerprint)
                         if json.dumps(previous.get(k)) != json.dumps(fingerprint.get(k)))
        if changed:
            raise ConfigError("workdir", f"{workdir!r} holds a sweep of another config (differs in "
                              f"{', '.join(changed)}); use a new workdir or remove that one")
    else:
        atomic_write_json(path, {k: v for k, v in config_dict.items() if k not in _NOT_RESULTS})


def _restore_latest_good(ckpt: GroupCheckpoints, abstract: dict, group: Group):
    """(epoch, tree) of the newest checkpoint that restores; corrupt ones are reported and deleted."""
    for epoch in sorted(ckpt.all_epochs(), reverse=True):
        try:
            return epoch, ckpt.restore(epoch, abstract)
        except Exception as e:  # Orbax raises many types for a damaged checkpoint
            log.error("group %s: the checkpoint after epoch %d is corrupt or incomplete (%s: %s); "
                      "falling back to the previous one", group.name, epoch, type(e).__name__, str(e)[:200])
            ckpt.delete(epoch)
    return None, None


def train_group(config: ml_collections.ConfigDict, program: GroupProgram, data: dict, workdir: str,
                progress: tqdm, on_epoch: Callable[[Group, int], None] | None = None) -> list[dict]:
    """Train and evaluate every run of a compiled group (`build_program`); return the run records.

    `data` is the group's feature arrays on the devices (`group_data`, replicated). Checkpoints hold
    the runs' state in the group's order, whatever the slots, so a sweep resumes on other devices.
    """
    group, by_run, batch, index = program.group, program.by_run, config.train.batch_size, program.index
    n_runs = len(group.runs)
    n_train = program.runs["n_train"][index]
    run_steps = np.asarray([steps_per_epoch(int(n), batch) for n in n_train])
    runs = jax.device_put(program.runs, by_run)

    ckpt = GroupCheckpoints(os.path.join(workdir, "checkpoints", group.name), config.checkpoint.keep)
    abstract = {"state": jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((n_runs, *x.shape[1:]), x.dtype),
                                                program.state),
                "seconds": jax.ShapeDtypeStruct((), jnp.float32),
                "last_loss": jax.ShapeDtypeStruct((n_runs,), jnp.float32)}
    start, tree = _restore_latest_good(ckpt, abstract, group)
    if start is None:
        state, seconds, last_loss = program.init(runs, data), 0.0, np.full(n_runs, np.nan, np.float32)
    else:
        log.info("group %s: resuming from the checkpoint after epoch %d", group.name, start)
        progress.update(start)
        in_slots = jax.tree_util.tree_map(lambda x: x[np.maximum(program.slots, 0)], tree["state"])
        state, seconds, last_loss = jax.device_put(in_slots, by_run), float(tree["seconds"]), tree["last_loss"]

    for epoch in range(start or 0, config.train.epochs):
        t0 = time.perf_counter()
        state, losses = program.train_epoch(state, runs, data)
        losses = np.asarray(losses)[index]
        seconds += time.perf_counter() - t0
        bad = [r for r, ok in zip(group.runs, np.isfinite(losses).all(axis=1)) if not ok]
        if bad:
            raise NonFinite(f"group {group.name}: non-finite training loss in epoch {epoch + 1} of runs "
                            + ", ".join(f"(scale {r.scale}, seed {r.seed}, level {r.level:g})" for r in bad))
        last_loss = np.asarray([row[:k].mean() for row, k in zip(losses, run_steps)], np.float32)
        by_group = jax.tree_util.tree_map(lambda x: x[index], jax.device_get(state))
        ckpt.save(epoch + 1, {"state": by_group, "seconds": np.float32(seconds), "last_loss": last_loss})
        progress.set_postfix(loss=f"{np.mean(last_loss):.4f}")
        progress.update(1)
        if on_epoch is not None:
            ckpt.wait()
            on_epoch(group, epoch + 1)
    ckpt.close()
    counts = np.asarray(program.evaluate(state, runs, data))[index]
    params = count_params(jax.tree_util.tree_map(lambda x: x[0], state["params"]))

    records = []
    for spec, c, loss, n, k in zip(group.runs, counts, last_loss, n_train, run_steps):
        m = metrics_lib.binary_metrics(*c)
        records.append({
            "backbone": spec.backbone, "method": spec.method, "scale": spec.scale, "seed": spec.seed,
            "degradation": {"kind": spec.kind, "level": spec.level},
            "metrics": {k: m[k] for k in metrics_lib.METRICS}, "majority_baseline": m["majority_baseline"],
            # The group's training time, shared among its runs in proportion to their steps.
            "params": params, "train_seconds": seconds * k / run_steps.sum(),
            "final_train_loss": float(loss) if np.isfinite(loss) else None,
            "n_train": int(n), "n_val": spec.scale - int(n),
        })
    return records


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       on_epoch: Callable[[Group, int], None] | None = None, command: str | None = None
                       ) -> dict | None:
    """Run (or resume) the whole sweep of `config` in `workdir`; write and return the results.

    With several processes, each trains its share of the groups; process 0 gathers every group,
    writes and returns the results, the others return None.

    Raises ConfigError, before anything is written, for an invalid config or workdir; with several
    processes, the others then raise distributed.PeerFailed instead of waiting for the failed one.
    `on_epoch(group, epochs_done)` is called after each epoch's checkpoint is on disk; `command`
    (the command line that started the sweep) is recorded in the results.
    """
    validate(config)
    index, count = distributed.initialize(config)
    config_dict = config.to_dict()
    with distributed.checked_start(index, count, config.distributed.wait_seconds):
        dataset = None if config.features == "synthetic" else load_dataset(config)
        features = {b: load_features(config, b, dataset) for b in config.backbones}
        validate_scales(config, features)
        prepare_workdir(workdir, config_dict)
    if index == 0:
        for b, fs in features.items():
            write_tsne_sample(workdir, b, fs)
    groups = plan(config)
    done = lambda g: os.path.join(workdir, "groups", f"{g.name}.json")
    failed = lambda g: os.path.join(workdir, "groups", f"{g.name}.failed.json")
    todo = [g for g in distributed.mine(groups, index, count) if not os.path.exists(done(g))]
    log.info("sweep %s: %d groups, %d runs; %d groups to train%s", config.name, len(groups),
             sum(len(g.runs) for g in groups), len(todo), f" in process {index} of {count}" if count > 1 else "")
    cache = persistent_cache(config.compilation_cache) if config.compilation_cache else contextlib.nullcontext()
    with cache, cache_events() as events, CompiledAhead(config, todo, features, compile_workers(config)) as ahead, \
            tqdm(total=len(todo) * config.train.epochs, unit="epoch", dynamic_ncols=True) as progress:
        for i, g in enumerate(todo):
            progress.set_description(f"group {i + 1}/{len(todo)} {g.name}")
            if os.path.exists(failed(g)):
                os.unlink(failed(g))
            try:
                program = ahead.program(i)
                atomic_write_json(done(g), train_group(config, program, ahead.data(program), workdir, progress,
                                                       on_epoch))
            except NonFinite as e:
                log.error("%s", e)
                atomic_write_json(failed(g), {"group": g.name, "error": str(e)})
            shutil.rmtree(os.path.join(workdir, "checkpoints", g.name), ignore_errors=True)
    if config.compilation_cache:
        log.info("compilation cache %s: %d programs loaded, %d compiled", config.compilation_cache,
                 events["hits"], events["misses"])
    if index != 0:
        return None

    waited = 0.0
    while not all(os.path.exists(done(g)) or os.path.exists(failed(g)) for g in groups):
        if waited >= config.distributed.wait_seconds:
            missing = [g.name for g in groups if not (os.path.exists(done(g)) or os.path.exists(failed(g)))]
            raise TimeoutError(f"groups {missing} not finished by the other processes after {waited:.0f} s")
        time.sleep(1.0)
        waited += 1.0
    records, failures = [], []
    for g in groups:
        with open(done(g) if os.path.exists(done(g)) else failed(g)) as f:
            (records.extend if os.path.exists(done(g)) else failures.append)(json.load(f))
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and not os.listdir(os.path.join(workdir, "checkpoints")):
        os.rmdir(os.path.join(workdir, "checkpoints"))
    return write_results(workdir, config_dict, records, command,
                         {b: fs.provenance for b, fs in features.items()}, failures)
