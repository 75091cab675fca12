"""The paper's Table 1: CLIP ViT-B/32 features (pre-aligned) on Flickr8k, four scales, three seeds.

Needs Flickr8k (--config.data.flickr8k_dir=DIR in the classic layout, or the hub) and the model
openai/clip-vit-base-patch32 (the hub, or --config.backbone.clip.model=DIR).

    python -m fusion_jax.main --config=configs/clip_sweep.py --config.data.flickr8k_dir=/data/flickr8k
"""

import ml_collections

from fusion_jax.config_base import add_image_caption_data, base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = base_config("clip_sweep", "flickr8k")
    add_image_caption_data(config)
    config.backbones = ("clip",)
    if arg:
        raise ValueError(f"configs/clip_sweep.py takes no variant, got {arg!r}")
    return config
