"""What the random draws cost the quick grid's groups on the CPU: each group built (init, train_epoch,
split/join, evaluate; build seconds, tracing included) and trained 6 epochs, the epoch's best and median
time, under one VARIANT per process:

    VARIANT=base      the benchmark's programs as they are
    VARIANT=unrolled  jax's unrolled threefry lowering rule (its default off the CPU, there emitted as a
                      function that XLA inlines) registered for the CPU too, inline, in place of the
                      CPU's rolled loop of 5 rounds (a jax internal: a probe only)
    VARIANT=nonoise   no noise drawn (degradation kind "none"), dropout as it is
    VARIANT=norng     no draws at all: no noise and dropout 0
(nonoise and norng leave the protocol: they bound what the draws cost, they are not settings to use)

    for r in 1 2 3; do for v in base unrolled nonoise norng; do VARIANT=$v python results/bench/cpu_profile/rng.py; done; done

JAX_DEFAULT_PRNG_IMPL=rbg (or unsafe_rbg) times jax's other key kinds, drawn by XLA's RngBitGenerator, in
place of threefry: other random bits, so a probe only (rng.log's section "jax's other key kinds").

With `sweep DIR` it runs `python -m fusion_jax.main --config=configs/synthetic.py --workdir=DIR` instead,
under the VARIANT's lowering (base or unrolled), to compare the runs' bits (results/compare_runs.py):

    VARIANT=unrolled python results/bench/cpu_profile/rng.py sweep DIR
"""

import os
import runpy
import sys
import time

VARIANTS = ("base", "unrolled", "nonoise", "norng")
if os.environ.get("VARIANT", "base") not in VARIANTS:
    sys.exit(f"VARIANT={os.environ['VARIANT']!r}: one of {', '.join(VARIANTS)}")
if os.environ.get("VARIANT") == "unrolled":
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32

    mlir.register_lowering(threefry2x32.threefry2x32_p, threefry2x32._threefry2x32_lowering_rule, platform="cpu")

import jax
import numpy as np

from fusion_jax import bench, groups


def main() -> None:
    variant = os.environ.get("VARIANT", "base")
    grid = bench.GRIDS["quick"]
    config = bench.bench_config(grid)
    if variant in ("nonoise", "norng"):
        config.degradation.kind = "none"
    if variant == "norng":
        config.train.dropout = 0.0
    features = bench.bench_features(grid, "aligned")
    out = []
    for group in groups.plan(config):
        t0 = time.perf_counter()
        program = groups.build_program(config, group, features)
        build = time.perf_counter() - t0
        data, runs = groups.group_data(features, program.replicated), jax.device_put(program.runs, program.by_run)
        state, epochs = program.init(runs, data), []
        for _ in range(6):
            t = time.perf_counter()
            state, losses = program.train_epoch(state, runs, data)
            np.asarray(losses)
            epochs.append(time.perf_counter() - t)
        out.append(f"{group.name}: build {build:.2f} s, epoch best {min(epochs):.3f} s, median {np.median(epochs):.3f} s")
    print(f"{variant:8s} " + " | ".join(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["sweep"]:
        if len(sys.argv) != 3:
            sys.exit("usage: VARIANT=base|unrolled python results/bench/cpu_profile/rng.py sweep DIR")
        sys.argv = ["fusion_jax.main", "--config=configs/synthetic.py", f"--workdir={sys.argv[2]}"]
        runpy.run_module("fusion_jax.main", run_name="__main__")
    else:
        main()
