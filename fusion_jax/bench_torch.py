"""The PyTorch reference's side of the benchmark: the paper's loop (tests/reference_torch.py), run by run.

torch is imported inside the functions, so importing this module (and fusion_jax.bench) does not
import it; the reference itself lives in tests/ and needs a source checkout.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from fusion_jax import metrics as metrics_lib
from fusion_jax.data import FeatureSet, build_pairs
from fusion_jax.groups import Group
from fusion_jax.train import steps_per_epoch

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "reference_torch.py")


def flops_key(group: Group) -> str:
    """Which training-step FLOP count a group's runs take: its method's, with the noise draw or without
    (a group whose runs are all at level 0 draws no noise)."""
    return group.method + ("" if group.noisy else ", noise-free")


def accuracy(counts: Sequence[int]) -> float:
    """Accuracy of (tp, fp, fn, tn) counts."""
    return float(metrics_lib.binary_metrics(*counts)["accuracy"])


def load_reference() -> Any:
    """tests/reference_torch.py of this source checkout, imported now (it imports torch)."""
    if not os.path.exists(REFERENCE):
        raise FileNotFoundError(f"the PyTorch reference {REFERENCE} is missing: the benchmark runs from a "
                                "source checkout of fusion_jax (it lives in tests/, not in the package)")
    spec = importlib.util.spec_from_file_location("fusion_jax_reference_torch", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def noisy_image(image: np.ndarray, level: float, seed: int, scale: int) -> np.ndarray:
    """normalize(v + N(0, level^2 I)), fixed per run: the degraded image features of one run."""
    if level == 0.0:
        return image
    z = np.random.default_rng([seed, scale, round(level * 1e6)]).standard_normal(image.shape, np.float32)
    x = image + level * z
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def time_torch_group(config: ml_collections.ConfigDict, group: Group, features: FeatureSet, ref: Any,
                     step_flops: float, device: str = "cpu", runs_per_scale: int | None = None) -> dict:
    """Train and evaluate the runs of `group` one after another with the PyTorch reference.

    With `runs_per_scale`, only the first that many runs of each scale are trained; the group's
    time is then estimated as each scale's measured seconds per step times all its runs' steps."""
    import torch

    t0 = time.perf_counter()
    hc, tc = config.head, config.train
    pairs = {s: build_pairs(features.caption_image, features.n_images, s, **config.pairs) for s in group.scales}
    run_s, losses, accuracies, steps, trained, trained_index = [], [], [], [], [], []
    for i, spec in enumerate(group.runs):
        if runs_per_scale is not None and sum(r.scale == spec.scale for r in trained) >= runs_per_scale:
            continue
        trained.append(spec)
        trained_index.append(i)
        tr = time.perf_counter()
        p = pairs[spec.scale]
        torch.manual_seed(spec.seed)
        head = ref.make_head_torch(group.method, features.image.shape[-1], features.text.shape[-1], hc.hidden,
                                   hc.mlp_hidden, tc.dropout, hc.num_heads).to(device)
        arrays = {"image": noisy_image(features.image, spec.level, spec.seed, spec.scale), "text": features.text}
        orders = [np.random.default_rng([spec.seed, spec.scale, e]).permutation(p.n_train) for e in range(tc.epochs)]
        step_losses = ref.train_reference(head, arrays, p.split("train"), orders, tc.learning_rate, tc.weight_decay,
                                          tc.epochs, tc.batch_size, device=device)
        accuracies.append(accuracy(ref.evaluate_reference(head, arrays, p.split("val"), device=device)))
        per_epoch = steps_per_epoch(p.n_train, tc.batch_size)
        losses.append(float(np.mean(step_losses[-per_epoch:])))
        steps.append(per_epoch * tc.epochs)
        run_s.append(time.perf_counter() - tr)
    wall = time.perf_counter() - t0
    out = {"group": group.name, "runs": len(group.runs), "trained_runs": len(trained), "trained_index": trained_index,
           "steps_per_run": steps,
           "wall_s": wall, "run_s": run_s, "final_train_loss": float(np.mean(losses)),
           "accuracy_mean": float(np.mean(accuracies))}
    all_steps = [steps_per_epoch(pairs[r.scale].n_train, tc.batch_size) * tc.epochs for r in group.runs]
    if len(trained) < len(group.runs):
        per_step = {s: np.sum([t for r, t in zip(trained, run_s) if r.scale == s])
                    / np.sum([k for r, k in zip(trained, steps) if r.scale == s]) for s in group.scales}
        overhead = wall - sum(run_s)  # the group's own work outside its runs (pairs), measured once
        out.update(measured_wall_s=wall, estimated=True, seconds_per_step=per_step,
                   wall_s=overhead + float(sum(per_step[r.scale] * k for r, k in zip(group.runs, all_steps))))
    out["train_flops"] = step_flops * sum(all_steps)
    return out


def torch_thread_check(ref: Any, features: FeatureSet, threads: int, steps: int = 30, device: str = "cpu") -> dict:
    """Reference ms per concat training step (batch 32) on 1 thread and on `threads`: shows contention."""
    import torch

    pairs = build_pairs(features.caption_image, features.n_images, 32 * steps, 0)
    train, order = pairs.split("train"), [np.arange(pairs.n_train)]
    out = {}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        head = ref.make_head_torch("concat", features.image.shape[-1], features.text.shape[-1]).to(device)
        warm = {k: v[:64] for k, v in train.items()}
        ref.train_reference(head, features.arrays(), warm, [np.arange(64)], 1e-4, 0.01, 1, 32, device)  # warm-up
        t0 = time.perf_counter()
        ref.train_reference(head, features.arrays(), train, order, 1e-4, 0.01, 1, 32, device)
        out[f"{n}_threads_ms_per_step"] = (time.perf_counter() - t0) / math.ceil(pairs.n_train / 32) * 1e3
    return out


def time_torch(config: ml_collections.ConfigDict, groups: list[Group], features: dict[str, FeatureSet],
               step_flops: dict[str, float], ref: Any, device: str, threads: int, runs_per_scale: int | None,
               log: Callable[[str], None]) -> dict:
    """Train and evaluate `groups` with the PyTorch reference, one run after another (`time_torch_group`),
    on `threads` CPU threads or the GPU, after a thread check (`torch_thread_check`)."""
    import torch

    threads_before = torch.get_num_threads()
    out = []
    try:
        check = torch_thread_check(ref, features[groups[0].backbone], threads, device=device)
        log(f"torch ms per concat step ({device}): "
            + ", ".join(f"{k.split('_')[0]} thread(s) {v:.2f}" for k, v in check.items()))
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        for i, group in enumerate(groups):
            r = time_torch_group(config, group, features[group.backbone], ref, step_flops[flops_key(group)], device,
                                 runs_per_scale)
            out.append(r)
            log(f"[torch {i + 1}/{len(groups)}] {group.name}: {r['trained_runs']} of {r['runs']} runs trained, "
                f"wall {r['wall_s']:.2f} s{' (estimated)' if r.get('estimated') else ''}, "
                f"{r['train_flops'] / r['wall_s'] / 1e9:.1f} GFLOP/s, accuracy {r['accuracy_mean']:.3f}")
        measured = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads_before)
    side = {"wall_s": measured, "groups": out, "thread_check": check}
    if any(r.get("estimated") for r in out):  # runs_per_scale left some runs untrained
        estimate = measured + sum(r["wall_s"] - r.get("measured_wall_s", r["wall_s"]) for r in out)
        side.update(wall_s=estimate, measured_wall_s=measured, estimated=True, runs_per_scale=runs_per_scale)
    return side
