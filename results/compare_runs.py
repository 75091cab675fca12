"""Checks behind results/README.md's comparisons of two sweeps, run from the repository root.

    python results/compare_runs.py A/results.json B/results.json
        run by run: how many runs keep their bits (metrics and final loss) per backbone, how many
        changed their metrics and how far their final losses moved, and B's accuracy shift against A
        (points) per backbone, method and noise (level 0 or above);
    python results/compare_runs.py --losses A/results.json
        per backbone, method and scale without noise, the first and last epoch's training loss, each
        the mean over seeds (the ends of fig_training_loss.png's curves);
    python results/compare_runs.py --norms [CONFIG]
        the L2 norms of each backbone's features for CONFIG (default configs/demo.py), from the
        feature cache (extracted first where missing).
"""

from __future__ import annotations

import collections
import json
import math
import sys

import numpy as np


def compare(path_a: str, path_b: str) -> list[str]:
    """The lines described above for the runs of two results.json files (the same runs in both)."""
    a, b = (json.load(open(p)) for p in (path_a, path_b))
    key = lambda r: (r["backbone"], r["method"], r["scale"], r["seed"], r["degradation"]["level"])
    runs_a, runs_b = {key(r): r for r in a["runs"]}, {key(r): r for r in b["runs"]}
    if set(runs_a) != set(runs_b):
        raise SystemExit(f"the two files hold other runs ({len(runs_a)} and {len(runs_b)})")
    same, shift, metrics, loss = (collections.Counter(), collections.defaultdict(list), collections.Counter(),
                                  collections.defaultdict(list))
    for k, ra in runs_a.items():
        rb = runs_b[k]
        same[k[0], ra["metrics"] == rb["metrics"] and ra["final_train_loss"] == rb["final_train_loss"]] += 1
        metrics[k[0]] += ra["metrics"] != rb["metrics"]
        if ra["final_train_loss"] != rb["final_train_loss"]:
            la, lb = ra["final_train_loss"], rb["final_train_loss"]  # None: not finite
            loss[k[0]].append(math.inf if la is None or lb is None else abs(la - lb))
        shift[k[0], k[1], "level 0" if k[4] == 0 else "levels > 0"].append(
            100 * (rb["metrics"]["accuracy"] - ra["metrics"]["accuracy"]))
    lines = [f"{b}: {n} runs {'the same bits' if kept else 'changed'}" for (b, kept), n in sorted(same.items())]
    lines += [f"{b}: {metrics[b]} runs with other metrics; {len(d)} with another final loss, "
              f"{min(d):.1e} to {max(d):.1e} apart" for b, d in sorted(loss.items())]
    lines += [f"{b} {m} {noise}: accuracy shift mean {np.mean(d):+.2f}, min {min(d):+.2f}, max {max(d):+.2f} "
              f"points ({len(d)} runs)" for (b, m, noise), d in sorted(shift.items())]
    return lines


def losses(path: str) -> list[str]:
    """The --losses lines described above (runs that record train_loss_by_epoch)."""
    cells = collections.defaultdict(list)
    for r in json.load(open(path))["runs"]:
        if r["degradation"]["level"] == 0 and r.get("train_loss_by_epoch"):
            cells[r["backbone"], r["method"], r["scale"]].append(r["train_loss_by_epoch"])
    def mean(values: list) -> str:  # over the seeds that recorded the epoch (None: missing or not finite)
        known = [v for v in values if v is not None]
        return f"{np.mean(known):.3f}" + (f" ({len(values) - len(known)} without)" if len(known) < len(values) else "")

    return [f"{b} {m} {sc}: epoch 1 {mean([c[0] for c in cs])}, epoch {len(cs[0])} "
            f"{mean([c[-1] for c in cs])} ({len(cs)} seeds)" for (b, m, sc), cs in sorted(cells.items())]


def norms(config_path: str) -> list[str]:
    """Per backbone and side, the range of the feature vectors' L2 norms (pooled features; real tokens)."""
    import importlib.util

    from fusion_jax.data.sources import load_features

    spec = importlib.util.spec_from_file_location("config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("")
    lines = []
    for b in config.backbones:
        fs = load_features(config, b)
        for side, x, mask in (("image", fs.image, fs.image_mask), ("text", fs.text, fs.text_mask)):
            n = np.linalg.norm(x, axis=-1)
            n = n[mask.astype(bool)] if mask is not None else n.ravel()
            lines.append(f"{b} {side}: norms {n.min():.3g} to {n.max():.3g} (median {np.median(n):.3g})")
    return lines


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--losses"] and len(args) == 2:
        print("\n".join(losses(args[1])))
    elif args[:1] == ["--norms"]:
        print("\n".join(norms(args[1] if len(args) > 1 else "configs/demo.py")))
    elif len(args) == 2:
        print("\n".join(compare(*args)))
    else:
        raise SystemExit(__doc__)
