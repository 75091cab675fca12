#!/bin/bash
# One device call: the full benchmark (default flags), the jax side under two XLA flag variants, GPU tests.
# (The runs logged here called it as .scratch/gpu_probe.py, a copy of probe.py before probe.py moved to groups.plan.)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import jax, flax, optax, orbax.checkpoint, torch, ml_collections; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"
echo "== bench full"
timeout 240 python3 -m fusion_jax.bench --torch-runs=1 --out=$OUT
for f in "--xla_gpu_autotune_level=0" "--xla_gpu_enable_triton_gemm=false"; do
  echo "== probe XLA_FLAGS=$f"
  XLA_FLAGS="$f" timeout 120 python3 results/bench/xla_flags/probe.py full 2>&1 | grep -E "PROBE|\[jax|Error|error"
done
echo "== tests"
timeout ${TEST_S:-200} python3 -m pytest -q tests/test_train.py tests/test_cost.py tests/test_reference_parity.py tests/test_fusion.py tests/test_metrics.py tests/test_degrade.py tests/test_sweep.py --durations=15
date -u
} 2>&1 | tee $OUT/gpu.log
