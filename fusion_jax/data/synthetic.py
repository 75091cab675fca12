"""Latent-variable features with an alignment dial: the package's own, download-free FeatureSet.

Each image has a latent z ~ N(0, I_k); each of its captions a perturbed copy u = z + c * e.
Image features are x = W_v z + s * e, caption features y = W_t u + s * e, both unit-normalised,
with W_t = a * W_v + sqrt(1 - a^2) * W_ind. At alignment a = 1 image and text are two noisy views
of one latent through the same map (matched pairs are close in cosine); at a = 0 the maps are
independent, so cosine carries no signal and a head has to learn the correspondence.
With tokens > 0 each vector becomes that many tokens (the vector plus per-token noise), with a
mask whose length varies, to exercise token-level fusion.
"""

from __future__ import annotations

import numpy as np

from fusion_jax.data.aligned import aligned
from fusion_jax.data.featureset import FeatureSet

NAMED_ALIGNMENT = {"aligned": 1.0, "unaligned": 0.0}


def alignment_of(backbone: str) -> float:
    """Alignment of a synthetic backbone name: "aligned", "unaligned" or "alignment=A" (0 <= A <= 1)."""
    if backbone in NAMED_ALIGNMENT:
        return NAMED_ALIGNMENT[backbone]
    if backbone.startswith("alignment="):
        try:
            a = float(backbone.split("=", 1)[1])
        except ValueError:
            a = -1.0
        if 0.0 <= a <= 1.0:
            return a
    raise ValueError(f"unknown synthetic backbone {backbone!r}; allowed: aligned, unaligned, alignment=A with 0 <= A <= 1")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _tokens(x: np.ndarray, tokens: int, noise: float, rng: np.random.Generator):
    lengths = rng.integers(max(1, tokens // 2), tokens + 1, len(x))
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.float32)
    t = _unit(x[:, None, :] + noise * rng.standard_normal((len(x), tokens, x.shape[-1])))
    return aligned(t * mask[..., None], np.float32), aligned(mask)


def generate(backbone: str, n_images: int, captions_per_image: int, latent_dim: int, dim: int,
             caption_noise: float, view_noise: float, seed: int, tokens: int = 0) -> FeatureSet:
    """FeatureSet of `n_images` images with `captions_per_image` captions each, d_v = d_t = `dim`.

    Images and captions (the latents), the maps and the view noise depend on `seed` alone, so backbones of one
    seed describe the same data with the same image features; the alignment sets the text map w_t alone.
    """
    alignment = alignment_of(backbone)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_images, latent_dim))
    caption_image = np.repeat(np.arange(n_images), captions_per_image)
    u = z[caption_image] + caption_noise * rng.standard_normal((len(caption_image), latent_dim))

    maps = np.random.default_rng([seed, 1])
    w_v = maps.standard_normal((latent_dim, dim)) / np.sqrt(latent_dim)
    w_ind = maps.standard_normal((latent_dim, dim)) / np.sqrt(latent_dim)
    w_t = alignment * w_v + np.sqrt(1.0 - alignment**2) * w_ind

    views = np.random.default_rng([seed, 2])
    image = aligned(_unit(z @ w_v + view_noise * views.standard_normal((n_images, dim))), np.float32)
    text = aligned(_unit(u @ w_t + view_noise * views.standard_normal((len(u), dim))), np.float32)
    masks = {}
    if tokens:
        image, masks["image_mask"] = _tokens(image, tokens, view_noise, views)
        text, masks["text_mask"] = _tokens(text, tokens, view_noise, views)
    provenance = {"dataset": "synthetic", "backbone": backbone, "alignment": alignment, "seed": seed,
                  "n_images": n_images, "captions_per_image": captions_per_image, "dim": dim,
                  "latent_dim": latent_dim, "tokens": tokens}
    return FeatureSet(image, text, caption_image.astype(np.int32), provenance=provenance, **masks)
