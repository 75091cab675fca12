"""FLOP counts from XLA's cost analysis (fusion_jax/cost.py) against the analytic counts."""

import pytest

from fusion_jax import cost


def test_concat_forward_flops_match_analytic(smoke_config):
    """Concat head, pooled 512 + 512 inputs: XLA's count per sample within 10% of 2 x multiply-adds."""
    hc = smoke_config.head
    xla = cost.forward_flops_per_sample("concat", 512, 512, smoke_config)
    analytic = cost.analytic_concat_flops(512, 512, hc.hidden, hc.mlp_hidden)
    assert analytic == 2 * (1024 * 256 + 256 * 128 + 128 * 2)
    assert xla == pytest.approx(analytic, rel=0.10)  # the bound
    # XLA adds the biases' and ReLUs' few FLOPs (0.1% here): a layer of another width would be far out of this.
    assert xla == pytest.approx(analytic, rel=0.01)


def test_cross_forward_flops_positive_and_plain_dict_config(smoke_config):
    """Cross head, pooled inputs, config as a plain dict: larger than concat's count, and within 5%
    of its dense layers without the attention's query and key projections, which a single key
    makes unused (XLA drops them; with them the count would be 31% higher)."""
    config = smoke_config.to_dict()
    cross = cost.forward_flops_per_sample("cross", 512, 512, config, batch=64)
    concat = cost.forward_flops_per_sample("concat", 512, 512, config, batch=64)
    assert cross > concat > 0
    dense = 2 * (2 * 512 * 256 + 2 * 256 * 256 + 256 * 128 + 128 * 2)  # in-projections, value, out, classifier
    assert cross == pytest.approx(dense, rel=0.01)  # 0.4% over: biases, ReLU, the softmax of one key


def test_train_step_flops_scale_with_runs(smoke_config):
    """One vmapped step of 2 runs costs twice one run; a step costs more than 2 x the forward pass."""
    one = cost.train_step_flops(smoke_config, "concat", 64, 64, n_runs=1)
    two = cost.train_step_flops(smoke_config, "concat", 64, 64, n_runs=2)
    # XLA:CPU counts 2 runs as 2.00x one run; XLA:GPU's count was 2.07x on an H100.
    assert two == pytest.approx(2 * one, rel=0.05)
    forward = cost.forward_flops_per_sample("concat", 64, 64, smoke_config) * smoke_config.train.batch_size
    assert one > 2 * forward
    # A group whose runs are all at level 0 draws no noise: its step costs less (the benchmark counts it so).
    assert 2 * forward < cost.train_step_flops(smoke_config, "concat", 64, 64, noisy=False) < one


@pytest.mark.parametrize("method", ["concat", "cross"])
def test_forward_flops_count_each_sides_own_tokens(smoke_config, method):
    """Token features: each side's own token count adds to the forward FLOPs (the image's 6 tokens with
    a pooled text, the text's 6 with a pooled image), and more of them add more."""
    flops = lambda image, text: cost.forward_flops_per_sample(method, 16, 8, smoke_config, batch=8,
                                                              image_tokens=image, text_tokens=text)
    pooled = flops(0, 0)
    assert flops(0, 6) > pooled and flops(6, 0) > pooled
    assert flops(0, 12) > flops(0, 6) and flops(12, 0) > flops(6, 0)
    assert flops(6, 0) > flops(0, 6)  # the image's tokens are the wider (16 dims against 8)


def test_the_counted_programs_take_what_a_sweep_gives_them(smoke_config, monkeypatch):
    """What XLA's cost analysis is asked about (its arguments' shapes, no compile): the forward pass on a batch of
    256; a training step of a chunk of runs on a batch of pairs, gathered from token features with their masks
    (float, as a FeatureSet holds them) where the features have tokens."""
    import jax
    import jax.numpy as jnp

    seen = []
    monkeypatch.setattr(cost, "host_flops", lambda f, *args: seen.append(args) or 256.0)
    assert cost.forward_flops_per_sample("concat", 16, 8, smoke_config) == 1.0
    assert [x.shape for x in seen[0][1:3]] == [(256, 16), (256, 8)]
    batch = smoke_config.train.batch_size
    cost.train_step_flops(smoke_config, "concat", 16, 8, n_runs=3, tokens=5)
    _, runs, data = seen[1]
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)
    assert shapes(data) == {"image": ((2 * batch, 5, 16), jnp.float32), "text": ((2 * batch, 5, 8), jnp.float32),
                            "image_mask": ((2 * batch, 5), jnp.float32), "text_mask": ((2 * batch, 5), jnp.float32)}
    assert {k: runs[k]["label"].shape for k in ("train", "val")} == {"train": (3, batch), "val": (3, 1)}
    cost.train_step_flops(smoke_config, "concat", 16, 8)
    assert set(seen[2][2]) == {"image", "text"} and seen[2][2]["image"].shape == (2 * batch, 16)
