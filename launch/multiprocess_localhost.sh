#!/usr/bin/env bash
# N processes of one sweep on this machine, for testing the multi-process path (CPU is fine).
#   launch/multiprocess_localhost.sh N CONFIG [--config.FIELD=VALUE ...]
# Each process trains every N-th group of the plan; process 0 gathers them into results.json.
set -euo pipefail
n="${1:?usage: launch/multiprocess_localhost.sh N CONFIG [--config.FIELD=VALUE ...]}"
config="${2:?usage: launch/multiprocess_localhost.sh N CONFIG [--config.FIELD=VALUE ...]}"
shift 2
port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
pids=()
for ((i = 1; i < n; i++)); do
  python -m fusion_jax.main --config="$config" "$@" \
    --config.distributed.coordinator_address="127.0.0.1:$port" \
    --config.distributed.num_processes="$n" --config.distributed.process_id="$i" &
  pids+=("$!")
done
status=0
python -m fusion_jax.main --config="$config" "$@" \
  --config.distributed.coordinator_address="127.0.0.1:$port" \
  --config.distributed.num_processes="$n" --config.distributed.process_id=0 || status=$?
# The others' exit status too (a failed process 0 makes them stop): the first failure is the script's.
for pid in "${pids[@]}"; do wait "$pid" || { code=$?; [ "$status" -ne 0 ] || status=$code; }; done
exit "$status"
