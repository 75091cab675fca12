#!/bin/bash
# The dry run of the paper's reproduction on full-size stand-ins, each step timed. Output: the steps'
# log lines, progress bars reduced to their final state (tr '\r' '\n', then the last line of each bar).
# DRYRUN_DIR (default /tmp/dryrun) is where it writes; a .venv in the checkout is used when there is one.
set -e
D=${DRYRUN_DIR:-/tmp/dryrun}; rm -rf $D
cd "$(dirname "$0")/../.."; [ -f .venv/bin/activate ] && . .venv/bin/activate
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo "${COMMIT:-unknown}")$(git diff --quiet HEAD -- fusion_jax configs 2>/dev/null || echo ' (plus uncommitted changes, or no git)'); $(date -u)"
filter() { tr '\r' '\n' | grep -v "^\s*$" | grep -v "FutureWarning\|deprecated\|warnings.warn" | python -c "
import re, sys
lines = sys.stdin.read().splitlines()
bar = lambda l: re.match(r'^(.*?):\s+\d+%\|', l)
for i, l in enumerate(lines):
    b = bar(l)
    if b and i + 1 < len(lines) and bar(lines[i + 1]) and bar(lines[i + 1]).group(1) == b.group(1):
        continue
    print(l)"; }
step() { echo "== $*"; local t0=$(date +%s.%N); "$@" 2>&1 | filter; echo "-- $(python -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s"; }
step python -m fusion_jax.features.standins --out=$D
F="--config.data.flickr8k_dir=$D/flickr8k --config.cache_dir=$D/cache"
step python -m fusion_jax.main --config=configs/clip_sweep.py $F --config.backbone.clip.model=$D/models/clip --workdir=$D/results/clip_sweep
step python -m fusion_jax.main --config=configs/resnet_sweep.py $F --config.backbone.resnet.model=$D/models/resnet --config.backbone.resnet.text_model=$(python -c "from fusion_jax.features.embedded_models import pretrained_minilm as p; print(p() or '$D/models/text')") --workdir=$D/results/resnet_sweep
step python -m fusion_jax.main --config=configs/noise_sweep.py $F --config.backbone.clip.model=$D/models/clip --workdir=$D/results/noise_sweep
echo "done $(date -u)"
