import hashlib

import numpy as np
import pytest

from fusion_jax.data import build_pairs, max_pairs

CAPTION_IMAGE = np.repeat(np.arange(50), 5)
PAIR_SPLIT_DIGEST = "fbbc18b617406375"  # as at 71af439, before split_by
IMAGE_SPLIT_DIGEST = "193f671f6776c928"  # as at 84a6cfe, before images without a caption were left out
VARIED_DIGEST = "7b7a67bc0e8d4269"  # images with 1-7 captions, both splits: pairs.PAIRS's draw


def test_balanced_and_correct():
    p = build_pairs(CAPTION_IMAGE, 50, 200, split_seed=0)
    assert p.label.sum() == 100
    positive = p.label == 1
    assert (CAPTION_IMAGE[p.caption_idx[positive]] == p.image_idx[positive]).all()
    assert (CAPTION_IMAGE[p.caption_idx[~positive]] != p.image_idx[~positive]).all()
    assert p.n_train == 160
    assert len(set(zip(p.image_idx.tolist(), p.caption_idx.tolist()))) == 200


def test_deterministic_and_nested():
    a = build_pairs(CAPTION_IMAGE, 50, 100, split_seed=3)
    b = build_pairs(CAPTION_IMAGE, 50, 100, split_seed=3)
    for x, y in zip((a.image_idx, a.caption_idx, a.label), (b.image_idx, b.caption_idx, b.label)):
        np.testing.assert_array_equal(x, y)
    small = set(zip(a.image_idx.tolist(), a.caption_idx.tolist()))
    large = build_pairs(CAPTION_IMAGE, 50, 300, split_seed=3)
    assert small <= set(zip(large.image_idx.tolist(), large.caption_idx.tolist()))
    other = build_pairs(CAPTION_IMAGE, 50, 100, split_seed=4)
    assert set(zip(other.image_idx.tolist(), other.caption_idx.tolist())) != small


def test_split_parts():
    p = build_pairs(CAPTION_IMAGE, 50, 101, split_seed=0, train_fraction=0.8)
    train, val = p.split("train"), p.split("val")
    assert len(train["label"]) == p.n_train == 81 and len(val["label"]) == 20
    assert p.label.sum() == 51  # odd scale: one more positive


def test_the_pair_split_is_pinned():
    """The paper's split, draw for draw: committed results were made with these pairs."""
    h = hashlib.sha256()
    for scale, seed in ((101, 0), (300, 3), (500, 7)):
        p = build_pairs(CAPTION_IMAGE, 50, scale, seed)
        h.update(np.stack([p.image_idx, p.caption_idx, p.label]).astype("<i4").tobytes() + bytes([p.n_train % 256]))
    assert h.hexdigest()[:16] == PAIR_SPLIT_DIGEST


def test_the_image_split_is_pinned():
    """Where every image has a caption, the image split draws as it did before such images were left out."""
    h = hashlib.sha256()
    for scale, seed in ((100, 0), (160, 3), (200, 7)):
        p = build_pairs(CAPTION_IMAGE, 50, scale, seed, split_by="image")
        h.update(np.stack([p.image_idx, p.caption_idx, p.label]).astype("<i4").tobytes() + bytes([p.n_train % 256]))
    assert h.hexdigest()[:16] == IMAGE_SPLIT_DIGEST


def test_the_draw_for_images_with_different_numbers_of_captions_is_pinned():
    """Change pairs.PAIRS with this digest: a workdir begun with another draw is then refused."""
    caption_image = np.repeat(np.arange(40), np.random.default_rng(1).integers(1, 8, 40))
    h = hashlib.sha256()
    for split_by in ("pair", "image"):
        for scale, seed in ((60, 0), (90, 3)):
            p = build_pairs(caption_image, 40, scale, seed, split_by=split_by)
            h.update(np.stack([p.image_idx, p.caption_idx, p.label]).astype("<i4").tobytes() + bytes([p.n_train % 256]))
    assert h.hexdigest()[:16] == VARIED_DIGEST


def test_scale_limits():
    assert max_pairs(CAPTION_IMAGE, 50) == 500
    build_pairs(CAPTION_IMAGE, 50, 500, split_seed=0)
    with pytest.raises(ValueError, match="scale 501"):
        build_pairs(CAPTION_IMAGE, 50, 501, split_seed=0)


def _images_of(p, part, caption_image=CAPTION_IMAGE):
    s = p.split(part)
    return set(s["image_idx"].tolist()) | set(caption_image[s["caption_idx"]].tolist())


def test_split_by_image_keeps_validation_images_and_captions_out_of_training():
    limit = max_pairs(CAPTION_IMAGE, 50, 0, 0.8, "image")
    assert limit == 500  # 40 training images' 200 captions: 400 pairs, 10 validation images': 100
    for scale in (10, 101, 300, limit):
        p = build_pairs(CAPTION_IMAGE, 50, scale, 0, 0.8, "image")
        assert p.n_train == round(0.8 * scale) and not _images_of(p, "train") & _images_of(p, "val")
        for part in ("train", "val"):
            s = p.split(part)
            positive = s["label"] == 1
            assert positive.sum() == (len(positive) + 1) // 2  # balanced within each split
            assert (CAPTION_IMAGE[s["caption_idx"][positive]] == s["image_idx"][positive]).all()
            assert (CAPTION_IMAGE[s["caption_idx"][~positive]] != s["image_idx"][~positive]).all()
        assert len(set(zip(p.image_idx.tolist(), p.caption_idx.tolist()))) == scale
    with pytest.raises(ValueError, match="split by image"):
        build_pairs(CAPTION_IMAGE, 50, limit + 1, 0, 0.8, "image")


def test_split_by_image_limit_is_the_largest_scale_each_side_can_serve():
    """Uneven captions per image: the limit differs from the pair split's, and is the brute-force one."""
    caption_image = np.sort(np.random.default_rng(0).integers(0, 50, 250))
    limit = max_pairs(caption_image, 50, 1, 0.8, "image")
    assert limit != max_pairs(caption_image, 50)
    fits = []
    for scale in range(2, 2 * len(caption_image) + 1):
        try:
            build_pairs(caption_image, 50, scale, 1, 0.8, "image")
        except ValueError:
            continue
        fits.append(scale)
    assert fits == list(range(2, limit + 1))
    p = build_pairs(caption_image, 50, limit, 1, 0.8, "image")
    assert not _images_of(p, "train", caption_image) & _images_of(p, "val", caption_image)


def test_split_by_image_needs_two_images_a_side_and_ids_in_range():
    assert max_pairs(np.repeat(np.arange(6), 5), 6, 0, 0.8, "image") == 0  # 5 train images, 1 validation
    with pytest.raises(ValueError, match="outside"):
        max_pairs(np.array([0, 1, 7]), 5)


def test_split_by_image_is_nested_per_split_and_seeded():
    rows = lambda p, part: set(zip(*(p.split(part)[k].tolist() for k in ("image_idx", "caption_idx", "label"))))
    small, large = (build_pairs(CAPTION_IMAGE, 50, s, 3, 0.8, "image") for s in (100, 300))
    assert rows(small, "train") <= rows(large, "train") and rows(small, "val") <= rows(large, "val")
    assert _images_of(large, "val") != _images_of(build_pairs(CAPTION_IMAGE, 50, 300, 4, 0.8, "image"), "val")
    again = build_pairs(CAPTION_IMAGE, 50, 300, 3, 0.8, "image")
    np.testing.assert_array_equal(again.image_idx, large.image_idx)


def test_split_by_pair_mixes_images_across_the_split():
    """The paper's split, for contrast: at this size some validation images are also training images."""
    p = build_pairs(CAPTION_IMAGE, 50, 300, 0)
    assert _images_of(p, "train") & _images_of(p, "val")
    with pytest.raises(ValueError, match="split_by"):
        build_pairs(CAPTION_IMAGE, 50, 300, 0, split_by="caption")


def test_the_configured_split_reaches_each_group(smoke_config):
    """groups.group_pairs builds every scale's pairs with config.pairs, split_by included."""
    from fusion_jax.data.sources import load_features
    from fusion_jax.groups import group_pairs, plan

    smoke_config.pairs.split_by = "image"
    features = load_features(smoke_config, smoke_config.backbones[0])
    group = plan(smoke_config)[0]
    for scale, p in group_pairs(smoke_config, group, features).items():
        expected = build_pairs(features.caption_image, features.n_images, scale, smoke_config.pairs.split_seed,
                               smoke_config.pairs.train_fraction, "image")
        np.testing.assert_array_equal(p.caption_idx, expected.caption_idx)
        image_of = lambda part: set(features.caption_image[p.split(part)["caption_idx"]].tolist())
        assert not image_of("train") & image_of("val")


def test_overlap_of_validation_with_training():
    """The paper's split shares images (and some captions) across its sides, more at larger scales;
    the image split shares none. Counted by hand on a small case."""
    from fusion_jax.data import overlap

    small, large = (overlap(build_pairs(CAPTION_IMAGE, 50, s, 0), CAPTION_IMAGE) for s in (50, 400))
    assert 0 < small["val_pairs_with_a_training_image"] < large["val_pairs_with_a_training_image"] <= 1
    assert large["val_pairs_with_a_training_caption"] > 0
    image = overlap(build_pairs(CAPTION_IMAGE, 50, 400, 0, 0.8, "image"), CAPTION_IMAGE)
    assert image == {"val_pairs_with_a_training_image": 0.0, "val_pairs_with_a_training_caption": 0.0}
    no_val = build_pairs(CAPTION_IMAGE, 50, 2, 0)  # both pairs train: no share to give
    assert overlap(no_val, CAPTION_IMAGE) == {"val_pairs_with_a_training_image": None,
                                              "val_pairs_with_a_training_caption": None}
    p = build_pairs(CAPTION_IMAGE, 50, 50, 0)
    train, val = p.split("train"), p.split("val")
    shown = set(train["image_idx"]) | set(CAPTION_IMAGE[train["caption_idx"]])
    by_hand = np.mean([i in shown or CAPTION_IMAGE[c] in shown for i, c in zip(val["image_idx"], val["caption_idx"])])
    assert small["val_pairs_with_a_training_image"] == pytest.approx(by_hand)
    p = build_pairs(CAPTION_IMAGE, 50, 400, 0)  # a caption's own row, not its image's other captions
    train, val = p.split("train"), p.split("val")
    by_hand = np.mean([c in set(train["caption_idx"]) for c in val["caption_idx"]])
    assert large["val_pairs_with_a_training_caption"] == pytest.approx(by_hand)
    assert by_hand < large["val_pairs_with_a_training_image"]


@pytest.mark.parametrize("split_by", ["pair", "image"])
def test_an_image_without_a_caption_is_never_drawn(split_by):
    """Images 30-39 have no caption: as negatives alone they would give their label away."""
    caption_image = np.repeat(np.arange(30), 4)
    limit = max_pairs(caption_image, 40, 0, 0.8, split_by)
    p = build_pairs(caption_image, 40, limit, 0, split_by=split_by)
    assert p.image_idx.max() < 30 and len(p.label) == limit and 0 < p.label.mean() < 1
    assert (p.image_idx[p.label == 0] != caption_image[p.caption_idx[p.label == 0]]).all()
    assert max_pairs(np.zeros(5, np.int64), 40, 0, 0.8, split_by) == 0  # one captioned image: no negative


def test_the_image_split_divides_the_images_with_a_caption():
    """10 captioned images among 100: each side gets its share of those 10, whatever the seed."""
    caption_image = np.repeat(np.arange(10), 5)
    assert all(max_pairs(caption_image, 100, seed, 0.8, "image") == 20 / 0.2 for seed in range(20))


@pytest.mark.parametrize("split_by", ["pair", "image"])
def test_an_image_is_a_negative_as_often_as_a_positive_whatever_its_captions(split_by):
    """Images with 1 to 9 captions: a uniform draw of the negatives' images made the many-caption images
    mostly positive and the others mostly negative, a label to read off the image alone."""
    from fusion_jax.data.pairs import _pools

    counts = np.random.default_rng(0).integers(1, 10, 200)
    caption_image = np.repeat(np.arange(200), counts)
    pools = _pools(caption_image, 200, 0, 0.8, split_by)
    assert len(pools) == (2 if split_by == "image" else 1)
    for pool in pools:  # the master lists every scale takes its pairs from
        np.testing.assert_array_equal(np.bincount(pool.neg_image, minlength=200),
                                      np.bincount(pool.pos_image, minlength=200))
        assert (pool.neg_image != caption_image[pool.neg_caption]).all()
    p = build_pairs(caption_image, 200, max_pairs(caption_image, 200, 0, 0.8, split_by), 0, split_by=split_by)
    per_image = np.bincount(p.image_idx, p.label, 200) / np.maximum(np.bincount(p.image_idx, minlength=200), 1)
    few, many = per_image[counts <= 3], per_image[counts >= 7]  # the share of positives among an image's pairs
    assert abs(few.mean() - many.mean()) < 0.1, (few.mean(), many.mean())


def test_an_image_with_most_captions_still_gets_other_images_as_negatives():
    caption_image = np.concatenate([np.zeros(30, np.int64), np.arange(1, 11)])  # image 0 has 30 of 40
    p = build_pairs(caption_image, 11, 80, 0)
    negative = p.label == 0
    assert (p.image_idx[negative] != caption_image[p.caption_idx[negative]]).all() and negative.sum() == 40
    caption_image = np.concatenate([np.zeros(49, np.int64), 1 + np.arange(51) % 10])  # image 0: 49 of 100
    for seed in range(20):  # a balance exists, and is found every time (64 random tries alone missed 8 of 40)
        p = build_pairs(caption_image, 11, 200, seed)
        np.testing.assert_array_equal(np.bincount(p.image_idx[p.label == 0], minlength=11),
                                      np.bincount(p.image_idx[p.label == 1], minlength=11))


def test_a_sweep_begun_with_the_earlier_negatives_is_not_resumed_where_they_differ(tmp_path):
    """The workdir claims the pair builder beside the features only where its draws changed (images with
    different numbers of captions): a start that claimed no such thing is refused there, and only there."""
    from fusion_jax.data.pairs import _pools, pair_identity
    from fusion_jax.validate import ConfigError
    from fusion_jax.workdir import prepare_workdir

    assert pair_identity(CAPTION_IMAGE, 50) == {} and pair_identity(np.array([0, 0, 1, 3, 3, 3]), 4)
    sides = np.repeat(np.arange(50), 5 - 2 * np.isin(np.arange(50), [7, 8, 11, 14, 16, 19, 20, 34, 36, 37]))
    train, val = (p.pos_image for p in _pools(sides, 50, 0, 0.8, "image"))
    assert set(np.bincount(train)[np.unique(train)]) == {5} and set(np.bincount(val)[np.unique(val)]) == {3}
    assert pair_identity(sides, 50, split_by="image") == {} and pair_identity(sides, 50)  # each side as many
    one_more = np.append(sides, train[0])  # a sixth caption for one training image: that side varies
    assert pair_identity(one_more, 50, split_by="image")
    config, before = {"name": "x"}, {"own": {"file": "own.npz", "sha256": "ab"}}
    prepare_workdir(str(tmp_path / "same"), config, before)  # an earlier start, as every start claimed
    prepare_workdir(str(tmp_path / "same"), config, {"own": {**before["own"], **pair_identity(CAPTION_IMAGE, 50)}})
    prepare_workdir(str(tmp_path / "varied"), config, before)
    with pytest.raises(ConfigError, match=r"differs in own\.pairs\); its pairs were drawn by an earlier pair builder"):
        prepare_workdir(str(tmp_path / "varied"), config, {"own": {**before["own"], **pair_identity([0, 0, 1], 2)}})


def test_synthetic_alignment_is_the_matched_pairs_cosine_and_each_noise_moves_its_own_side():
    """The synthetic dial: with no noise, alignment A puts a caption at cosine about A from its image (the
    text map A·W_v + sqrt(1 - A²)·W_ind keeps the length of W_v's image); caption_noise moves the captions
    alone, view_noise the images too."""
    from fusion_jax.data.synthetic import generate

    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        fs = generate(f"alignment={a}", 300, 1, 64, 256, caption_noise=0.0, view_noise=0.0, seed=3)
        cos = (fs.image[fs.caption_image] * fs.text).sum(-1)
        assert abs(cos.mean() - a) < 0.02, (a, cos.mean())
    quiet = generate("aligned", 50, 2, 16, 32, caption_noise=0.0, view_noise=0.0, seed=1)
    np.testing.assert_allclose(quiet.text, quiet.image[quiet.caption_image], atol=1e-6)
    captions = generate("aligned", 50, 2, 16, 32, caption_noise=0.5, view_noise=0.0, seed=1)
    np.testing.assert_array_equal(captions.image, quiet.image)
    assert np.abs(captions.text - quiet.text).max() > 0.1
    views = generate("aligned", 50, 2, 16, 32, caption_noise=0.0, view_noise=0.5, seed=1)
    assert np.abs(views.image - quiet.image).max() > 0.1 and np.abs(views.text - quiet.text).max() > 0.1


def test_split_overlap_is_each_scales_own():
    """results.json's split_overlap (feature_report): each scale's validation against its own training pairs,
    as `overlap` counts them (the paper's split shares more at the larger scale)."""
    import ml_collections

    from fusion_jax.data import overlap
    from fusion_jax.data.featureset import FeatureSet
    from fusion_jax.feature_report import split_overlap

    config = ml_collections.ConfigDict({"scales": (50, 400), "pairs": {"split_seed": 0, "train_fraction": 0.8,
                                                                        "split_by": "pair"}})
    fs = FeatureSet(np.zeros((50, 4), np.float32), np.zeros((len(CAPTION_IMAGE), 4), np.float32), CAPTION_IMAGE)
    got = split_overlap(config, fs)
    assert got == {str(s): overlap(build_pairs(CAPTION_IMAGE, 50, s, 0), CAPTION_IMAGE) for s in (50, 400)}
    assert got["50"]["val_pairs_with_a_training_image"] < got["400"]["val_pairs_with_a_training_image"]
