"""Datasets and features: the FeatureSet value, its sources, and the pair builder."""

from fusion_jax.data.featureset import FeatureSet
from fusion_jax.data.pairs import (PAIR_FIELDS, SPLITS, Pairs, build_pairs, captioned_images, max_pairs, overlap,
                                   split_sizes)

__all__ = ["FeatureSet", "PAIR_FIELDS", "Pairs", "SPLITS", "build_pairs", "captioned_images", "max_pairs", "overlap",
           "split_sizes"]
