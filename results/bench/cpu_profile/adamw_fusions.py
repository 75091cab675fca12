"""How XLA:CPU fuses AdamW in a training step: for each parameter of the quick grid's `concat` head, the
fused kernels of its training program (one lane) whose output has that parameter's shape ([runs of a
chunk, ...]), with the shapes they read. Three per parameter (first moment, second moment, update)
means the update reads the new moments back from memory: 10 arrays streamed per parameter, where one
multi-output kernel would stream 7 (its runs in chunks of `runs_per_chunk`, 2 on a CPU). Then asks XLA for its
multi-output fusion, whose debug option the library names."""
import collections, re
import jax
from fusion_jax import bench
from fusion_jax.groups import build_program, plan

g = bench.GRIDS["quick"]; config = bench.bench_config(g); config.lanes = 1
group = next(grp for grp in plan(config) if grp.method == "concat")
features = bench.bench_features(g, group.backbone)
texts = []
program = build_program(config, group, features, programs=lambda lowered, options=None: (
    lambda c: texts.append(c.as_text()) or c)(lowered.compile(options)))
param_shapes = {f"f32[{','.join(map(str, (program.chunk, *x.shape[1:])))}]"
                for x in jax.tree_util.tree_leaves(program.state["params"])}
train = texts[1]
fusions = re.findall(r"^%(fused_computation[.\d]*) \((.*)\) -> (f32\[[\d,]+\]) \{", train, re.M)
shapes = collections.defaultdict(list)
for name, params, out in fusions:
    reads = re.findall(r"f32\[[\d,]+\]", params)
    if out in param_shapes and out in reads and len(set(reads) - {f"f32[{program.chunk}]"}) == 1:  # elementwise
        shapes[out].append((name, len([r for r in reads if r == out])))
print(f"jax {jax.__version__}; group {group.name}; fused kernels per parameter shape (name, arrays of that shape read):")
for out, names in shapes.items():
    print(f"  {out}: {len(names)} kernels {names}")
try:
    jax.jit(lambda x: x + 1).lower(1.0).compile({"xla_cpu_use_multi_output_fusion": True})
    print("xla_cpu_use_multi_output_fusion: accepted")
except Exception as e:
    print(f"xla_cpu_use_multi_output_fusion: {type(e).__name__}: {str(e).splitlines()[0]}")
