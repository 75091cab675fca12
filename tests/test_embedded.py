"""Tests for the embedded procedural image-caption dataset."""

import re

import numpy as np
import pytest

from fusion_jax.data import embedded
from fusion_jax.data.embedded import COLOUR_WORDS, SHAPE_WORDS, generate_embedded


@pytest.fixture(scope="module")
def data300():
    return generate_embedded(300, seed=1, image_size=64)


def _has(caption: str, phrases) -> bool:
    return any(f" {p} " in f" {caption} " for p in phrases)


def _shape_mentions(caption: str) -> int:
    """Number of shape phrases in a caption, longest synonym first so "round disc" counts once."""
    phrases = sorted((p for ws in SHAPE_WORDS.values() for p in ws), key=len, reverse=True)
    text, n = f" {caption} ", 0
    for p in phrases:
        n += text.count(f" {p} ")
        text = text.replace(f" {p} ", " | ")
    return n


def test_deterministic_per_seed():
    a, b, c = (generate_embedded(12, seed=s, image_size=32) for s in (3, 3, 4))
    assert a.captions == b.captions and a.fingerprint == b.fingerprint
    assert all(np.array_equal(a.attributes[k], b.attributes[k]) for k in a.attributes)
    assert all(np.array_equal(a.load_image(i), b.load_image(i)) for i in range(12))
    assert a.captions != c.captions and a.fingerprint != c.fingerprint
    assert not np.array_equal(a.load_image(0), c.load_image(0))


def test_shapes_dtypes_and_grouping():
    d = generate_embedded(7, seed=0, image_size=48, captions_per_image=4)
    assert d.name == "embedded" and d.n_images == 7 and d.n_captions == 28
    assert d.image_ids[0] == "embedded_00000" and d.image_ids[6] == "embedded_00006"
    assert d.caption_image.dtype == np.int32
    np.testing.assert_array_equal(d.caption_image, np.repeat(np.arange(7), 4))
    image = d.load_image(3)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert re.fullmatch(r"[0-9a-f]{64}", d.fingerprint)
    # Each of what makes the images and captions keys the features cached from them.
    assert d.fingerprint != generate_embedded(7, seed=0, image_size=48, captions_per_image=5).fingerprint
    assert d.fingerprint != generate_embedded(7, seed=0, image_size=64, captions_per_image=4).fingerprint
    assert d.fingerprint != generate_embedded(8, seed=0, image_size=48, captions_per_image=4).fingerprint
    with pytest.raises(IndexError):
        d.load_image(7)
    with pytest.raises(ValueError):
        generate_embedded(3, seed=-1)


def test_captions_distinct_lowercase_and_describe_primary(data300):
    d = data300
    names = d.attribute_names
    for i in range(d.n_images):
        caps = d.captions[5 * i: 5 * i + 5]
        assert len(set(caps)) == 5
        colour = names["colour"][d.attributes["colour"][i]]
        shape = names["shape"][d.attributes["shape"][i]]
        for c in caps:
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", c), c
            assert _has(c, COLOUR_WORDS[colour]) and _has(c, SHAPE_WORDS[shape]), (c, colour, shape)


def test_attributes_ranges_and_coverage(data300):
    d = data300
    assert set(d.attributes) == {"shape", "colour", "size", "position", "count"}
    assert len(d.attribute_names["shape"]) >= 6 and len(d.attribute_names["colour"]) >= 8
    for key, values in d.attributes.items():
        assert values.dtype == np.int32 and values.shape == (300,)
        assert values.min() >= 0 and values.max() < len(d.attribute_names[key])
    for key in ("shape", "colour", "size", "position", "count"):
        assert len(np.unique(d.attributes[key])) == len(d.attribute_names[key]), key


def test_count_matches_objects_described(data300):
    d = data300
    nouns = "|".join(embedded._COUNT_NOUNS)
    for i in range(d.n_images):
        n = int(d.attributes["count"][i]) + 1
        caps = d.captions[5 * i: 5 * i + 5]
        mentions = [_shape_mentions(c) for c in caps]
        assert max(mentions) == n and min(mentions) >= 1, (caps, n)
        for c in caps:
            for word in re.findall(rf"\b(one|two|three) (?:{nouns})\b", c):
                assert embedded.COUNTS.index(word) == n - 1, (c, n)


def test_images_independent_of_n_images():
    small, large = generate_embedded(10, seed=5, image_size=32), generate_embedded(50, seed=5, image_size=32)
    assert small.captions == large.captions[:50]
    for i in range(10):
        np.testing.assert_array_equal(small.load_image(i), large.load_image(i))
        assert all(small.attributes[k][i] == large.attributes[k][i] for k in small.attributes)


def test_primary_object_is_drawn(data300):
    d = data300
    for i in range(60):
        rgb = embedded.COLOUR_RGB[d.attributes["colour"][i]]
        close = np.abs(d.load_image(i).astype(np.float64) - rgb).max(axis=-1) <= 20
        assert close.sum() >= 10, i


def test_small_vocabulary():
    d = generate_embedded(2000, seed=2, image_size=32)
    vocab = {w for c in d.captions for w in c.split()}
    assert len(vocab) < 400
