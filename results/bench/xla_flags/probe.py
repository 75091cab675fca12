"""Jax side of the full bench grid under the current XLA_FLAGS: compile and train seconds per group."""
import json, os, sys, time
t0 = time.perf_counter()
import jax
from fusion_jax import bench, cost
from fusion_jax.groups import plan
g = bench.GRIDS[sys.argv[1] if len(sys.argv) > 1 else "full"]
config = bench.bench_config(g)
groups = plan(config)
features = {b: bench.bench_features(g, b) for b in g.backbones}
step_flops = {m: cost.train_step_flops(config, m, g.dim, g.dim) for m in g.methods}
t1 = time.perf_counter()
side = bench.time_jax(config, groups, features, step_flops, bench.compile_workers(config), lambda s: print(s, flush=True))
print("PROBE", json.dumps({"flags": os.environ.get("XLA_FLAGS", ""), "setup_s": t1 - t0, "wall_s": side["wall_s"],
      "compile_s": side["compile_s"], "wait_s": side["wait_s"], "train_s": side["train_s"],
      "groups": [(r["group"], round(r["compile_s"], 2), round(r["train_s"], 3), r["accuracy_mean"], r["final_train_loss"]) for r in side["groups"]]}), flush=True)
