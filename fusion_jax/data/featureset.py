"""FeatureSet: frozen image and caption features with the caption -> image index."""

from __future__ import annotations

import dataclasses

import numpy as np

from fusion_jax.data.aligned import aligned


def _frozen(a: np.ndarray | None) -> np.ndarray | None:
    """A read-only view of `a` in aligned memory (`aligned`: a copy only where `a` is not so already)."""
    if a is None:
        return None
    a = aligned(a).view()
    a.flags.writeable = False
    return a


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Frozen features of one (dataset, backbone).

    image: [n_images, d_v] or [n_images, tokens, d_v]; text: [n_captions, d_t] or
    [n_captions, tokens, d_t]; masks ([n, tokens], 1 = real token) only for token features;
    caption_image: [n_captions] index of each caption's image. provenance keys caches and reports.
    The feature arrays and masks are read-only views in 64-byte aligned memory (`data.aligned`), which on a
    CPU the jax devices read in place: arrays given to a FeatureSet must not be written afterwards.
    """

    image: np.ndarray
    text: np.ndarray
    caption_image: np.ndarray
    image_mask: np.ndarray | None = None
    text_mask: np.ndarray | None = None
    provenance: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("image", "text", "image_mask", "text_mask"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        n_images, n_captions = self.image.shape[0], self.text.shape[0]
        if self.caption_image.shape != (n_captions,):
            raise ValueError(f"caption_image has shape {self.caption_image.shape}, expected ({n_captions},)")
        if n_captions and (self.caption_image.min() < 0 or self.caption_image.max() >= n_images):
            raise ValueError(f"caption_image holds indices from {self.caption_image.min()} to {self.caption_image.max()}, "
                             f"outside [0, {n_images}): the rows of image, shape {self.image.shape} (one row per "
                             "image; is image transposed?)")
        for name, x, mask in (("image", self.image, self.image_mask), ("text", self.text, self.text_mask)):
            if x.ndim not in (2, 3):
                raise ValueError(f"{name} features must be [n, d] or [n, tokens, d], got shape {x.shape}")
            if mask is not None and mask.shape != x.shape[:2]:
                raise ValueError(f"{name}_mask has shape {mask.shape}, expected {x.shape[:2]}")

    def __reduce__(self):
        # Copies and pickles are built through __init__, which puts their arrays in aligned, read-only memory.
        return FeatureSet, tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @property
    def n_images(self) -> int:
        return int(self.image.shape[0])

    @property
    def n_captions(self) -> int:
        return int(self.text.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The feature arrays as a pytree (masks only where present), ready for the device."""
        out = {"image": self.image, "text": self.text}
        if self.image_mask is not None:
            out["image_mask"] = self.image_mask
        if self.text_mask is not None:
            out["text_mask"] = self.text_mask
        return out


def feature_identity(provenance: dict) -> dict:
    """What made a backbone's features, for comparing two sweeps or a resume: the provenance without
    what is measured from the features or the pairs (alignment, split_overlap, notes, and the token counts,
    which newer sweeps record for Table 3) and without a local model's name where its files' hash
    identifies it."""
    out = {k: v for k, v in provenance.items()
           if k not in ("alignment", "split_overlap", "notes", "tokens_image", "tokens_text")}
    for field in ("model", "text_model"):
        if out.get(f"{field}_files"):
            out.pop(field, None)
    return out
