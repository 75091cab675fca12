"""The download-free main job: latent-variable features, aligned and unaligned, the full grid.

Both methods x 3 seeds x 3 scales x the paper's 6 noise levels, on an aligned and an unaligned
synthetic backbone (see fusion_jax/data/synthetic.py). Run it with

    python -m fusion_jax.main --config=configs/synthetic.py

and `--config=configs/synthetic.py:smoke` for a seconds-long version (what the tests run).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "synthetic"
    config.workdir = ""  # empty: results/<name>/

    # Features: a latent z per image, captions are perturbed copies of it, both modalities are
    # noisy views of their latent through a shared (aligned) or an independent (unaligned) map.
    config.features = "synthetic"
    config.backbones = ("aligned", "unaligned")  # or "alignment=A", 0 <= A <= 1
    config.synthetic = ml_collections.ConfigDict(dict(
        n_images=2000, captions_per_image=5, latent_dim=16, dim=128,
        caption_noise=0.6, view_noise=0.3, tokens=0, seed=0,
    ))

    # The grid: every (backbone, method, scale) is one compiled group of seeds x levels.
    config.methods = ("concat", "cross")
    config.scales = (1024, 2048, 4096)
    config.seeds = (42, 123, 456)
    config.pairs = ml_collections.ConfigDict(dict(split_seed=0, train_fraction=0.8))

    # The paper's noise study: v' = normalize(v + N(0, sigma^2 I)) on the image features.
    config.degradation = ml_collections.ConfigDict(dict(
        kind="gaussian", modality="image", levels=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
    ))

    # The paper's recipe (its learning rate is not legible; 1e-4 is this project's default).
    config.train = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, weight_decay=0.01, epochs=10, batch_size=32, dropout=0.1,
        eval_batch_size=1024,
    ))
    config.head = ml_collections.ConfigDict(dict(hidden=256, mlp_hidden=128, num_heads=4))
    config.checkpoint = ml_collections.ConfigDict(dict(keep=2))

    if arg == "smoke":
        config.name = "synthetic_smoke"
        config.synthetic.n_images = 200
        config.synthetic.dim = 32
        config.scales = (128, 256)
        config.seeds = (42, 123)
        config.degradation.levels = (0.0, 0.3)
        config.train.epochs = 2
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/synthetic.py; allowed: '' or 'smoke'")
    return config
