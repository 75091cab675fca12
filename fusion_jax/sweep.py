"""Sweeps: plan the grid into groups, train each group as one vmapped program, resume, report.

A group is one (backbone, method, scale); its runs are all seeds x degradation levels. The host
loop only moves between epochs: progress, checkpoints, resume. Finished groups are kept in
`<workdir>/groups/<group>.json`; an unfinished group resumes from its last Orbax checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from typing import Callable

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
from fusion_jax.train import make_train, run_key
from fusion_jax.validate import ConfigError, validate, validate_scales

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
    """Runs that share one compiled program: the same backbone, method and scale."""

    backbone: str
    method: str
    scale: int
    runs: tuple[RunSpec, ...]
    part: tuple[int, int] | None = None  # (index, count) when max_runs_per_program split the group

    @property
    def name(self) -> str:
        part = "" if self.part is None else f"-part{self.part[0] + 1}of{self.part[1]}"
        return re.sub(r"[^A-Za-z0-9_.=-]", "_", f"{self.backbone}-{self.method}-{self.scale}{part}")


def plan(config: ml_collections.ConfigDict) -> list[Group]:
    """The sweep's groups, in a fixed order; each holds seeds x degradation levels (level 0 alone for
    a backbone outside a non-empty `degradation.backbones`)."""
    d = config.degradation
    levels = {b: d.levels if not d.backbones or b in d.backbones else (0.0,) for b in config.backbones}
    groups = [Group(b, m, s, tuple(RunSpec(b, m, s, seed, d.kind, float(level))
                                   for seed in config.seeds for level in levels[b]))
              for b in config.backbones for m in config.methods for s in config.scales]
    cap = config.max_runs_per_program
    if cap and any(len(g.runs) > cap for g in groups):
        log.info("max_runs_per_program=%d: splitting groups of more runs into programs of at most %d", cap, cap)
        groups = [Group(g.backbone, g.method, g.scale, g.runs[i:i + cap], part=(i // cap, -(-len(g.runs) // cap)))
                  for g in groups for i in range(0, len(g.runs), cap)]
    return groups


def stack_runs(runs: tuple[RunSpec, ...]) -> dict:
    """Per-run values of a group as stacked arrays: key [runs, 2], noise_level [runs]."""
    return {"key": jnp.stack([run_key(r.seed, r.scale) for r in runs]),
            "noise_level": jnp.asarray([r.level for r in runs], jnp.float32)}


def group_data(features: FeatureSet, pairs: Pairs, sharding: NamedSharding | None = None) -> dict:
    """What every run of a group reads: feature arrays and the train/val pair indices, put on the
    device(s) once (with `sharding`, e.g. replicated over a mesh)."""
    return jax.device_put({**features.arrays(), "train": pairs.split("train"), "val": pairs.split("val")}, sharding)


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
_NOT_RESULTS = ("workdir", "distributed")  # config fields that do not change a sweep's results


def prepare_workdir(workdir: str, config_dict: dict) -> None:
    """Create the workdir and claim it for this config; refuse one that holds a different sweep."""
    try:
        os.makedirs(os.path.join(workdir, "groups"), exist_ok=True)
        probe = os.path.join(workdir, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ConfigError("workdir", f"cannot write to {workdir!r}: {e.strerror or e}") from None
    free = shutil.disk_usage(workdir).free
    if free < _MIN_FREE_BYTES:
        raise ConfigError("workdir", f"{workdir!r} has {free / 2**20:.0f} MiB free; checkpoints and results need "
                          f"at least {_MIN_FREE_BYTES / 2**20:.0f} MiB")
    fingerprint = _flatten({k: v for k, v in config_dict.items() if k not in _NOT_RESULTS})
    path = os.path.join(workdir, "sweep.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = _flatten(json.load(f))
        changed = sorted(k for k in set(previous) | set(fingerprint)
                         if json.dumps(previous.get(k)) != json.dumps(fingerprint.get(k)))
        if changed:
            raise ConfigError("workdir", f"{workdir!r} holds a sweep of another config (differs in "
                              f"{', '.join(changed)}); use a new workdir or remove that one")
    else:
        atomic_write_json(path, {k: v for k, v in config_dict.items() if k not in _NOT_RESULTS})


def run_mesh() -> Mesh:
    """A 1-D mesh over this process's devices; a group's run axis is sharded over it."""
    return Mesh(np.array(jax.local_devices()), ("runs",))


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


def train_group(config: ml_collections.ConfigDict, group: Group, features: FeatureSet, workdir: str,
                progress: tqdm, on_epoch: Callable[[Group, int], None] | None = None) -> list[dict]:
    """Train and evaluate every run of `group` in one vmapped program; return the run records.

    The run axis is sharded over the local devices; a group that does not fill them is padded
    with copies of its last run, whose results are dropped.
    """
    pairs = build_pairs(features.caption_image, features.n_images, group.scale, config.pairs.split_seed,
                        config.pairs.train_fraction)
    for name, x, rows in (("image", features.image, pairs.image_idx), ("text", features.text, pairs.caption_idx)):
        bad = np.unique(rows[~np.isfinite(x[rows]).reshape(len(rows), -1).all(axis=1)])
        if len(bad):
            raise NonFinite(f"group {group.name}: {name} features of backbone {group.backbone!r} hold NaN or Inf "
                            f"(rows {bad[:5].tolist()}{'...' if len(bad) > 5 else ''}); every run of the group stops")
    n_train, n_val = pairs.n_train, group.scale - pairs.n_train
    trainer = make_train(config, group.method, n_train, n_val)
    mesh = run_mesh()
    by_run, replicated = NamedSharding(mesh, P("runs")), NamedSharding(mesh, P())
    n_runs = len(group.runs)
    padded = group.runs + (group.runs[-1],) * (-n_runs % mesh.size)
    data = group_data(features, pairs, replicated)
    runs = jax.device_put(stack_runs(padded), by_run)
    init = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)), out_shardings=by_run)
    train_epoch = jax.jit(jax.vmap(trainer.train_epoch, in_axes=(0, 0, None)), out_shardings=by_run)
    evaluate = jax.jit(jax.vmap(trainer.evaluate, in_axes=(0, 0, None)), out_shardings=by_run)

    ckpt_dir = os.path.join(workdir, "checkpoints", group.name)
    ckpt = GroupCheckpoints(ckpt_dir, config.checkpoint.keep)
    abstract = {"state": jax.eval_shape(init, runs, data), "seconds": jax.ShapeDtypeStruct((), jnp.float32),
                "last_loss": jax.ShapeDtypeStruct((len(padded),), jnp.float32)}
    start, tree = _restore_latest_good(ckpt, abstract, group)
    if start is None:
        state, seconds, last_loss = init(runs, data), 0.0, np.full(len(padded), np.nan, np.float32)
    else:
        log.info("group %s: resuming from the checkpoint after epoch %d", group.name, start)
        progress.update(start)
        state, seconds, last_loss = jax.device_put(tree["state"], by_run), float(tree["seconds"]), tree["last_loss"]

    for epoch in range(start or 0, config.train.epochs):
        t0 = time.perf_counter()
        state, losses = train_epoch(state, runs, data)
        losses = np.asarray(losses)[:n_runs]
        seconds += time.perf_counter() - t0
        bad = [r for r, ok in zip(group.runs, np.isfinite(losses).all(axis=1)) if not ok]
        if bad:
            raise NonFinite(f"group {group.name}: non-finite training loss in epoch {epoch + 1} of runs "
                                + ", ".join(f"(seed {r.seed}, level {r.level:g})" for r in bad))
        last_loss = np.concatenate([losses.mean(axis=1), last_loss[n_runs:]]).astype(np.float32)
        ckpt.save(epoch + 1, {"state": state, "seconds": np.float32(seconds), "last_loss": last_loss})
        progress.set_postfix(loss=f"{losses.mean():.4f}")
        progress.update(1)
        if on_epoch is not None:
            ckpt.wait()
            on_epoch(group, epoch + 1)
    ckpt.close()
    counts = np.asarray(evaluate(state, runs, data))[:n_runs]
    params = count_params(jax.tree_util.tree_map(lambda x: x[0], state["params"]))
    losses = last_loss[:n_runs]

    records = []
    for spec, c, loss in zip(group.runs, counts, losses):
        m = metrics_lib.binary_metrics(*c)
        records.append({
            "backbone": spec.backbone, "method": spec.method, "scale": spec.scale, "seed": spec.seed,
            "degradation": {"kind": spec.kind, "level": spec.level},
            "metrics": {k: m[k] for k in metrics_lib.METRICS}, "majority_baseline": m["majority_baseline"],
            "params": params, "train_seconds": seconds / len(group.runs),
            "final_train_loss": float(loss) if np.isfinite(loss) else None,
            "n_train": n_train, "n_val": n_val,
        })
    return records


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       on_epoch: Callable[[Group, int], None] | None = None, command: str | None = None
                       ) -> dict | None:
    """Run (or resume) the whole sweep of `config` in `workdir`; write and return the results.

    With several processes, each trains its share of the groups; process 0 gathers every group,
    writes and returns the results, the others return None.

    Raises ConfigError, before anything is written, for an invalid config or workdir.
    `on_epoch(group, epochs_done)` is called after each epoch's checkpoint is on disk; `command`
    (the command line that started the sweep) is recorded in the results.
    """
    validate(config)
    dataset = None if config.features == "synthetic" else load_dataset(config)
    features = {b: load_features(config, b, dataset) for b in config.backbones}
    validate_scales(config, features)
    config_dict = config.to_dict()
    prepare_workdir(workdir, config_dict)

    index, count = distributed.initialize(config)
    if index == 0:
        for b, fs in features.items():
            write_tsne_sample(workdir, b, fs)
    groups = plan(config)
    done = lambda g: os.path.join(workdir, "groups", f"{g.name}.json")
    failed = lambda g: os.path.join(workdir, "groups", f"{g.name}.failed.json")
    todo = [g for g in distributed.mine(groups, index, count) if not os.path.exists(done(g))]
    log.info("sweep %s: %d groups, %d runs; %d groups to train%s", config.name, len(groups),
             sum(len(g.runs) for g in groups), len(todo), f" in process {index} of {count}" if count > 1 else "")
    with tqdm(total=len(todo) * config.train.epochs, unit="epoch", dynamic_ncols=True) as progress:
        for i, g in enumerate(todo):
            progress.set_description(f"group {i + 1}/{len(todo)} {g.name}")
            if os.path.exists(failed(g)):
                os.unlink(failed(g))
            try:
                atomic_write_json(done(g), train_group(config, g, features[g.backbone], workdir, progress, on_epoch))
            except NonFinite as e:
                log.error("%s", e)
                atomic_write_json(failed(g), {"group": g.name, "error": str(e)})
            shutil.rmtree(os.path.join(workdir, "checkpoints", g.name), ignore_errors=True)
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
