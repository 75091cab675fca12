"""The paper's unaligned setting: ResNet-18 image features + a separate text encoder (all-MiniLM-L6-v2).

Needs Flickr8k (--config.data.flickr8k_dir=DIR, or the hub), microsoft/resnet-18 and
sentence-transformers/all-MiniLM-L6-v2 (the hub, or --config.backbone.resnet.model=DIR and
--config.backbone.resnet.text_model=DIR).

    python -m fusion_jax.main --config=configs/resnet_sweep.py --config.data.flickr8k_dir=/data/flickr8k
"""

import ml_collections

from fusion_jax.config_base import add_image_caption_data, base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = base_config("resnet_sweep", "flickr8k")
    add_image_caption_data(config)
    config.backbones = ("resnet",)
    if arg:
        raise ValueError(f"configs/resnet_sweep.py takes no variant, got {arg!r}")
    return config
