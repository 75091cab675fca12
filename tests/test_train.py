"""A run gives the same numbers alone or inside a vmapped group, and a group compiles once."""

import chex
import jax
import numpy as np

from fusion_jax.data import build_pairs
from fusion_jax.data.sources import load_features
from fusion_jax.sweep import RunSpec, group_data, stack_runs
from fusion_jax.train import make_train


def _setup(config, method, scale=256):
    fs = load_features(config, "aligned")
    pairs = build_pairs(fs.caption_image, fs.n_images, scale, config.pairs.split_seed)
    trainer = make_train(config, method, pairs.n_train, scale - pairs.n_train)
    return trainer, group_data(fs, pairs)


def _train_group(trainer, runs, data, epochs):
    init = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))
    epoch = jax.jit(jax.vmap(trainer.train_epoch, in_axes=(0, 0, None)))
    evaluate = jax.jit(jax.vmap(trainer.evaluate, in_axes=(0, 0, None)))
    state = init(runs, data)
    for _ in range(epochs):
        state, losses = epoch(state, runs, data)
    return state, evaluate(state, runs, data), losses


def _train_alone(trainer, run, data, epochs):
    state = jax.jit(trainer.init)(run, data)
    epoch = jax.jit(trainer.train_epoch)
    for _ in range(epochs):
        state, losses = epoch(state, run, data)
    return state, jax.jit(trainer.evaluate)(state, run, data), losses


def test_run_alone_equals_run_in_group(smoke_config):
    for method in ("concat", "cross"):
        trainer, data = _setup(smoke_config, method)
        specs = tuple(RunSpec("aligned", method, 256, seed, "gaussian", level)
                      for seed in (42, 123) for level in (0.0, 0.3))
        state, counts, losses = _train_group(trainer, stack_runs(specs), data, epochs=2)
        for i in (0, 3):
            run = jax.tree_util.tree_map(lambda x: x[i], stack_runs(specs))
            alone_state, alone_counts, alone_losses = _train_alone(trainer, run, data, epochs=2)
            in_group = jax.tree_util.tree_map(lambda x: x[i], state)
            chex.assert_trees_all_close(alone_state["params"], in_group["params"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(alone_losses, losses[i], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(alone_counts, counts[i])


def test_runs_differ_where_their_specs_differ(smoke_config):
    trainer, data = _setup(smoke_config, "concat")
    specs = tuple(RunSpec("aligned", "concat", 256, seed, "gaussian", level)
                  for seed, level in ((42, 0.0), (123, 0.0), (42, 0.5)))
    state, _, losses = _train_group(trainer, stack_runs(specs), data, epochs=1)
    assert not np.allclose(losses[0], losses[1])  # another seed: another init and batch order
    assert not np.allclose(losses[0], losses[2])  # another noise level
    init = jax.vmap(trainer.init, in_axes=(0, None))(stack_runs(specs), data)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[0], init["params"]),
                                jax.tree_util.tree_map(lambda x: x[2], init["params"]))  # levels share the init


def test_group_compiles_once(smoke_config):
    trainer, data = _setup(smoke_config, "cross")
    specs = tuple(RunSpec("aligned", "cross", 256, s, "gaussian", 0.1) for s in (1, 2, 3))
    runs = stack_runs(specs)
    epoch = jax.jit(jax.vmap(chex.assert_max_traces(trainer.train_epoch, n=1), in_axes=(0, 0, None)))
    state = jax.vmap(trainer.init, in_axes=(0, None))(runs, data)
    for _ in range(3):
        state, _ = epoch(state, runs, data)
    assert int(state["epoch"][0]) == 3


def test_training_lowers_the_loss(smoke_config):
    smoke_config.train.learning_rate = 1e-3
    trainer, data = _setup(smoke_config, "concat")
    specs = (RunSpec("aligned", "concat", 256, 0, "gaussian", 0.0),)
    runs = stack_runs(specs)
    init = jax.vmap(trainer.init, in_axes=(0, None))(runs, data)
    epoch = jax.jit(jax.vmap(trainer.train_epoch, in_axes=(0, 0, None)))
    state, first = epoch(init, runs, data)
    state, last = epoch(state, runs, data)
    assert last.mean() < first.mean()
