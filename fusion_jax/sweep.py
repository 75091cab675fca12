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
import ml_collections
import numpy as np
from tqdm.auto import tqdm

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

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]", "_", f"{self.backbone}-{self.method}-{self.scale}")


def plan(config: ml_collections.ConfigDict) -> list[Group]:
    """The sweep's groups, in a fixed order; each holds seeds x degradation levels (level 0 alone for
    a backbone outside a non-empty `degradation.backbones`)."""
    d = config.degradation
    levels = {b: d.levels if not d.backbones or b in d.backbones else (0.0,) for b in config.backbones}
    return [Group(b, m, s, tuple(RunSpec(b, m, s, seed, d.kind, float(level))
                                 for seed in config.seeds for level in levels[b]))
            for b in config.backbones for m in config.methods for s in config.scales]


def stack_runs(runs: tuple[RunSpec, ...]) -> dict:
    """Per-run values of a group as stacked arrays: key [runs, 2], noise_level [runs]."""
    return {"key": jnp.stack([run_key(r.seed, r.scale) for r in runs]),
            "noise_level": jnp.asarray([r.level for r in runs], jnp.float32)}


def group_data(features: FeatureSet, pairs: Pairs) -> dict:
    """What every run of a group reads: feature arrays and the train/val pair indices, on the device."""
    return jax.device_put({**features.arrays(), "train": pairs.split("train"), "val": pairs.split("val")})


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


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
    fingerprint = _flatten({k: v for k, v in config_dict.items() if k != "workdir"})
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
        atomic_write_json(path, {k: v for k, v in config_dict.items() if k != "workdir"})


def train_group(config: ml_collections.ConfigDict, group: Group, features: FeatureSet, workdir: str,
                progress: tqdm, on_epoch: Callable[[Group, int], None] | None = None) -> list[dict]:
    """Train and evaluate every run of `group` in one vmapped program; return the run records."""
    pairs = build_pairs(features.caption_image, features.n_images, group.scale, config.pairs.split_seed,
                        config.pairs.train_fraction)
    n_train, n_val = pairs.n_train, group.scale - pairs.n_train
    trainer = make_train(config, group.method, n_train, n_val)
    data = group_data(features, pairs)
    runs = jax.device_put(stack_runs(group.runs))
    init = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))
    train_epoch = jax.jit(jax.vmap(trainer.train_epoch, in_axes=(0, 0, None)))
    evaluate = jax.jit(jax.vmap(trainer.evaluate, in_axes=(0, 0, None)))

    ckpt_dir = os.path.join(workdir, "checkpoints", group.name)
    ckpt = GroupCheckpoints(ckpt_dir, config.checkpoint.keep)
    tree = {"state": init(runs, data), "seconds": jnp.zeros((), jnp.float32)}
    start = ckpt.latest_epoch()
    if start is not None:
        tree = ckpt.restore(start, jax.eval_shape(lambda: tree))
        log.info("group %s: resuming from the checkpoint after epoch %d", group.name, start)
        progress.update(start)
    state, seconds = tree["state"], float(tree["seconds"])

    losses = np.full((len(group.runs), 1), np.nan)
    for epoch in range(start or 0, config.train.epochs):
        t0 = time.perf_counter()
        state, losses = train_epoch(state, runs, data)
        losses = np.asarray(losses)
        seconds += time.perf_counter() - t0
        bad = [r for r, ok in zip(group.runs, np.isfinite(losses).all(axis=1)) if not ok]
        if bad:
            raise FloatingPointError(f"group {group.name}: non-finite training loss in epoch {epoch + 1} "
                                     f"of runs {[(r.seed, r.level) for r in bad]}")
        ckpt.save(epoch + 1, {"state": state, "seconds": jnp.float32(seconds)})
        progress.set_postfix(loss=f"{losses[:, -trainer.steps_per_epoch:].mean():.4f}")
        progress.update(1)
        if on_epoch is not None:
            ckpt.close()
            on_epoch(group, epoch + 1)
            ckpt = GroupCheckpoints(ckpt_dir, config.checkpoint.keep)
    ckpt.close()
    counts = np.asarray(evaluate(state, runs, data))
    params = count_params(jax.tree_util.tree_map(lambda x: x[0], state["params"]))

    records = []
    for spec, c, loss in zip(group.runs, counts, losses):
        m = metrics_lib.binary_metrics(*c)
        records.append({
            "backbone": spec.backbone, "method": spec.method, "scale": spec.scale, "seed": spec.seed,
            "degradation": {"kind": spec.kind, "level": spec.level},
            "metrics": {k: m[k] for k in metrics_lib.METRICS}, "majority_baseline": m["majority_baseline"],
            "params": params, "train_seconds": seconds / len(group.runs),
            "final_train_loss": float(loss.mean()) if np.isfinite(loss).all() else None,
            "n_train": n_train, "n_val": n_val,
        })
    return records


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       on_epoch: Callable[[Group, int], None] | None = None, command: str | None = None) -> dict:
    """Run (or resume) the whole sweep of `config` in `workdir`; write and return the results.

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

    groups = plan(config)
    group_file = lambda g: os.path.join(workdir, "groups", f"{g.name}.json")
    todo = [g for g in groups if not os.path.exists(group_file(g))]
    log.info("sweep %s: %d groups, %d runs; %d groups to train", config.name, len(groups),
             sum(len(g.runs) for g in groups), len(todo))
    records = []
    with tqdm(total=len(todo) * config.train.epochs, unit="epoch", dynamic_ncols=True) as progress:
        for i, g in enumerate(groups):
            if g in todo:
                progress.set_description(f"group {todo.index(g) + 1}/{len(todo)} {g.name}")
                group_records = train_group(config, g, features[g.backbone], workdir, progress, on_epoch)
                atomic_write_json(group_file(g), group_records)
            else:
                with open(group_file(g)) as f:
                    group_records = json.load(f)
            shutil.rmtree(os.path.join(workdir, "checkpoints", g.name), ignore_errors=True)
            records += group_records
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and not os.listdir(os.path.join(workdir, "checkpoints")):
        os.rmdir(os.path.join(workdir, "checkpoints"))
    return write_results(workdir, config_dict, records, command,
                         {b: fs.provenance for b, fs in features.items()})
