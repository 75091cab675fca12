"""Per-run binary metrics from confusion counts, and the statistics over seeds."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

METRICS = ("accuracy", "f1", "precision", "recall")
# A 50/50 guess scores ln 2 on the two-way softmax cross-entropy; a run whose last epoch's mean training
# loss is above twice that did worse on its own training pairs than guessing: it diverged or oscillates.
UNCONVERGED_LOSS = 2 * math.log(2)


def binary_metrics(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Accuracy, F1, precision, recall (fractions) and the majority-class baseline.

    Positive class = matching pair. With no positive predictions precision is 0, with no positive
    labels recall is 0, and F1 is 0 when precision + recall is 0 (scikit-learn's zero_division=0).
    """
    tp, fp, fn, tn = (int(v) for v in (tp, fp, fn, tn))
    n = tp + fp + fn + tn
    if n == 0:
        raise ValueError("no examples to score")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    positives = tp + fn
    return {
        "accuracy": (tp + tn) / n,
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "majority_baseline": max(positives, n - positives) / n,
    }


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); the std is None for a single value."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None]:
    """Mean of a - b over paired seeds and the two-sided paired t-test p-value.

    The p-value is None when it is undefined: fewer than two pairs, a difference that is not a
    number, or identical differences (zero variance; float round-off would otherwise turn it into a
    spurious tiny p).
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size < 2 or not np.isfinite(d).all() or np.ptp(d) <= 1e-12:
        return float(d.mean()), None
    return float(d.mean()), float(stats.ttest_rel(a, b).pvalue)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, the defined ones taken as one family (None stays None): the
    i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j)). Reject where below alpha to
    hold the family-wise error at alpha."""
    defined = [i for i, p in enumerate(p_values) if p is not None]
    if not all(0 <= p_values[i] <= 1 for i in defined):
        raise ValueError(f"p-values lie in [0, 1]: {list(p_values)}")
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(defined, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (len(defined) - rank) * float(p_values[i])))
        out[i] = running
    return out


def unconverged(final_train_loss: float | None) -> bool:
    """Whether a run's last-epoch mean training loss (None: not finite) is above UNCONVERGED_LOSS: its
    training diverged."""
    return final_train_loss is None or not final_train_loss <= UNCONVERGED_LOSS


def unconverged_runs(final_train_losses: Sequence[float | None]) -> tuple[int, str]:
    """How many of these last-epoch mean training losses are `unconverged`, and the worst of them in words
    ('up to 4e+13', 'not finite in 2', or both joined by ', '; '' when none): the sweep's warning and
    summary.md say both."""
    bad = [x for x in final_train_losses if unconverged(x)]
    finite = [x for x in bad if x is not None and math.isfinite(x)]
    return len(bad), ", ".join(([f"up to {max(finite):.4g}"] if finite else [])
                               + ([f"not finite in {len(bad) - len(finite)}"] if len(finite) < len(bad) else []))
