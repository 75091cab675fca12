"""Feature sources: where a backbone's FeatureSet comes from, chosen by `config.features`."""

from __future__ import annotations

import ml_collections

from fusion_jax.data import synthetic
from fusion_jax.data.featureset import FeatureSet

SOURCES = ("synthetic",)


def check_backbone(config: ml_collections.ConfigDict, backbone: str) -> None:
    """Raise ValueError if `backbone` is not one the configured source can provide."""
    if config.features == "synthetic":
        synthetic.alignment_of(backbone)


def load_features(config: ml_collections.ConfigDict, backbone: str) -> FeatureSet:
    """The FeatureSet of `backbone` under the configured source."""
    if config.features == "synthetic":
        s = config.synthetic
        return synthetic.generate(backbone, s.n_images, s.captions_per_image, s.latent_dim, s.dim,
                                  s.caption_noise, s.view_noise, s.seed, s.tokens)
    raise ValueError(f"unknown feature source {config.features!r}; allowed: {', '.join(SOURCES)}")
