"""The paper's protocol as a base ConfigDict: each file in configs/ starts here and sets its experiment."""

from __future__ import annotations

import json
from typing import Any

import ml_collections

PAPER_SCALES = (2048, 4096, 8192, 16384)
PAPER_SEEDS = (42, 123, 456)
PAPER_NOISE = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


class ConfigError(ValueError):
    """A user error in the config: `field` and what is allowed (fusion_jax.validate raises most)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config.{field}: {message}" if field else f"config: {message}")
        self.field = field


def base_config(name: str, features: str) -> ml_collections.ConfigDict:
    """Fields every sweep has, at the paper's values (its learning rate is not legible: 1e-4 here)."""
    config = ml_collections.ConfigDict()
    config.name = name
    config.workdir = ""  # empty: results/<name>/
    config.cache_dir = ""  # empty: $FUSION_JAX_CACHE, else $XDG_CACHE_HOME/fusion_jax, else ~/.cache/fusion_jax
    config.features = features
    config.backbones = ()
    config.methods = ("concat", "cross")
    config.scales = PAPER_SCALES
    config.seeds = PAPER_SEEDS
    # split_by "pair": the pairs are split at random (the paper); "image": the images are, and no
    # validation image or caption is seen in training (data/pairs.py).
    config.pairs = ml_collections.ConfigDict(dict(split_seed=0, train_fraction=0.8, split_by="pair"))
    # v' = normalize(v + N(0, sigma^2 I)); `backbones` and `scales` list who gets the levels (empty:
    # all), the other runs are at level 0 only (the paper's noise study is one backbone at one scale).
    config.degradation = ml_collections.ConfigDict(dict(
        kind="gaussian", modality="image", levels=(0.0,), backbones=(), scales=()))
    config.train = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, weight_decay=0.01, epochs=10, batch_size=32, dropout=0.1, eval_batch_size=1024))
    config.head = ml_collections.ConfigDict(dict(hidden=256, mlp_hidden=128, num_heads=4))
    config.checkpoint = ml_collections.ConfigDict(dict(keep=2))
    # Matched pairs per backbone in the report's t-SNE figure (0: no t-SNE); its time grows with them.
    config.tsne_pairs = 800
    # Cap on the runs one compiled program trains at once (0: no cap); larger groups are split.
    config.max_runs_per_program = 0
    # One program per (backbone, method, scale) instead of per (backbone, method): more programs to
    # compile, and more groups to spread over the processes of a multi-process sweep.
    config.split_by_scale = False
    # Runs a device steps together, chunk after chunk (0: all of its runs on accelerators, 2 on CPUs,
    # whose caches then hold a chunk's parameters and moments). Results agree to float rounding.
    config.runs_per_chunk = 0
    # On a CPU with one device: programs that each train a share of a group's chunks, side by side
    # (0: one per core, at most one per full chunk). The same numbers, bit for bit.
    config.lanes = 0
    # Threads that compile the next groups while one trains (0: half the cores).
    config.compile_workers = 0
    # A folder for JAX's persistent compilation cache (empty: the process's own setting, by default
    # none): a later sweep of the same programs (other seed values, a resume) loads them.
    config.compilation_cache = ""
    # Several processes (hosts): empty / 0 / -1 mean "from the environment" (SLURM, JAX_COORDINATOR_ADDRESS).
    config.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=0, process_id=-1, timeout_seconds=300,
        wait_seconds=86400,  # how long a process waits for the others: their start-up, their groups
    ))
    return config


def add_image_caption_data(config: ml_collections.ConfigDict) -> None:
    """Fields of the `embedded` and `flickr8k` sources: the dataset, the backbones and their models."""
    config.data = ml_collections.ConfigDict(dict(
        flickr8k_dir="",  # a folder with Flicker8k_Dataset/ and Flickr8k.token.txt
        hub_id="jxie/flickr8k", hub_revision="",  # used when flickr8k_dir is empty
        max_bad_fraction=0.01,  # unreadable images tolerated before stopping
        embedded_images=8000, embedded_seed=0, image_size=64,  # the embedded dataset
    ))
    config.backbone = ml_collections.ConfigDict(dict(
        clip=dict(model="openai/clip-vit-base-patch32", revision=""),
        resnet=dict(model="microsoft/resnet-18", text_model="sentence-transformers/all-MiniLM-L6-v2", revision=""),
        tokens=False,  # True: token states with masks instead of pooled vectors
        batch_size=64,
        # "embedded" as a model id: the package's tiny models, trained on an embedded dataset of their own seed.
        embedded=dict(n_images=4000, seed=1, clip_steps=600, resnet_steps=400, text_steps=300),
    ))


# Config fields that neither change a sweep's results (runs_per_chunk: to float rounding, as the device
# count; lanes: not at all) nor its groups' names, which finished groups and checkpoints go by
# (split_by_scale and max_runs_per_program change those, so a resume must keep them).
# checkpoint.keep: how many epochs' checkpoints stay on disk; tsne_pairs: a figure's sample.
NOT_RESULTS = ("workdir", "distributed", "compile_workers", "runs_per_chunk", "lanes", "compilation_cache",
               "checkpoint.keep", "tsne_pairs")
# Fields saved only since a later release, which a sweep.json without them may have had at any value:
# not compared against such a file.
SAVED_LATER = ("split_by_scale",)
# Fields added since the first release, at their defaults: a config saved without them (a sweep.json, a
# results.json) is the same as one with them at these values.
ADDED = {"degradation.scales": [], "pairs.split_by": "pair"}


def not_result(key: str) -> bool:
    """Whether a (dotted) config field is, or lies inside, one of NOT_RESULTS."""
    return any(key == name or key.startswith(name + ".") for name in NOT_RESULTS)


def results_fields(d: dict, prefix: str = "") -> dict:
    """A nested config dict without its NOT_RESULTS fields, at any depth (what a sweep.json keeps)."""
    return {k: results_fields(v, f"{prefix}{k}.") if isinstance(v, dict) else v
            for k, v in d.items() if not not_result(prefix + k)}


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict (a config's to_dict(), say) as one level with dotted keys: {"train.epochs": 10, ...}."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _canonical(value: Any) -> Any:
    """A value as compared: numbers as floats (`levels=(0,0.1)` is `(0.0,0.1)`), lists and dicts inside too."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def differing(previous: dict, current: dict, skip: set[str] = frozenset()) -> list[str]:
    """The keys of two flat dicts whose values differ (compared as JSON, numbers by value), but those in `skip`."""
    text = lambda d, k: json.dumps(_canonical(d.get(k)), sort_keys=True)
    return sorted(k for k in (set(previous) | set(current)) - skip if text(previous, k) != text(current, k))
