"""Your own features through the paper's protocol: one .npz file per backbone (fusion_jax/data/npz.py).

Save each feature set with `np.savez(f"{DIR}/{name}.npz", image=..., text=..., caption_image=...)`:
image [n_images, d_v], text [n_captions, d_t] (or token features [n, tokens, d] with optional
image_mask / text_mask), caption_image [n_captions], the image row of each caption. Then

    python -m fusion_jax.main --config=configs/own_features.py --config.npz.dir=DIR \
        "--config.backbones=('name1','name2')" "--config.scales=(1024,2048)"

Both methods, the paper's 3 seeds, no noise; add the noise study with, for example,
"--config.degradation.levels=(0.0,0.1,0.3)" "--config.degradation.scales=(2048,)".
"""

import ml_collections

from fusion_jax.config_base import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = base_config("own_features", "npz")
    config.npz = ml_collections.ConfigDict(dict(dir=""))  # the folder of <backbone>.npz files
    config.backbones = ()  # file names in npz.dir without .npz: each file is one backbone
    if arg:
        raise ValueError(f"configs/own_features.py takes no variant, got {arg!r}")
    return config
