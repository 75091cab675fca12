#!/bin/bash
# The HF Flax classes' op-by-op initialisation, and `on_host` (commit e809937; `fusion_jax.host` since b6d9681), on this machine.
# Usage, from the checkout's root with its environment active: bash results/init_on_host/run.sh LOG [BEFORE]
# 1. How many programs each of the demo's tiny models compiles while it is constructed (eager ops), and how
#    long that takes, on jax's default device and inside on_host (construct.py; added after the CPU log).
# 2. `configs/demo.py:smoke` end to end, fresh caches, with the code of BEFORE (default 0404d63, before
#    on_host) and of the checkout: wall time, compilations, and whether the trained tiny models and the
#    runs have the same bits (on a CPU-only machine on_host changes nothing; on a GPU it would).
set -euo pipefail
log=$1; before=${2:-0404d63}; tmp=$(mktemp -d); here=$PWD
trap 'git -C "$here" worktree remove --force "$tmp/before" 2>/dev/null; rm -rf "$tmp"' EXIT
git worktree add -q --detach "$tmp/before" "$before"
{
date -u; echo "checkout $(git rev-parse --short HEAD), before $before; $(nproc) cores, $(python -c 'import jax; print("jax", jax.__version__, jax.devices())')"
for place in default host; do python results/init_on_host/construct.py $place 2>&1 | grep -v deprecated; done
for side in before after; do
  src=$([ $side = before ] && echo "$tmp/before" || echo "$here")
  start=$(date +%s.%N)
  (cd "$src" && FUSION_JAX_CACHE="$tmp/cache-$side" JAX_LOG_COMPILES=1 python -m fusion_jax.main \
      --config=configs/demo.py:smoke --workdir="$tmp/out-$side") > "$tmp/$side.txt" 2>&1
  echo "demo smoke, $side ($(python -c "import json; print(json.load(open('$tmp/out-$side/results.json'))['source']['commit'][:7])")): $(python -c "print(f'{$(date +%s.%N) - $start:.1f}')") s wall, $(grep -c 'Compiling jit' "$tmp/$side.txt") compilations"
done
for m in "$tmp"/cache-before/models/*/; do
  for f in "$m"*; do cmp -s "$f" "$tmp/cache-after/models/$(basename "$m")/$(basename "$f")" && echo "same bytes: models/$(basename "$m")/$(basename "$f")" || echo "DIFFERENT: models/$(basename "$m")/$(basename "$f")"; done
done
python results/compare_runs.py "$tmp/out-before/results.json" "$tmp/out-after/results.json" | sed -n 1,2p
date -u
} 2>&1 | tee "$log"
