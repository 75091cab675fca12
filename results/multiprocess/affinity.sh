#!/usr/bin/env bash
# Two processes of configs/synthetic.py (4 groups: process 0 trains both `concat` groups, process 1 both
# `cross` groups, which take about twice as long) on this machine's cores, as
# launch/multiprocess_localhost.sh starts them (each process sees every core), against each process
# pinned to its share of the cores (`taskset`), and one process alone (`python -m fusion_jax.main`),
# in turn, ROUNDS times.
#   bash results/multiprocess/affinity.sh LOG [ROUNDS]
# Run from the repository root with the environment active; LOG gets one line per run.
set -euo pipefail
log="$(realpath -m "${1:?usage: affinity.sh LOG [ROUNDS]}")"
rounds="${2:-2}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cores=($(python -c "import os; print(*sorted(os.sched_getaffinity(0)))"))
# The launcher with process i pinned to the i-th of two equal shares of the cores.
half=$(( ${#cores[@]} / 2 ))
share0=$(IFS=,; echo "${cores[*]:0:$half}"); share1=$(IFS=,; echo "${cores[*]:$half}")
sed 's|^    exec python -m fusion_jax.main|    share=("'"$share0"'" "'"$share1"'"); exec taskset -c "${share[$i]}" python -m fusion_jax.main|' \
  launch/multiprocess_localhost.sh > "$scratch/pinned.sh"
grep -q 'taskset -c' "$scratch/pinned.sh"
export FUSION_JAX_CACHE="$scratch/cache"
{
  echo "# bash results/multiprocess/affinity.sh LOG $rounds; commit $(git rev-parse --short HEAD); $(date -u);" \
       "${#cores[@]} cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); $(python -c 'import jax; print("jax", jax.__version__)');" \
       "pinned: process 0 on cores $share0, process 1 on cores $share1"
  for ((round = 1; round <= rounds; round++)); do
    for variant in unpinned pinned "one process"; do
      start=$(date +%s.%N)
      set +e
      case "$variant" in
        unpinned) run=(bash launch/multiprocess_localhost.sh 2 configs/synthetic.py) ;;
        pinned) run=(bash "$scratch/pinned.sh" 2 configs/synthetic.py) ;;
        *) run=(python -m fusion_jax.main --config=configs/synthetic.py) ;;
      esac
      "${run[@]}" --config.tsne_pairs=0 --workdir="$scratch/w-${variant// /-}-$round" \
        > "$scratch/${variant// /-}-$round.log" 2>&1
      status=$?
      set -e
      echo "round $round, $variant: exit status $status, $(python -c "print(f'{$(date +%s.%N) - $start:.1f}')") s;" \
           "load average $(cut -d' ' -f1-3 /proc/loadavg)"
    done
  done
} > "$log"
