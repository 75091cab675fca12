#!/usr/bin/env bash
# One host: run a sweep config on this machine's devices.
#   launch/local.sh configs/synthetic.py [--config.FIELD=VALUE ...] [--workdir=DIR]
set -euo pipefail
usage="usage: launch/local.sh CONFIG [--config.FIELD=VALUE ...] [--workdir=DIR]"
[[ $# -ge 1 ]] || { echo "$usage" >&2; exit 2; }
config="$1"
shift
exec python -m fusion_jax.main --config="$config" "$@"
