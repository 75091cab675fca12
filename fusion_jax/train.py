"""The trainer: `make_train` returns pure functions that one compiled program runs for a group.

The paper's recipe: AdamW (weight decay 0.01), learning rate decayed by a cosine over all steps of
the run's epochs (torch's CosineAnnealingLR stepped per batch), batch 32, softmax cross-entropy over
two logits. Each epoch reshuffles the training pairs; the last batch of an epoch is partly padded
and the padding carries zero weight, so no pair is dropped (as torch's DataLoader, drop_last=False).

A run is a small pytree: `key` (derived from the run's own seed and scale, see `run_key`),
`noise_level` (sigma) and its own pairs, padded to the group's largest scale (`pair_arrays`). Runs of
different scales therefore share one program: an epoch loops over the steps of the group's largest
run (on CPUs, of the chunk's largest), and a smaller run leaves its state untouched in the steps
past its own (`steps_per_epoch`). All runs share `data`: the feature arrays, gathered by index
inside the compiled step.

Training steps a chunk of runs together (vmapped inside the step) and, on CPUs, skips the steps
past all of the chunk's runs. Which runs share a chunk, and how many, is the sweep's choice
(groups.layout): one chunk of all runs fills an accelerator; on a CPU, chunks of a few runs keep
their parameters and moments in the cache, and the smaller scales' chunks stop early.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fusion_jax import degrade as degrade_lib
from fusion_jax.fusion import make_head

# fold_in tags that split a run key into independent streams.
_INIT, _SHUFFLE, _DROPOUT, _NOISE = range(4)


class Trainer(NamedTuple):
    """Pure functions of one method, to jit.

    init(run, data) -> state and evaluate(state, run, data) -> counts [5] = (tp, fp, fn, tn, pairs
    with a non-finite logit) on the run's validation pairs take one run: vmap them over runs.
    train_epoch(state, runs, data) -> (state, losses [k, steps_per_epoch]) takes a chunk of k runs
    (state and runs stacked [k, ...]);
    the losses of steps past a run's own are 0; skip_idle: whether it skips the steps past a chunk's
    longest run (see make_train).
    """

    init: Callable
    train_epoch: Callable
    evaluate: Callable
    steps_per_epoch: int
    skip_idle: bool


def run_key(seed: int, scale: int) -> jax.Array:
    """A run's key, from its own spec. Degradation levels of one (seed, scale) share it on purpose:
    they then share initialisation, batch order and the noise direction, and differ only in sigma."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), scale)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of n_train pairs (the last batch partly padded)."""
    return math.ceil(n_train / batch_size)


def pair_arrays(split: dict, size: int) -> dict:
    """A run's pairs of one split ({image_idx, caption_idx, label} [n]) padded with zeros to [size]."""
    return {k: np.pad(np.asarray(v, np.int32), (0, size - len(v))) for k, v in split.items()}


def cosine_lr(peak: float, step: jax.Array, total: jax.Array) -> jax.Array:
    """peak * (1 + cos(pi * step / total)) / 2: optax's cosine_decay_schedule with a per-run total."""
    return peak * (0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(step, total) / total)))


def adamw(params: Any, grads: Any, opt: dict, lr: jax.Array, weight_decay: float, active: jax.Array,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, unread: Any = None) -> tuple[Any, dict]:
    """One AdamW step, as optax.adamw and torch.optim.AdamW take it: (params, opt).

    With `active` False the step leaves params and moments exactly as they are (decays of 1, a
    step size of 0). This replaces a select between old and new state, which XLA:CPU pays for
    with copies of the whole state (twice the time of a step).

    unread: a tree of bools like params (see `unread_leaves`), True where the loss does not read the
    leaf: its gradient is exactly 0, so its moments stay exactly 0 and the update is weight decay
    alone, the same numbers without streaming the moments. This takes those moments to be 0 (as
    `adamw_init` makes them and as every earlier step leaves them): it neither reads nor updates them."""
    unread = unread or jax.tree_util.tree_map(lambda _: False, params)
    d1, d2 = jnp.where(active, b1, 1.0), jnp.where(active, b2, 1.0)
    count = opt["count"] + active.astype(jnp.int32)
    mu = jax.tree_util.tree_map(lambda m, g, u: m if u else (1 - d1) * g + d1 * m, opt["mu"], grads, unread)
    nu = jax.tree_util.tree_map(lambda v, g, u: v if u else (1 - d2) * (g * g) + d2 * v, opt["nu"], grads, unread)
    c = jnp.maximum(count, 1).astype(jnp.float32)
    bc1, bc2, step = 1 - b1 ** c, 1 - b2 ** c, jnp.where(active, lr, 0.0)
    update = lambda p, m, v: p - step * ((m / bc1) / (jnp.sqrt(v / bc2) + eps) + weight_decay * p)
    params = jax.tree_util.tree_map(lambda p, m, v, u: update(p, *(2 * [jnp.zeros_like(p)] if u else [m, v])),
                                    params, mu, nu, unread)
    return params, {"count": count, "mu": mu, "nu": nu}


def unread_leaves(f: Callable, params: Any, *args: Any) -> Any:
    """A tree of bools like params: True where f(params, *args) does not read the leaf at all (in its
    traced program), as `cross`'s query and key projections on pooled features (fusion.Attention).

    A backward walk over the program's equations, each taken whole: an equation with an effect or a
    used output uses all of its inputs. It may call an unread leaf read, never a read leaf unread."""
    closed = jax.make_jaxpr(f)(params, *args)
    if len(closed.jaxpr.invars) != len(jax.tree_util.tree_leaves((params, *args))):
        raise AssertionError("the traced program's inputs do not line up with the leaves of (params, *args)")
    live = {v for v in closed.jaxpr.outvars if isinstance(v, jax_core.Var)}
    for eqn in reversed(closed.jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if isinstance(v, jax_core.Var))
    n = len(jax.tree_util.tree_leaves(params))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params),
                                        [v not in live for v in closed.jaxpr.invars[:n]])


def adamw_init(params: Any) -> dict:
    """AdamW's state: step count and zero first and second moments."""
    zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)
    return {"count": jnp.zeros((), jnp.int32), "mu": zeros(), "nu": zeros()}


def epoch_order(key: jax.Array, epoch: jax.Array, n_train: jax.Array, size: int) -> jax.Array:
    """The training pairs' order in `epoch`: [size], a random permutation of 0..n_train-1 first.

    Uniform draws sorted, padding last: the first n_train entries do not depend on `size`, so a
    run takes the same batches alone or beside larger runs."""
    u = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, _SHUFFLE), epoch), (size,))
    return jnp.argsort(jnp.where(jnp.arange(size) < n_train, u, 2.0), stable=True)


def make_train(config: ml_collections.ConfigDict, method: str, max_train: int, max_val: int, *,
               noisy: bool = True, skip_idle: bool = True) -> Trainer:
    """Build the trainer of `method` for runs of at most max_train / max_val pairs.

    noisy=False promises that every run's noise_level is 0: the noise is then not drawn (level 0 is
    the features as they are, `degrade.gaussian`). skip_idle=False steps a chunk
    through every step of the epoch, past its longest run too (as exact no-ops), in a scan of fixed
    length: for GPUs, where those steps cost little and a loop of data-dependent length can cost a
    host sync per step."""
    if not jax.config.jax_threefry_partitionable:
        raise ValueError("fusion_jax needs jax_threefry_partitionable=True (JAX's default): without it a run's "
                         "batch order depends on the size of its group")
    tc, hc, dc = config.train, config.head, config.degradation
    head = make_head(method, hc.hidden, hc.mlp_hidden, tc.dropout, hc.num_heads)
    batch = tc.batch_size
    steps = steps_per_epoch(max_train, batch)
    degraded = degrade_lib.degraded(dc.modality)
    eval_batch = min(tc.eval_batch_size, max_val)
    eval_chunks = math.ceil(max_val / eval_batch)

    def inputs(data, run, image_idx, caption_idx):
        """Gather (and degrade) a batch: the head's positional inputs."""
        out = []
        for tag, (name, idx) in enumerate((("image", image_idx), ("text", caption_idx))):
            x = data[name][idx]
            if noisy and name in degraded and dc.kind != "none":
                key = jax.random.fold_in(jax.random.fold_in(run["key"], _NOISE), tag)
                x = degrade_lib.degrade(x, idx, key, run["noise_level"], dc.kind)
            out.append(x)
        masks = [data[f"{n}_mask"][i] if f"{n}_mask" in data else None
                 for n, i in (("image", image_idx), ("text", caption_idx))]
        return (*out, *masks)

    def init(run, data):
        # The parameters depend on the inputs' shapes alone: one zero row each (masks of ones).
        example = [jnp.zeros((1, *data[n].shape[1:]), data[n].dtype) for n in ("image", "text")]
        example += [jnp.ones((1, *data[m].shape[1:]), data[m].dtype) if m in data else None
                    for m in ("image_mask", "text_mask")]
        params = head.init(jax.random.fold_in(run["key"], _INIT), *example)["params"]
        return {"params": params, "opt_state": adamw_init(params), "epoch": jnp.zeros((), jnp.int32)}

    def loss_fn(params, x, label, weight, key):
        logits = head.apply({"params": params}, *x, train=True, rngs={"dropout": key})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)
        return (ce * weight).sum() / jnp.maximum(weight.sum(), 1.0)

    def train_epoch(state, runs, data):
        """One epoch of a chunk of k runs stepped together (state, runs [k, ...]). With skip_idle, a
        while loop runs the chunk's own steps and stops after its longest run; without, a scan runs
        every step of the group's longest run."""
        k, epoch, n_train = runs["n_train"].shape[0], state["epoch"], runs["n_train"]
        run_steps = (n_train + batch - 1) // batch
        order = jax.vmap(epoch_order, (0, 0, 0, None))(runs["key"], epoch, n_train, steps * batch)
        rows = order.reshape(k, steps, batch).swapaxes(0, 1)
        weight = (jnp.arange(steps * batch) < n_train[:, None]).astype(jnp.float32)
        weight = weight.reshape(k, steps, batch).swapaxes(0, 1)

        def run_step(params, opt_state, run, r, w, t, epoch, run_steps):
            """One run's step on its batch rows r [batch] with weights w [batch]."""
            pairs = run["train"]
            x = inputs(data, run, pairs["image_idx"][r], pairs["caption_idx"][r])
            done = epoch * run_steps + t
            dropout_key = jax.random.fold_in(jax.random.fold_in(run["key"], _DROPOUT), done)
            args = (x, pairs["label"][r], w, dropout_key)
            loss, grads = jax.value_and_grad(loss_fn)(params, *args)
            lr = cosine_lr(tc.learning_rate, done, run_steps * tc.epochs)
            unread = unread_leaves(loss_fn, params, *args)
            return adamw(params, grads, opt_state, lr, tc.weight_decay, t < run_steps, unread=unread), loss

        def chunk_step(carry, r, w, t):
            """Step t of every run in the chunk: carry (params, opt_state) [k, ...] -> (carry, losses [k])."""
            return jax.vmap(run_step, (0, 0, 0, 0, 0, None, 0, 0))(*carry, runs, r, w, t, epoch, run_steps)

        carry = (state["params"], state["opt_state"])
        if skip_idle:
            # A while loop rather than a scan with a cond per step: XLA:CPU copied part of the
            # state out of the cond every step, and the loop has no idle iterations.
            last = jnp.minimum(run_steps.max(), steps)

            def body(c):
                t, carry, losses = c
                carry, loss = chunk_step(carry, rows[t], weight[t], t)
                return t + 1, carry, losses.at[t].set(loss)

            start = (jnp.zeros((), jnp.int32), carry, jnp.zeros((steps, k), jnp.float32))
            _, carry, losses = jax.lax.while_loop(lambda c: c[0] < last, body, start)
        else:
            carry, losses = jax.lax.scan(lambda c, xs: chunk_step(c, *xs), carry,
                                         (rows, weight, jnp.arange(steps)))
        params, opt_state = carry
        return {"params": params, "opt_state": opt_state, "epoch": epoch + 1}, losses.T

    def evaluate(state, run, data):
        pairs, n_val = run["val"], run["n_val"]
        rows = jnp.arange(eval_chunks * eval_batch).reshape(eval_chunks, eval_batch)

        def chunk(r):
            valid = r < n_val
            r = jnp.minimum(r, max_val - 1)
            logits = head.apply({"params": state["params"]},
                                *inputs(data, run, pairs["image_idx"][r], pairs["caption_idx"][r]))
            pred, label = jnp.argmax(logits, -1) == 1, pairs["label"][r] == 1
            return jnp.stack([(valid & pred & label).sum(), (valid & pred & ~label).sum(),
                              (valid & ~pred & label).sum(), (valid & ~pred & ~label).sum(),
                              (valid & ~jnp.isfinite(logits).all(-1)).sum()])

        return jax.lax.map(chunk, rows).sum(0)

    return Trainer(init, train_epoch, evaluate, steps, skip_idle)
