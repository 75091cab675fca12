"""The embedded dataset: procedural shape images with varied captions, generated from a seed.

A download-free stand-in for Flickr8k. Image i's scene (background, one to three objects with a
shape, colour, size and 3x3 grid cell) and its captions come from `np.random.default_rng([seed, i])`;
its pixels are rendered on demand from the scene plus noise from `default_rng([seed, i, 1])`, so
image i does not depend on `n_images`. Rendering uses only numpy arithmetic and comparisons (no
trigonometry, no anti-aliasing), so it is the same on every platform for a given numpy.
"""

from __future__ import annotations

import hashlib
from typing import Callable, NamedTuple, Sequence

import numpy as np

from fusion_jax.data.dataset import ImageCaptionDataset

VERSION = "v1"  # bump whenever the generator (scenes, captions or rendering) changes

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "ellipse")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "cyan")
SIZES = ("small", "medium", "large")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
COUNTS = ("one", "two", "three")
BACKGROUNDS = ("grey", "sandy", "dark", "pale")

COLOUR_RGB = np.array([(220, 40, 40), (40, 170, 60), (40, 80, 230), (245, 225, 40), (140, 60, 190),
                       (250, 140, 20), (250, 250, 250), (15, 15, 15), (250, 140, 200), (40, 210, 220)], np.float64)
BACKGROUND_RGB = np.array([(120, 120, 120), (190, 175, 140), (60, 70, 85), (150, 175, 200)], np.float64)

SHAPE_WORDS = {"circle": ("circle", "disc", "round disc"), "square": ("square", "box", "block"),
               "triangle": ("triangle", "triangular shape"), "diamond": ("diamond", "rhombus"),
               "star": ("star", "star shape"), "cross": ("cross", "plus sign", "plus shape"),
               "ring": ("ring", "hoop", "donut"), "ellipse": ("ellipse", "oval", "flat oval")}
COLOUR_WORDS = {"red": ("red", "bright red"), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",),
                "purple": ("purple", "violet"), "orange": ("orange",), "white": ("white",), "black": ("black",),
                "pink": ("pink",), "cyan": ("cyan", "turquoise", "aqua")}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium", "medium sized", "mid sized"),
              "large": ("large", "big", "huge")}

_RADIUS = (0.075, 0.12, 0.18)  # object radius as a fraction of the image side, per size
_CELL = (0.2, 0.5, 0.8)  # grid cell centres as fractions of the image side
_STAR = ((0.0, -1.0), (0.2645, -0.3641), (0.9511, -0.309), (0.428, 0.1391), (0.5878, 0.809),
         (0.0, 0.45), (-0.5878, 0.809), (-0.428, 0.1391), (-0.9511, -0.309), (-0.2645, -0.3641))
_COUNT_NOUNS = ("shapes", "objects", "things", "items")


class SceneObject(NamedTuple):
    """One drawn object: class indices, grid cell (row * 3 + col), centre and radius as image fractions."""

    shape: int
    colour: int
    size: int
    cell: int
    x: float
    y: float
    radius: float


class Scene(NamedTuple):
    """An image's description: background colour and texture indices, objects largest first."""

    background: int
    texture: int
    objects: tuple[SceneObject, ...]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """A uniformly chosen element (one cheap uniform draw)."""
    return options[int(rng.random() * len(options))]


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: one to three objects of distinct sizes and colours in distinct grid cells."""
    background, texture, n = (int(v) for v in rng.integers(0, (len(BACKGROUNDS), 4, 3)))
    n += 1
    sizes = sorted((int(s) for s in rng.choice(3, n, replace=False)), reverse=True)
    colours = rng.choice(len(COLOURS), n, replace=False)
    shapes = rng.integers(0, len(SHAPES), n)
    radii = [_RADIUS[s] * (0.92 + 0.16 * rng.random()) for s in sizes]
    for _ in range(20):  # resample cells until objects overlap only a little
        cells = [int(c) for c in rng.choice(9, n, replace=False)]
        xy = [(_CELL[c % 3] + 0.06 * (rng.random() - 0.5), _CELL[c // 3] + 0.06 * (rng.random() - 0.5)) for c in cells]
        if all((xy[a][0] - xy[b][0]) ** 2 + (xy[a][1] - xy[b][1]) ** 2 >= (0.85 * (radii[a] + radii[b])) ** 2
               for a in range(n) for b in range(a)):
            break
    objects = tuple(SceneObject(int(shapes[k]), int(colours[k]), sizes[k], cells[k], xy[k][0], xy[k][1], radii[k])
                    for k in range(n))
    return Scene(background, texture, objects)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels inside a unit-radius shape, in coordinates relative to its centre (v points down)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.8
    if shape == "triangle":
        return (v <= 0.75) & (au * 1.75 <= v + 1.0)
    if shape == "diamond":
        return au + av <= 1.1
    if shape == "cross":
        return (np.minimum(au, av) <= 0.3) & (np.maximum(au, av) <= 1.0)
    if shape == "ring":
        d = u * u + v * v
        return (d <= 1.0) & (d >= 0.3)
    if shape == "ellipse":
        return u * u + v * v / 0.3025 <= 1.0
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)  # star: crossing-number test
    for (x1, y1), (x2, y2) in zip(_STAR, _STAR[1:] + _STAR[:1]):
        inside ^= ((y1 > v) != (y2 > v)) & (u < x1 + (v - y1) * ((x2 - x1) / (y2 - y1)))
    return inside


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [image_size, image_size, 3] RGB: textured background, objects largest first, pixel noise."""
    ramp = np.linspace(-1.0, 1.0, image_size)
    texture = (np.zeros((1, 1)), ramp[None, :], ramp[:, None], 0.5 * (ramp[None, :] + ramp[:, None]))[scene.texture]
    image = BACKGROUND_RGB[scene.background] + 18.0 * np.broadcast_to(texture, (image_size, image_size))[..., None]
    coords = (np.arange(image_size) + 0.5) / image_size
    for obj in scene.objects:
        mask = _shape_mask(SHAPES[obj.shape], (coords[None, :] - obj.x) / obj.radius, (coords[:, None] - obj.y) / obj.radius)
        image[mask] = COLOUR_RGB[obj.colour]
    image += rng.normal(0.0, 4.0, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _a(phrase: str) -> str:
    """The phrase with its indefinite article."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(rng: np.random.Generator, obj: SceneObject, size_p: float, colour_p: float, article: bool = True) -> str:
    """A noun phrase for an object, dropping its size or colour with probability 1 - p."""
    words = [_pick(rng, SIZE_WORDS[SIZES[obj.size]])] if rng.random() < size_p else []
    if rng.random() < colour_p:
        words.append(_pick(rng, COLOUR_WORDS[COLOURS[obj.colour]]))
    words.append(_pick(rng, SHAPE_WORDS[SHAPES[obj.shape]]))
    phrase = " ".join(words)
    return _a(phrase) if article else phrase


def _position(rng: np.random.Generator, cell: int) -> str:
    """A phrase for a grid cell, e.g. "in the top left corner"."""
    row, col = divmod(cell, 3)
    side = ("left", "", "right")[col]
    if row == 1 and col == 1:
        return _pick(rng, ("in the centre", "in the middle", "at the centre", "in the centre of the image"))
    if row == 1:
        return _pick(rng, ("on the ", "on the ", "at the ", "to the ")) + side + _pick(rng, ("", " side", ""))
    top, upper = ("top", "upper") if row == 0 else ("bottom", "lower")
    if col == 1:
        return _pick(rng, (f"at the {top}", f"near the {top}", f"along the {top} edge", f"at the {top} of the image",
                           f"in the {upper} middle", f"at the {top} centre"))
    return _pick(rng, ("in the ", "at the ")) + f"{_pick(rng, (top, upper))} {side}" + _pick(rng, (" corner", ""))


def _relation(rng: np.random.Generator, a: SceneObject, b: SceneObject) -> str:
    """Where object a is relative to object b, e.g. "to the left of"."""
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    options: list[str] = []
    if ca != cb:
        options += [("to the left of", "left of") if ca < cb else ("to the right of", "right of")]
    if ra != rb:
        options += [("above", "over") if ra < rb else ("below", "under", "beneath")]
    if max(abs(ra - rb), abs(ca - cb)) == 1:
        options += [("next to", "beside")]
    return _pick(rng, options[int(rng.random() * len(options))])


def _count(rng: np.random.Generator, n: int) -> str:
    """E.g. "three shapes"."""
    return f"{COUNTS[n - 1]} {_pick(rng, _COUNT_NOUNS)}"


def _background(rng: np.random.Generator, scene: Scene) -> str:
    """E.g. "a grey background"."""
    return _a(f"{BACKGROUNDS[scene.background]} {_pick(rng, ('background', 'backdrop'))}")


Template = Callable[[np.random.Generator, Scene], str]


def _single_templates() -> tuple[Template, ...]:
    """Caption templates for a one-object scene."""
    def p(r: np.random.Generator, s: Scene, article: bool = True) -> str:
        return _noun(r, s.objects[0], 0.7, 1.0, article)

    def pos(r: np.random.Generator, s: Scene) -> str:
        return _position(r, s.objects[0].cell)

    return (lambda r, s: f"{p(r, s)} {pos(r, s)}",
            lambda r, s: f"{pos(r, s)} there is {p(r, s)}",
            lambda r, s: f"{p(r, s)} on {_background(r, s)}",
            lambda r, s: f"{p(r, s)} {pos(r, s)} on {_background(r, s)}",
            lambda r, s: f"{_pick(r, ('a picture of', 'an image of', 'a photo of'))} {p(r, s)} {pos(r, s)}",
            lambda r, s: f"{_pick(r, ('one', 'a single', 'a lone'))} {p(r, s, False)} {pos(r, s)}",
            lambda r, s: f"the image shows {p(r, s)} {pos(r, s)}",
            lambda r, s: f"{_background(r, s)} with {p(r, s)} {pos(r, s)}",
            lambda r, s: f"just {p(r, s)} and nothing else")


def _multi_templates() -> tuple[tuple[Template, ...], tuple[Template, ...]]:
    """Caption templates for two or three objects: (those describing every object, the rest)."""
    def p(r: np.random.Generator, s: Scene, k: int, article: bool = True) -> str:
        return _noun(r, s.objects[k], 0.7, 1.0, article) if k == 0 else _noun(r, s.objects[k], 0.6, 0.85, article)

    def pos(r: np.random.Generator, s: Scene, k: int) -> str:
        return _position(r, s.objects[k].cell)

    def rel(r: np.random.Generator, s: Scene, a: int, b: int) -> str:
        return _relation(r, s.objects[a], s.objects[b])

    def tail(r: np.random.Generator, s: Scene) -> str:
        return f" and {p(r, s, 2)} {pos(r, s, 2)}" if len(s.objects) == 3 else ""

    def listing(r: np.random.Generator, s: Scene, with_pos: bool) -> str:
        order = r.permutation(len(s.objects))
        return " and ".join(p(r, s, int(k)) + (f" {pos(r, s, int(k))}" if with_pos else "") for k in order)

    full: tuple[Template, ...] = (
        lambda r, s: f"{p(r, s, 0)} {rel(r, s, 0, 1)} {p(r, s, 1)}{tail(r, s)}",
        lambda r, s: f"{p(r, s, 1)} {rel(r, s, 1, 0)} {p(r, s, 0)}{tail(r, s)}",
        lambda r, s: f"{_count(r, len(s.objects))} {listing(r, s, False)}",
        lambda r, s: listing(r, s, True),
        lambda r, s: f"{p(r, s, 0)} {pos(r, s, 0)} with {p(r, s, 1)} {rel(r, s, 1, 0)} it{tail(r, s)}",
        lambda r, s: f"there are {_count(r, len(s.objects))} on {_background(r, s)} {listing(r, s, False)}")
    partial: tuple[Template, ...] = (
        lambda r, s: (f"{_count(r, len(s.objects))} on {_background(r, s)} the "
                      f"{_pick(r, ('largest', 'biggest', 'largest one', 'biggest one'))} is {_noun(r, s.objects[0], 0.0, 1.0)}"),
        lambda r, s: f"{p(r, s, 0)} {pos(r, s, 0)} and " + (
            _pick(r, ("another shape", "another object", "one more thing")) if len(s.objects) == 2
            else f"two other {_pick(r, _COUNT_NOUNS)}"))
    return full, partial


_SINGLE = _single_templates()
_FULL, _PARTIAL = _multi_templates()


def scene_captions(rng: np.random.Generator, scene: Scene, n: int) -> tuple[str, ...]:
    """`n` distinct captions of a scene; the first mentions every object, the others vary templates."""
    full = _SINGLE if len(scene.objects) == 1 else _FULL
    templates = full if len(scene.objects) == 1 else _FULL + _PARTIAL
    captions = [full[int(rng.random() * len(full))](rng, scene)]
    order = rng.permutation(len(templates))
    for attempt in range(50 * n):
        if len(captions) == n:
            break
        caption = templates[int(order[attempt % len(order)])](rng, scene)
        if caption not in captions or attempt >= 40 * n:  # duplicates only if variety is exhausted
            captions.append(caption)
    return tuple(captions)


def fingerprint(n_images: int, seed: int, image_size: int, captions_per_image: int) -> str:
    """Content hash of the embedded dataset: the generator version and its parameters."""
    key = repr(("embedded", VERSION, n_images, seed, image_size, captions_per_image))
    return hashlib.sha256(key.encode()).hexdigest()


def scene_and_captions(seed: int, i: int, captions_per_image: int) -> tuple[Scene, tuple[str, ...]]:
    """Image i's scene and captions, from `np.random.default_rng([seed, i])` alone."""
    rng = np.random.default_rng([seed, i])
    scene = sample_scene(rng)
    return scene, scene_captions(rng, scene, captions_per_image)


def generate_embedded(n_images: int = 8000, seed: int = 0, image_size: int = 64,
                      captions_per_image: int = 5) -> ImageCaptionDataset:
    """The embedded dataset: scenes and captions now, images rendered per index by load_image."""
    if n_images < 0 or seed < 0 or image_size < 8 or captions_per_image < 1:
        raise ValueError(f"need n_images >= 0, seed >= 0, image_size >= 8, captions_per_image >= 1; got "
                         f"{n_images}, {seed}, {image_size}, {captions_per_image}")
    scenes: list[Scene] = []
    captions: list[str] = []
    for i in range(n_images):
        scene, its_captions = scene_and_captions(seed, i, captions_per_image)
        scenes.append(scene)
        captions.extend(its_captions)
    primary = [s.objects[0] for s in scenes]
    attributes = {"shape": np.array([o.shape for o in primary], np.int32),
                  "colour": np.array([o.colour for o in primary], np.int32),
                  "size": np.array([o.size for o in primary], np.int32),
                  "position": np.array([o.cell for o in primary], np.int32),
                  "count": np.array([len(s.objects) - 1 for s in scenes], np.int32)}
    names = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS, "count": COUNTS}

    def load_image(i: int) -> np.ndarray:
        """Image i, rendered from its scene."""
        if not 0 <= i < n_images:
            raise IndexError(f"image {i} out of range for {n_images} images")
        return render_scene(scenes[i], image_size, np.random.default_rng([seed, i, 1]))

    return ImageCaptionDataset(
        name="embedded", image_ids=tuple(f"embedded_{i:05d}" for i in range(n_images)), captions=tuple(captions),
        caption_image=np.repeat(np.arange(n_images, dtype=np.int32), captions_per_image), load_image=load_image,
        fingerprint=fingerprint(n_images, seed, image_size, captions_per_image),
        attributes=attributes, attribute_names=names)
