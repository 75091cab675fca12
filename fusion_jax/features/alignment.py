"""How aligned a FeatureSet is: zero-shot image -> text retrieval by cosine similarity.

Defined only where image and text features share a space (the same dimension); otherwise the
result says so instead of inventing a number.
"""

from __future__ import annotations

import numpy as np

from fusion_jax.data.featureset import FeatureSet
from fusion_jax.data.pairs import captioned_images


def _pooled(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if x.ndim == 2:
        return x
    if mask is None:
        return x.mean(1, dtype=np.float64)
    return (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)


def retrieval_recall(fs: FeatureSet, ks: tuple[int, ...] = (1, 5), max_images: int = 1000, seed: int = 0,
                     chunk: int = 100) -> dict:
    """Recall@k of image -> caption retrieval over `max_images` images and all their captions.

    An image counts as retrieved at k when one of its own captions is among the k captions most
    cosine-similar to it; images without a caption are left out (none of their captions can be
    retrieved). `chance@k` is the expected recall of a random ranking. Only the sampled rows are pooled,
    and `chunk` images are ranked at a time: memory grows with the captions, not with images x captions.
    """
    if fs.image.shape[-1] != fs.text.shape[-1]:
        return {"defined": False, "reason": f"image features are {fs.image.shape[-1]}-d and text features "
                f"{fs.text.shape[-1]}-d: no shared space, so zero-shot retrieval is undefined"}
    rng = np.random.default_rng(seed)
    images = np.sort(rng.permutation(captioned_images(fs.caption_image))[:max_images])
    captions = np.flatnonzero(np.isin(fs.caption_image, images))
    rows = lambda x, mask, idx: _pooled(x[idx], None if mask is None else mask[idx]).astype(np.float64)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    image, text = unit(rows(fs.image, fs.image_mask, images)), unit(rows(fs.text, fs.text_mask, captions))
    of_caption = fs.caption_image[captions]
    top = min(max(ks), len(captions))
    hits = np.zeros((len(images), top), bool)  # whether the image's j-th nearest caption is its own
    for i in range(0, len(images), chunk):
        order = np.argsort(-(image[i:i + chunk] @ text.T), axis=1)[:, :top]
        hits[i:i + chunk] = of_caption[order] == images[i:i + chunk, None]
    out = {"defined": True, "n_images": int(len(images)), "n_captions": int(len(captions))}
    own = np.bincount(of_caption, minlength=fs.n_images)[images]
    g = len(captions)
    for k in ks:
        out[f"recall@{k}"] = float(hits[:, :k].any(axis=1).mean())
        # 1 - P(no own caption among k random draws without replacement from the gallery)
        p_miss = np.ones(len(images))
        for j in range(min(k, g)):  # all g drawn: p_miss is then 0
            p_miss *= np.clip((g - own - j) / (g - j), 0, 1)
        out[f"chance@{k}"] = float((1 - p_miss).mean())
    return out
