#!/bin/bash
# One short call on a lent GPU machine after followup.sh: the tests named as arguments (pytest, one process
# each), and beside them configs/demo.py:smoke with JAX_LOG_COMPILES, its compilation summed by
# program (compiles.py). Writes $OUT/recheck.log, $OUT/recheck-tests.log, $OUT/demo-compiles.txt (the
# summary) and $OUT/demo.log (the run's whole log). Needs the wheels (setup.sh).
source results/gpu-tests/setup.sh
tmp=$(mktemp -d)
{
header
echo "== configs/demo.py:smoke with JAX_LOG_COMPILES, beside the tests ($(left) s left)"
( start=$(date +%s.%N)
  FUSION_JAX_CACHE=$tmp/cache JAX_LOG_COMPILES=1 timeout -s KILL $(( $(left) - 10 )) python3 -m fusion_jax.main \
    --config=configs/demo.py:smoke --workdir=$tmp/out > $OUT/demo.log 2>&1
  echo "demo smoke: exit $?, $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')") s wall" > $tmp/wall.txt ) &
echo "== tests: $*"
timeout -s KILL $(( $(left) - 15 )) python3 -m pytest -v -rfEs -p no:cacheprovider -m "" ${parallel:+-n $#} $pertest --tb=short \
  --durations=10 "$@" 2>&1 | tee $OUT/recheck-tests.log | grep -E "FAIL|ERROR|passed|failed|s call|Error"
wait
cat $tmp/wall.txt; python3 results/gpu-tests/compiles.py $OUT/demo.log 30 | tee $OUT/demo-compiles.txt
date -u
} 2>&1 | tee $OUT/recheck.log
