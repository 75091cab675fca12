"""ImageCaptionDataset: images (decoded on demand) with their captions, before any backbone."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

# A folder written by data.flickr8k.write_flickr8k_folder (features.standins) holds STANDIN_FILE; the
# Flickr8k loader then names the dataset STANDIN_NAME, so that results on it are never labelled Flickr8k.
STANDIN_FILE = "fusion_jax_standin.json"
STANDIN_NAME = "flickr8k-standin"


class BadImageError(OSError):
    """An image that cannot be read or decoded; extraction skips it and counts it."""


class DataUnavailableError(RuntimeError):
    """The configured data cannot be found or used; the message names the problem and how to mend it."""


@dataclasses.dataclass(frozen=True)
class ImageCaptionDataset:
    """A captioned image collection.

    image_ids: [n_images] names (file names for Flickr8k); captions: [n_captions] strings;
    caption_image: [n_captions] int32 index into image_ids; load_image(i) -> uint8 [H, W, 3] RGB,
    raising BadImageError for an unreadable image; fingerprint: a content hash that changes when
    the data changes (it keys feature caches); attributes: optional [n_images] int label arrays
    (the embedded dataset's ground truth, e.g. "shape"), with their class names in attribute_names.
    """

    name: str
    image_ids: tuple[str, ...]
    captions: tuple[str, ...]
    caption_image: np.ndarray
    load_image: Callable[[int], np.ndarray]
    fingerprint: str
    attributes: dict[str, np.ndarray] | None = None
    attribute_names: dict[str, tuple[str, ...]] | None = None

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_captions(self) -> int:
        return len(self.captions)
