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


def _scenes(n: int, seed: int = 3):
    """(scene, its five captions) of the first n images, as generate_embedded draws them."""
    return (embedded.scene_and_captions(seed, i, 5) for i in range(n))


def test_objects_sit_in_their_grid_cells_largest_first_and_are_drawn_there():
    """Cell = row * 3 + column: x follows the column, y the row; objects come largest first; each is drawn
    where its scene puts it (the centroid of its colour in a one-object image)."""
    size = 64
    for i, (scene, _) in enumerate(_scenes(200)):
        for obj in scene.objects:
            row, col = divmod(obj.cell, 3)
            assert abs(obj.x - embedded._CELL[col]) <= 0.03 and abs(obj.y - embedded._CELL[row]) <= 0.03
        assert [o.size for o in scene.objects] == sorted({o.size for o in scene.objects}, reverse=True)
        assert all(a.radius > b.radius for a, b in zip(scene.objects, scene.objects[1:]))
        if len(scene.objects) == 1 and scene.objects[0].shape != embedded.SHAPES.index("ring"):
            obj = scene.objects[0]
            image = embedded.render_scene(scene, size, np.random.default_rng(i)).astype(float)
            ys, xs = np.nonzero(np.abs(image - embedded.COLOUR_RGB[obj.colour]).max(-1) <= 16)
            assert abs(xs.mean() + 0.5 - obj.x * size) <= 3 and abs(ys.mean() + 0.5 - obj.y * size) <= 3, obj


@pytest.mark.parametrize("shape, inside, outside", [
    ("circle", [(0, 0), (0.7, 0.7)], [(0.75, 0.75)]), ("square", [(0.75, -0.75)], [(0.85, 0)]),
    ("triangle", [(0, 0.5), (0, -0.9)], [(0.5, -0.5), (0, 0.8)]), ("diamond", [(0.5, 0.5)], [(0.6, 0.6)]),
    ("cross", [(0.9, 0), (0, -0.9)], [(0.6, 0.6)]), ("ring", [(0.8, 0), (0, -0.8)], [(0, 0), (0.3, 0.3)]),
    ("ellipse", [(0.9, 0)], [(0, 0.6)]), ("star", [(0, 0), (0, -0.9)], [(0, 0.6), (0.6, -0.6)])])
def test_each_shape_is_drawn_as_named(shape, inside, outside):
    """Points a shape of unit radius covers and leaves out (v points down): a ring has its hole, a triangle its
    apex up, a star the notch between its lower points."""
    u, v = np.array([p[0] for p in inside + outside]), np.array([p[1] for p in inside + outside])
    assert embedded._shape_mask(shape, u, v).tolist() == [True] * len(inside) + [False] * len(outside)


def test_position_and_relation_words_are_true_of_the_scene():
    """Every position phrase names the cell's row and side; every relation phrase in a caption holds between the
    objects it joins (the one named before it and the one after it, "it" being the caption's first)."""
    for cell in range(9):
        row, col = divmod(cell, 3)
        for seed in range(40):
            words = set(embedded._position(np.random.default_rng(seed), cell).split())
            assert ("left" in words) == (col == 0) and ("right" in words) == (col == 2), (cell, words)
            assert bool(words & {"top", "upper"}) == (row == 0) and bool(words & {"bottom", "lower"}) == (row == 2)
    holds = {"left of": lambda a, b: a[1] < b[1], "right of": lambda a, b: a[1] > b[1],
             "above": lambda a, b: a[0] < b[0], "over": lambda a, b: a[0] < b[0],
             "below": lambda a, b: a[0] > b[0], "under": lambda a, b: a[0] > b[0], "beneath": lambda a, b: a[0] > b[0],
             "next to": lambda a, b: max(abs(a[0] - b[0]), abs(a[1] - b[1])) == 1,
             "beside": lambda a, b: max(abs(a[0] - b[0]), abs(a[1] - b[1])) == 1}
    relation = re.compile(r"\b(?:to the )?(" + "|".join(holds) + r")\b ")
    shape_of = {w: s for s, words in SHAPE_WORDS.items() for w in words}
    shape_words = re.compile(r"\b(" + "|".join(sorted(shape_of, key=len, reverse=True)) + r")\b")
    checked = 0
    for scene, captions in _scenes(400):
        shapes = [embedded.SHAPES[o.shape] for o in scene.objects]
        if len(set(shapes)) < len(shapes):
            continue  # the objects a phrase joins are told apart by their shapes
        for caption in captions:
            for m in relation.finditer(caption):
                before = shape_words.findall(caption[:m.start()])
                after = caption[m.end():]
                a = shapes.index(shape_of[before[-1]])
                b = 0 if after.split()[:1] == ["it"] else shapes.index(shape_of[shape_words.search(after).group(1)])
                cells = [divmod(scene.objects[k].cell, 3) for k in (a, b)]
                assert holds[m.group(1)](*cells), (caption, scene)
                checked += 1
    assert checked > 200


def test_the_largest_named_is_the_largest_drawn():
    largest = re.compile(r"the (?:largest|biggest)(?: one)? is (?:a|an) (.+)$")
    named = 0
    for scene, captions in _scenes(300):
        for caption in captions:
            if m := largest.search(caption):
                first = scene.objects[0]
                assert _has(m.group(1), COLOUR_WORDS[embedded.COLOURS[first.colour]])
                assert _has(m.group(1), SHAPE_WORDS[embedded.SHAPES[first.shape]]), (caption, scene)
                named += 1
    assert named > 20


def test_size_and_background_words_name_the_scenes_own():
    """In a one-object scene every size word is the object's size; a background word is the one drawn."""
    sizes = {w: size for size, ws in embedded.SIZE_WORDS.items() for w in ws}
    by_size = sorted(sizes, key=len, reverse=True)  # "medium sized" before "medium"
    checked = {"size": 0, "background": 0}
    for scene, captions in _scenes(200):
        for caption in captions:
            for bg in embedded.BACKGROUNDS:
                if f" {bg} back" in f" {caption}":
                    assert bg == embedded.BACKGROUNDS[scene.background], (caption, scene)
                    checked["background"] += 1
            if len(scene.objects) == 1:
                word = next((w for w in by_size if f" {w} " in f" {caption} "), None)
                if word:
                    assert sizes[word] == embedded.SIZES[scene.objects[0].size], (caption, scene)
                    checked["size"] += 1
    assert min(checked.values()) > 50, checked


def test_the_first_caption_mentions_every_object():
    for scene, captions in _scenes(200):
        assert _shape_mentions(captions[0]) == len(scene.objects), (captions[0], scene)


def test_too_small_an_image_is_refused():
    embedded.generate_embedded(2, image_size=8)
    with pytest.raises(ValueError, match="image_size >= 8"):
        embedded.generate_embedded(2, image_size=7)


def test_the_generator_is_pinned_to_its_version():
    """Cached features are keyed by fingerprint(), which changes only with VERSION: a change to the scenes,
    captions or pixels (or numpy's generators) must bump VERSION and this digest, or every cache serves the
    old images' features."""
    import hashlib

    d = embedded.generate_embedded(4, seed=0, image_size=32)
    h = hashlib.sha256()
    for i in range(4):
        h.update(d.load_image(i).tobytes())
    h.update("\n".join(d.captions).encode())
    assert (embedded.VERSION, h.hexdigest()) == ("v1", "b45ecccfd03bf91ce99b0993e9b7b5b228b8881556d3d1536428f8f8f1c6d9ad")
