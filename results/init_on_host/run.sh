#!/bin/bash
# The HF Flax classes' op-by-op initialisation, and `backbones.on_host` (commit e809937), on this machine.
# Usage, from the checkout's root with its environment active: bash results/init_on_host/run.sh LOG [BEFORE]
# 1. How many programs each of the demo's tiny models compiles while it is constructed (eager ops).
# 2. `configs/demo.py:smoke` end to end, fresh caches, with the code of BEFORE (default 0404d63, before
#    on_host) and of the checkout: wall time, compilations, and whether the trained tiny models and the
#    runs have the same bits (on a CPU-only machine on_host changes nothing; on a GPU it would).
set -euo pipefail
log=$1; before=${2:-0404d63}; tmp=$(mktemp -d); here=$PWD
trap 'git -C "$here" worktree remove --force "$tmp/before" 2>/dev/null; rm -rf "$tmp"' EXIT
git worktree add -q --detach "$tmp/before" "$before"
{
date -u; echo "checkout $(git rev-parse --short HEAD), before $before; $(nproc) cores, $(python -c 'import jax; print("jax", jax.__version__, jax.devices())')"
python - <<'PY' 2>&1 | grep -v deprecated
import logging, jax
from transformers import BertConfig, CLIPConfig, FlaxBertModel, FlaxCLIPModel, FlaxResNetModel, ResNetConfig
compiles = []
class Count(logging.Handler):
    def emit(self, record):
        compiles.append("Compiling" in record.getMessage())
for name in ("jax._src.interpreters.pxla", "jax._src.dispatch"):
    logging.getLogger(name).addHandler(Count())
jax.config.update("jax_log_compiles", True)
w, size = 64, 64  # as train_tiny_clip and the demo's image size
models = {
    "tiny CLIP": lambda: FlaxCLIPModel(CLIPConfig(
        text_config=dict(vocab_size=300, hidden_size=w, intermediate_size=2 * w, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=32, bos_token_id=2, eos_token_id=299, pad_token_id=0),
        vision_config=dict(image_size=size, patch_size=8, hidden_size=w, intermediate_size=2 * w, num_hidden_layers=2,
                           num_attention_heads=4), projection_dim=w), seed=0),
    "tiny ResNet": lambda: FlaxResNetModel(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2],
                                                       layer_type="basic", downsample_in_first_stage=False),
                                           seed=0, input_shape=(1, size, size, 3)),
    "tiny BERT": lambda: FlaxBertModel(BertConfig(vocab_size=300, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                                                  intermediate_size=192, max_position_embeddings=32, pad_token_id=0), seed=0),
}
for name, build in models.items():
    compiles.clear()
    build()
    print(f"{name}: {sum(compiles)} programs compiled while constructing it (its eager init)")
PY
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
