#!/usr/bin/env bash
# Two processes of one sweep on this machine, where process 1 has no group to train and so is done at
# once, while process 0 trains for about 6 minutes (one group of 54 runs, 560 epochs).
#   bash results/multiprocess/end_barrier.sh COMMIT LOG
# checks COMMIT out into a scratch worktree and runs it there; LOG gets its output, progress bars left
# out. At d2a353b (no end barrier: process 1 waited at JAX's shutdown barrier) process 1 was aborted
# after 5 minutes; at f29a8db (the end barrier) both finished.
set -euo pipefail
commit="${1:?usage: end_barrier.sh COMMIT LOG}"
log="$(realpath -m "${2:?usage: end_barrier.sh COMMIT LOG}")"
scratch="$(mktemp -d)"
trap 'git worktree remove --force "$scratch/tree" >/dev/null 2>&1 || true; rm -rf "$scratch"' EXIT
git worktree add -q "$scratch/tree" "$commit"
cd "$scratch/tree"
export PYTHONPATH="$PWD"
start=$(date +%s)
{
  echo "# bash results/multiprocess/end_barrier.sh $commit; $(date -u); $(nproc)-core $(uname -m);" \
       "$(python -c 'import jax; print("jax", jax.__version__)')"
  set +e
  bash launch/multiprocess_localhost.sh 2 configs/synthetic.py "--config.methods=('concat',)" \
    "--config.backbones=('aligned',)" --config.train.epochs=560 --workdir="$scratch/w" 2>&1 \
    | tr '\r' '\n' | grep -v -E 'epoch/s|s/epoch|^$'
  echo "exit status ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
} > "$log"
