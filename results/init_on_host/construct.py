"""How the HF Flax classes' op-by-op initialisation costs where it runs: build the demo's tiny CLIP,
ResNet and BERT (their sizes as `embedded_models`) on jax's default device, or inside `fusion_jax.host.on_host()`.
Prints, per model, the programs compiled while it is constructed and the wall time. Run each placement in
a fresh process (compiled eager ops are reused within one): python results/init_on_host/construct.py default|host
"""
import contextlib
import logging
import sys
import time

import jax
from transformers import BertConfig, CLIPConfig, FlaxBertModel, FlaxCLIPModel, FlaxResNetModel, ResNetConfig

from fusion_jax.host import on_host

place = sys.argv[1]
if place not in ("default", "host"):
    sys.exit("usage: construct.py default|host")
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
print(f"default device {jax.devices()[0]}, constructing {'inside on_host()' if place == 'host' else 'there'}")
for name, build in models.items():
    compiles.clear()
    start = time.perf_counter()
    with on_host() if place == "host" else contextlib.nullcontext():
        model = build()
        jax.block_until_ready(model.params)
    print(f"{name}: {sum(compiles)} programs compiled while constructing it (its eager init), "
          f"{time.perf_counter() - start:.2f} s, weights on {jax.tree.leaves(model.params)[0].devices()}")
