"""A plain PyTorch reference of the fusion heads and the paper's training loop (tests only).

The package never imports this module. It mirrors fusion_jax/fusion.py layer by layer, so that a
Flax parameter tree can be copied in (`load_flax_params`), and trains the way the paper's authors
would in PyTorch (`train_reference`): torch.optim.AdamW, CosineAnnealingLR stepped per batch,
nn.CrossEntropyLoss, batch 32 with the last partial batch kept.

AdamW, torch against optax (torch 2.13 `_single_tensor_adam`, optax 0.2.8 `adamw`), per parameter:

    torch: p <- p * (1 - lr_t * wd);  p <- p - lr_t * m_hat / (sqrt(v_hat) + eps)
    optax: p <- p - lr_t * (m_hat / (sqrt(v_hat) + eps) + wd * p)

with m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t). These are the same update: eps is added
outside the square root of the bias-corrected second moment in both (torch computes
sqrt(v) / sqrt(1 - b2^t) + eps), both bias-correct both moments, and both multiply the weight
decay by the *scheduled* learning rate (optax's chain is scale_by_adam -> add_decayed_weights ->
scale_by_learning_rate(schedule)), decaying the parameters before the step. Only the order of
the float32 operations differs.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the token axis: [batch, tokens, d] -> [batch, d]; pooled [batch, d] passes through."""
    if x.dim() == 2:
        return x
    if mask is None:
        return x.mean(dim=-2)
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(dim=-2) / m.sum(dim=-2).clamp(min=1.0)


class ClassifierTorch(nn.Module):
    """Linear(hidden -> mlp_hidden), ReLU, dropout, Linear(mlp_hidden -> 2) (flax `Classifier_0`)."""

    def __init__(self, hidden: int, mlp_hidden: int, dropout: float):
        super().__init__()
        self.dense_0 = nn.Linear(hidden, mlp_hidden)
        self.dropout = nn.Dropout(dropout)
        self.dense_1 = nn.Linear(mlp_hidden, 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.dense_1(self.dropout(torch.relu(self.dense_0(h))))


class ConcatHeadTorch(nn.Module):
    """Concatenate (pooled) image and text features, Linear -> classifier: [batch, 2] logits."""

    def __init__(self, d_v: int, d_t: int, hidden: int = 256, mlp_hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.dense = nn.Linear(d_v + d_t, hidden)
        self.classifier = ClassifierTorch(hidden, mlp_hidden, dropout)

    def forward(self, image, text, image_mask=None, text_mask=None):
        fused = torch.cat([masked_mean(image, image_mask), masked_mean(text, text_mask)], dim=-1)
        return self.classifier(self.dense(fused))


class CrossHeadTorch(nn.Module):
    """Text queries attend over image keys/values, residual + LayerNorm, masked mean, classifier.

    The attention is written out (not nn.MultiheadAttention) to follow fusion.py's `Attention` (the
    math of flax's MultiHeadDotProductAttention): separate query/key/value/out projections, the
    query scaled by 1/sqrt(head_dim) before the dot product, masked logits set to the float32 minimum.
    """

    def __init__(self, d_v: int, d_t: int, hidden: int = 256, mlp_hidden: int = 128, dropout: float = 0.1,
                 num_heads: int = 4):
        super().__init__()
        self.num_heads = num_heads
        self.text_proj = nn.Linear(d_t, hidden)
        self.image_proj = nn.Linear(d_v, hidden)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-6)  # flax's default epsilon (torch's is 1e-5)
        self.classifier = ClassifierTorch(hidden, mlp_hidden, dropout)

    def attention(self, q_in, kv_in, kv_mask):
        """[batch, tq, hidden] queries over [batch, tk, hidden] keys/values -> [batch, tq, hidden]."""
        split = lambda x: x.reshape(*x.shape[:2], self.num_heads, -1)  # [batch, t, heads, head_dim]
        q, k, v = split(self.query(q_in)), split(self.key(kv_in)), split(self.value(kv_in))
        q = q / math.sqrt(q.shape[-1])
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k)
        if kv_mask is not None:
            logits = logits.masked_fill(~kv_mask[:, None, None, :].bool(), torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=-1)
        a = torch.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.out(a.reshape(*a.shape[:2], -1))

    def forward(self, image, text, image_mask=None, text_mask=None):
        if image.dim() == 2:  # pooled: one token, no mask
            image, image_mask = image[:, None, :], None
        if text.dim() == 2:
            text, text_mask = text[:, None, :], None
        q = self.text_proj(text)
        kv = self.image_proj(image)
        h = self.norm(q + self.attention(q, kv, image_mask))
        return self.classifier(masked_mean(h, text_mask))


def make_head_torch(method: str, d_v: int, d_t: int, hidden: int = 256, mlp_hidden: int = 128,
                    dropout: float = 0.1, num_heads: int = 4) -> nn.Module:
    """The torch head for `method` ("concat" or "cross")."""
    if method == "concat":
        return ConcatHeadTorch(d_v, d_t, hidden, mlp_hidden, dropout)
    if method == "cross":
        return CrossHeadTorch(d_v, d_t, hidden, mlp_hidden, dropout, num_heads)
    raise ValueError(f"unknown method {method!r}")


def _copy(target: torch.Tensor, value) -> None:
    value = torch.from_numpy(np.array(value, np.float32))
    if target.shape != value.shape:
        raise ValueError(f"shape mismatch: torch {tuple(target.shape)} vs flax {tuple(value.shape)}")
    target.copy_(value)


def _load_dense(linear: nn.Linear, p) -> None:
    """flax Dense: kernel [in, out] -> torch weight [out, in]."""
    _copy(linear.weight, np.asarray(p["kernel"]).T)
    _copy(linear.bias, p["bias"])


@torch.no_grad()
def load_flax_params(module: nn.Module, flax_params) -> nn.Module:
    """Copy a Flax param tree of fusion.py's ConcatHead / CrossHead into the torch module."""
    _load_dense(module.classifier.dense_0, flax_params["Classifier_0"]["Dense_0"])
    _load_dense(module.classifier.dense_1, flax_params["Classifier_0"]["Dense_1"])
    if isinstance(module, ConcatHeadTorch):
        _load_dense(module.dense, flax_params["Dense_0"])
    elif isinstance(module, CrossHeadTorch):
        _load_dense(module.text_proj, flax_params["text_proj"])
        _load_dense(module.image_proj, flax_params["image_proj"])
        attention = flax_params["attention"]
        for name in ("query", "key", "value", "out"):  # fusion.Attention: 2-D Dense kernels [in, hidden]
            _load_dense(getattr(module, name), attention[name])
        _copy(module.norm.weight, flax_params["norm"]["scale"])
        _copy(module.norm.bias, flax_params["norm"]["bias"])
    else:
        raise TypeError(f"unsupported module {type(module).__name__}")
    return module


def _on_device(features: dict, pairs: dict, device: str) -> tuple[dict, dict]:
    """Features and pair indices as torch tensors on `device`, moved there once. A FeatureSet's arrays are
    read-only, which torch cannot mark; the reference only reads them (no copy, as the loop it stands for)."""
    to = lambda x, dtype=None: torch.as_tensor(np.asarray(x), dtype=dtype).to(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return ({k: to(v) for k, v in features.items()},
                {k: to(v, torch.long) for k, v in pairs.items()})


def _batch(features: dict, pairs: dict, rows):
    """The head's inputs and the labels of pair rows `rows` (tensors from `_on_device`)."""
    rows = torch.as_tensor(np.array(rows), dtype=torch.long).to(pairs["label"].device)
    image_idx, caption_idx = pairs["image_idx"][rows], pairs["caption_idx"][rows]
    get = lambda name, idx: features[name][idx] if name in features else None
    x = (get("image", image_idx), get("text", caption_idx), get("image_mask", image_idx), get("text_mask", caption_idx))
    return x, pairs["label"][rows]


def cosine_lrs(lr: float, total_steps: int) -> list[float]:
    """The learning rate of each of `total_steps` steps under CosineAnnealingLR(T_max=total_steps)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def train_reference(head: nn.Module, features: dict, pairs: dict, epoch_orders, lr: float,
                    weight_decay: float, epochs: int, batch_size: int, device: str = "cpu") -> list[float]:
    """Train `head` (on `device`) in place; return the loss of every step.

    features: "image", "text" (and "image_mask", "text_mask" for tokens) arrays; pairs: the training
    split's "image_idx", "caption_idx", "label"; epoch_orders: one order of the pair rows per epoch.
    Features and pairs go to the device once; the losses are read back once, at the end.
    """
    features, pairs = _on_device(features, pairs, device)
    if len(epoch_orders) != epochs:
        raise ValueError(f"{len(epoch_orders)} epoch orders for {epochs} epochs")
    n = len(pairs["label"])
    steps_per_epoch = math.ceil(n / batch_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_per_epoch * epochs)
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    losses = []
    for order in epoch_orders:
        order = np.asarray(order)
        for start in range(0, n, batch_size):  # the last, partial batch is kept
            x, label = _batch(features, pairs, order[start:start + batch_size])
            loss = loss_fn(head(*x), label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())
    return torch.stack(losses).tolist()


@torch.no_grad()
def evaluate_reference(head: nn.Module, features: dict, pairs: dict, device: str = "cpu") -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) of `head` (on `device`) on the pairs (the validation split); class 1 = matching."""
    features, pairs = _on_device(features, pairs, device)
    head.eval()
    x, label = _batch(features, pairs, np.arange(len(pairs["label"])))
    pred = head(*x).argmax(dim=-1) == 1
    label = label == 1
    return (int((pred & label).sum()), int((pred & ~label).sum()),
            int((~pred & label).sum()), int((~pred & ~label).sum()))
