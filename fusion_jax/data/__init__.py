"""Datasets and features: the FeatureSet value, its sources, and the pair builder."""

from fusion_jax.data.featureset import FeatureSet
from fusion_jax.data.pairs import SPLITS, Pairs, build_pairs, max_pairs

__all__ = ["FeatureSet", "Pairs", "SPLITS", "build_pairs", "max_pairs"]
