import numpy as np
import pytest

from fusion_jax.data import build_pairs, max_pairs

CAPTION_IMAGE = np.repeat(np.arange(50), 5)


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


def test_scale_limits():
    assert max_pairs(CAPTION_IMAGE, 50) == 500
    build_pairs(CAPTION_IMAGE, 50, 500, split_seed=0)
    with pytest.raises(ValueError, match="scale 501"):
        build_pairs(CAPTION_IMAGE, 50, 501, split_seed=0)
