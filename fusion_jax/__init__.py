"""fusion_jax: concatenation vs cross-attention fusion of frozen features, in JAX/Flax.

A reimplementation of the study in "Feature Alignment Determines Fusion Strategy"
(arXiv:2606.01207) built around vmapped, compiled sweeps.
"""

__version__ = "0.1.0"
