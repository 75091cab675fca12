"""Benchmark: the vmapped sweep against the paper's sequential PyTorch loop, on Flickr8k-shaped features.

    python -m fusion_jax.bench [--quick | --tiny] [--out=results/bench] [--torch-threads=N]

Features: the package's synthetic generator at Flickr8k's shape (8,091 images x 5 = 40,455
captions, 512-d unit vectors with a planted matching structure), an aligned and an unaligned
backbone. Grid (default "full", the paper's): 2 methods x 4 scales x 3 seeds on both backbones,
plus the 6-level noise study on the first backbone at scale 16384 (its level-0 runs are the main
grid's runs there), 10 epochs, batch 32. `--quick`: the same protocol (10 epochs) on a smaller grid,
the aligned backbone at scales 2048 and 4096 and noise levels 0 and 0.1 at 4096 (18 runs).

Two ways, one after the other (`--torch-first` swaps the order), in this process:
  a. fusion_jax: per (backbone, method) one compiled epoch (train_epoch over chunks of runs) for
     all the group's runs (scales x seeds x levels), built by groups.build_program as a sweep builds
     it (run axis sharded over the local devices; on one CPU device, lanes of chunks side by side),
     the groups compiled ahead by worker threads while earlier groups train; no checkpoints. The wall
     time runs from the first compilation to the last evaluation.
  b. the reference (fusion_jax.bench_torch): tests/reference_torch.py's training loop (torch AdamW,
     CosineAnnealingLR per batch, batch 32), one run after another, on one GPU when jax has one
     (each run moves its features there, inside its timing), else on `--torch-threads` CPU threads
     (default: all cores). Noisy runs get their degraded image features once per run, before
     training, inside the timing.
FLOPs are XLA's cost analysis of one training step compiled for the host CPU (fusion_jax.cost; per method, with the
noise draw for groups that have a nonzero level), times each run's own steps, the same count for
both ways (fusion_jax also executes the idle steps of the shorter runs in a chunk: `executed_flops`;
the reference also computes cross's unused query/key projections, fusion.Attention); the peak is a
large float32 matmul measured here with jax, back to back (times the local devices on accelerators,
for fusion_jax's share; the reference uses one). Outside the timed walls on both sides: jax's
start-up (the first peak measurement) and torch's warm-up (its thread check).
`--compilation-cache=DIR` gives fusion_jax's side JAX's persistent compilation cache at DIR: a second
run with the same DIR loads its programs instead of compiling them (the file records the hits and misses).
`--repeats=N` runs both ways N times in turn and reports each way's median run, with every wall time
(with a compilation cache, the rounds after the first load what it compiled).
Writes <out>/<device>.json and .md (`<device>-quick`, `<device>-tiny` for the smaller grids; `-xN` with
repeats, `-split-by-scale`, `-chunkN` with --runs-per-chunk, `-lanesN` with --lanes, `-cached` with a compilation
cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import re
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fusion_jax import cost
from fusion_jax.bench_markdown import markdown
from fusion_jax.bench_torch import accuracy, flops_key, load_reference, time_torch
from fusion_jax.cli import command_line
from fusion_jax.config_base import PAPER_NOISE, PAPER_SCALES, PAPER_SEEDS, base_config
from fusion_jax.data import FeatureSet
from fusion_jax.data.synthetic import generate
from fusion_jax.files import atomic_write_json, atomic_write_text, made_folder, unwritable_folder
from fusion_jax.report import device, source, versions
from fusion_jax.groups import CompiledAhead, Group, compile_workers, plan, usable_cores
from fusion_jax.train import steps_per_epoch
from fusion_jax.xla_cache import cache_events, persistent_cache

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
    "quick": Grid("quick", ("aligned",), (2048, 4096), PAPER_SEEDS, 4096, (0.0, 0.1), 10),
    "tiny": Grid("tiny", ("aligned",), (256,), (42,), 256, (0.0, 0.1), 1,
                 n_images=300, dim=64, matmul_size=1024),
}


def bench_config(grid: Grid) -> ml_collections.ConfigDict:
    """The paper's training settings (configs' base) for `grid`: lr 1e-4, batch 32, dropout 0.1."""
    config = base_config(f"bench_{grid.name}", "synthetic")
    config.backbones, config.scales, config.seeds = grid.backbones, grid.scales, grid.seeds
    config.degradation.levels, config.degradation.backbones = grid.noise_levels, grid.backbones[:1]
    config.degradation.scales = (grid.noise_scale,)
    config.train.epochs = grid.epochs
    return config


def bench_features(grid: Grid, backbone: str) -> FeatureSet:
    """Flickr8k-shaped synthetic features (deterministic: generator seed 0)."""
    return generate(backbone, grid.n_images, grid.captions_per_image, latent_dim=16, dim=grid.dim,
                    caption_noise=0.6, view_noise=0.3, seed=0)


def device_name() -> str:
    """A file-name-safe device label: "cpu-<cores>core-<machine>" or the accelerator's device_kind, with
    "-<n>devices" when jax has several (CPU devices when JAX_NUM_CPU_DEVICES asks for them)."""
    d = jax.devices()[0]
    name = f"cpu-{usable_cores()}core-{platform.machine()}" if d.platform == "cpu" else d.device_kind
    if jax.device_count() > 1:
        name += f"-{jax.device_count()}devices"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower()


def matmul_peak(size: int, reps: int = 5, round_seconds: float = 0.05) -> dict:
    """GFLOP/s of a float32 [size, size] @ [size, size] matmul on one device, with jax at the precision its
    training matmuls use (`matmul_precision`): the best of `reps` rounds, each of `calls` matmuls issued
    back to back and waited for once (enough for `round_seconds`, so that a GPU's fast matmul is not
    timed with its dispatch)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    calls = max(1, min(1000, math.ceil(round_seconds / (time.perf_counter() - t0))))
    # A GPU runs its stream in order: waiting for the last output waits for all (and keeping them all
    # would hold calls x size² floats). XLA:CPU may run independent calls at once: wait for each output.
    in_order = a.devices().pop().platform != "cpu"
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        if in_order:
            for _ in range(calls):
                out = f(a, a)
            out.block_until_ready()
        else:
            jax.block_until_ready([f(a, a) for _ in range(calls)])
        best = min(best, (time.perf_counter() - t0) / calls)
    return {"size": size, "reps": reps, "calls": calls, "seconds": best, "gflops": 2 * size**3 / best / 1e9}


def matmul_precision(platform: str) -> dict:
    """The float32 matmul precision of each side: jax's setting (its default runs TF32 on NVIDIA GPUs since
    Ampere, full float32 on CPUs) and torch's (by default full float32 everywhere)."""
    import torch

    setting = jax.config.jax_default_matmul_precision
    return {"jax": f"{setting or 'default'}" + (" (TF32 on NVIDIA GPUs since Ampere)" if platform == "gpu" and not setting
                                                 else ""),
            "torch": torch.get_float32_matmul_precision()
            + (" (TF32)" if platform == "gpu" and torch.backends.cuda.matmul.allow_tf32 else "")}


def time_jax(config: ml_collections.ConfigDict, groups: list[Group], features: dict[str, FeatureSet],
             step_flops: dict[str, float], workers: int, log: Callable[[str], None]) -> dict:
    """Train and evaluate `groups` as sweep.train_and_evaluate does, without checkpoints: programs
    compiled ahead by `workers` threads (groups.CompiledAhead), run axis sharded over the local devices.

    Per group: compile_s (its compilation, in a worker thread; evaluate's after the group could start
    training), wait_s (how long the group waited for its programs), train_s (its epochs), eval_s
    (its evaluation, less any wait for evaluate's compilation); the total wall time covers all of it;
    compilation_cache: the persistent cache's folder (None without one), its hits and misses meanwhile."""
    t_start = time.perf_counter()
    batch, epochs = config.train.batch_size, config.train.epochs
    out = []
    with cache_events() as cache, CompiledAhead(config, groups, features, workers) as ahead:
        for i, group in enumerate(groups):
            t0 = time.perf_counter()
            program = ahead.program(i)
            t1 = time.perf_counter()
            data = ahead.data(program)
            runs = jax.device_put(program.runs, program.by_run)
            state = jax.block_until_ready(program.init(runs, data))
            t2 = time.perf_counter()
            epoch_s = []
            for _ in range(epochs):
                t = time.perf_counter()
                state, losses = program.train_epoch(state, runs, data)
                losses = np.asarray(losses)
                epoch_s.append(time.perf_counter() - t)
            t3 = time.perf_counter()
            counts = np.asarray(program.evaluate(state, runs, data))[program.index]
            t4 = time.perf_counter()
            accuracies = [accuracy(c[:4]) for c in counts]  # in the group's run order
            later = program.evaluate  # a programs.Later: CompiledAhead compiles it after handing the group over
            slot_steps = np.asarray([steps_per_epoch(int(n), batch) * epochs for n in program.runs["n_train"]])
            run_steps = slot_steps[program.index].tolist()
            # A chunk steps all its slots until its longest run is done, or (skip_idle off) through every step.
            chunk_steps = slot_steps.reshape(-1, program.chunk).max(axis=1)
            if not program.trainer.skip_idle:
                chunk_steps[:] = program.trainer.steps_per_epoch * epochs
            executed_steps = int(chunk_steps.sum()) * program.chunk
            r = {"group": group.name, "runs": len(group.runs), "scales": list(group.scales),
                 "steps_per_run": run_steps, "program_steps": program.trainer.steps_per_epoch * epochs,
                 "compile_s": program.compile_seconds + later.seconds,
                 "wait_s": t1 - t0 + later.waited, "setup_s": t2 - t1,
                 "train_s": t3 - t2, "epoch_s": epoch_s, "eval_s": t4 - t3 - later.waited,
                 "slots": len(slot_steps), "runs_per_chunk": program.chunk, "lanes": program.train_epoch.lanes,
                 # useful work (each run's own steps), and what the program executed (chunks' idle slots)
                 "train_flops": step_flops[flops_key(group)] * sum(run_steps),
                 "executed_flops": step_flops[flops_key(group)] * executed_steps,
                 "final_train_loss": float(np.mean([row[:k // epochs].mean()
                                                    for row, k in zip(losses[program.index], run_steps)])),
                 "accuracy_per_run": accuracies, "accuracy_mean": float(np.mean(accuracies))}
            out.append(r)
            log(f"[jax {i + 1}/{len(groups)}] {group.name}: {r['runs']} runs, compile {r['compile_s']:.2f} s "
                f"(waited {r['wait_s']:.2f}), train {r['train_s']:.2f} s, eval {r['eval_s']:.2f} s, "
                f"{r['train_flops'] / r['train_s'] / 1e9:.1f} GFLOP/s training, accuracy {r['accuracy_mean']:.3f}")
    wall = time.perf_counter() - t_start
    return {"wall_s": wall, "workers": workers, "groups": out,
            "compilation_cache": {"dir": jax.config.jax_compilation_cache_dir
                                  if jax.config.jax_enable_compilation_cache else None, **cache},
            **{k: sum(g[k] for g in out) for k in ("compile_s", "wait_s", "setup_s", "train_s", "eval_s")}}


def _median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (of an even number, the faster of the middle two)."""
    return sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]


def _totals(side: dict, peak_gflops: float) -> dict:
    """Wall time, runs per second, useful GFLOP/s and its fraction of the peak, of one side."""
    groups = side["groups"]
    wall, runs = side["wall_s"], sum(g["runs"] for g in groups)
    flops = sum(g["train_flops"] for g in groups)
    out = {"runs": runs, "runs_per_s": runs / wall, "train_flops": flops,
           "achieved_gflops": flops / wall / 1e9, "fraction_of_peak": flops / wall / 1e9 / peak_gflops}
    if "train_s" in side:
        out["achieved_gflops_steady"] = flops / side["train_s"] / 1e9
        out["fraction_of_peak_steady"] = out["achieved_gflops_steady"] / peak_gflops
    return out


def run_benchmark(grid: str = "full", out_dir: str = "results/bench", torch_threads: int | None = None,
                  command: str | None = None, log: Callable[[str], None] = print, workers: int | None = None,
                  torch_runs: int | None = None, torch_first: bool = False, split_by_scale: bool = False,
                  runs_per_chunk: int = 0, compilation_cache_dir: str | None = None, repeats: int = 1,
                  lanes: int = 0) -> dict:
    """Time `grid` both ways, write <out_dir>/<device>[-grid].json and .md, and return the result.

    fusion_jax runs first, then the reference (`torch_first`: the other way round), `repeats` times
    in turn; each side reports its median run by wall time, and `repeats` records every wall time
    (a shared machine's load moves single runs by a third). `split_by_scale`, `runs_per_chunk` and
    `lanes` set the config fields of those names; `compilation_cache_dir`: JAX's persistent compilation
    cache for fusion_jax's programs (`persistent_cache`)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    if torch_runs is not None and torch_runs < 1:
        raise ValueError(f"--torch-runs must be at least 1 (a reference run per group and scale to time), not {torch_runs}")
    load_start = list(os.getloadavg())
    g = GRIDS[grid]
    ref = load_reference()
    import torch

    torch_device = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    torch_threads = torch_threads or usable_cores()
    config = bench_config(g)
    config.runs_per_chunk, config.split_by_scale, config.lanes = runs_per_chunk, split_by_scale, lanes
    workers = workers or compile_workers(config)
    groups = plan(config)
    log(f"bench {grid}: {len(groups)} groups, {sum(len(x.runs) for x in groups)} runs, {g.epochs} epochs, "
        f"features {g.n_images} x {g.dim} / {g.n_images * g.captions_per_image} x {g.dim}, device {device_name()}, "
        f"torch on {torch_device}")
    features = {b: bench_features(g, b) for b in g.backbones}
    kinds = {flops_key(x): (x.method, x.noisy) for x in groups}
    step_flops = {k: cost.train_step_flops(config, method, g.dim, g.dim, noisy=noisy)
                  for k, (method, noisy) in sorted(kinds.items())}
    forward = {m: cost.forward_flops_per_sample(m, g.dim, g.dim, config) for m in g.methods}
    peak = matmul_peak(g.matmul_size)
    if cost.counting_platform() != "cpu":
        log(f"warning: jax has no CPU backend here (JAX_PLATFORMS), so the FLOP counts compile for "
            f"{cost.counting_platform()}, whose cost analysis may leave out library matmuls (cuBLAS): they may read low")
    log(f"matmul peak ({g.matmul_size}^2 float32, jax): {peak['gflops']:.1f} GFLOP/s; training FLOPs per step "
        f"and run: " + ", ".join(f"{m} {f / 1e6:.1f} M" for m, f in step_flops.items()))

    def run_jax():
        with persistent_cache(compilation_cache_dir):
            return time_jax(config, groups, features, step_flops, workers, log)

    run_torch = lambda: time_torch(config, groups, features, step_flops, ref, torch_device, torch_threads,
                                   torch_runs, log)
    sides = {"jax": run_jax, "torch": run_torch}
    rounds = {name: [] for name in (("torch", "jax") if torch_first else ("jax", "torch"))}
    for i in range(repeats):
        if repeats > 1:
            log(f"round {i + 1} of {repeats}")
        for name in rounds:
            rounds[name].append(sides[name]())
    jax_rounds, torch_rounds = rounds["jax"], rounds["torch"]
    jax_side, torch_side = _median_run(jax_rounds), _median_run(torch_rounds)
    peak_after = matmul_peak(g.matmul_size)
    peak_gflops = max(peak["gflops"], peak_after["gflops"])
    # Each accelerator has its own matmul units and fusion_jax trains on all local ones; CPU devices share the cores.
    jax_devices = 1 if jax.devices()[0].platform == "cpu" else jax.local_device_count()

    jax_total = {**jax_side, **_totals(jax_side, peak_gflops * jax_devices)}
    torch_total = {**torch_side, **_totals(torch_side, peak_gflops)}
    result = {
        "command": command, "source": source(), "grid_name": grid,
        "versions": {**versions(), "torch": torch.__version__},
        "order": "torch, then jax" if torch_first else "jax, then torch", "split_by_scale": split_by_scale,
        "runs_per_chunk": runs_per_chunk, "lanes": lanes,
        "device": {**device(), "name": device_name(), "cpu_cores": usable_cores()},
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        # Not JAX_COMPILATION_CACHE_DIR: fusion_jax's side uses --compilation-cache alone (jax.compilation_cache).
        "env": {k: os.environ[k] for k in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS") if k in os.environ},
        "grid": {**dataclasses.asdict(g), "groups": [x.name for x in groups],
                 "runs": sum(len(x.runs) for x in groups), "batch_size": config.train.batch_size,
                 "learning_rate": config.train.learning_rate, "noise_backbone": g.backbones[0]},
        "flops": {"train_step_per_run": step_flops, "forward_per_sample": forward,
                  "platform": cost.counting_platform(),
                  "source": f"XLA cost_analysis of one training step compiled for {cost.counting_platform()} "
                            "(fusion_jax.cost.train_step_flops)"},
        "matmul_peak": {"before": peak, "after": peak_after, "gflops": peak_gflops, "jax_devices": jax_devices},
        "matmul_precision": matmul_precision(jax.devices()[0].platform),
        "jax": jax_total,
        "torch": {**torch_total, "device": torch_device, "threads": torch_threads},
        "speedup": {"wall": torch_total["wall_s"] / jax_total["wall_s"],
                    "excluding_compile": torch_total["wall_s"] / (jax_total["wall_s"] - jax_total["wait_s"]),
                    "estimated": bool(torch_total.get("estimated"))},
        "repeats": {"rounds": repeats, "jax_wall_s": [x["wall_s"] for x in jax_rounds],
                    "torch_wall_s": [x["wall_s"] for x in torch_rounds],
                    "speedup_per_round": [t["wall_s"] / j["wall_s"] for j, t in zip(jax_rounds, torch_rounds)]},
    }
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, device_name() + ("" if grid == "full" else f"-{grid}")
                        + (f"-x{repeats}" if repeats > 1 else "")
                        + ("-split-by-scale" if split_by_scale else "")
                        + (f"-chunk{runs_per_chunk}" if runs_per_chunk else "")
                        + (f"-lanes{lanes}" if lanes else "")
                        + ("-cached" if compilation_cache_dir else ""))
    atomic_write_json(stem + ".json", result)
    atomic_write_text(stem + ".md", markdown(result))
    log(f"speed-up {result['speedup']['wall']:.2f}x wall ({result['speedup']['excluding_compile']:.2f}x without "
        f"waiting for compilation); jax {100 * jax_total['fraction_of_peak']:.0f}% of the matmul peak "
        f"({100 * jax_total['fraction_of_peak_steady']:.0f}% while training); wrote {stem}.json and .md")
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: `python -m fusion_jax.bench [--quick | --tiny] [--out=DIR] [--torch-threads=N]`."""
    parser = argparse.ArgumentParser(prog="python -m fusion_jax.bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller grid (about a minute on a 2-core CPU)")
    size.add_argument("--tiny", action="store_true", help="a seconds-long grid (what the tests run)")
    parser.add_argument("--out", default="results/bench", type=os.path.expanduser,
                        help="output folder (default results/bench)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--torch-runs", type=int, default=None,
                        help="train only this many reference runs per (group, scale) and estimate the rest from "
                             "their seconds per step (default: all; the result is then marked estimated)")
    parser.add_argument("--torch-first", action="store_true",
                        help="run the reference first, then fusion_jax (default: fusion_jax first)")
    parser.add_argument("--split-by-scale", action="store_true",
                        help="one fusion_jax program per (backbone, method, scale), as config.split_by_scale")
    parser.add_argument("--runs-per-chunk", type=int, default=0,
                        help="runs a device steps together, as config.runs_per_chunk (default 0: 2 on a CPU, "
                             "all of a device's runs on a GPU)")
    parser.add_argument("--lanes", type=int, default=0,
                        help="on a CPU with one jax device, programs side by side over shares of a group's "
                             "chunks, as config.lanes (default 0: one per core, at most one per full chunk)")
    parser.add_argument("--repeats", type=int, default=1, metavar="N",
                        help="run both sides N times in turn and report each side's median run (a shared "
                             "machine's load moves single runs); output name gets -xN")
    parser.add_argument("--compile-workers", type=int, default=None,
                        help="threads compiling groups ahead (default: half the cores, at least 1)")
    parser.add_argument("--compilation-cache", default=None, metavar="DIR",
                        help="JAX's persistent compilation cache for fusion_jax's programs: run twice with the same "
                             "DIR to time them loaded instead of compiled (output name gets -cached)")
    args = parser.parse_args(argv)
    for flag, value, low in (("--runs-per-chunk", args.runs_per_chunk, 0), ("--lanes", args.lanes, 0),
                             ("--compile-workers", args.compile_workers, 1), ("--repeats", args.repeats, 1),
                             ("--torch-threads", args.torch_threads, 1), ("--torch-runs", args.torch_runs, 1)):
        if value is not None and value < low:
            parser.error(f"{flag} must be at least {low}, not {value}")
    folders = [(flag, folder) for flag, folder in (("--out", args.out), ("--compilation-cache", args.compilation_cache))
               if folder is not None]
    for check in (unwritable_folder, made_folder):  # now, not after the run; each checked before any is made
        for flag, folder in folders:
            if problem := check(folder):
                parser.error(f"{flag}: {folder!r} {problem}")
    grid = "quick" if args.quick else "tiny" if args.tiny else "full"
    command = command_line("fusion_jax.bench", sys.argv[1:] if argv is None else argv)
    try:
        run_benchmark(grid, args.out, args.torch_threads, command, log=lambda s: print(s, flush=True),
                      workers=args.compile_workers, torch_runs=args.torch_runs, torch_first=args.torch_first,
                      split_by_scale=args.split_by_scale, runs_per_chunk=args.runs_per_chunk,
                      compilation_cache_dir=args.compilation_cache, repeats=args.repeats, lanes=args.lanes)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"fusion_jax.bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
