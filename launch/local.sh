#!/usr/bin/env bash
# One host: run a sweep config on this machine's devices.
#   launch/local.sh configs/synthetic.py [--config.FIELD=VALUE ...]
set -euo pipefail
config="${1:?usage: launch/local.sh CONFIG [--config.FIELD=VALUE ...]}"
shift
exec python -m fusion_jax.main --config="$config" "$@"
