#!/usr/bin/env bash
# A sweep with JAX's persistent compilation cache: `configs/synthetic.py:smoke` (4 groups, 32 runs)
# into a fresh workdir with an empty cache, into another with the cache it filled, and into a third
# without a cache; each twice (a fresh cache each time for the first), timed with /usr/bin/time.
#   bash results/bench/cache/sweep_cache.sh LOG
# Run from the repository root in the environment of the README; LOG gets the times, the sweeps'
# cache lines and whether all runs had the same metrics and final losses.
set -euo pipefail
log="$(realpath -m "${1:?usage: sweep_cache.sh LOG}")"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
run() {  # name, extra args...
  local name="$1"; shift
  /usr/bin/time -f "$name: %e s" python -m fusion_jax.main --config=configs/synthetic.py:smoke \
    --workdir="$scratch/$name" "$@" 2>&1 | tr '\r' '\n' | grep -E "^$name: |compilation cache" || true
}
{
  echo "# bash results/bench/cache/sweep_cache.sh; commit $(git rev-parse --short HEAD); $(date -u);" \
       "$(nproc)-core $(uname -m); $(python -c 'import jax; print("jax", jax.__version__)')"
  for round in 1 2; do
    rm -rf "$scratch/cache"
    run "empty-cache-$round" --config.compilation_cache="$scratch/cache"
    run "warm-cache-$round" --config.compilation_cache="$scratch/cache"
    run "no-cache-$round"
  done
  python - "$scratch" <<'PY'
import json, sys, glob
runs = lambda p: sorted((json.dumps({k: v for k, v in r.items() if k not in ("train_seconds", "source")},
                                    sort_keys=True) for r in json.load(open(p))["runs"]))
files = sorted(glob.glob(f"{sys.argv[1]}/*/results.json"))
print(f"{len(files)} sweeps; all runs with the same metrics and final losses: "
      f"{all(runs(f) == runs(files[0]) for f in files)}")
PY
} > "$log"
