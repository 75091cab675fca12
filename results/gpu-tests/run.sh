#!/bin/bash
# One call on a lent GPU machine: the full benchmark, the whole test suite with the slow test (in parallel
# processes when pytest-xdist is there: compilation, on the host's cores, is most of their time), the
# quick benchmark.
# Writes $OUT/gpu.log, $OUT/tests.log and the benchmark's JSON and md. Needs the wheels in .whl/
# (ml_collections; transformers 4.x with its huggingface_hub and tokenizers; datasets with its dill,
# multiprocess and fsspec; `bash results/gpu-tests/wheels.sh` downloads them) and, without git,
# .scratch/commit holding the commit.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/bin && printf "#!/bin/sh\nexec %s \"\$@\"\n" "$(command -v python3)" > /tmp/bin/python && chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH
end=$(( $(date +%s) + ${BUDGET_S:-540} ))
left() { echo $(( end - $(date +%s) )); }
parallel=""; python3 -c "import xdist" 2>/dev/null && parallel="-n ${TEST_WORKERS:-14}"
pertest=""; python3 -c "import pytest_timeout" 2>/dev/null && pertest="--timeout=300"
{
date -u; git log --oneline -1 2>/dev/null || echo "commit: $(cat .scratch/commit 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; echo "host cores: $(nproc)"
python3 -c "import sys, jax, flax, optax, orbax.checkpoint, torch, ml_collections, chex; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', orbax.checkpoint.__version__, 'chex', chex.__version__, 'torch', torch.__version__)"
echo "== bench full ($(left) s left)"
timeout -s KILL 170 python3 -m fusion_jax.bench --torch-runs=1 --out=$OUT 2>&1 | tr '\r' '\n' | grep -v "it/s\]$"
echo "== tests ($(left) s left): pytest $parallel $pertest"
timeout -s KILL $(( $(left) - 100 )) python3 -m pytest -v -rfEs -p no:cacheprovider -m "" $parallel $pertest tests --tb=short --durations=15 2>&1 | tee $OUT/tests.log | grep -E "FAIL|ERROR|passed|failed|s call|Error"
echo "== bench quick ($(left) s left)"
if [ "$(left)" -ge 100 ]; then
  timeout -s KILL $(( $(left) - 5 )) python3 -m fusion_jax.bench --quick --out=$OUT 2>&1 | tr '\r' '\n' | grep -v "it/s\]$"
else echo "skipped: under 100 s left"; fi
date -u
} 2>&1 | tee $OUT/gpu.log
