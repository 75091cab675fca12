"""FLOP counts of the fusion heads and of a training step, from XLA's cost analysis.

XLA's `cost_analysis()` of a compiled program counts the body of a while loop once, whatever its
trip count, so the step loop of a training epoch is counted as one step. `train_step_flops`
therefore compiles an epoch of exactly one step (n_train = batch) and reads it: that is the cost
of one optimizer step, gather, degradation and AdamW update included (elementwise and integer
ops count one FLOP per element, as XLA counts them). `analytic_concat_flops` is the textbook
count: 2 x the multiply-adds of the three dense layers.

Every count compiles for the host's CPU (`host_flops`), whatever device runs the sweep: XLA's GPU cost
analysis leaves out the matmuls it hands to cuBLAS (on an H100, a cross head on token inputs counted
about a quarter of its FLOPs), so counts made there would depend on the GPU compiler's choices.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from fusion_jax.fusion import make_head
from fusion_jax.host import host_device, on_host
from fusion_jax.train import make_train


def counting_platform() -> str:
    """Where `host_flops` compiles: "cpu", or the default device's platform where jax has no CPU backend
    (JAX_PLATFORMS leaves it out; on a GPU the counts then leave out cuBLAS's matmuls)."""
    return (host_device() or jax.devices()[0]).platform


def host_flops(f: Callable, *args: Any) -> float:
    """The "flops" of XLA's cost analysis of jit(f) on `args` (shapes), compiled for the host's CPU
    (`counting_platform`); the analysis, a dict or a list of dicts, is summed."""
    with on_host():
        compiled = jax.jit(f).lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, Mapping):
        analysis = [analysis]
    return float(sum(a.get("flops", 0.0) for a in analysis or ()))


def _features(n: int, d: int, tokens: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct | None]:
    """Shapes of n pooled [n, d] or token [n, tokens, d] features and their mask."""
    if tokens:
        return jax.ShapeDtypeStruct((n, tokens, d), jnp.float32), jax.ShapeDtypeStruct((n, tokens), jnp.float32)
    return jax.ShapeDtypeStruct((n, d), jnp.float32), None


def forward_flops_per_sample(method: str, d_v: int, d_t: int, config: Any, batch: int = 256,
                             image_tokens: int = 0, text_tokens: int = 0) -> float:
    """FLOPs per sample of the head's eval-mode forward pass, from XLA's cost analysis of a batch: on pooled
    [batch, d] inputs, or on [batch, tokens, d] for a side with tokens (every slot, padding included)."""
    head = make_head(method, config["head"]["hidden"], config["head"]["mlp_hidden"], config["train"]["dropout"],
                     config["head"]["num_heads"])
    image, image_mask = _features(batch, d_v, image_tokens)
    text, text_mask = _features(batch, d_t, text_tokens)
    inputs = (image, text, image_mask, text_mask)
    params = jax.eval_shape(lambda *x: head.init(jax.random.PRNGKey(0), *x), *inputs)
    return host_flops(lambda p, *x: head.apply(p, *x), params, *inputs) / batch


def analytic_concat_flops(d_v: int, d_t: int, hidden: int = 256, mlp_hidden: int = 128) -> int:
    """FLOPs per sample of the concat head's forward pass: 2 x multiply-adds of its three layers."""
    return 2 * ((d_v + d_t) * hidden + hidden * mlp_hidden + mlp_hidden * 2)


def train_step_flops(config: Any, method: str, d_v: int, d_t: int, n_runs: int = 1, tokens: int = 0,
                     noisy: bool = True) -> float:
    """FLOPs of one training step of a chunk of `n_runs` runs (batch config.train.batch_size each).

    From the cost analysis of a compiled one-step epoch of the trainer (`make_train`): forward,
    backward, gather, degradation (config.degradation.kind; the noise draw only when `noisy`, as in
    a group with a nonzero level) and the AdamW update.
    """
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    batch = config.train.batch_size
    trainer = make_train(config, method, max_train=batch, max_val=1, noisy=noisy)
    n_images, n_captions = 2 * batch, 2 * batch
    image, image_mask = _features(n_images, d_v, tokens)
    text, text_mask = _features(n_captions, d_t, tokens)
    data = {"image": image, "text": text}
    if tokens:
        data.update(image_mask=image_mask, text_mask=text_mask)
    split = lambda n: {k: jax.ShapeDtypeStruct((n_runs, n), jnp.int32) for k in ("image_idx", "caption_idx", "label")}
    runs = {"key": jax.ShapeDtypeStruct((n_runs, 2), jnp.uint32),
            "noise_level": jax.ShapeDtypeStruct((n_runs,), jnp.float32),
            "n_train": jax.ShapeDtypeStruct((n_runs,), jnp.int32), "n_val": jax.ShapeDtypeStruct((n_runs,), jnp.int32),
            "train": split(batch), "val": split(1)}
    state = jax.eval_shape(jax.vmap(trainer.init, in_axes=(0, None)), runs, data)
    return host_flops(trainer.train_epoch, state, runs, data)
