#!/bin/bash
# One call on the lent GPU machine at commit 5758c5b (now in results/bench/5758c5b/: nvidia-h100-tests.log, nvidia-h100-80gb-hbm3*): full and quick benchmark, the GPU-path tests between them. Needs the wheels in .whl/ (ml_collections; transformers 4.x) and .scratch/commit holding the commit. Superseded by results/gpu-tests/run.sh.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/bin && printf "#!/bin/sh\nexec %s \"\$@\"\n" "$(command -v python3)" > /tmp/bin/python && chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH
end=$(( $(date +%s) + ${BUDGET_S:-470} ))
left() { echo $(( end - $(date +%s) )); }
{
date -u; git log --oneline -1 2>/dev/null || echo "commit: $(cat .scratch/commit 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; echo "host cores: $(nproc)"
python3 -c "import jax, flax, optax, orbax.checkpoint, torch, ml_collections, chex; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', orbax.checkpoint.__version__, 'chex', chex.__version__, 'torch', torch.__version__)"
echo "== bench full ($(left) s left)"
timeout -s KILL 170 python3 -m fusion_jax.bench --torch-runs=1 --out=$OUT 2>&1 | tr '\r' '\n' | grep -v "it/s\]$"
echo "== tests ($(left) s left)"
timeout -s KILL $(( $(left) - 100 )) python3 -m pytest -v -rfE -p no:cacheprovider tests/test_sweep.py tests/test_train.py -k "not token_features and not aligned_synthetic and not lowers_the_loss" --tb=short --durations=8 2>&1 | tee $OUT/tests.log | grep -E "PASS|FAIL|ERROR|passed|failed|s call|Error" 
echo "== bench quick ($(left) s left)"
timeout -s KILL $(( $(left) - 5 )) python3 -m fusion_jax.bench --quick --out=$OUT 2>&1 | tr '\r' '\n' | grep -v "it/s\]$"
date -u
} 2>&1 | tee $OUT/gpu.log
