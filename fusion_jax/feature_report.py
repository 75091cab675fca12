"""What a sweep writes about its features beside the runs: notes for the reader (results.json, summary.md),
how much each scale's validation pairs share with training, and the matched pairs the report's t-SNE draws."""

from __future__ import annotations

import contextlib
import glob
import logging
import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from fusion_jax import degrade
from fusion_jax.data import FeatureSet, build_pairs, captioned_images, overlap
from fusion_jax.files import atomic_write_npz, safe_name
from fusion_jax.fusion import masked_mean
from fusion_jax.groups import Group

log = logging.getLogger("fusion_jax")


def tsne_samples(workdir: str, features: dict[str, FeatureSet], n: int) -> None:
    """Write each backbone's `tsne_<backbone>.npz` (`tsne_sample`); with n 0, remove those an earlier run left (and
    their figure), which would still draw the figure that n 0 turns off."""
    if not n:
        for name in glob.glob(os.path.join(workdir, "tsne_*.npz")) + [os.path.join(workdir, "fig_tsne.png")]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
    for backbone, fs in features.items() if n else ():
        tsne_sample(workdir, backbone, fs, n)


def tsne_sample(workdir: str, backbone: str, fs: FeatureSet, n: int = 800, seed: int = 0) -> None:
    """`tsne_<backbone>.npz`: `n` matched pairs (image [n, d_v], text [n, d_t], pooled) for the report's t-SNE."""
    rng = np.random.default_rng(seed)
    captions = rng.permutation(fs.n_captions)[:n]
    pooled = lambda x, m: np.asarray(masked_mean(jnp.asarray(x), None if m is None else jnp.asarray(m)))
    image = fs.image[fs.caption_image[captions]]
    image_mask = None if fs.image_mask is None else fs.image_mask[fs.caption_image[captions]]
    text_mask = None if fs.text_mask is None else fs.text_mask[captions]
    path = os.path.join(workdir, f"tsne_{safe_name(backbone)}.npz")
    arrays = {"image": pooled(image, image_mask), "text": pooled(fs.text[captions], text_mask)}
    atomic_write_npz(path, arrays)


def feature_notes(config: ml_collections.ConfigDict, groups: list[Group],
                  features: dict[str, FeatureSet]) -> dict[str, list[str]]:
    """What a reader of the results should know about each backbone's features, logged as warnings and
    kept in results.json (summary.md shows them): images without a caption (never drawn), and a noise
    study on features that are not unit vectors (σ is meant relative to unit norm, and levels > 0 are
    re-normalised while level 0 stays as it is, so their gap mixes the noise with a change of scale;
    up to 4096 rows spread over the set, real tokens only, by mask, for token features), and features that
    are another backbone's (one file under two names, say: the same runs twice)."""
    noisy = {g.backbone for g in groups if g.noisy}
    out = {}
    for i, (b, fs) in enumerate(features.items()):
        notes = out.setdefault(b, [])
        same = next((a for a in list(features)[:i] if same_features(features[a], fs)), None)
        if same is not None:
            notes.append(f"it holds the same features as backbone {same!r} (array for array): its runs repeat that "
                         "backbone's")
        uncaptioned = fs.n_images - len(captioned_images(fs.caption_image))
        if uncaptioned:
            notes.append(f"{uncaptioned} of its {fs.n_images} images have no caption: pairs never draw them")
        for m in degrade.degraded(config.degradation.modality) if b in noisy else ():
            n = len(getattr(fs, m))
            rows = np.unique(np.linspace(0, max(n - 1, 0), min(n, 4096)).astype(np.int64))  # spread over all
            x, mask = getattr(fs, m)[rows], getattr(fs, f"{m}_mask")
            norms = np.sqrt(np.einsum("...d,...d->...", x, x))
            norms = norms[mask[rows].astype(bool)] if mask is not None else norms.ravel()
            if norms.size and not np.allclose(norms, 1.0, atol=1e-3):
                span = dict.fromkeys((f"{norms.min():.3g}", f"{norms.max():.3g}"))
                notes.append(f"the noise study degrades its {m} features, whose norms are {'-'.join(span)}, not 1: "
                             "σ is meant for unit vectors, and levels > 0 are re-normalised while level 0 is used "
                             "as it is (L2-normalise the features first to study the noise alone)")
        for note in notes:
            log.warning("backbone %r: %s", b, note)
    return {b: notes for b, notes in out.items() if notes}


def same_features(a: FeatureSet, b: FeatureSet, block_bytes: int = 64 << 20) -> bool:
    """Whether two feature sets hold the same arrays (masks included): compared in blocks of rows of about
    `block_bytes`, stopping at the first that differs (token features can be gigabytes)."""
    def same(x, y) -> bool:
        if x is None or y is None or x.shape != y.shape:
            return x is None and y is None
        if x is y or (x.dtype == y.dtype and x.ctypes.data == y.ctypes.data and x.strides == y.strides):
            return True  # the same memory (a FeatureSet holds views: one of dataclasses.replace is another object)
        block = max(1, block_bytes // max(1, x[:1].nbytes))
        return all(np.array_equal(x[i:i + block], y[i:i + block]) for i in range(0, len(x), block))

    arrays = lambda fs: (fs.caption_image, fs.image_mask, fs.text_mask, fs.image, fs.text)  # the cheap first
    return all(same(x, y) for x, y in zip(arrays(a), arrays(b)))


def split_overlap(config: ml_collections.ConfigDict, fs: FeatureSet) -> dict[str, dict[str, float]]:
    """Per scale (as a string, for JSON), what its validation pairs share with its training pairs
    (`data.overlap`): how much the pair split lets validation see training's images and captions."""
    return {str(s): overlap(build_pairs(fs.caption_image, fs.n_images, s, **config.pairs), fs.caption_image)
            for s in config.scales}
