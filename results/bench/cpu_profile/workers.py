"""Jax side of the quick grid with N threads compiling groups ahead (argv[1]; the default on 2 cores
is 1): wall time, CPU seconds, compilation, waiting and training, to see whether compiling the second
group beside the first group's compilation (on the core that waits) pays."""
import json, resource, sys, time
import jax
from fusion_jax import bench, cost
from fusion_jax.groups import plan
g = bench.GRIDS["quick"]; config = bench.bench_config(g); groups = plan(config)
features = {b: bench.bench_features(g, b) for b in g.backbones}
step_flops = {m: cost.train_step_flops(config, m, g.dim, g.dim) for m in g.methods}
cpu = lambda: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(resource.RUSAGE_SELF))
workers = int(sys.argv[1])
c0, t0 = cpu(), time.perf_counter()
side = bench.time_jax(config, groups, features, step_flops, workers, lambda s: None)
c1, t1 = cpu(), time.perf_counter()
print(json.dumps({"workers": workers, "devices": jax.device_count(), "wall_s": round(t1 - t0, 2),
                  "cpu_s": round(c1 - c0, 2), "compile_s": round(side["compile_s"], 2), "wait_s": round(side["wait_s"], 2),
                  "train_s": round(side["train_s"], 2), "accuracy": [round(r["accuracy_mean"], 4) for r in side["groups"]]}))
