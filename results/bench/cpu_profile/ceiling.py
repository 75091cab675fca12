"""How fast can a training step's matmuls run here at all? Each dense-layer product of a chunk of 2 runs
at batch 32 (forward, weight gradient, input gradient where one is needed), timed alone at its own shape,
in jax (XLA:CPU) and in torch (bmm, on 1 and on 2 threads), against the 4096² matmul peak the benchmark
measures.

    python results/bench/cpu_profile/ceiling.py
    taskset -c 0 python results/bench/cpu_profile/ceiling.py   # one core: which products jax spreads over two

A step that did nothing but these products, each at its own best rate, would reach their FLOPs over the
sum of their times: the "all dots" line per head. The shapes are the dense layers each head's compiled
step computes on 512 + 512 pooled features: profile.py's LAYERS less `cross`'s query and key projections,
which XLA drops there. Each product counts 2 x m x k x n FLOPs per run.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from fusion_jax import bench

BATCH, RUNS, ROUNDS = 32, 2, 5
LAYERS = {"concat": [(1024, 256, False), (256, 128, True), (128, 2, True)],
          "cross": [(512, 256, False), (512, 256, False)] + [(256, 256, True)] * 2 + [(256, 128, True), (128, 2, True)]}


def products(method: str) -> list[tuple[str, int, int, int]]:
    """(name, m, k, n) of each product [m, k] @ [k, n] in one run's step."""
    out = []
    for i, o, dgrad in LAYERS[method]:
        out += [(f"fwd {i}->{o}", BATCH, i, o), (f"dW {i}x{o}", i, BATCH, o)]
        if dgrad:
            out.append((f"dX {o}->{i}", BATCH, o, i))
    return out


def jax_seconds(m: int, k: int, n: int, iters: int) -> float:
    """Seconds per product [RUNS, m, k] @ [RUNS, k, n], the best of ROUNDS loops of `iters` in one program.
    Each product writes one entry per run into the next one's left operand (in place), so none can be
    hoisted or skipped; the barrier keeps XLA from computing only that entry."""
    a = jax.random.normal(jax.random.PRNGKey(0), (RUNS, m, k), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (RUNS, k, n), jnp.float32)

    @jax.jit
    def loop(a, b):
        def body(i, x):
            y = jax.lax.optimization_barrier(jnp.einsum("rmk,rkn->rmn", x, b))
            return x.at[:, 0, 0].set(y[:, 0, 0] * 1e-30)
        return jax.lax.fori_loop(0, iters, body, a)

    loop(a, b).block_until_ready()
    best = np.inf
    for _ in range(ROUNDS):
        t = time.perf_counter()
        loop(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best / iters


def torch_seconds(m: int, k: int, n: int, iters: int, threads: int) -> float:
    """Seconds per torch.bmm of the same shapes on `threads` threads (best of ROUNDS Python loops, a call's
    overhead included)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(RUNS, m, k), torch.randn(RUNS, k, n)
    out = torch.empty(RUNS, m, n)
    for _ in range(10):
        torch.bmm(a, b, out=out)
    best = np.inf
    for _ in range(ROUNDS):
        t = time.perf_counter()
        for _ in range(iters):
            torch.bmm(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return best / iters


SIDES = {"jax": jax_seconds, "torch 1 thread": lambda *a: torch_seconds(*a, threads=1),
         "torch 2 threads": lambda *a: torch_seconds(*a, threads=2)}


def main() -> None:
    peak = bench.matmul_peak(4096)["gflops"]
    print(f"jax {jax.__version__}, torch {torch.__version__}, {jax.device_count()} jax cpu device(s), "
          f"{len(os.sched_getaffinity(0))} core(s) this process may use; matmul peak (4096² float32, jax) "
          f"{peak:.1f} GFLOP/s")
    for method in LAYERS:
        print(f"\n{method}: products of a chunk of {RUNS} runs at batch {BATCH}; per side: us, GFLOP/s, % of the peak")
        print(f"  {'product':<16} {'MFLOP':>6}" + "".join(f" | {side:^23}" for side in SIDES))
        total = {"flops": 0.0, **{side: 0.0 for side in SIDES}}
        for name, m, k, n in products(method):
            flops = 2.0 * RUNS * m * k * n
            iters = max(50, int(2e10 / flops))  # about 0.1 s per round at 200 GFLOP/s
            total["flops"] += flops
            cells = []
            for side, seconds in SIDES.items():
                t = seconds(m, k, n, iters)
                total[side] += t
                cells.append(f" | {t * 1e6:7.1f} {flops / t / 1e9:7.1f} {100 * flops / t / 1e9 / peak:6.1f}")
            print(f"  {name:<16} {flops / 1e6:6.2f}" + "".join(cells))
        for side in SIDES:
            rate = total["flops"] / total[side] / 1e9
            print(f"  all dots, {side}: {total['flops'] / 1e6:.1f} MFLOP in {total[side] * 1e6:.0f} us per chunk-step "
                  f"= {rate:.1f} GFLOP/s, {100 * rate / peak:.1f}% of the peak")


if __name__ == "__main__":
    main()
