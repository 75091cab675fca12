"""The paper's Table 2: Gaussian noise on CLIP's image features, v' = normalize(v + N(0, sigma^2 I)).

The paper does not state the scale of its noise study; 16384 pairs (its largest) is our choice.
Needs Flickr8k and openai/clip-vit-base-patch32, as configs/clip_sweep.py.

    python -m fusion_jax.main --config=configs/noise_sweep.py --config.data.flickr8k_dir=/data/flickr8k
"""

import ml_collections

from fusion_jax.config_base import PAPER_NOISE, add_image_caption_data, base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = base_config("noise_sweep", "flickr8k")
    add_image_caption_data(config)
    config.backbones = ("clip",)
    config.scales = (16384,)
    config.degradation.levels = PAPER_NOISE
    if arg:
        raise ValueError(f"configs/noise_sweep.py takes no variant, got {arg!r}")
    return config
