"""Frozen feature extraction: backbones, preprocessing, the on-disk cache, the embedded models.

Only this package imports transformers; heads, training and reports never do.
"""
