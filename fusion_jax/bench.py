"""Benchmark: the vmapped sweep against the paper's sequential PyTorch loop, on Flickr8k-shaped features.

    python -m fusion_jax.bench [--quick | --tiny] [--out=results/bench] [--torch-threads=N]

Features: the package's synthetic generator at Flickr8k's shape (8,091 images x 5 = 40,455
captions, 512-d unit vectors with a planted matching structure), an aligned and an unaligned
backbone. Grid (default "full", the paper's): 2 methods x 4 scales x 3 seeds on both backbones,
plus the 6-level noise study on the first backbone at scale 16384 (its level-0 runs are the main
grid's runs there: a group holds seeds x levels, as sweep.plan makes it), 10 epochs, batch 32.

Two ways, one after the other, in this process:
  a. fusion_jax: per (backbone, method, scale) one `jax.jit(jax.vmap(train_epoch))` over the group's
     runs, built as sweep.train_group builds it (run axis sharded over the local devices; no
     checkpoints); compile time is timed apart via
     `.lower().compile()` and is included in the wall time.
  b. the reference: tests/reference_torch.py's training loop (torch AdamW, CosineAnnealingLR per
     batch, batch 32), one run after another, on `--torch-threads` threads (default: all cores).
     Noisy runs get their degraded image features once per run, before training, inside the timing.
FLOPs are XLA's cost analysis of one compiled training step (fusion_jax.cost), times steps and
epochs, the same count for both ways; the peak is a large float32 matmul measured here with jax.
Writes <out>/<device>.json and .md (`<device>-quick`, `<device>-tiny` for the smaller grids).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import platform
import re
import shlex
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fusion_jax import cost
from fusion_jax import metrics as metrics_lib
from fusion_jax.config_base import PAPER_NOISE, PAPER_SCALES, PAPER_SEEDS, base_config
from fusion_jax.data import FeatureSet, build_pairs
from fusion_jax.data.synthetic import generate
from fusion_jax.files import atomic_write_json, atomic_write_text
from fusion_jax.report import device, versions
from fusion_jax.sweep import Group, RunSpec, group_data, run_mesh, stack_runs
from fusion_jax.train import make_train

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "reference_torch.py")


@dataclasses.dataclass(frozen=True)
class Grid:
    """What a benchmark trains: the main grid, a noise study at one (backbone, scale), the features."""

    name: str
    backbones: tuple[str, ...]
    scales: tuple[int, ...]
    seeds: tuple[int, ...]
    noise_scale: int
    noise_levels: tuple[float, ...]
    epochs: int
    methods: tuple[str, ...] = ("concat", "cross")
    n_images: int = 8091
    captions_per_image: int = 5
    dim: int = 512
    matmul_size: int = 4096


GRIDS = {
    "full": Grid("full", ("aligned", "unaligned"), PAPER_SCALES, PAPER_SEEDS, 16384, PAPER_NOISE, 10),
    "quick": Grid("quick", ("aligned",), (2048, 4096), PAPER_SEEDS, 4096, (0.0, 0.1), 3),
    "tiny": Grid("tiny", ("aligned",), (256,), (42,), 256, (0.0, 0.1), 1,
                 n_images=300, dim=64, matmul_size=1024),
}


def bench_config(grid: Grid) -> ml_collections.ConfigDict:
    """The paper's training settings (configs' base) for `grid`: lr 1e-4, batch 32, dropout 0.1."""
    config = base_config(f"bench_{grid.name}", "synthetic")
    config.backbones, config.scales, config.seeds = grid.backbones, grid.scales, grid.seeds
    config.degradation.levels, config.degradation.backbones = grid.noise_levels, grid.backbones[:1]
    config.train.epochs = grid.epochs
    return config


def plan_groups(grid: Grid, kind: str = "gaussian") -> list[Group]:
    """One group per (backbone, method, scale); the noise study's group holds seeds x levels."""
    groups = []
    for b in grid.backbones:
        for m in grid.methods:
            for s in grid.scales:
                levels = grid.noise_levels if (b, s) == (grid.backbones[0], grid.noise_scale) else (0.0,)
                groups.append(Group(b, m, s, tuple(RunSpec(b, m, s, seed, kind, float(level))
                                                   for seed in grid.seeds for level in levels)))
    return groups


def bench_features(grid: Grid, backbone: str) -> FeatureSet:
    """Flickr8k-shaped synthetic features (deterministic: generator seed 0)."""
    return generate(backbone, grid.n_images, grid.captions_per_image, latent_dim=16, dim=grid.dim,
                    caption_noise=0.6, view_noise=0.3, seed=0)


def device_name() -> str:
    """A file-name-safe device label: "cpu-<cores>core-<machine>" or the accelerator's device_kind."""
    d = jax.devices()[0]
    name = f"cpu-{len(os.sched_getaffinity(0))}core-{platform.machine()}" if d.platform == "cpu" else d.device_kind
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower()


def matmul_peak(size: int, reps: int = 5) -> dict:
    """Best-of-`reps` GFLOP/s of a float32 [size, size] @ [size, size] matmul, with jax."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return {"size": size, "reps": reps, "seconds": best, "gflops": 2 * size**3 / best / 1e9}


def _accuracy(counts) -> float:
    return float(metrics_lib.binary_metrics(*counts)["accuracy"])


def time_jax_group(config: ml_collections.ConfigDict, group: Group, features: FeatureSet,
                   step_flops: float) -> dict:
    """Train and evaluate `group` as sweep.train_group does (run axis sharded over the local devices,
    padded to fill them; no checkpoints): timings and FLOPs (of the padded runs: the work done).

    compile_s: lowering and compiling init, train_epoch and evaluate (and running init, ~ms)."""
    t0 = time.perf_counter()
    pairs = build_pairs(features.caption_image, features.n_images, group.scale, config.pairs.split_seed,
                        config.pairs.train_fraction)
    n_train, n_val = pairs.n_train, group.scale - pairs.n_train
    trainer = make_train(config, group.method, n_train, n_val)
    mesh = run_mesh()
    by_run, replicated = NamedSharding(mesh, P("runs")), NamedSharding(mesh, P())
    padded = group.runs + (group.runs[-1],) * (-len(group.runs) % mesh.size)
    data = group_data(features, pairs, replicated)
    runs = jax.device_put(stack_runs(padded), by_run)
    t1 = time.perf_counter()
    program = lambda f, axes: jax.jit(jax.vmap(f, in_axes=axes), out_shardings=by_run)
    init = program(trainer.init, (0, None)).lower(runs, data).compile()
    state = jax.block_until_ready(init(runs, data))
    ti = time.perf_counter()
    train_epoch = program(trainer.train_epoch, (0, 0, None)).lower(state, runs, data).compile()
    te = time.perf_counter()
    evaluate = program(trainer.evaluate, (0, 0, None)).lower(state, runs, data).compile()
    t2 = time.perf_counter()
    epoch_s = []
    for _ in range(config.train.epochs):
        t = time.perf_counter()
        state, losses = train_epoch(state, runs, data)
        losses = np.asarray(losses)
        epoch_s.append(time.perf_counter() - t)
    t3 = time.perf_counter()
    counts = np.asarray(evaluate(state, runs, data))[:len(group.runs)]
    t4 = time.perf_counter()
    steps = trainer.steps_per_epoch * config.train.epochs
    return {"group": group.name, "runs": len(group.runs), "n_train": n_train, "steps_per_run": steps,
            "wall_s": t4 - t0, "setup_s": t1 - t0, "compile_s": t2 - t1,
            "compile_parts_s": {"init": ti - t1, "train_epoch": te - ti, "evaluate": t2 - te},
            "train_s": t3 - t2, "epoch_s": epoch_s, "eval_s": t4 - t3,
            "padded_runs": len(padded), "train_flops": step_flops * len(padded) * steps,
            "final_train_loss": float(losses[:len(group.runs)].mean()),
            "accuracy_mean": float(np.mean([_accuracy(c) for c in counts]))}


def load_reference() -> Any:
    """tests/reference_torch.py of this source checkout, imported now (it imports torch)."""
    if not os.path.exists(REFERENCE):
        raise FileNotFoundError(f"the PyTorch reference {REFERENCE} is missing: the benchmark runs from a "
                                "source checkout of fusion_jax (it lives in tests/, not in the package)")
    spec = importlib.util.spec_from_file_location("fusion_jax_reference_torch", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _noisy(image: np.ndarray, level: float, seed: int, scale: int) -> np.ndarray:
    """normalize(v + N(0, level^2 I)), fixed per run: the degraded image features of one run."""
    if level == 0.0:
        return image
    z = np.random.default_rng([seed, scale, round(level * 1e6)]).standard_normal(image.shape, np.float32)
    x = image + level * z
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def time_torch_group(config: ml_collections.ConfigDict, group: Group, features: FeatureSet, ref: Any,
                     step_flops: float) -> dict:
    """Train and evaluate the runs of `group` one after another with the PyTorch reference."""
    import torch

    t0 = time.perf_counter()
    hc, tc = config.head, config.train
    pairs = build_pairs(features.caption_image, features.n_images, group.scale, config.pairs.split_seed,
                        config.pairs.train_fraction)
    train, val = pairs.split("train"), pairs.split("val")
    run_s, losses, accuracies = [], [], []
    for spec in group.runs:
        tr = time.perf_counter()
        torch.manual_seed(spec.seed)
        head = ref.make_head_torch(group.method, features.image.shape[-1], features.text.shape[-1], hc.hidden,
                                   hc.mlp_hidden, tc.dropout, hc.num_heads)
        arrays = {"image": _noisy(features.image, spec.level, spec.seed, spec.scale), "text": features.text}
        orders = [np.random.default_rng([spec.seed, spec.scale, e]).permutation(pairs.n_train)
                  for e in range(tc.epochs)]
        step_losses = ref.train_reference(head, arrays, train, orders, tc.learning_rate, tc.weight_decay,
                                          tc.epochs, tc.batch_size)
        accuracies.append(_accuracy(ref.evaluate_reference(head, arrays, val)))
        losses.append(float(np.mean(step_losses[-math.ceil(pairs.n_train / tc.batch_size):])))
        run_s.append(time.perf_counter() - tr)
    steps = math.ceil(pairs.n_train / tc.batch_size) * tc.epochs
    return {"group": group.name, "runs": len(group.runs), "n_train": pairs.n_train, "steps_per_run": steps,
            "wall_s": time.perf_counter() - t0, "run_s": run_s,
            "train_flops": step_flops * len(group.runs) * steps,
            "final_train_loss": float(np.mean(losses)), "accuracy_mean": float(np.mean(accuracies))}


def torch_thread_check(ref: Any, features: FeatureSet, threads: int, steps: int = 30) -> dict:
    """Reference ms per concat training step (batch 32) on 1 thread and on `threads`: shows contention."""
    import torch

    pairs = build_pairs(features.caption_image, features.n_images, 32 * steps, 0)
    train, order = pairs.split("train"), [np.arange(pairs.n_train)]
    out = {}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        head = ref.make_head_torch("concat", features.image.shape[-1], features.text.shape[-1])
        warm = {k: v[:64] for k, v in train.items()}
        ref.train_reference(head, features.arrays(), warm, [np.arange(64)], 1e-4, 0.01, 1, 32)  # warm-up
        t0 = time.perf_counter()
        ref.train_reference(head, features.arrays(), train, order, 1e-4, 0.01, 1, 32)
        out[f"{n}_threads_ms_per_step"] = (time.perf_counter() - t0) / math.ceil(pairs.n_train / 32) * 1e3
    return out


def _totals(groups: list[dict], peak_gflops: float, time_keys: tuple[str, ...] = ("wall_s",)) -> dict:
    """Sums over groups: wall time, runs per second, achieved GFLOP/s and its fraction of the peak."""
    wall = sum(g["wall_s"] for g in groups)
    runs = sum(g["runs"] for g in groups)
    flops = sum(g["train_flops"] for g in groups)
    out = {"wall_s": wall, "runs": runs, "runs_per_s": runs / wall, "train_flops": flops,
           "achieved_gflops": flops / wall / 1e9, "fraction_of_peak": flops / wall / 1e9 / peak_gflops}
    for key in time_keys[1:]:
        out[key] = sum(g[key] for g in groups)
    if "train_s" in out:
        out["achieved_gflops_steady"] = flops / out["train_s"] / 1e9
        out["fraction_of_peak_steady"] = out["achieved_gflops_steady"] / peak_gflops
    return out


def run_benchmark(grid: str = "full", out_dir: str = "results/bench", torch_threads: int | None = None,
                  command: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Time `grid` both ways, write <out_dir>/<device>[-grid].json and .md, and return the result."""
    load_start = list(os.getloadavg())
    g = GRIDS[grid]
    ref = load_reference()
    import torch

    torch_threads = torch_threads or len(os.sched_getaffinity(0))
    config = bench_config(g)
    groups = plan_groups(g, config.degradation.kind)
    log(f"bench {grid}: {len(groups)} groups, {sum(len(x.runs) for x in groups)} runs, {g.epochs} epochs, "
        f"features {g.n_images} x {g.dim} / {g.n_images * g.captions_per_image} x {g.dim}, device {device_name()}")
    features = {b: bench_features(g, b) for b in g.backbones}
    step_flops = {m: cost.train_step_flops(config, m, g.dim, g.dim) for m in g.methods}
    forward = {m: cost.forward_flops_per_sample(m, g.dim, g.dim, config) for m in g.methods}
    peak = matmul_peak(g.matmul_size)
    log(f"matmul peak ({g.matmul_size}^2 float32, jax): {peak['gflops']:.1f} GFLOP/s; training FLOPs per step "
        f"and run: " + ", ".join(f"{m} {f / 1e6:.1f} M" for m, f in step_flops.items()))

    jax_groups = []
    for i, group in enumerate(groups):
        r = time_jax_group(config, group, features[group.backbone], step_flops[group.method])
        jax_groups.append(r)
        log(f"[jax {i + 1}/{len(groups)}] {group.name}: {r['runs']} runs, wall {r['wall_s']:.2f} s "
            f"(compile {r['compile_s']:.2f}, train {r['train_s']:.2f}, eval {r['eval_s']:.2f}), "
            f"{r['train_flops'] / r['train_s'] / 1e9:.1f} GFLOP/s training, accuracy {r['accuracy_mean']:.3f}")
    threads_before = torch.get_num_threads()
    torch_groups = []
    try:
        check = torch_thread_check(ref, features[g.backbones[0]], torch_threads)
        log("torch ms per concat step: " + ", ".join(f"{k.split('_')[0]} thread(s) {v:.2f}" for k, v in check.items()))
        torch.set_num_threads(torch_threads)
        for i, group in enumerate(groups):
            r = time_torch_group(config, group, features[group.backbone], ref, step_flops[group.method])
            torch_groups.append(r)
            log(f"[torch {i + 1}/{len(groups)}] {group.name}: {r['runs']} runs, wall {r['wall_s']:.2f} s, "
                f"{r['train_flops'] / r['wall_s'] / 1e9:.1f} GFLOP/s, accuracy {r['accuracy_mean']:.3f}")
    finally:
        torch.set_num_threads(threads_before)
    peak_after = matmul_peak(g.matmul_size)
    peak_gflops = max(peak["gflops"], peak_after["gflops"])

    jax_total = _totals(jax_groups, peak_gflops, ("wall_s", "compile_s", "train_s", "eval_s", "setup_s"))
    torch_total = _totals(torch_groups, peak_gflops)
    result = {
        "command": command, "grid_name": grid, "versions": {**versions(), "torch": torch.__version__},
        "device": {**device(), "name": device_name(), "cpu_cores": len(os.sched_getaffinity(0))},
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "grid": {**dataclasses.asdict(g), "groups": [x.name for x in groups],
                 "runs": sum(len(x.runs) for x in groups), "batch_size": config.train.batch_size,
                 "learning_rate": config.train.learning_rate, "noise_backbone": g.backbones[0]},
        "flops": {"train_step_per_run": step_flops, "forward_per_sample": forward,
                  "source": "XLA cost_analysis of one compiled training step (fusion_jax.cost.train_step_flops)"},
        "matmul_peak": {"before": peak, "after": peak_after, "gflops": peak_gflops},
        "jax": {**jax_total, "groups": jax_groups},
        "torch": {**torch_total, "threads": torch_threads, "thread_check": check, "groups": torch_groups},
        "speedup": {"wall": torch_total["wall_s"] / jax_total["wall_s"],
                    "excluding_compile": torch_total["wall_s"] / (jax_total["wall_s"] - jax_total["compile_s"])},
    }
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, device_name() + ("" if grid == "full" else f"-{grid}"))
    atomic_write_json(stem + ".json", result)
    atomic_write_text(stem + ".md", markdown(result))
    log(f"speed-up {result['speedup']['wall']:.2f}x wall ({result['speedup']['excluding_compile']:.2f}x without "
        f"compilation); jax {100 * jax_total['fraction_of_peak']:.0f}% of the matmul peak "
        f"({100 * jax_total['fraction_of_peak_steady']:.0f}% while training); wrote {stem}.json and .md")
    return result


def markdown(r: dict) -> str:
    """The benchmark's Markdown report: the totals and a per-group table."""
    j, t, g = r["jax"], r["torch"], r["grid"]
    acc = lambda side, m: np.mean([x["accuracy_mean"] for x in side["groups"] if f"-{m}-" in x["group"]])
    lines = [f"# Benchmark `{r['grid_name']}` on {r['device']['name']} ({r['device']['device_kind']})", "",
             f"Made by `{r['command']}`; jax {r['versions']['jax']}, torch {r['versions']['torch']}. "
             f"{g['runs']} runs in {len(g['groups'])} groups: backbones {', '.join(g['backbones'])}, "
             f"scales {', '.join(map(str, g['scales']))}, seeds {', '.join(map(str, g['seeds']))}, noise levels "
             f"{', '.join(f'{x:g}' for x in g['noise_levels'])} on {g['noise_backbone']} at scale {g['noise_scale']}, "
             f"{g['epochs']} epochs, batch {g['batch_size']}; features {g['n_images']} images x "
             f"{g['captions_per_image']} captions, {g['dim']}-d (synthetic, Flickr8k's shape for full/quick). "
             f"Matmul peak ({g['matmul_size']}² float32, jax): {r['matmul_peak']['gflops']:.1f} GFLOP/s. "
             f"Load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in r['load_average']['start'])}, "
             f"at end {', '.join(f'{x:.2f}' for x in r['load_average']['end'])}.", "",
             "| | fusion_jax (vmapped groups) | PyTorch reference (sequential) |", "|---|---:|---:|",
             f"| wall time (s) | {j['wall_s']:.1f} | {t['wall_s']:.1f} |",
             f"| of which compilation (s) | {j['compile_s']:.1f} | – |",
             f"| of which training epochs (s) | {j['train_s']:.1f} | – |",
             f"| runs per second | {j['runs_per_s']:.3f} | {t['runs_per_s']:.3f} |",
             f"| achieved GFLOP/s (wall) | {j['achieved_gflops']:.1f} | {t['achieved_gflops']:.1f} |",
             f"| % of matmul peak (wall) | {100 * j['fraction_of_peak']:.1f} | {100 * t['fraction_of_peak']:.1f} |",
             f"| achieved GFLOP/s, % of peak (training epochs only) | {j['achieved_gflops_steady']:.1f}, "
             f"{100 * j['fraction_of_peak_steady']:.1f} | – |",
             f"| threads | XLA default | {t['threads']} |",
             "| torch ms per concat step, 1 thread / all | – | "
             + " / ".join(f"{v:.2f}" for v in t["thread_check"].values()) + " |"]
    lines += [f"| mean val. accuracy, {m} | {acc(j, m):.3f} | {acc(t, m):.3f} |" for m in g["methods"]]
    lines += ["", f"**Speed-up: {r['speedup']['wall']:.2f}x** wall time, compilation included "
              f"({r['speedup']['excluding_compile']:.2f}x without it).", "",
              "| group | runs | steps/run | jax wall (s) | jax compile (s) | jax train (s) | torch wall (s) "
              "| speed-up |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(j["groups"], t["groups"]):
        lines.append(f"| {a['group']} | {a['runs']} | {a['steps_per_run']} | {a['wall_s']:.2f} | "
                     f"{a['compile_s']:.2f} | {a['train_s']:.2f} | {b['wall_s']:.2f} | {b['wall_s'] / a['wall_s']:.2f} |")
    lines += ["", "FLOPs: XLA's cost analysis of one compiled training step per run "
              + ", ".join(f"{m} {f / 1e6:.1f} M" for m, f in r["flops"]["train_step_per_run"].items())
              + " (forward, backward, AdamW, gather, noise), times steps; the same count for both columns.",
              "", "Each side initialises as its framework does by default (torch's Linear init is about 1.7x "
              "smaller than flax's lecun-normal), which moves the accuracies at lr 1e-4 and few epochs; the "
              "work per step is the same (tests/test_reference_parity.py: same init, same trajectory)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The command line: `python -m fusion_jax.bench [--quick | --tiny] [--out=DIR] [--torch-threads=N]`."""
    parser = argparse.ArgumentParser(prog="python -m fusion_jax.bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller grid (minutes on a 2-core CPU)")
    size.add_argument("--tiny", action="store_true", help="a seconds-long grid (what the tests run)")
    parser.add_argument("--out", default="results/bench", help="output folder (default results/bench)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    grid = "quick" if args.quick else "tiny" if args.tiny else "full"
    command = " ".join(["python -m fusion_jax.bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    try:
        run_benchmark(grid, args.out, args.torch_threads, command, log=lambda s: print(s, flush=True))
    except (FileNotFoundError, ImportError) as e:
        print(f"fusion_jax.bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
