"""The paper's published figures (arXiv:2606.01207, Tables 1-4 and the protocol) as Python data.

Copied by hand from the paper's tables; nothing here is computed. Percentages are as printed
(mean and std over seeds 42, 123, 456). The package never reads the paper at run time.
"""

from __future__ import annotations

import re

CITATION = ("Zhou & Xie (2026), 'Feature Alignment Determines Fusion Strategy: A Comparative Study of "
            "Cross-Attention and Concatenation in Multimodal Learning', arXiv:2606.01207v1")
SETTING = "Flickr8k, CLIP ViT-B/32"  # the data and backbone of the paper's Tables 1 and 2
BACKBONE = "clip"  # our backbone name for the paper's setting
FEATURES = "flickr8k"  # our feature source for the paper's setting
MODEL, DIM = "openai/clip-vit-base-patch32", 512  # its CLIP (pooled, projected features of 512)
# Its training and heads (PROTOCOL below) as this package's config fields; its learning rate is not
# legible, so none is compared.
TRAINING = {"train.weight_decay": 0.01, "train.epochs": 10, "train.batch_size": 32, "train.dropout": 0.1,
            "head.hidden": 256, "head.mlp_hidden": 128, "head.num_heads": 4}

# Table 1: CLIP ViT-B/32 features, Flickr8k balanced binary matching, validation metrics in percent.
TABLE1_COLUMNS = ("scale", "method", "acc_mean", "acc_std", "f1_mean", "f1_std",
                  "precision_mean", "precision_std", "recall_mean", "recall_std")
TABLE1_ROWS = (
    (2048, "concat", 77.9, 2.2, 79.0, 2.9, 76.1, 3.1, 82.3, 2.8),
    (2048, "cross", 73.5, 2.6, 74.8, 3.7, 72.0, 3.4, 78.0, 4.5),
    (4096, "concat", 85.2, 1.4, 85.3, 1.5, 83.5, 1.7, 87.3, 1.5),
    (4096, "cross", 80.0, 0.8, 80.3, 1.3, 78.4, 1.2, 82.3, 1.6),
    (8192, "concat", 89.2, 0.6, 89.5, 0.7, 88.6, 0.8, 90.4, 0.6),
    (8192, "cross", 84.4, 2.6, 85.4, 2.1, 81.9, 2.8, 89.2, 1.5),
    (16384, "concat", 93.3, 0.2, 93.3, 0.2, 92.9, 0.3, 93.7, 0.3),
    (16384, "cross", 89.2, 1.4, 89.5, 1.5, 86.8, 1.7, 92.4, 1.0),
)

# Table 2: CLIP features with Gaussian noise of std sigma, then re-normalized; accuracy in percent.
# The paper does not state the scale of this study.
TABLE2_COLUMNS = ("sigma", "concat_mean", "concat_std", "cross_mean", "cross_std", "advantage")
TABLE2_ROWS = (
    (0.00, 94.7, 0.3, 93.3, 0.5, "concat +1.3"),
    (0.05, 91.1, 0.6, 89.2, 0.3, "concat +1.9"),
    (0.10, 86.2, 0.3, 83.3, 0.3, "concat +2.8"),
    (0.20, 83.3, 0.3, 83.3, 0.3, "tied"),
    (0.30, 83.3, 0.3, 83.3, 0.3, "tied"),
    (0.50, 83.3, 0.3, 83.3, 0.3, "tied"),
)

# Table 3: efficiency (the paper rounds its counts; how FLOPs were counted is not stated).
TABLE3_COLUMNS = ("method", "params", "flops_per_sample", "rel_params", "rel_flops")
TABLE3_ROWS = (
    ("concat", 296000, 530000, 1.0, 1.0),
    ("cross", 757000, 400000, 2.6, 0.75),
)

# Table 4: the paper's decision rules.
TABLE4_ROWS = (
    ("pre-aligned (CLIP, BLIP)", "any", "concat"),
    ("weakly aligned", "<= 4K", "concat"),
    ("weakly aligned", ">= 8K", "cross"),
    ("unaligned (ResNet)", "any", "cross"),
)

PROTOCOL = {
    "dataset": ("Flickr8k: 8,000 images x 5 captions; positive = image with one of its captions, negative = "
                "image with a random caption of another image; 50/50 balanced"),
    "scales": (2048, 4096, 8192, 16384),
    "split": "80% train / 20% validation, fixed seed",
    "seeds": (42, 123, 456),
    "optimizer": "AdamW, weight decay 0.01 (learning rate not legible in the paper text)",
    "schedule": "cosine annealing over 10 epochs",
    "batch_size": 32,
    "concat_head": ("Linear(d_v + d_t -> 256), then MLP 256 -> 128 (ReLU, dropout 0.1) -> 2; "
                    "295,554 parameters for 512+512 inputs"),
    "cross_head": "multi-head cross-attention, 4 heads, hidden 256, text queries, visual keys and values, same classifier",
    "noise": "v' = normalize(v + N(0, sigma^2 I)), sigma in {0, 0.05, 0.1, 0.2, 0.3, 0.5}",
    "metrics": "accuracy, F1, precision, recall; mean and std over 3 seeds; paired t-test",
    "tsne": "800 CLIP image-text feature pairs",
}


def table1() -> list[dict]:
    """Table 1 as one dict per (scale, method)."""
    return [dict(zip(TABLE1_COLUMNS, row)) for row in TABLE1_ROWS]


def table1_row(scale: int, method: str) -> dict | None:
    """The paper's Table 1 row for (scale, method), or None if the paper has no such row."""
    return next((r for r in table1() if r["scale"] == scale and r["method"] == method), None)


def table2() -> list[dict]:
    """Table 2 as one dict per sigma, with the advantage also as a number (`advantage_pp`)."""
    return [{**dict(zip(TABLE2_COLUMNS, row)), "advantage_pp": advantage_points(row[-1])} for row in TABLE2_ROWS]


def table3() -> list[dict]:
    """Table 3 as one dict per method."""
    return [dict(zip(TABLE3_COLUMNS, row)) for row in TABLE3_ROWS]


def decision_rules() -> str:
    """Table 4 in words, per feature quality: 'pre-aligned (CLIP, BLIP): concat at any data size; weakly
    aligned: concat at <= 4K pairs, cross at >= 8K pairs; ...'."""
    rules: dict[str, list[str]] = {}
    for quality, size, method in TABLE4_ROWS:
        rules.setdefault(quality, []).append(f"{method} at {'any data size' if size == 'any' else size + ' pairs'}")
    return "; ".join(f"{quality}: {', '.join(r)}" for quality, r in rules.items())


def advantage_points(text: str) -> float:
    """The paper's advantage words as concat-minus-cross points: "concat +1.3" -> 1.3, "tied" -> 0."""
    m = re.fullmatch(r"(concat|cross) \+([0-9.]+)", text.strip())
    if m is None:
        if text.strip() == "tied":
            return 0.0
        raise ValueError(f"unreadable advantage {text!r}")
    return float(m.group(2)) * (1 if m.group(1) == "concat" else -1)
