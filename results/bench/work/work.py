"""The quick grid's work on a CPU, phase by phase: how many CPU seconds fusion_jax's side costs, and
so the shortest wall time its cores allow, against the reference's wall time in the same process.

    python results/bench/work/work.py [rounds]

Each round, in turn:
1. each group alone, nothing else running: its build (groups.build_program: pairs, tracing and the
   compilation of its programs), then its training (init, the epochs with the default lanes,
   evaluate), each with its wall time and the process's CPU seconds (user + system, every thread);
2. the benchmark's fusion_jax side as `python -m fusion_jax.bench --quick` times it (bench.time_jax:
   groups compiled ahead in a worker thread, beside the earlier groups' training), with its CPU seconds;
3. the PyTorch reference as the benchmark times it (bench_torch.time_torch).
`floor_s` is the phases' CPU seconds over the cores: no schedule of that work on these cores is shorter,
unless overlapping phases cost fewer CPU seconds together than apart.
"""

import json
import os
import resource
import sys
import time

import jax
import numpy as np

from fusion_jax import bench, cost
from fusion_jax.bench_torch import load_reference, time_torch
from fusion_jax.groups import build_program, compile_workers, group_data, plan


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(f):
    """(f(), wall seconds, CPU seconds)."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0, cpu_seconds() - c0


def train_alone(program, data, epochs: int) -> None:
    runs = jax.device_put(program.runs, program.by_run)
    state = program.init(runs, data)
    for _ in range(epochs):
        state, losses = program.train_epoch(state, runs, data)
        np.asarray(losses)
    np.asarray(program.evaluate(state, runs, data))


def main(rounds: int) -> None:
    g = bench.GRIDS["quick"]
    config = bench.bench_config(g)
    groups = plan(config)
    features = {b: bench.bench_features(g, b) for b in g.backbones}
    step_flops = {bench.flops_key(x): cost.train_step_flops(config, x.method, g.dim, g.dim, noisy=x.noisy)
                  for x in groups}
    cores = len(os.sched_getaffinity(0))
    bench.matmul_peak(g.matmul_size)  # jax's start-up, outside the timings, as in the benchmark
    for r in range(rounds):
        phases = {}
        for group in groups:
            fs = features[group.backbone]
            program, *phases[f"{group.name} build"] = timed(lambda: build_program(config, group, fs))
            data = group_data(fs, program.replicated)
            _, *phases[f"{group.name} train (lanes {program.train_epoch.lanes})"] = timed(
                lambda: train_alone(program, data, config.train.epochs))
        side, jax_wall, jax_cpu = timed(lambda: bench.time_jax(config, groups, features, step_flops,
                                                               compile_workers(config), lambda s: None))
        ref, torch_wall, torch_cpu = timed(lambda: time_torch(config, groups, features, step_flops, load_reference(),
                                                              "cpu", cores, None, lambda s: None))
        phase_cpu = sum(c for _, c in phases.values())
        print(json.dumps({
            "round": r + 1, "cores": cores,
            "phases": {k: {"wall_s": round(w, 2), "cpu_s": round(c, 2)} for k, (w, c) in phases.items()},
            "phases_wall_s": round(sum(w for w, _ in phases.values()), 2), "phases_cpu_s": round(phase_cpu, 2),
            "floor_s": round(phase_cpu / cores, 2),
            "bench_jax": {"wall_s": round(jax_wall, 2), "cpu_s": round(jax_cpu, 2),
                          "wait_s": round(side["wait_s"], 2), "train_s": round(side["train_s"], 2)},
            "torch": {"wall_s": round(torch_wall, 2), "cpu_s": round(torch_cpu, 2)},
            "speedup": {"bench": round(torch_wall / jax_wall, 2), "at_floor": round(torch_wall * cores / phase_cpu, 2)},
        }), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
