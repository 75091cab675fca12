"""The download-free main job: latent-variable features, aligned and unaligned, the full grid.

Both methods x 3 seeds x 3 scales x the paper's 6 noise levels, on an aligned and an unaligned
synthetic backbone (see fusion_jax/data/synthetic.py). Run it with

    python -m fusion_jax.main --config=configs/synthetic.py

and `--config=configs/synthetic.py:smoke` for a seconds-long version (what the tests run).
"""

import ml_collections

from fusion_jax.config_base import PAPER_NOISE, base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = base_config("synthetic", "synthetic")

    # Features: a latent z per image, captions are perturbed copies of it, both modalities are
    # noisy views of their latent through a shared (aligned) or an independent (unaligned) map.
    config.backbones = ("aligned", "unaligned")  # or "alignment=A", 0 <= A <= 1
    config.synthetic = ml_collections.ConfigDict(dict(
        n_images=2000, captions_per_image=5, latent_dim=16, dim=128,
        caption_noise=0.6, view_noise=0.3, tokens=0, seed=0,
    ))
    config.scales = (1024, 2048, 4096)
    config.degradation.levels = PAPER_NOISE

    if arg == "smoke":
        config.name = "synthetic_smoke"
        config.synthetic.n_images = 200
        config.synthetic.dim = 32
        config.scales = (128, 256)
        config.seeds = (42, 123)
        config.degradation.levels = (0.0, 0.3)
        config.train.epochs = 2
        config.tsne_pairs = 100
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/synthetic.py; allowed: '' or 'smoke'")
    return config
