# Sourced by the scripts here on a lent GPU machine (from the checkout's root): installs the carried wheels
# of .whl/ (ml_collections; transformers 4.x with its huggingface_hub and tokenizers; datasets with its
# dill, multiprocess and fsspec; `bash results/gpu-tests/wheels.sh` downloads them), puts `python` on the
# PATH, and defines left (seconds to the end of BUDGET_S), $parallel and $pertest (pytest's -n and
# --timeout where the plugins are there) and header (the date, commit, GPU and versions).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/bin && printf "#!/bin/sh\nexec %s \"\$@\"\n" "$(command -v python3)" > /tmp/bin/python && chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH
end=$(( $(date +%s) + ${BUDGET_S:-540} ))
left() { echo $(( end - $(date +%s) )); }
parallel=""; python3 -c "import xdist" 2>/dev/null && parallel="-n ${TEST_WORKERS:-14}"
pertest=""; python3 -c "import pytest_timeout" 2>/dev/null && pertest="--timeout=300"
header() {
  date -u; git log --oneline -1 2>/dev/null || echo "commit: $(cat .scratch/commit 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; echo "host cores: $(nproc)"
  python3 -c "import sys, jax, flax, optax, orbax.checkpoint, torch, ml_collections, chex; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', orbax.checkpoint.__version__, 'chex', chex.__version__, 'torch', torch.__version__)"
}
