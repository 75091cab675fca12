"""The trainer: `make_train` returns pure functions that one `jax.jit(jax.vmap(...))` runs for a group.

The paper's recipe: AdamW (weight decay 0.01), learning rate decayed by a cosine over all steps of
the run's epochs (torch's CosineAnnealingLR stepped per batch), batch 32, softmax cross-entropy over
two logits. Each epoch reshuffles the training pairs; the last batch of an epoch is partly padded
and the padding carries zero weight, so no pair is dropped (as torch's DataLoader, drop_last=False).

A run is a small pytree: `key` (derived from the run's own seed and scale, see `run_key`) and
`noise_level` (sigma). All runs of a group share `data`: the feature arrays and the pair indices,
gathered by index inside the compiled step.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fusion_jax import degrade as degrade_lib
from fusion_jax.fusion import make_head

# fold_in tags that split a run key into independent streams.
_INIT, _SHUFFLE, _DROPOUT, _NOISE = range(4)


class Trainer(NamedTuple):
    """Pure functions of one (method, scale): vmap them over runs, jit the result.

    init(run, data) -> state; train_epoch(state, run, data) -> (state, losses [steps_per_epoch]);
    evaluate(state, run, data) -> counts [4] = (tp, fp, fn, tn) on the validation pairs.
    """

    init: Callable
    train_epoch: Callable
    evaluate: Callable
    steps_per_epoch: int


def run_key(seed: int, scale: int) -> jax.Array:
    """A run's key, from its own spec. Degradation levels of one (seed, scale) share it on purpose:
    they then share initialisation, batch order and the noise direction, and differ only in sigma."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), scale)


def make_train(config: ml_collections.ConfigDict, method: str, n_train: int, n_val: int) -> Trainer:
    """Build the trainer of `method` for a group whose pairs split into n_train / n_val."""
    tc, hc, dc = config.train, config.head, config.degradation
    head = make_head(method, hc.hidden, hc.mlp_hidden, tc.dropout, hc.num_heads)
    batch = tc.batch_size
    steps = math.ceil(n_train / batch)
    tx = optax.adamw(optax.cosine_decay_schedule(tc.learning_rate, steps * tc.epochs),
                     weight_decay=tc.weight_decay)
    noisy = {"image": dc.modality in ("image", "both"), "text": dc.modality in ("text", "both")}
    eval_batch = min(tc.eval_batch_size, n_val)
    eval_chunks = math.ceil(n_val / eval_batch)

    def inputs(data, run, image_idx, caption_idx):
        """Gather (and degrade) a batch: the head's positional inputs."""
        out = []
        for tag, (name, idx) in enumerate((("image", image_idx), ("text", caption_idx))):
            x = data[name][idx]
            if noisy[name]:
                key = jax.random.fold_in(jax.random.fold_in(run["key"], _NOISE), tag)
                x = degrade_lib.degrade(x, idx, key, run["noise_level"], dc.kind)
            out.append(x)
        masks = [data[f"{n}_mask"][i] if f"{n}_mask" in data else None
                 for n, i in (("image", image_idx), ("text", caption_idx))]
        return (*out, *masks)

    def init(run, data):
        zero = jnp.zeros((1,), jnp.int32)
        params = head.init(jax.random.fold_in(run["key"], _INIT), *inputs(data, run, zero, zero))["params"]
        return {"params": params, "opt_state": tx.init(params), "epoch": jnp.zeros((), jnp.int32)}

    def loss_fn(params, x, label, weight, key):
        logits = head.apply({"params": params}, *x, train=True, rngs={"dropout": key})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)
        return (ce * weight).sum() / weight.sum()

    def train_epoch(state, run, data):
        pairs = data["train"]
        epoch = state["epoch"]
        perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(run["key"], _SHUFFLE), epoch), n_train)
        rows = jnp.zeros(steps * batch, jnp.int32).at[:n_train].set(perm).reshape(steps, batch)
        weight = (jnp.arange(steps * batch) < n_train).astype(jnp.float32).reshape(steps, batch)
        dropout_key = jax.random.fold_in(run["key"], _DROPOUT)

        def step(carry, xs):
            params, opt_state = carry
            r, w, t = xs
            x = inputs(data, run, pairs["image_idx"][r], pairs["caption_idx"][r])
            loss, grads = jax.value_and_grad(loss_fn)(params, x, pairs["label"][r], w,
                                                      jax.random.fold_in(dropout_key, t))
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        t = epoch * steps + jnp.arange(steps)
        (params, opt_state), losses = jax.lax.scan(step, (state["params"], state["opt_state"]), (rows, weight, t))
        return {"params": params, "opt_state": opt_state, "epoch": epoch + 1}, losses

    def evaluate(state, run, data):
        pairs = data["val"]
        rows = jnp.arange(eval_chunks * eval_batch).reshape(eval_chunks, eval_batch)

        def chunk(r):
            valid = r < n_val
            r = jnp.minimum(r, n_val - 1)
            logits = head.apply({"params": state["params"]},
                                *inputs(data, run, pairs["image_idx"][r], pairs["caption_idx"][r]))
            pred, label = jnp.argmax(logits, -1) == 1, pairs["label"][r] == 1
            return jnp.stack([(valid & pred & label).sum(), (valid & pred & ~label).sum(),
                              (valid & ~pred & label).sum(), (valid & ~pred & ~label).sum()])

        return jax.lax.map(chunk, rows).sum(0)

    return Trainer(init, train_epoch, evaluate, steps)
