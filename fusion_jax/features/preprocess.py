"""Batched image preprocessing that reproduces transformers' (slow, PIL-based) image processors.

`CLIPImageProcessor` and `ConvNextImageProcessor` (the one microsoft/resnet-* ship) both resize a
uint8 PIL image with `PIL.Image.resize(..., reducing_gap=None)`, centre-crop the uint8 array
(zero-padding when it is too small), rescale in float64 then cast to float32, and normalise in
float32. We do the same per image in a thread pool (PIL releases the GIL) and apply rescale and
normalise through a per-channel 256-entry lookup table computed with the very same float ops,
so the output equals the processor's bit for bit on uint8 input.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

# ConvNextImageProcessor warps (no crop) at or above this shortest edge; see its `resize`.
CONVNEXT_CROP_LIMIT = 384
SUPPORTED = ("CLIPImageProcessor", "ConvNextImageProcessor")


def _default_threads() -> int:
    """min(4, cpu count)."""
    return max(1, min(4, os.cpu_count() or 1))


def _hw(size: Any) -> tuple[int, int]:
    """(height, width) of a {"height", "width"} size dict."""
    return int(size["height"]), int(size["width"])


def shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    """Output (height, width) with the short side set to `edge`, as transformers rounds it (int())."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop of an [H, W, C] array, zero-padded like transformers' `center_crop` if too small."""
    h, w = image.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[top : top + height, left : left + width]
    nh, nw = max(height, h), max(width, w)
    pt, pl = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded = np.zeros((nh, nw) + image.shape[2:], image.dtype)
    padded[pt : pt + h, pl : pl + w] = image
    top, left = top + pt, left + pl
    return padded[max(0, top) : min(nh, top + height), max(0, left) : min(nw, left + width)]


class UnsupportedProcessor(ValueError):
    """A model's image processor is none that this module mirrors."""


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """uint8 RGB images -> float32 [batch, 3, H, W] pixel_values, as the model's own processor makes them."""

    do_resize: bool = True
    shortest_edge: int | None = 224  # resize the short side to this, keeping the aspect ratio...
    resize_hw: tuple[int, int] | None = None  # ...or warp to this (height, width)
    resample: int = int(Image.Resampling.BICUBIC)
    crop_hw: tuple[int, int] | None = (224, 224)  # centre crop after resizing; None: no crop
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    do_convert_rgb: bool = True  # grey [H, W] / [H, W, 1] and RGBA inputs become RGB; else they are errors
    num_threads: int = dataclasses.field(default_factory=_default_threads)

    def __post_init__(self) -> None:
        """Check that the resize rule is unambiguous."""
        if self.do_resize and (self.shortest_edge is None) == (self.resize_hw is None):
            raise ValueError("set exactly one of shortest_edge and resize_hw when do_resize is True")

    @classmethod
    def from_processor(cls, processor: Any, num_threads: int | None = None) -> ImagePreprocessor:
        """Settings of a loaded (slow) CLIPImageProcessor or ConvNextImageProcessor (UnsupportedProcessor
        for others)."""
        names = [c.__name__ for c in type(processor).__mro__]
        kind = next((n for n in names if n in SUPPORTED), None)
        if kind is None:
            raise UnsupportedProcessor(
                f"unsupported image processor {type(processor).__name__}; expected one of {', '.join(SUPPORTED)} "
                "(fast processors resize with torchvision: load with use_fast=False)"
            )
        p = processor
        common = dict(
            do_resize=bool(p.do_resize),
            resample=int(p.resample),
            do_rescale=bool(p.do_rescale),
            rescale_factor=float(p.rescale_factor),
            do_normalize=bool(p.do_normalize),
            image_mean=tuple(float(m) for m in np.broadcast_to(p.image_mean, (3,))),
            image_std=tuple(float(s) for s in np.broadcast_to(p.image_std, (3,))),
            num_threads=num_threads if num_threads is not None else _default_threads(),
        )
        if kind == "CLIPImageProcessor":
            edge = p.size.get("shortest_edge")
            return cls(
                shortest_edge=int(edge) if edge is not None else None,
                resize_hw=None if edge is not None else _hw(p.size),
                crop_hw=_hw(p.crop_size) if p.do_center_crop else None,
                do_convert_rgb=bool(getattr(p, "do_convert_rgb", True)),
                **common,
            )
        if "shortest_edge" not in p.size:
            raise ValueError(f"ConvNextImageProcessor size needs 'shortest_edge', got {dict(p.size)}")
        edge = int(p.size["shortest_edge"])
        # ConvNext has no do_convert_rgb (grey input breaks it); we convert grey/RGBA like CLIP does.
        if edge < CONVNEXT_CROP_LIMIT:  # short side to int(edge / crop_pct), then crop edge x edge (in resize)
            return cls(shortest_edge=int(edge / p.crop_pct), crop_hw=(edge, edge) if p.do_resize else None, **common)
        return cls(shortest_edge=None, resize_hw=(edge, edge), crop_hw=None, **common)

    @classmethod
    def from_pretrained(cls, model_id_or_dir: str, num_threads: int | None = None,
                        revision: str | None = None) -> ImagePreprocessor:
        """Load the model's image processor (slow, PIL variant) with AutoImageProcessor and mirror it."""
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_id_or_dir, use_fast=False, revision=revision)
        return cls.from_processor(processor, num_threads=num_threads)

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the output for an input of this size."""
        if self.crop_hw is not None:
            return self.crop_hw
        if not self.do_resize:
            return height, width
        if self.resize_hw is not None:
            return self.resize_hw
        return shortest_edge_size(height, width, int(self.shortest_edge))

    def lookup_table(self) -> np.ndarray:
        """float32 [3, 256]: rescale + normalise of every uint8 value, with transformers' exact float ops."""
        values = np.arange(256, dtype=np.uint8)[None, :].repeat(3, 0)
        table = (values.astype(np.float64) * self.rescale_factor).astype(np.float32) if self.do_rescale else values
        if self.do_normalize:
            table = table.astype(np.float32) if table.dtype != np.float32 else table
            mean = np.asarray(self.image_mean, np.float32)[:, None]
            std = np.asarray(self.image_std, np.float32)[:, None]
            table = (table - mean) / std
        return np.ascontiguousarray(table, dtype=np.float32)

    def to_rgb(self, image: np.ndarray) -> np.ndarray:
        """Validate an image and bring it to uint8 [H, W, 3]."""
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 3:
            return image
        if self.do_convert_rgb and (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 4))):
            if image.ndim == 2 or image.shape[-1] == 1:
                return np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
            return image[..., :3]  # PIL's RGBA -> RGB conversion drops alpha
        raise ValueError(f"images must be [H, W, 3] RGB, got shape {image.shape}")

    def resize_crop(self, image: np.ndarray) -> np.ndarray:
        """Resize (PIL, on uint8) and centre-crop one image; uint8 [h, w, 3]."""
        image = self.to_rgb(image)
        if self.do_resize:
            if self.resize_hw is not None:
                h, w = self.resize_hw
            else:
                h, w = shortest_edge_size(image.shape[0], image.shape[1], int(self.shortest_edge))
            pil = Image.fromarray(image)
            image = np.asarray(pil.resize((w, h), resample=self.resample, reducing_gap=None))
        if self.crop_hw is not None:
            image = center_crop(image, *self.crop_hw)
        return image

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float32 [batch, 3, H, W] pixel values for uint8 [H, W, 3] RGB images of any sizes."""
        images = list(images)
        if not images:
            raise ValueError("no images to preprocess")
        shapes = {self.output_hw(*np.shape(image)[:2]) for image in images}
        if len(shapes) > 1:
            raise ValueError(f"images preprocess to different shapes {sorted(shapes)}; set a crop size to batch them")
        out = np.empty((len(images), 3) + shapes.pop(), np.float32)
        table = self.lookup_table()

        def work(i: int) -> None:
            crop = self.resize_crop(images[i])
            for c in range(3):  # rescale + normalise by table lookup, written in place (channels first)
                np.take(table[c], crop[..., c], out=out[i, c], mode="clip")  # uint8: in range

        if self.num_threads > 1 and len(images) > 1:
            with ThreadPoolExecutor(max_workers=min(self.num_threads, len(images))) as pool:
                list(pool.map(work, range(len(images))))
        else:
            for i in range(len(images)):
                work(i)
        return out
