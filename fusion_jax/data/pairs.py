"""The one pair builder: balanced image-caption matching pairs per scale, with a fixed split.

A positive is an image with one of its own captions, a negative an image with a caption of a
different image; half and half. Each caption is once a positive and once a negative, and each image
a negative about as often as it is a positive (as often as it has captions), so that neither side
of a pair gives its label away. Pairs depend only on (split_seed, scale): every run of a scale
sees the same pairs and split, and a smaller scale's positives and negatives are prefixes of a
larger scale's, so the scales are nested subsets of one master list.

Two splits (`split_by`):
- "pair" (the paper's "80% train / 20% validation, fixed seed"): the pairs are split at random, so
  an image (and a caption, once as a positive and once as a negative) may sit on both sides.
- "image": the images are split first; training pairs use only training images and their captions,
  validation pairs only the others, so validation measures matching on unseen images and captions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SPLITS = ("pair", "image")
PAIR_FIELDS = ("split_seed", "train_fraction", "split_by")  # build_pairs' keywords: config.pairs' fields
# How negatives' images are drawn where images have different numbers of captions (`pair_identity`): change
# it with the draw, so that a workdir begun with another draw is not resumed.
PAIRS = "v2: negative images as often as positive"


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


@dataclasses.dataclass(frozen=True)
class _Pool:
    """Master lists of one set of images: positives in order, negatives in order (each caption once)."""

    pos_image: np.ndarray
    pos_caption: np.ndarray
    neg_image: np.ndarray
    neg_caption: np.ndarray

    @property
    def limit(self) -> int:
        """Pairs the pool holds: each caption once as a positive and once as a negative."""
        return len(self.pos_caption) + len(self.neg_caption)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image_idx, caption_idx, label) of the first ceil(n/2) positives and floor(n/2) negatives."""
        n_pos = (n + 1) // 2
        return (np.concatenate([self.pos_image[:n_pos], self.neg_image[:n - n_pos]]),
                np.concatenate([self.pos_caption[:n_pos], self.neg_caption[:n - n_pos]]),
                np.concatenate([np.ones(n_pos), np.zeros(n - n_pos)]))


def captioned_images(caption_image: np.ndarray) -> np.ndarray:
    """The images that have a caption, sorted [n_captioned]: the only ones pairs and retrieval draw."""
    return np.unique(caption_image)


def _pool(caption_image: np.ndarray, n_images: int, images: np.ndarray, rng: np.random.Generator) -> _Pool:
    """The master lists of the captions of `images` (image ids); negatives draw another image of the set."""
    if len(images) < 2:
        empty = np.zeros(0, np.int64)
        return _Pool(empty, empty, empty, empty)
    position = np.full(n_images, -1)
    position[images] = np.arange(len(images))
    captions = np.flatnonzero(position[caption_image] >= 0)
    pos = captions[rng.permutation(len(captions))]
    neg = captions[rng.permutation(len(captions))]
    return _Pool(caption_image[pos], pos, _negative_images(caption_image, neg, images, position, rng), neg)


def _negative_images(caption_image: np.ndarray, neg: np.ndarray, images: np.ndarray, position: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """The image of each negative (neg: its captions, in order), another image of `images` (position: an
    image's index in `images`). Where every image has as many captions, uniform among the others (the
    paper's protocol, draw for draw). Where they differ, a uniform draw would make an image with many
    captions mostly positive and one with few mostly negative, a label a head reads off the image alone:
    the images of the same captions in another order instead, clashes swapped away, so that each image is
    a negative as often as a positive (an image that holds most captions cannot be: a caption's image of
    another image then)."""
    own = caption_image[neg]
    counts = np.bincount(position[own], minlength=len(images))
    if counts.min() == counts.max():
        # A uniform draw among the other images: shift the caption's own image by 1..len(images)-1.
        shift = rng.integers(1, len(images), len(neg))
        return images[(position[own] + shift) % len(images)]
    drawn = own[rng.permutation(len(own))]
    for i in np.flatnonzero(drawn == own):
        if drawn[i] != own[i]:  # mended by an earlier swap
            continue
        for j in rng.integers(0, len(own), 64):
            if drawn[j] != own[i] and drawn[i] != own[j]:
                break
        else:  # rare: look at every place before giving up the balance
            fits = np.flatnonzero((drawn != own[i]) & (own != drawn[i]))
            j = rng.choice(fits) if len(fits) else None
        if j is not None:
            drawn[i], drawn[j] = drawn[j], drawn[i]
        else:  # one image holds most captions: another caption's image, in proportion to their captions
            drawn[i] = rng.choice(own[own != own[i]])
    return drawn


def _image_pools(caption_image: np.ndarray, n_images: int, captioned: np.ndarray, split_seed: int,
                 train_fraction: float) -> tuple[_Pool, _Pool]:
    """(training pool, validation pool) of the image split: of the images with a caption,
    round(train_fraction * their number) train. An image without a caption is in no pool: as a negative
    alone its label would show. (Where every image has a caption, and as many, the draws of the split before
    this.)"""
    rng = np.random.default_rng([split_seed, 0, 1])
    images = captioned[rng.permutation(len(captioned))]
    n_train = split_sizes(len(captioned), train_fraction)[0]  # images, rounded as a scale's pairs are
    return (_pool(caption_image, n_images, np.sort(images[:n_train]), rng),
            _pool(caption_image, n_images, np.sort(images[n_train:]), rng))


def _pools(caption_image: np.ndarray, n_images: int, split_seed: int, train_fraction: float, split_by: str
           ) -> tuple[_Pool, ...]:
    """The master lists: one pool over all images (split_by="pair"), or the image split's (training,
    validation) pools; none with fewer than 2 images that have a caption."""
    if split_by not in SPLITS:
        raise ValueError(f"split_by {split_by!r}; allowed: {', '.join(SPLITS)}")
    if len(caption_image) and not 0 <= caption_image.min() <= caption_image.max() < n_images:
        raise ValueError(f"caption_image holds image ids outside [0, {n_images})")
    captioned = captioned_images(caption_image)
    if len(captioned) < 2:
        return ()
    if split_by == "image":
        return _image_pools(caption_image, n_images, captioned, split_seed, train_fraction)
    # The paper's protocol over all images with a caption (kept draw for draw where every image has one, and as many).
    return (_pool(caption_image, n_images, captioned, np.random.default_rng(split_seed)),)


def split_sizes(scale: int, train_fraction: float) -> tuple[int, int]:
    """(training, validation) pairs of a scale: round(train_fraction * scale) train, the rest validation."""
    n_train = int(round(train_fraction * scale))
    return n_train, scale - n_train


def _limit(pools: tuple[_Pool, ...], train_fraction: float) -> int:
    """Largest scale the pools serve: the one pool's limit, or the largest scale whose training and
    validation parts fit their pools (0 when a pool is empty)."""
    if not pools or not all(p.limit for p in pools):
        return 0
    if len(pools) == 1:
        return pools[0].limit
    fits = lambda s: all(n <= p.limit for n, p in zip(split_sizes(s, train_fraction), pools))
    low, high = 0, sum(p.limit for p in pools)  # fits() is monotone in the scale: bisect for the largest
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def max_pairs(caption_image: np.ndarray, n_images: int, split_seed: int = 0, train_fraction: float = 0.8,
              split_by: str = "pair") -> int:
    """Largest scale the pair builder can serve: every caption once as positive and once as negative
    (with split_by="image", within each side of the split; 0 when a side has fewer than 2 images with a
    caption)."""
    return _limit(_pools(np.asarray(caption_image, np.int64), n_images, split_seed, train_fraction, split_by),
                  train_fraction)


def build_pairs(caption_image: np.ndarray, n_images: int, scale: int, split_seed: int,
                train_fraction: float = 0.8, split_by: str = "pair") -> Pairs:
    """Balanced pairs for `scale`: half positives (ceil), the rest negatives, split train/val."""
    caption_image = np.asarray(caption_image, np.int64)
    pools = _pools(caption_image, n_images, split_seed, train_fraction, split_by)
    limit = _limit(pools, train_fraction)
    if not 2 <= scale <= limit:
        raise ValueError(f"scale {scale} outside [2, {limit}] for {len(caption_image)} captions"
                         + (" (split by image)" if split_by == "image" else ""))
    n_train, n_val = split_sizes(scale, train_fraction)
    if split_by == "image":
        parts = [pool.take(n) for pool, n in zip(pools, (n_train, n_val))]
        rng = np.random.default_rng([split_seed, scale])
        order = np.concatenate([rng.permutation(n_train), n_train + rng.permutation(n_val)])
        image_idx, caption_idx, label = (np.concatenate(a) for a in zip(*parts))
    else:
        image_idx, caption_idx, label = pools[0].take(scale)
        order = np.random.default_rng([split_seed, scale]).permutation(scale)
    return Pairs(image_idx[order].astype(np.int32), caption_idx[order].astype(np.int32),
                 label[order].astype(np.int32), n_train)


def pair_identity(caption_image: np.ndarray, n_images: int, split_seed: int = 0, train_fraction: float = 0.8,
                  split_by: str = "pair") -> dict[str, str]:
    """What a workdir and the results claim of the pair builder beside a backbone's features: nothing where
    the images of each pool (all of them, or each side of the image split) have as many captions (the
    pairs drawn as ever), else how the negatives' images are drawn, so that a sweep begun with the earlier
    draw (which gave the label away there) is not resumed."""
    pools = _pools(np.asarray(caption_image, np.int64), n_images, split_seed, train_fraction, split_by)
    counts = [c[c > 0] for c in (np.bincount(p.pos_image) for p in pools if len(p.pos_image))]
    return {"pairs": PAIRS} if any(c.min() != c.max() for c in counts) else {}


def overlap(pairs: Pairs, caption_image: np.ndarray) -> dict[str, float | None]:
    """How much validation shares with training, as two separate shares of the validation pairs: those
    whose image, or whose caption's image, a training pair also shows (as its image or its caption's
    image), and those whose caption a training pair has. Both are 0 with split_by="image"; with the
    paper's split they grow with the scale. None without validation pairs."""
    caption_image = np.asarray(caption_image)
    train, val = pairs.split("train"), pairs.split("val")
    seen_images = np.union1d(train["image_idx"], caption_image[train["caption_idx"]])
    seen = np.isin(val["image_idx"], seen_images) | np.isin(caption_image[val["caption_idx"]], seen_images)
    caption_seen = np.isin(val["caption_idx"], train["caption_idx"])
    n = len(val["label"])
    return {"val_pairs_with_a_training_image": float(seen.sum() / n) if n else None,
            "val_pairs_with_a_training_caption": float(caption_seen.sum() / n) if n else None}
