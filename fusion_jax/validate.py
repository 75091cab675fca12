"""Config checks that run before anything is trained or written: one clear line per mistake."""

from __future__ import annotations

import math

import ml_collections
import numpy as np

from fusion_jax import degrade, fusion
from fusion_jax.config_base import ConfigError
from fusion_jax.data import PAIR_FIELDS, SPLITS, FeatureSet, captioned_images, max_pairs, split_sizes
from fusion_jax.data.dataset import ImageCaptionDataset
from fusion_jax.distributed import in_cluster
from fusion_jax.files import safe_name, unwritable_folder

_F32 = np.finfo(np.float32)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(field, message)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _float32(x) -> bool:
    """A finite number that float32, the training's type, holds without rounding it to 0 or to inf."""
    return _finite(x) and (x == 0 or float(_F32.tiny) <= abs(x) <= float(_F32.max))


def _int(x, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _distinct(values, field: str) -> tuple:
    values = tuple(values)
    _require(len(set(values)) == len(values), field, f"has duplicates in {values}")
    return values


def _distinct_nonempty(values, field: str) -> tuple:
    _require(len(tuple(values)) > 0, field, "must not be empty")
    return _distinct(values, field)


def validate_fields(config: ml_collections.ConfigDict) -> None:
    """ConfigError unless `config` is a ConfigDict with every top-level field of base_config (a hand-made
    get_config() may return less): what `validate` and the command line read fields of once it passes."""
    from fusion_jax.config_base import base_config

    start_from = "build it from fusion_jax.config_base.base_config, as the files in configs/ do"
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError("", f"get_config() returned type {type(config).__name__}, not an ml_collections.ConfigDict: "
                          f"{start_from}")
    missing = [k for k in base_config("name", "synthetic") if k not in config]
    _require(not missing, "", f"lacks the fields {', '.join(missing)}: {start_from}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Check every field that does not need the features; raise ConfigError on the first mistake."""
    validate_fields(config)
    for check in (_check_sweep, _check_degradation, _check_training, _check_sources, _check_runtime,
                  _check_distributed):
        check(config)


def _check_sweep(config: ml_collections.ConfigDict) -> None:
    """name, features (and npz.dir), backbones, methods, seeds, scales."""
    from fusion_jax.data.sources import SOURCES, check_backbone

    _require(bool(config.name) and "/" not in config.name and config.name not in (".", ".."), "name",
             f"{config.name!r} must be a non-empty name without '/', not '.' or '..' (results/<name> is its folder)")
    _require(config.features in SOURCES, "features",
             f"unknown feature source {config.features!r}; allowed: {', '.join(SOURCES)}")
    if config.features == "npz":
        from fusion_jax.data import npz

        _require("npz" in config, "npz.dir", "features 'npz' needs the field npz.dir (the folder of "
                 "<backbone>.npz files): start from configs/own_features.py")
        try:
            npz.check_dir(config.npz.dir)
        except ValueError as e:
            raise ConfigError("npz.dir", str(e)) from None
        if not tuple(config.backbones):
            raise ConfigError("backbones", f"must not be empty; npz.dir holds: "
                              f"{', '.join(npz.names(config.npz.dir)) or 'no .npz file'}")
    for b in _distinct_nonempty(config.backbones, "backbones"):
        try:
            check_backbone(config, b)
        except ValueError as e:
            hint = ("" if "quoted tuple" in str(e) or not any(c in str(b) for c in ",()'\"") else
                    "; several names are a quoted tuple of strings, \"--config.backbones=('a','b')\"")
            raise ConfigError("backbones", str(e) + hint) from None
    files = {}  # groups/, checkpoints/ and t-SNE samples are named by safe_name(backbone)
    for b in config.backbones:
        other = files.setdefault(safe_name(b), b)
        _require(other == b, "backbones", f"{other!r} and {b!r} are the same file name, {safe_name(b)!r} (a "
                 "backbone's groups, checkpoints and t-SNE sample are named by it): rename one")
    for m in _distinct_nonempty(config.methods, "methods"):
        _require(m in fusion.METHODS, "methods", f"unknown method {m!r}; allowed: {', '.join(fusion.METHODS)}")
    for s in _distinct_nonempty(config.seeds, "seeds"):
        _require(_int(s, 0) and s < 2**31, "seeds", f"seed {s!r} must be an integer in [0, 2^31)")
    for s in _distinct_nonempty(config.scales, "scales"):
        _require(_int(s, 1), "scales", f"scale {s!r} must be a positive integer")


def _check_degradation(config: ml_collections.ConfigDict) -> None:
    """degradation.*: its kind, modality, levels (distinct in float32), and where the noise study runs."""
    d = config.degradation
    _require(d.kind in degrade.KINDS, "degradation.kind",
             f"unknown kind {d.kind!r}; allowed: {', '.join(degrade.KINDS)}")
    _require(d.modality in degrade.MODALITIES, "degradation.modality",
             f"unknown modality {d.modality!r}; allowed: {', '.join(degrade.MODALITIES)}")
    for level in _distinct_nonempty(d.levels, "degradation.levels"):
        _require(_finite(level) and 0 <= level <= degrade.MAX_LEVEL, "degradation.levels",
                 f"level {level!r} must be a number >= 0 and <= {degrade.MAX_LEVEL:g} (sigma, against unit-norm features)")
    in_runs = [float(np.float32(level)) for level in d.levels]
    for level, kept in zip(d.levels, in_runs):
        _require(kept > 0 or level == 0, "degradation.levels",
                 f"level {level!r} is 0 in float32, the precision of a run's level: no noise would be drawn")
    _require(len(set(in_runs)) == len(in_runs), "degradation.levels",
             f"{tuple(d.levels)} are not distinct in float32, the precision of a run's level")
    for b in _distinct(d.backbones, "degradation.backbones"):
        _require(b in config.backbones, "degradation.backbones", f"{b!r} is not in backbones {tuple(config.backbones)}")
    for s in _distinct(d.scales, "degradation.scales"):
        _require(s in config.scales, "degradation.scales", f"{s!r} is not in scales {tuple(config.scales)}")
    if d.kind == "none":
        _require(tuple(d.levels) == (0.0,), "degradation.levels", "must be (0.0,) when degradation.kind is 'none'")


def _check_training(config: ml_collections.ConfigDict) -> None:
    """train.* (the optimiser, epochs, batches, dropout) and pairs.*."""
    t = config.train
    in_range = f"within float32's range ({_F32.tiny:.2g} to {_F32.max:.2g})"
    _require(_float32(t.learning_rate) and t.learning_rate > 0, "train.learning_rate",
             f"{t.learning_rate} must be a number > 0 {in_range}")
    _require(_float32(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay",
             f"{t.weight_decay} must be 0 or a number > 0 {in_range}")
    _require(_int(t.epochs, 1), "train.epochs", f"{t.epochs} must be an integer >= 1")
    _require(_int(t.batch_size, 1), "train.batch_size", f"{t.batch_size} must be an integer >= 1")
    _require(_int(t.eval_batch_size, 1), "train.eval_batch_size",
             f"{t.eval_batch_size} must be an integer >= 1")
    _require(0 <= t.dropout < 1, "train.dropout", f"{t.dropout} must be in [0, 1)")
    _require(sorted(config.pairs) == sorted(PAIR_FIELDS), "pairs",
             f"has fields {sorted(config.pairs)}; expected exactly {', '.join(PAIR_FIELDS)}")
    _require(0 < config.pairs.train_fraction < 1, "pairs.train_fraction",
             f"{config.pairs.train_fraction} must be in (0, 1)")
    _require(_int(config.pairs.split_seed, 0), "pairs.split_seed",
             f"{config.pairs.split_seed!r} must be an integer >= 0")
    _require(config.pairs.split_by in SPLITS, "pairs.split_by",
             f"{config.pairs.split_by!r}; allowed: {', '.join(repr(s) for s in SPLITS)}")


def _check_sources(config: ml_collections.ConfigDict) -> None:
    """synthetic.* for synthetic features; data.* and backbone.* for features extracted from images."""
    from fusion_jax.data.sources import IMAGE_SOURCES

    if config.features == "synthetic":
        sy = config.synthetic
        for field, low in (("n_images", 2), ("captions_per_image", 1), ("latent_dim", 1), ("dim", 1),
                           ("tokens", 0), ("seed", 0)):
            _require(_int(sy[field], low), f"synthetic.{field}", f"{sy[field]!r} must be an integer >= {low}")
        for field in ("caption_noise", "view_noise"):
            _require(_finite(sy[field]) and sy[field] >= 0, f"synthetic.{field}",
                     f"{sy[field]!r} must be a finite number >= 0")
    if config.features in IMAGE_SOURCES:
        _require(0 <= config.data.max_bad_fraction <= 1, "data.max_bad_fraction",
                 f"{config.data.max_bad_fraction} must be in [0, 1]")
        for field, low in (("embedded_images", 2), ("embedded_seed", 0), ("image_size", 8)):
            _require(_int(config.data[field], low), f"data.{field}",
                     f"{config.data[field]!r} must be an integer >= {low}")
        emb = config.backbone.embedded
        for field, low in (("n_images", 2), ("seed", 0), ("clip_steps", 1), ("resnet_steps", 1), ("text_steps", 1)):
            _require(_int(emb[field], low), f"backbone.embedded.{field}", f"{emb[field]!r} must be an integer >= {low}")
        b = config.backbone
        trains_embedded = "embedded" in (b.clip.model, b.resnet.model, b.resnet.text_model)
        _require(not (config.features == "embedded" and trains_embedded and emb.seed == config.data.embedded_seed),
                 "backbone.embedded.seed", f"{emb.seed} must differ from data.embedded_seed: the embedded backbones "
                 "would train on the sweep's own images")
        _require(_int(config.backbone.batch_size, 1),
                 "backbone.batch_size", "must be an integer >= 1")


def _check_runtime(config: ml_collections.ConfigDict) -> None:
    """head.* and how the sweep runs: programs, chunks, lanes, compilation, checkpoints, the t-SNE sample."""
    h = config.head
    for field in ("hidden", "mlp_hidden", "num_heads"):
        _require(_int(h[field], 1), f"head.{field}", f"{h[field]} must be an integer >= 1")
    _require(h.hidden % h.num_heads == 0, "head.num_heads", f"{h.num_heads} must divide head.hidden={h.hidden}")
    _require(isinstance(config.split_by_scale, bool), "split_by_scale",
             f"{config.split_by_scale!r} must be True or False")
    _require(_int(config.max_runs_per_program, 0),
             "max_runs_per_program", f"{config.max_runs_per_program} must be an integer >= 0 (0: no cap)")
    _require(_int(config.runs_per_chunk, 0), "runs_per_chunk",
             f"{config.runs_per_chunk} must be an integer >= 0 (0: 2 on CPUs, all of a device's runs otherwise)")
    _require(_int(config.lanes, 0), "lanes",
             f"{config.lanes} must be an integer >= 0 (0: one per core on a CPU with one device)")
    _require(_int(config.compile_workers, 0),
             "compile_workers", f"{config.compile_workers} must be an integer >= 0 (0: half the cores)")
    cache = config.compilation_cache
    _require(isinstance(cache, str), "compilation_cache", f"{cache!r} must be a folder's path (empty: none)")
    problem = unwritable_folder(cache) if cache else None
    _require(problem is None, "compilation_cache",
             f"{cache!r} {problem}: give a folder jax can write its programs into (empty: none)")
    _require(_int(config.checkpoint.keep, 1), "checkpoint.keep",
             f"{config.checkpoint.keep} must be an integer >= 1")
    _require(_int(config.tsne_pairs, 0), "tsne_pairs", f"{config.tsne_pairs!r} must be an integer >= 0 (0: no t-SNE)")


def _check_distributed(config: ml_collections.ConfigDict) -> None:
    """distributed.*: the wait limits, and a coordinator, process count and index that fit together."""
    for field in ("timeout_seconds", "wait_seconds"):
        value = config.distributed[field]
        _require(_finite(value) and value >= 1, f"distributed.{field}", f"{value!r} must be a finite number >= 1")
    d = config.distributed
    if d.coordinator_address:
        host, _, port = str(d.coordinator_address).rpartition(":")
        _require(bool(host) and port.isdigit() and 1 <= int(port) <= 65535, "distributed.coordinator_address",
                 f"{d.coordinator_address!r} must be HOST:PORT, the port from 1 to 65535")
    _require(_int(d.num_processes, 0), "distributed.num_processes",
             f"{d.num_processes!r} must be an integer >= 0 (0: one, or the cluster's count under SLURM)")
    _require(_int(d.process_id, -1) and (d.process_id < d.num_processes or d.num_processes == 0),
             "distributed.process_id", f"{d.process_id!r} must be an integer from 0 to num_processes - 1 "
             "(-1: from the cluster)")
    _require(d.num_processes > 0 or not (d.coordinator_address or d.process_id >= 0), "distributed.num_processes",
             "is 0 while distributed.coordinator_address or process_id is set: set it to the number of processes "
             "(each would otherwise run the whole sweep alone)")
    if d.num_processes > 1 and not in_cluster():
        _require(bool(d.coordinator_address), "distributed.coordinator_address",
                 "must be HOST:PORT (process 0's) with num_processes > 1 outside a cluster (SLURM)")
        _require(d.process_id >= 0, "distributed.process_id",
                 "must be this process's index with num_processes > 1 outside a cluster (SLURM)")


def validate_scales(config: ml_collections.ConfigDict, sets: dict[str, FeatureSet | ImageCaptionDataset]) -> None:
    """Every scale must fit the pairs each set (a dataset before extraction, each backbone's features
    after, keyed by how the error names it) can make, and leave both splits usable."""
    for label, fs in sets.items():
        limit = max_pairs(fs.caption_image, fs.n_images, **config.pairs)
        by_image = " with pairs.split_by='image'" if config.pairs.split_by == "image" else ""
        captioned = len(captioned_images(fs.caption_image))
        to_train = split_sizes(captioned, config.pairs.train_fraction)[0]  # the image split's (data/pairs.py)
        _require(limit or not by_image or captioned < 2, "pairs.split_by",
                 f"'image' splits the {captioned} images of {label} that have a caption ({fs.n_images} images in "
                 f"all) into {to_train} for training and {captioned - to_train} for validation (train_fraction "
                 f"{config.pairs.train_fraction}); each side needs at least 2, as a negative pairs a caption with "
                 "another image of its side: use 'pair' or more images")
        _require(limit >= 2, "scales", f"{label} makes no pairs: a negative pairs an image with a caption of "
                 f"another image, so captions of at least 2 images are needed ({fs.n_captions} captions of "
                 f"{captioned} image(s), {fs.n_images} images{by_image})")
        low = next((s for s in range(2, limit + 1) if (n := split_sizes(s, config.pairs.train_fraction))[0]
                    >= config.train.batch_size and n[1] >= 2), None)  # the smallest scale the check below passes
        allowed = f"allowed: {low}..{limit}" if low else "none is usable (too few pairs for a training batch)"
        for scale in config.scales:
            _require(scale <= limit, "scales",
                     f"scale {scale} is larger than the {limit} pairs available from {label} "
                     f"({fs.n_captions} captions, {fs.n_images} images{by_image}); {allowed}")
            n_train, n_val = split_sizes(scale, config.pairs.train_fraction)
            _require(n_train >= config.train.batch_size and n_val >= 2, "scales",
                     f"scale {scale} leaves {n_train} training and {n_val} validation pairs; "
                     f"need at least train.batch_size={config.train.batch_size} and 2")
