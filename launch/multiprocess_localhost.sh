#!/usr/bin/env bash
# N processes of one sweep on this machine, for testing the multi-process path (CPU is fine).
#   launch/multiprocess_localhost.sh N CONFIG [--config.FIELD=VALUE ...] [--workdir=DIR]
# Each process trains every N-th unfinished group of the plan; process 0 gathers them into results.json.
# Ctrl-C reaches every process (each stops after its epoch, as alone); `kill` of this script ends them all.
set -euo pipefail
usage="usage: launch/multiprocess_localhost.sh N CONFIG [--config.FIELD=VALUE ...] [--workdir=DIR]"
[[ $# -ge 2 ]] || { echo "$usage" >&2; exit 2; }
n="$1"
config="$2"
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "$usage (N is a number of processes, not '$n')" >&2; exit 2; }
shift 2
port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true; wait; exit 143' TERM HUP  # also while the processes start
for ((i = 0; i < n; i++)); do
  # A script's background jobs ignore Ctrl-C (SIGINT) and SIGQUIT: each process gets them back.
  ( trap - INT QUIT
    exec python -m fusion_jax.main --config="$config" "$@" \
      --config.distributed.coordinator_address="127.0.0.1:$port" \
      --config.distributed.num_processes="$n" --config.distributed.process_id="$i" ) &
  pids+=("$!")
done
trap '' INT  # the processes stop on their own; this script waits for them and gives their status
status=0
# Every process's exit status (a failed process 0 makes the others stop): the first failure is the script's.
for pid in "${pids[@]}"; do wait "$pid" || { code=$?; [ "$status" -ne 0 ] || status=$code; }; done
exit "$status"
