#!/bin/bash
# One call on a lent GPU machine after run.sh's first H100 run (nvidia-h100-suite.log): first the tests that
# failed there, were left unfinished or came after it; then `on_host` on the GPU
# (results/init_on_host/run.sh: the tiny models' construction, and configs/demo.py:smoke before and after
# on_host); then the rest of the suite in the time left.
# Writes $OUT/gpu.log, $OUT/first.log, $OUT/init_on_host.log, $OUT/rest.log. Needs the wheels (setup.sh).
source results/gpu-tests/setup.sh
first=(tests/test_features.py tests/test_npz.py
       "tests/test_scale_out.py::test_a_last_update_that_diverges_fails_its_group_instead_of_scoring_nan_logits"
       "tests/test_report.py::test_table3_counts_flops_on_the_token_inputs_results_json_records")
smoke="tests/test_features.py::test_embedded_demo_smoke_end_to_end"  # run.sh's second part runs its config
{
header
echo "== the first run's failures and unfinished tests, and the tests since ($(left) s left)"
timeout -s KILL 150 python3 -m pytest -v -rfEs -p no:cacheprovider -m "" $parallel $pertest --tb=short --durations=20 \
  "${first[@]}" --deselect "$smoke" 2>&1 | tee $OUT/first.log | grep -E "FAIL|ERROR|passed|failed|s call|Error"
echo "== on_host ($(left) s left)"
timeout -s KILL $(( $(left) - 70 )) bash results/init_on_host/run.sh $OUT/init_on_host.log
echo "== the rest of the suite ($(left) s left)"
mapfile -t features < <(python3 -m pytest -q --collect-only -p no:cacheprovider -m "" tests/test_features.py 2>/dev/null \
  | grep :: | grep -vxF "$smoke")
deselect=(); for t in "${first[@]:2}" "${features[@]}"; do deselect+=(--deselect "$t"); done
timeout -s KILL $(( $(left) - 5 )) python3 -m pytest -v -rfEs -p no:cacheprovider -m "" $parallel $pertest --tb=short --durations=20 \
  tests --ignore=tests/test_npz.py "${deselect[@]}" 2>&1 | tee $OUT/rest.log | grep -E "FAIL|ERROR|passed|failed|s call|Error"
date -u
} 2>&1 | tee $OUT/gpu.log
