"""Where a training step's time goes on the CPU: one epoch of each `--quick` benchmark group's compiled
train_epoch, traced with XLA:CPU's per-kernel trace events, the kernels' time summed by kind.

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python results/bench/cpu_profile/profile.py

Kinds, from the compiled HLO's instruction names and shapes: matmul (XLA's YNNPACK matmul fusions and
its own dots), parameter-shaped (any other kernel whose output has a parameter's shape: mostly AdamW's
moment and parameter updates, also the bias gradients' sums), copies, and the rest. Times are per
executed run-step: a chunk of runs steps until its longest run is done, and an empty slot steps too. Kernel times are each kernel's duration, summed: kernels run side by side, and one kernel may use
several threads, so the sums neither add up to the wall time nor count threads.
The matmul FLOPs are the heads' dense layers counted by hand (forward, weight gradient, input gradient
where one is needed), to read the matmul kernels' own rate against the measured matmul peak.
"""

import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

from fusion_jax import bench, groups

BATCH = 32
# Dense layers (in, out, input gradient needed) of each head on 512 + 512 pooled features.
LAYERS = {"concat": [(1024, 256, False), (256, 128, True), (128, 2, True)],
          "cross": [(512, 256, False), (512, 256, False)] + [(256, 256, True)] * 4 + [(256, 128, True), (128, 2, True)]}


def matmul_flops(method: str) -> int:
    """FLOPs of one run's training step in its dense layers: 2 x batch x in x out per product."""
    return sum(2 * BATCH * i * o * (3 if dgrad else 2) for i, o, dgrad in LAYERS[method])


def kinds(hlo: str, param_shapes: set) -> dict:
    """HLO instruction name -> kind, from the compiled module's text."""
    out = {}
    for name, rest in re.findall(r"%([\w.\-]+) = ([^\n]*)", hlo):
        shape = re.match(r"f32\[([\d,]*)\]", rest)
        if name.startswith(("ynn_fusion", "dot")):
            out[name] = "matmul"
        elif name.startswith("copy"):
            out[name] = "copies"
        elif shape and tuple(int(x) for x in shape.group(1).split(",") if x) in param_shapes:
            out[name] = "parameter-shaped (mostly AdamW)"
    return out


def main() -> None:
    if "--xla_cpu_enable_xprof_traceme=true" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true (XLA:CPU's per-kernel trace events)")
    grid = bench.GRIDS["quick"]
    config = bench.bench_config(grid)
    config.lanes = 1  # one program's kernels, one chunk after another (lanes would run two side by side)
    features = bench.bench_features(grid, "aligned")
    peak = bench.matmul_peak(grid.matmul_size)["gflops"]
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {len(os.sched_getaffinity(0))} cores; matmul peak "
          f"(4096² float32) {peak:.1f} GFLOP/s")
    for group in groups.plan(config):
        program = groups.build_program(config, group, features)
        data, runs = groups.group_data(features, program.replicated), jax.device_put(program.runs, program.by_run)
        state = program.init(runs, data)
        epochs = []
        for _ in range(3):
            t = time.perf_counter()
            state, losses = program.train_epoch(state, runs, data)
            np.asarray(losses)
            epochs.append(time.perf_counter() - t)
        slot_steps = np.asarray([-(-int(n) // BATCH) for n in program.runs["n_train"]])
        run_steps = int(slot_steps.reshape(-1, program.chunk).max(axis=1).sum()) * program.chunk  # executed
        shapes = {(program.chunk, *x.shape[1:]) for x in jax.tree_util.tree_leaves(program.state["params"])}
        kind = kinds(program.train_epoch.program.as_text(), shapes)
        folder = tempfile.mkdtemp()
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            state, losses = program.train_epoch(state, runs, data)
            np.asarray(losses)
        events = json.load(gzip.open(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
        shutil.rmtree(folder)
        thread_us, other = collections.Counter(), collections.Counter()
        for e in events:
            name = e.get("name", "")
            skip = ("ThunkExecutor", "SlinkyThreadPool", "$", "while", "call", "cond", "Pjit")  # not kernels
            if e.get("ph") != "X" or name.startswith(skip):
                continue
            name = name.removeprefix("end: ")
            thread_us[kind.get(name, "other")] += e["dur"]
            if name not in kind:
                other[re.sub(r"\.\d+$", "", name)] += e["dur"]
        total = sum(thread_us.values())
        print(f"\n{group.name}: {run_steps} run-steps per epoch executed ({int(slot_steps.sum())} useful), "
              f"chunks of {program.chunk}; epoch {min(epochs):.3f} s "
              f"(best of 3, untraced) = {min(epochs) / run_steps * 1e3:.3f} ms per run-step; kernels "
              f"{total / 1e3 / run_steps:.3f} kernel-ms per run-step (traced epoch; kernels overlap)")
        for k, us in thread_us.most_common():
            print(f"  {k:36s} {us / 1e3 / run_steps:6.3f} kernel-ms per run-step  {100 * us / total:5.1f}%")
        print("  largest of the rest: " + ", ".join(f"{n} {us / 1e3 / run_steps:.3f}" for n, us in other.most_common(6)))
        mm = matmul_flops(group.method)
        print(f"  matmul FLOPs per run-step {mm / 1e6:.1f} M (dense layers): "
              f"{mm / (thread_us['matmul'] / run_steps * 1e-6) / 1e9:.1f} GFLOP/s over the matmul kernels' summed time "
              f"({100 * mm / (thread_us['matmul'] / run_steps * 1e-6) / 1e9 / peak:.0f}% of the peak)")


if __name__ == "__main__":
    main()
