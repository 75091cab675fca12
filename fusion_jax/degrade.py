"""Feature degradation, applied inside the compiled program.

The paper's protocol: v' = normalize(v + N(0, sigma^2 I)). The noise of a feature vector is a
pure function of the run's noise key and the vector's index in the FeatureSet, so it is fixed
for the whole run (the same vector always gets the same noise, in training and evaluation) and
is drawn only for the vectors of the current batch, never materialised for the whole set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("none", "gaussian")
MODALITIES = ("image", "text", "both")
# The largest noise level: far past pure noise (the paper's largest is 0.5), and far below where the float32
# norm of a noisy feature vector overflows (about 1e19 / sqrt(d)).
MAX_LEVEL = 1e6


def degraded(modality: str) -> tuple[str, ...]:
    """The feature sets `degradation.modality` degrades: ("image",), ("text",) or both."""
    return {"image": ("image",), "text": ("text",), "both": ("image", "text")}[modality]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Unit L2 norm along the last axis."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def gaussian(x: jax.Array, index: jax.Array, key: jax.Array, sigma: jax.Array) -> jax.Array:
    """normalize(x + sigma * z), z ~ N(0, I) fixed per vector by (key, index); x itself at sigma 0.

    Level 0 is the features as they are, the same as a run without a noise study: on unit vectors (the
    protocol's, CLIP's) normalize(x) is x, and other features are not rescaled behind the user's back.
    x: [batch, d] or [batch, tokens, d]; index: [batch] positions of the vectors in their set.
    """
    z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), x.shape[1:], x.dtype))(index)
    return jnp.where(sigma > 0, l2_normalize(x + sigma * z), x)


def degrade(x: jax.Array, index: jax.Array, key: jax.Array, sigma: jax.Array, kind: str) -> jax.Array:
    """Apply degradation `kind` ("none": identity; "gaussian": the paper's noise) to a batch."""
    if kind == "none":
        return x
    if kind == "gaussian":
        return gaussian(x, index, key, sigma)
    raise ValueError(f"unknown degradation kind {kind!r}; allowed: {', '.join(KINDS)}")
