"""ImagePreprocessor against the transformers image processors it mirrors (no network)."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

transformers = pytest.importorskip("transformers")
from transformers import CLIPImageProcessor, ConvNextImageProcessor, ViTImageProcessor  # noqa: E402

from fusion_jax.features.preprocess import ImagePreprocessor, center_crop  # noqa: E402

# microsoft/resnet-18's preprocessor_config.json (the same file every fine-tune of it re-saves).
RESNET18_CONFIG = {
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "ConvNextImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}
# The pre-ImageProcessor spelling of the same settings (as older hub snapshots store it).
RESNET18_LEGACY = {
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ConvNextFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 224,
}
# openai/clip-vit-base-patch32's preprocessor_config.json.
CLIP_LEGACY = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
SHAPES = [(375, 500), (500, 333), (224, 224), (480, 640), (400, 120), (37, 91)]


def _images() -> list[np.ndarray]:
    """Random uint8 images of real-world sizes plus a smooth gradient."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SHAPES]
    y, x = np.mgrid[0:300, 0:451]
    gradient = np.stack([x * 255 / 450, y * 255 / 299, (x + y) * 255 / 749], axis=-1)
    return images + [np.round(gradient).astype(np.uint8)]


def _reference(processor, images) -> np.ndarray:
    """The processor's own pixel_values for a batch."""
    return processor(images=images, return_tensors="np")["pixel_values"]


def _assert_parity(processor, images=None, **kwargs) -> np.ndarray:
    """Our output equals the processor's bit for bit (as README.md says)."""
    images = _images() if images is None else images
    ours = ImagePreprocessor.from_processor(processor, **kwargs)(images)
    ref = _reference(processor, images)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    return ours


def test_clip_default_processor_parity():
    out = _assert_parity(CLIPImageProcessor())
    assert out.shape == (len(SHAPES) + 1, 3, 224, 224)


def test_resnet18_processor_parity():
    processor = ConvNextImageProcessor(**RESNET18_CONFIG)
    pre = ImagePreprocessor.from_processor(processor)
    assert pre.shortest_edge == 256 and pre.crop_hw == (224, 224) and pre.resample == 3  # int(224 / 0.875)
    assert _assert_parity(processor).shape[-2:] == (224, 224)


def test_convnext_resizes_to_the_crop_over_crop_pct_rounded_down():
    """224 / 0.9 = 248.9: the short side goes to 248, as transformers truncates it, then the crop to 224."""
    processor = ConvNextImageProcessor(**{**RESNET18_CONFIG, "crop_pct": 0.9})
    assert ImagePreprocessor.from_processor(processor).shortest_edge == 248
    _assert_parity(processor)


def test_convnext_large_size_warps_without_crop():
    processor = ConvNextImageProcessor(**{**RESNET18_CONFIG, "size": {"shortest_edge": 384}})
    pre = ImagePreprocessor.from_processor(processor)
    assert pre.resize_hw == (384, 384) and pre.crop_hw is None
    assert _assert_parity(processor).shape[-2:] == (384, 384)


def test_convnext_without_resize_does_not_crop():
    images = [np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)] * 2
    out = _assert_parity(ConvNextImageProcessor(**{**RESNET18_CONFIG, "do_resize": False}), images)
    assert out.shape == (2, 3, 50, 70)


def test_clip_crop_larger_than_resize_pads_with_zeros():
    _assert_parity(CLIPImageProcessor(size={"shortest_edge": 200}, crop_size={"height": 224, "width": 240}))


def test_clip_fixed_size_and_options():
    _assert_parity(CLIPImageProcessor(size={"height": 240, "width": 200}, resample=2, do_normalize=False))
    _assert_parity(CLIPImageProcessor(do_rescale=False, image_mean=[0.2, 0.3, 0.4], image_std=0.5))


def test_pil_inputs_and_rgb_conversion():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (300, 260), dtype=np.uint8)
    rgba = rng.integers(0, 256, (260, 300, 4), dtype=np.uint8)
    rgb = rng.integers(0, 256, (333, 500, 3), dtype=np.uint8)
    processor = CLIPImageProcessor()  # converts PIL grey/RGBA images with .convert("RGB")
    ref = _reference(processor, [Image.fromarray(grey), Image.fromarray(rgba), Image.fromarray(rgb)])
    ours = ImagePreprocessor.from_processor(processor)([grey, rgba, rgb])
    np.testing.assert_array_equal(ours, ref)
    # ConvNext has no RGB conversion of its own: ours converts, equal to feeding it RGB images.
    resnet = ConvNextImageProcessor(**RESNET18_CONFIG)
    ref = _reference(resnet, [Image.fromarray(grey).convert("RGB"), Image.fromarray(rgba).convert("RGB")])
    np.testing.assert_array_equal(ImagePreprocessor.from_processor(resnet)([grey, rgba]), ref)
    strict = dataclasses.replace(ImagePreprocessor.from_processor(resnet), do_convert_rgb=False)
    with pytest.raises(ValueError, match="RGB"):
        strict([grey])
    with pytest.raises(ValueError, match="uint8"):
        strict([rgb.astype(np.float32)])


def test_threads_do_not_change_the_result():
    processor = ConvNextImageProcessor(**RESNET18_CONFIG)
    serial = ImagePreprocessor.from_processor(processor, num_threads=1)(_images())
    threaded = ImagePreprocessor.from_processor(processor, num_threads=4)(_images())
    np.testing.assert_array_equal(serial, threaded)


def test_center_crop_matches_transformers():
    from transformers.image_transforms import center_crop as hf_center_crop

    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    for size in [(3, 3), (4, 6), (8, 4), (9, 11), (5, 7)]:
        np.testing.assert_array_equal(center_crop(image, *size), hf_center_crop(image, size))


def test_uncropped_batches_of_mixed_shapes_are_rejected():
    pre = ImagePreprocessor.from_processor(CLIPImageProcessor(do_center_crop=False))
    with pytest.raises(ValueError, match="different shapes"):
        pre(_images()[:2])


def test_unsupported_processor_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported image processor ViTImageProcessor"):
        ImagePreprocessor.from_processor(ViTImageProcessor())


def test_from_pretrained_saved_processors(tmp_path):
    images = _images()
    for name, processor in [("clip", CLIPImageProcessor()), ("resnet", ConvNextImageProcessor(**RESNET18_CONFIG))]:
        processor.save_pretrained(tmp_path / name)
        ours = ImagePreprocessor.from_pretrained(str(tmp_path / name))
        assert ours == ImagePreprocessor.from_processor(processor, num_threads=ours.num_threads)
        np.testing.assert_array_equal(ours(images), _reference(processor, images))


@pytest.mark.parametrize(
    "config, expected",
    [(RESNET18_LEGACY, lambda: ConvNextImageProcessor(**RESNET18_CONFIG)), (CLIP_LEGACY, CLIPImageProcessor)],
)
def test_from_pretrained_legacy_hub_configs(tmp_path, config, expected):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = ImagePreprocessor.from_pretrained(str(tmp_path), num_threads=1)
    assert ours == ImagePreprocessor.from_processor(expected(), num_threads=1)


def test_a_clip_processor_without_rgb_conversion_refuses_grey_images():
    pre = ImagePreprocessor.from_processor(CLIPImageProcessor(do_convert_rgb=False))
    assert pre.do_convert_rgb is False
    grey = np.random.default_rng(1).integers(0, 256, (300, 260), dtype=np.uint8)
    with pytest.raises(ValueError, match="RGB"):
        pre([grey])


def test_a_one_channel_image_is_read_as_grey():
    grey = np.random.default_rng(1).integers(0, 256, (300, 260), dtype=np.uint8)
    pre = ImagePreprocessor.from_processor(CLIPImageProcessor())
    np.testing.assert_array_equal(pre([grey[..., None]]), pre([grey]))


def test_a_resize_rule_must_be_one_of_the_two():
    with pytest.raises(ValueError, match="exactly one of shortest_edge and resize_hw"):
        ImagePreprocessor(shortest_edge=224, resize_hw=(240, 200))
    with pytest.raises(ValueError, match="exactly one of shortest_edge and resize_hw"):
        ImagePreprocessor(shortest_edge=None)
    ImagePreprocessor(do_resize=False, shortest_edge=None)  # no resize: no rule needed
