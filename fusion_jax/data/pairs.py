"""The one pair builder: balanced image-caption matching pairs per scale, with a fixed split.

A positive is an image with one of its own captions, a negative an image with a caption of a
different image; half and half. Pairs depend only on (split_seed, scale): every run of a scale
sees the same pairs and split, and a smaller scale's positives and negatives are prefixes of a
larger scale's, so the scales are nested subsets of one master list.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Pairs of one scale; rows [:n_train] are the training split, the rest validation."""

    image_idx: np.ndarray  # [scale] int32
    caption_idx: np.ndarray  # [scale] int32
    label: np.ndarray  # [scale] int32, 1 = matching
    n_train: int

    def split(self, part: str) -> dict[str, np.ndarray]:
        """Arrays of the "train" or "val" split as a pytree."""
        sl = slice(None, self.n_train) if part == "train" else slice(self.n_train, None)
        return {"image_idx": self.image_idx[sl], "caption_idx": self.caption_idx[sl], "label": self.label[sl]}


def max_pairs(caption_image: np.ndarray, n_images: int) -> int:
    """Largest scale the pair builder can serve: every caption once as positive and once as negative."""
    return 2 * len(caption_image) if n_images >= 2 else 0


def build_pairs(caption_image: np.ndarray, n_images: int, scale: int, split_seed: int,
                train_fraction: float = 0.8) -> Pairs:
    """Balanced pairs for `scale`: ceil(scale/2) positives, the rest negatives, split train/val."""
    limit = max_pairs(caption_image, n_images)
    if not 2 <= scale <= limit:
        raise ValueError(f"scale {scale} outside [2, {limit}] for {len(caption_image)} captions")
    caption_image = np.asarray(caption_image, np.int64)
    rng = np.random.default_rng(split_seed)
    pos_captions = rng.permutation(len(caption_image))
    neg_captions = rng.permutation(len(caption_image))
    # A uniform draw among the other images: shift the caption's own image by 1..n_images-1.
    neg_images = (caption_image[neg_captions] + rng.integers(1, n_images, len(caption_image))) % n_images

    n_pos = (scale + 1) // 2
    n_neg = scale - n_pos
    image_idx = np.concatenate([caption_image[pos_captions[:n_pos]], neg_images[:n_neg]])
    caption_idx = np.concatenate([pos_captions[:n_pos], neg_captions[:n_neg]])
    label = np.concatenate([np.ones(n_pos), np.zeros(n_neg)])

    order = np.random.default_rng([split_seed, scale]).permutation(scale)
    n_train = int(round(train_fraction * scale))
    return Pairs(image_idx[order].astype(np.int32), caption_idx[order].astype(np.int32),
                 label[order].astype(np.int32), n_train)
