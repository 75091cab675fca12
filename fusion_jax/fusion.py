"""Fusion heads: `concat` and `cross`, on pooled ([batch, d]) or token ([batch, tokens, d]) features.

`concat` is the paper's head: Linear(d_v + d_t -> 256), Linear(256 -> 128), ReLU, dropout 0.1,
Linear(128 -> 2); 295,554 parameters for 512 + 512 inputs.

`cross` (this project's layout; the paper reports ~757K parameters without pinning a layout):
  q = Dense(256)(text tokens), kv = Dense(256)(image tokens)
  a = 4-head dot-product attention, text queries over image keys/values, image padding masked:
      query/key/value = Dense(256) each, split into 4 heads of 64, softmax(q k^T / sqrt(64)) v,
      heads merged, out = Dense(256)
  h = LayerNorm(q + a), masked mean over text tokens
  then the same classifier as `concat`: Linear(256 -> 128), ReLU, dropout 0.1, Linear(128 -> 2).
It has 559,490 parameters for 512 + 512 inputs. The attention's parameters are
attention/{query,key,value,out}/{kernel,bias}, kernels 2-D ([256, 256]) and biases [256]: plain Dense
layers with the heads split by reshape (the same math as flax's MultiHeadDotProductAttention, whose
3-D DenseGeneral kernels train markedly slower on XLA:CPU).

With pooled inputs each side is one token, and softmax attention over a single key is identically 1:
the attention output is then a function of the image alone and the query is ignored, so `cross`
reduces to an MLP on a sum of projections. `Attention` skips the softmax there (the same numbers),
and XLA drops the query and key projections; their parameters stay. Token-level features make
cross-attention meaningful.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

METHODS = ("concat", "cross")


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean over the token axis: [batch, tokens, d] -> [batch, d]; pooled [batch, d] passes through."""
    if x.ndim == 2:
        return x
    if mask is None:
        return x.mean(axis=-2)
    m = mask.astype(x.dtype)[..., None]
    return (x * m).sum(axis=-2) / jnp.maximum(m.sum(axis=-2), 1.0)


def as_tokens(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Pooled [batch, d] becomes one token [batch, 1, d]; token inputs keep their mask."""
    if x.ndim == 2:
        return x[:, None, :], None
    return x, mask


class Classifier(nn.Module):
    """Linear(256 -> 128), ReLU, dropout, Linear(128 -> 2): the classifier both heads share."""

    mlp_hidden: int = 128
    dropout: float = 0.1

    @nn.compact
    def __call__(self, h: jax.Array, train: bool) -> jax.Array:
        h = nn.relu(nn.Dense(self.mlp_hidden)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(2)(h)


class ConcatHead(nn.Module):
    """Concatenate (pooled) image and text features, then Linear -> classifier: [batch, 2] logits."""

    hidden: int = 256
    mlp_hidden: int = 128
    dropout: float = 0.1

    @nn.compact
    def __call__(self, image: jax.Array, text: jax.Array, image_mask: jax.Array | None = None,
                 text_mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        fused = jnp.concatenate([masked_mean(image, image_mask), masked_mean(text, text_mask)], -1)
        return Classifier(self.mlp_hidden, self.dropout)(nn.Dense(self.hidden)(fused), train)


class Attention(nn.Module):
    """Multi-head dot-product attention with 2-D Dense projections: [batch, tq, d] -> [batch, tq, hidden].

    The math of flax's MultiHeadDotProductAttention (deterministic, no dropout): query/key/value =
    Dense(hidden) with bias, split into num_heads heads of hidden // num_heads, the query scaled by
    1/sqrt(head_dim), logits where `mask` is False set to the dtype's minimum, softmax over the keys,
    heads merged, out = Dense(hidden).
    """

    hidden: int = 256
    num_heads: int = 4

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden // self.num_heads
        split = lambda x: x.reshape(*x.shape[:-1], self.num_heads, head_dim)  # [b, t, heads, head_dim]
        q = split(nn.Dense(self.hidden, name="query")(inputs_q))
        k = split(nn.Dense(self.hidden, name="key")(inputs_kv))
        v = split(nn.Dense(self.hidden, name="value")(inputs_kv))
        if k.shape[-3] == 1:
            # Softmax over a single key is exactly 1 (its gradient exactly 0), so every query reads
            # that key's value: the same numbers, and XLA drops the unused query/key projections.
            a = jnp.broadcast_to(v, (*q.shape[:-3], q.shape[-3], *v.shape[-2:]))
        else:
            q = q / jnp.sqrt(head_dim).astype(q.dtype)
            logits = jnp.einsum("...qhd,...khd->...hqk", q, k)
            if mask is not None:
                logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            weights = jax.nn.softmax(logits, axis=-1)
            a = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        return nn.Dense(self.hidden, name="out")(a.reshape(*a.shape[:-2], self.hidden))


class CrossHead(nn.Module):
    """Text queries attend over image keys/values (see the module docstring): [batch, 2] logits."""

    hidden: int = 256
    mlp_hidden: int = 128
    dropout: float = 0.1
    num_heads: int = 4

    @nn.compact
    def __call__(self, image: jax.Array, text: jax.Array, image_mask: jax.Array | None = None,
                 text_mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        image, image_mask = as_tokens(image, image_mask)
        text, text_mask = as_tokens(text, text_mask)
        q = nn.Dense(self.hidden, name="text_proj")(text)
        kv = nn.Dense(self.hidden, name="image_proj")(image)
        attn_mask = None if image_mask is None else image_mask[:, None, None, :].astype(bool)
        a = Attention(self.hidden, self.num_heads, name="attention")(q, kv, mask=attn_mask)
        h = masked_mean(nn.LayerNorm(name="norm")(q + a), text_mask)
        return Classifier(self.mlp_hidden, self.dropout)(h, train)


def make_head(method: str, hidden: int = 256, mlp_hidden: int = 128, dropout: float = 0.1,
              num_heads: int = 4) -> nn.Module:
    """The head for `method` ("concat" or "cross")."""
    if method == "concat":
        return ConcatHead(hidden, mlp_hidden, dropout)
    if method == "cross":
        return CrossHead(hidden, mlp_hidden, dropout, num_heads)
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def count_params(params: Any) -> int:
    """Number of scalar parameters in a tree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
