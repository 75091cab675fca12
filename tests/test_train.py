"""A run gives the same numbers alone or inside a vmapped group (also beside runs of larger scales),
and a group compiles once."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.data import build_pairs
from fusion_jax.data.sources import load_features
from fusion_jax.groups import RunSpec, group_data, stack_runs
from fusion_jax.fusion import make_head
from fusion_jax.train import adamw, adamw_init, epoch_order, make_train, run_key, unread_leaves

ON_GPU = jax.devices()[0].platform == "gpu"


def _group(config, method, specs, **trainer_options):
    """(trainer, runs, data) of `specs`, sized for the largest of their scales."""
    fs = load_features(config, "aligned")
    pairs = {s: build_pairs(fs.caption_image, fs.n_images, s, config.pairs.split_seed) for s in {r.scale for r in specs}}
    runs = stack_runs(specs, pairs)
    trainer = make_train(config, method, int(runs["n_train"].max()), int(runs["n_val"].max()),
                         noisy=any(r.level for r in specs), **trainer_options)
    return trainer, runs, group_data(fs)


def _train_group(trainer, runs, data, epochs):
    init = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))
    epoch = jax.jit(trainer.train_epoch)
    evaluate = jax.jit(jax.vmap(trainer.evaluate, in_axes=(0, 0, None)))
    state = init(runs, data)
    for _ in range(epochs):
        state, losses = epoch(state, runs, data)
    return state, evaluate(state, runs, data), losses


def _assert_same_run(alone, in_group, steps, lr):
    """Same parameters, losses and validation counts. On a GPU the batched and single matmuls
    accumulate in other orders, and Adam turns a rounding difference in a near-zero gradient into
    a step of up to lr: parameters then agree to a few lr, losses to 1e-4."""
    (a_state, a_counts, a_losses), (g_state, g_counts, g_losses) = alone, in_group
    if ON_GPU:
        chex.assert_trees_all_close(a_state["params"], g_state["params"], rtol=1e-3, atol=4 * lr)
        np.testing.assert_allclose(a_losses, g_losses[:steps], rtol=1e-4, atol=1e-5)
        assert np.abs(np.asarray(a_counts) - np.asarray(g_counts)).max() <= 2
    else:
        chex.assert_trees_all_close(a_state["params"], g_state["params"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a_losses, g_losses[:steps], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a_counts, g_counts)
    np.testing.assert_array_equal(g_losses[steps:], 0.0)  # the idle steps of a smaller run


@pytest.mark.parametrize("method", ["concat", "cross"])
def test_run_alone_equals_run_in_group(smoke_config, method):
    """Runs of scales 256 and 512, seeds and noise levels in one group; a 256 run and a 512 run
    trained alone (each sized for its own scale) give the same numbers."""
    specs = tuple(RunSpec("aligned", method, scale, seed, "gaussian", level)
                  for scale in (256, 512) for seed in (42, 123) for level in (0.0, 0.3))
    trainer, runs, data = _group(smoke_config, method, specs)
    state, counts, losses = _train_group(trainer, runs, data, epochs=2)
    for i in (1, 6):
        alone_trainer, alone_runs, _ = _group(smoke_config, method, specs[i:i + 1])
        alone = _train_group(alone_trainer, alone_runs, data, epochs=2)
        assert alone_trainer.steps_per_epoch < trainer.steps_per_epoch or specs[i].scale == 512
        in_group = jax.tree_util.tree_map(lambda x: x[i:i + 1], (state, counts, losses))
        _assert_same_run(jax.tree_util.tree_map(lambda x: x[0], alone),
                         jax.tree_util.tree_map(lambda x: x[0], in_group),
                         alone_trainer.steps_per_epoch, smoke_config.train.learning_rate)


@pytest.mark.parametrize("skip_idle", [True, False])
def test_a_chunk_of_smaller_runs_equals_them_alone(smoke_config, skip_idle):
    """A chunk of two 256 runs in a program sized for 512 (its epochs scan the 512 run's steps):
    with skip_idle the steps past theirs are skipped, without they are exact no-ops; either way
    the runs match themselves trained alone."""
    specs = tuple(RunSpec("aligned", "concat", scale, seed, "gaussian", 0.3)
                  for scale, seed in ((256, 42), (256, 123), (512, 42)))
    trainer, runs, data = _group(smoke_config, "concat", specs, skip_idle=skip_idle)
    chunk = _train_group(trainer, jax.tree_util.tree_map(lambda x: x[:2], runs), data, epochs=2)
    alone_trainer, alone_runs, _ = _group(smoke_config, "concat", specs[:2])
    assert alone_trainer.steps_per_epoch < trainer.steps_per_epoch
    alone = _train_group(alone_trainer, alone_runs, data, epochs=2)
    for i in range(2):
        _assert_same_run(jax.tree_util.tree_map(lambda x: x[i], alone), jax.tree_util.tree_map(lambda x: x[i], chunk),
                         alone_trainer.steps_per_epoch, smoke_config.train.learning_rate)


def test_epoch_order_is_a_permutation_independent_of_padding():
    key = jax.random.PRNGKey(7)
    alone = np.asarray(epoch_order(key, 3, 100, 100))
    padded = np.asarray(epoch_order(key, 3, 100, 260))
    assert sorted(alone) == list(range(100))
    np.testing.assert_array_equal(padded[:100], alone)
    assert sorted(padded[100:]) == list(range(100, 260))
    assert not np.array_equal(alone, np.asarray(epoch_order(key, 4, 100, 100)))  # reshuffled each epoch


def test_a_batch_order_that_would_depend_on_the_group_is_refused(smoke_config):
    """Without partitionable threefry, a uniform draw's first entries depend on its length."""
    key = jax.random.PRNGKey(7)
    before = jax.config.jax_threefry_partitionable
    try:
        jax.config.update("jax_threefry_partitionable", False)
        assert not np.array_equal(epoch_order(key, 3, 50, 64)[:50], epoch_order(key, 3, 50, 4096)[:50])
        with pytest.raises(ValueError, match="jax_threefry_partitionable=True"):
            make_train(smoke_config, "concat", 256, 64)
    finally:
        jax.config.update("jax_threefry_partitionable", before)
    make_train(smoke_config, "concat", 256, 64)


def test_runs_differ_where_their_specs_differ(smoke_config):
    specs = tuple(RunSpec("aligned", "concat", 256, seed, "gaussian", level)
                  for seed, level in ((42, 0.0), (123, 0.0), (42, 0.5)))
    trainer, runs, data = _group(smoke_config, "concat", specs)
    state, _, losses = _train_group(trainer, runs, data, epochs=1)
    assert not np.allclose(losses[0], losses[1])  # another seed: another init and batch order
    assert not np.allclose(losses[0], losses[2])  # another noise level
    init = jax.vmap(trainer.init, in_axes=(0, None))(runs, data)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[0], init["params"]),
                                jax.tree_util.tree_map(lambda x: x[2], init["params"]))  # levels share the init
    # Each run's key is its (seed, scale)'s, whatever the group: another scale of the same seed starts elsewhere.
    for key, spec in zip(runs["key"], specs):
        np.testing.assert_array_equal(key, run_key(spec.seed, spec.scale))
    first = jax.tree_util.tree_map(lambda x: x[0], runs)
    other_scale = trainer.init({**first, "key": run_key(42, 512)}, data)["params"]
    assert not all(np.allclose(a, b[0]) for a, b in zip(jax.tree_util.tree_leaves(other_scale),
                                                        jax.tree_util.tree_leaves(init["params"])))
    # Validation sees the run's noise too: run 0's parameters score other counts on run 2's (noisier) inputs.
    run0 = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x[0], x.shape), state)
    counts = jax.jit(jax.vmap(trainer.evaluate, in_axes=(0, 0, None)))(run0, runs, data)  # _train_group's program
    assert not np.array_equal(counts[0], counts[2])


def test_noise_free_program_equals_level_zero(smoke_config):
    """noisy=False (no noise drawn) trains exactly as a level-0 run of a noisy program."""
    specs = (RunSpec("aligned", "concat", 256, 42, "gaussian", 0.0),)
    trainer, runs, data = _group(smoke_config, "concat", specs)
    noisy = make_train(smoke_config, "concat", int(runs["n_train"].max()), int(runs["n_val"].max()), noisy=True)
    quiet = _train_group(trainer, runs, data, epochs=1)
    loud = _train_group(noisy, runs, data, epochs=1)
    chex.assert_trees_all_close(quiet[0]["params"], loud[0]["params"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(quiet[2], loud[2], rtol=1e-6)


def test_training_reads_the_features_as_they_are(smoke_config):
    """Without noise, no modality is rescaled: image features 3x larger train differently (a head is not
    scale-invariant), in a noise-free program and at level 0 of a noisy one."""
    specs = (RunSpec("aligned", "concat", 256, 42, "gaussian", 0.0),)
    trainer, runs, data = _group(smoke_config, "concat", specs)
    noisy = make_train(smoke_config, "concat", int(runs["n_train"].max()), int(runs["n_val"].max()), noisy=True)
    louder = {**data, "image": 3.0 * data["image"]}
    for t in (trainer, noisy):
        state = jax.vmap(t.init, in_axes=(0, None))(runs, data)
        _, losses = jax.jit(t.train_epoch)(state, runs, data)
        _, louder_losses = jax.jit(t.train_epoch)(state, runs, louder)
        assert not np.allclose(losses, louder_losses, rtol=1e-3)


def test_group_compiles_once(smoke_config):
    specs = tuple(RunSpec("aligned", "cross", scale, s, "gaussian", 0.1) for scale in (128, 256) for s in (1, 2))
    trainer, runs, data = _group(smoke_config, "cross", specs)
    epoch = jax.jit(chex.assert_max_traces(trainer.train_epoch, n=1))
    state = jax.vmap(trainer.init, in_axes=(0, None))(runs, data)
    for _ in range(3):
        state, _ = epoch(state, runs, data)
    assert int(state["epoch"][0]) == 3


def test_training_lowers_the_loss(smoke_config):
    smoke_config.train.learning_rate = 1e-3
    trainer, runs, data = _group(smoke_config, "concat", (RunSpec("aligned", "concat", 256, 0, "gaussian", 0.0),))
    init = jax.vmap(trainer.init, in_axes=(0, None))(runs, data)
    epoch = jax.jit(trainer.train_epoch)
    state, first = epoch(init, runs, data)
    state, last = epoch(state, runs, data)
    # The initial parameters on epoch 2's batches and dropout keys: the drop is the training's, not the order's.
    _, frozen = epoch(dict(init, epoch=state["epoch"] - 1), runs, data)
    assert last.mean() < first.mean() and last[0, 0] < frozen[0, 0]


def test_padding_tokens_do_not_reach_training(smoke_config):
    """Token features with masks of varying length: what the padding holds changes no training loss (the
    trainer hands each batch its masks; the heads' own masking is tests/test_fusion.py's)."""
    smoke_config.synthetic.tokens = 4
    trainer, runs, data = _group(smoke_config, "cross", (RunSpec("aligned", "cross", 128, 0, "gaussian", 0.0),))
    assert all(float(data[f"{n}_mask"].min()) == 0.0 for n in ("image", "text"))  # some rows are padded
    filled = dict(data, **{n: jnp.where(data[f"{n}_mask"][..., None] > 0, data[n], 100.0) for n in ("image", "text")})
    epoch = jax.jit(trainer.train_epoch)
    init = jax.vmap(trainer.init, in_axes=(0, None))(runs, data)
    np.testing.assert_allclose(epoch(init, runs, filled)[1], epoch(init, runs, data)[1], rtol=1e-5, atol=1e-6)


def test_dropout_is_drawn_in_training(smoke_config):
    """Step 0 of a run with dropout 0.5 and of the same run without: same parameters and batch, other loss."""
    spec = (RunSpec("aligned", "concat", 128, 0, "gaussian", 0.0),)
    losses = {}
    for rate in (0.0, 0.5):
        smoke_config.train.dropout = rate
        trainer, runs, data = _group(smoke_config, "concat", spec)
        _, loss = trainer.train_epoch(jax.vmap(trainer.init, in_axes=(0, None))(runs, data), runs, data)
        losses[rate] = float(loss[0, 0])
    assert losses[0.0] != pytest.approx(losses[0.5], rel=1e-4)


def test_dropout_masks_are_new_at_every_step_of_every_epoch(smoke_config):
    """With every training row alike (constant features, label 1) and a learning rate of 0, a step's loss
    depends on its dropout masks alone: each step of two epochs then has a loss of its own, and without
    dropout all are equal (the control)."""
    spec = (RunSpec("aligned", "concat", 128, 0, "gaussian", 0.0),)
    smoke_config.train.learning_rate, smoke_config.train.batch_size = 0.0, 32
    losses = {}
    for rate in (0.0, 0.5):
        smoke_config.train.dropout = rate
        trainer, runs, data = _group(smoke_config, "concat", spec)
        data = {**data, "image": jnp.ones_like(data["image"]), "text": jnp.ones_like(data["text"])}
        runs = {**runs, "train": {**runs["train"], "label": jnp.ones_like(runs["train"]["label"])}}
        n = int(runs["n_train"][0]) // 32  # the full batches (the last is partly padding)
        state = jax.vmap(trainer.init, in_axes=(0, None))(runs, data)
        state, first = trainer.train_epoch(state, runs, data)
        _, second = trainer.train_epoch(state, runs, data)
        losses[rate] = np.concatenate([first[0, :n], second[0, :n]])
    assert n >= 2 and np.ptp(losses[0.0]) == 0, losses[0.0]
    assert len(set(losses[0.5].tolist())) == 2 * n, losses[0.5]


def test_validation_in_chunks_counts_what_one_chunk_does(smoke_config):
    """train.eval_batch_size changes no count: 51 validation pairs in chunks of 7 (the last one padded) give
    the counts of one chunk of them all (the paper's scales from 8192 have more than the default 1024)."""
    spec = (RunSpec("aligned", "cross", 256, 0, "gaussian", 0.0),)
    trainer, runs, data = _group(smoke_config, "cross", spec)
    state = jax.jit(trainer.train_epoch)(jax.vmap(trainer.init, in_axes=(0, None))(runs, data), runs, data)[0]
    counts = {}
    for size in (7, 1024):
        smoke_config.train.eval_batch_size = size
        trainer = make_train(smoke_config, "cross", int(runs["n_train"].max()), int(runs["n_val"].max()), noisy=False)
        counts[size] = np.asarray(jax.jit(jax.vmap(trainer.evaluate, in_axes=(0, 0, None)))(state, runs, data))
    assert int(runs["n_val"][0]) == 51 and counts[7][0, :4].sum() == 51 and counts[7][0, 4] == 0
    assert 0 < counts[7][0, 0] + counts[7][0, 1] < 51  # the head predicts both classes: the counts can move
    if ON_GPU:  # other batch shapes, other matmul kernels: a logit near the tie may round the other way
        assert np.abs(counts[7] - counts[1024]).max() <= 2
    else:
        np.testing.assert_array_equal(counts[7], counts[1024])


def test_validation_counts_infinite_logits_as_non_finite(smoke_config):
    """A pair whose logits overflow to ±inf (not NaN) counts as non-finite, which fails its group: an inf
    logit still has an argmax, and would otherwise be scored as a prediction."""
    spec = (RunSpec("aligned", "concat", 128, 0, "gaussian", 0.0),)
    trainer, runs, data = _group(smoke_config, "concat", spec)
    state = jax.vmap(trainer.init, in_axes=(0, None))(runs, data)
    last = state["params"]["Classifier_0"]["Dense_1"]
    assert last["bias"].shape == (1, 2)
    for bias in ([np.inf, 0.0], [0.0, -np.inf]):
        last["bias"] = jnp.asarray([bias], jnp.float32)
        counts = np.asarray(jax.vmap(trainer.evaluate, in_axes=(0, 0, None))(state, runs, data))
        assert counts[0, 4] == int(runs["n_val"][0]) > 0, (bias, counts)


@pytest.mark.parametrize("modality, noised", [("image", {16}), ("text", {24}), ("both", {16, 24})])
def test_noise_reaches_the_modality_the_config_names(smoke_config, monkeypatch, modality, noised):
    """degradation.modality picks the features the noise is drawn for, in training and in evaluation (image
    features 16-d, text 24-d here: the degraded batches' widths name them)."""
    from fusion_jax import train as train_module

    spec = (RunSpec("aligned", "concat", 128, 0, "gaussian", 0.3),)
    _, runs, data = _group(smoke_config, "concat", spec)
    data = {**data, "image": jnp.zeros((data["image"].shape[0], 16)), "text": jnp.zeros((data["text"].shape[0], 24))}
    smoke_config.degradation.modality = modality
    trainer = make_train(smoke_config, "concat", int(runs["n_train"].max()), int(runs["n_val"].max()), noisy=True)
    widths = []
    monkeypatch.setattr(train_module.degrade_lib, "degrade", lambda x, *args: widths.append(x.shape[-1]) or x)
    state = jax.eval_shape(jax.vmap(trainer.init, in_axes=(0, None)), runs, data)
    jax.eval_shape(trainer.train_epoch, state, runs, data)
    assert set(widths) == noised
    widths.clear()
    jax.eval_shape(jax.vmap(trainer.evaluate, in_axes=(0, 0, None)), state, runs, data)
    assert set(widths) == noised


def test_image_and_text_noise_are_drawn_from_keys_of_their_own(smoke_config, monkeypatch):
    """With degradation.modality 'both', image row i and caption row i must not get the same noise (which
    they would, on features of one width, from one key): each side's noise key is its own (image features
    16-d, text 24-d here, to tell the sides apart)."""
    from fusion_jax import train as train_module

    spec = (RunSpec("aligned", "concat", 128, 0, "gaussian", 0.3),)
    smoke_config.degradation.modality = "both"
    _, runs, data = _group(smoke_config, "concat", spec)
    data = {**data, "image": jnp.ones((data["image"].shape[0], 16)), "text": jnp.ones((data["text"].shape[0], 24))}
    trainer = make_train(smoke_config, "concat", int(runs["n_train"].max()), int(runs["n_val"].max()), noisy=True)
    keys, real = {}, train_module.degrade_lib.degrade

    def spy(x, index, key, sigma, kind):
        side = {16: "image", 24: "text"}[x.shape[-1]]
        jax.debug.callback(lambda k: keys.setdefault(side, np.asarray(k)), jax.random.key_data(key))
        return real(x, index, key, sigma, kind)

    monkeypatch.setattr(train_module.degrade_lib, "degrade", spy)
    state = jax.vmap(trainer.init, in_axes=(0, None))(runs, data)
    jax.block_until_ready(jax.jit(jax.vmap(trainer.evaluate, in_axes=(0, 0, None)))(state, runs, data))
    assert set(keys) == {"image", "text"} and not np.array_equal(keys["image"], keys["text"]), keys


def _head_loss(method):
    head = make_head(method)
    return head, lambda params, image, text: head.apply({"params": params}, image, text).sum()


def test_unread_leaves_are_crosss_query_and_key_on_pooled_features():
    """On pooled features (one key) `cross` never reads its attention's query and key projections;
    on token features every parameter is read, and so is every one of `concat`'s."""
    pooled, tokens = (jnp.zeros((4, 16)), jnp.zeros((4, 8))), (jnp.zeros((4, 3, 16)), jnp.zeros((4, 5, 8)))
    qk = {f"attention/{p}/{leaf}" for p in ("query", "key") for leaf in ("kernel", "bias")}
    for method, inputs, expected in (("cross", pooled, qk), ("cross", tokens, set()), ("concat", pooled, set())):
        head, loss = _head_loss(method)
        params = jax.jit(head.init)(jax.random.PRNGKey(0), *inputs)["params"]  # jit: one compile, not one per op
        unread = unread_leaves(loss, params, *inputs)
        paths = jax.tree_util.tree_flatten_with_path(unread)[0]
        found = {"/".join(k.key for k in path) for path, u in paths if u}
        assert found == expected, (method, found)
        # An unread leaf's gradient is exactly 0.
        grads = jax.jit(jax.grad(loss))(params, *[np.random.default_rng(1).normal(size=x.shape) for x in inputs])
        for u, g in zip(jax.tree_util.tree_leaves(unread), jax.tree_util.tree_leaves(grads)):
            assert not u or not np.asarray(g).any()


def test_adamw_on_unread_leaves_gives_the_same_bits():
    """AdamW told which leaves have a zero gradient (moments kept at 0, not streamed) gives exactly
    the parameters and state of the full update, over steps with a cosine schedule, idle steps too."""
    head, loss = _head_loss("cross")
    image, text = jax.random.normal(jax.random.PRNGKey(1), (32, 16)), jax.random.normal(jax.random.PRNGKey(2), (32, 8))
    params = head.init(jax.random.PRNGKey(0), image, text)["params"]
    unread = unread_leaves(loss, params, image, text)
    assert any(jax.tree_util.tree_leaves(unread))

    def steps(params, skip):
        def step(carry, t):
            p, opt = carry
            g = jax.grad(loss)(p, image * (1 + t), text)
            return adamw(p, g, opt, 1e-2 * (1 + jnp.cos(t / 7.0)), 0.01, t % 5 != 4,
                         unread=unread if skip else None), None
        return jax.lax.scan(step, (params, adamw_init(params)), jnp.arange(20.0))[0]

    full, skipped = jax.jit(lambda p: steps(p, False))(params), jax.jit(lambda p: steps(p, True))(params)
    chex.assert_trees_all_equal(full, skipped)
    assert not np.array_equal(full[0]["attention"]["query"]["kernel"], params["attention"]["query"]["kernel"])  # decayed


def test_a_chunk_of_empty_slots_is_left_as_it_is(smoke_config):
    """Empty slots (groups.layout's padding: no training pairs) take no step: state unchanged but for
    the epoch counter, losses 0."""
    specs = (RunSpec("aligned", "concat", 256, 42, "gaussian", 0.0),) * 2
    trainer, runs, data = _group(smoke_config, "concat", specs)
    runs = dict(runs, n_train=np.zeros_like(runs["n_train"]))
    state = jax.vmap(trainer.init, in_axes=(0, None))(runs, data)
    after, losses = jax.jit(trainer.train_epoch)(state, runs, data)
    chex.assert_trees_all_equal((after["params"], after["opt_state"]), (state["params"], state["opt_state"]))
    np.testing.assert_array_equal(after["epoch"], state["epoch"] + 1)
    np.testing.assert_array_equal(losses, 0.0)
