#!/bin/bash
# One call on a lent GPU machine: the full benchmark, the whole test suite with the slow test (in parallel
# processes when pytest-xdist is there: compilation, on the host's cores, is most of their time), the
# quick benchmark.
# Writes $OUT/gpu.log, $OUT/tests.log and the benchmark's JSON and md. Needs the wheels in .whl/ (setup.sh)
# and, without git, .scratch/commit holding the commit.
source results/gpu-tests/setup.sh
{
header
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
