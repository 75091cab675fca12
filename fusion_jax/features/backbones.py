"""Frozen backbones from Hugging Face Flax models, loaded with `from_pretrained` from a hub id or a folder.

`clip`: FlaxCLIPModel, projected image and text embeddings (512-d for ViT-B/32), optionally the two
towers' last hidden states as tokens (unprojected: the class token and the patches, the text's tokens).
`resnet`: FlaxResNetModel pooled features (512-d for ResNet-18), optionally its final grid as tokens,
with a separate text encoder (a FlaxBertModel-family model, mean pooled over the attention mask).
Batches are padded to a fixed size so that each encoder compiles once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from fusion_jax.data.dataset import DataUnavailableError
from fusion_jax.degrade import l2_normalize
from fusion_jax.features.preprocess import ImagePreprocessor, UnsupportedProcessor
from fusion_jax.files import sha256
from fusion_jax.fusion import masked_mean
from fusion_jax.host import on_host

log = logging.getLogger("fusion_jax")
# What the encoders below compute from a model's outputs (pooling, normalisation, token states). Bump it
# when a change here alters the features of an unchanged model: the cache keys then change, and no entry
# extracted by the old code is used. Version 1 is left out of the keys, which are older than it, so the
# caches and workdirs made before it stay valid.
EXTRACTOR_VERSION = 1


def _versioned(key: dict) -> dict:
    """A side's cache key with the extractor's version (none for version 1) and `matmul_key`."""
    return {**key, **({} if EXTRACTOR_VERSION == 1 else {"extractor": EXTRACTOR_VERSION}), **matmul_key()}


def matmul_key() -> dict:
    """The float32 matmul precision the encoders run at, where it is below full float32 (an NVIDIA GPU's
    default is TF32, ~1e-3 relative; a TPU's bfloat16 passes), so that such features are not reused where
    full precision is asked for, nor the other way round; {} on CPUs and at "highest" (or "float32"), the
    keys of every cache made before this was keyed."""
    setting = jax.config.jax_default_matmul_precision
    if jax.default_backend() == "cpu" or setting in ("highest", "float32"):
        return {}
    return {"matmul_precision": f"{jax.default_backend()}:{setting or 'default'}"}


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A loaded backbone: encode_images(uint8 images) and encode_texts(strings, max_length) -> arrays.

    Outputs: {"image": [b, d_v]} (+ "image_tokens" [b, T, d], "image_mask" [b, T] with tokens), and
    {"text": [b, d_t]} (+ "text_tokens", "text_mask"). `image_key` and `text_key` name what made each
    side's features (their cache keys: a new text model leaves the image features cached), `key`
    both (the provenance).
    """

    name: str
    image_key: dict
    text_key: dict
    encode_images: Callable[[Sequence[np.ndarray]], dict[str, np.ndarray]]
    encode_texts: Callable[[Sequence[str], int], dict[str, np.ndarray]]
    text_length: Callable[[Sequence[str]], int]

    @property
    def key(self) -> dict:
        return {**self.image_key, **self.text_key}


def _commit(net) -> str | None:
    """The hub commit a model was loaded at (None for a local folder): a hub model keyed by its id alone
    would reuse features after the hub's branch moved on."""
    return getattr(net.config, "_commit_hash", None)


def _missing(what: str, model: str, field: str, error: Exception) -> DataUnavailableError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if len(reason) > 200:
        reason = reason[:200].rsplit(" ", 1)[0] + " ..."
    if os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model):
        fix = f"--config.{field} must be a folder saved with save_pretrained, or a hub id"
    else:
        fix = (f"Give a local folder saved with save_pretrained (--config.{field}=DIR) or make the Hugging Face "
               "hub reachable (with HF_HUB_OFFLINE=1 a missing model fails at once instead of after retries)")
    return DataUnavailableError(f"cannot load the {what} {model!r} ({reason}). {fix}.")


def _check_kind(model: str, revision: str | None, what: str, field: str, kind: str | None) -> None:
    """Refuse a model of another kind than the field needs (transformers loads a CLIP folder as a random
    ResNet, say, with only a warning): `kind` its config's model_type, or None for a text encoder (a config
    with the vocabulary and positions at its top, which CLIP's and ResNet's have not)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as e:
        raise _missing(what, model, field, e) from e
    text = all(hasattr(config, a) for a in ("vocab_size", "max_position_embeddings"))
    if (config.model_type != kind) if kind else not text:
        raise DataUnavailableError(f"--config.{field}: {model!r} is a {config.model_type!r} model, not a {what}"
                                   + ("" if kind else " such as BERT or MiniLM"))


def _image_processor(model: str, revision: str | None, what: str, field: str) -> ImagePreprocessor:
    try:
        return ImagePreprocessor.from_pretrained(model, revision=revision)
    except UnsupportedProcessor as e:  # loaded, but not one this package mirrors: no loading advice
        raise DataUnavailableError(f"--config.{field}: {model!r} has an {e}") from e
    except (OSError, ValueError) as e:
        raise _missing(what, model, field, e) from e


def _load(cls, model: str, revision: str | None, weights: str) -> tuple:
    """(model, params) of cls.from_pretrained, for `weights` as `_weights` names them.

    Flax weights load without the random initialisation that from_pretrained otherwise runs op by
    op before overwriting every weight (seconds even for a tiny CLIP on a CPU). Weights the
    checkpoint lacks are initialised randomly by from_pretrained's own op-by-op init, run on the host
    (`on_host`): the bits from_pretrained gives them on the host CPU (a GPU's draw can differ in the
    last bit), and named in a warning. PyTorch weights take
    from_pretrained's own path, on the host too (its
    conversion reads the initialised model): from model.safetensors without torch where there is one,
    which transformers takes only when it is not asked for PyTorch weights (then it reads
    pytorch_model.bin first, which needs torch)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    if weights != "flax":
        with on_host():
            net = cls.from_pretrained(model, revision=revision, from_pt=weights == "pytorch")
        return net, net.params
    net, params = cls.from_pretrained(model, revision=revision, _do_init=False)
    flat = flatten_dict(params)
    missing = sorted(net.required_params - set(flat))
    if missing:
        log.warning("%s: %d weights missing from the checkpoint are initialised randomly: %s", model,
                    len(missing), ", ".join("/".join(k) for k in missing[:5]) + (", ..." if len(missing) > 5 else ""))
        with on_host():
            fresh = flatten_dict(net.init_weights(net.key, net.input_shape))
        params = unflatten_dict({**flat, **{k: fresh[k] for k in missing}})
    return net, params


def _weights(model: str, revision: str | None) -> str:
    """Which weights `model` (a folder or a hub id) has, in transformers' order: "flax" (msgpack, one
    file or shards, or a model.safetensors saved from Flax), "safetensors" (saved from PyTorch) or
    "pytorch" (anything else: from_pretrained then looks for pytorch_model.bin, or says what is missing).
    A model.safetensors that cannot be read (a git-LFS pointer, a cut download) is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open
    from transformers.utils import cached_file

    def path(name: str) -> str | None:
        if os.path.isdir(model):
            return os.path.join(model, name) if os.path.exists(os.path.join(model, name)) else None
        return cached_file(model, name, revision=revision, _raise_exceptions_for_missing_entries=False)

    try:
        if path("flax_model.msgpack") or path("flax_model.msgpack.index.json"):
            return "flax"
        tensors = path("model.safetensors")
        if tensors is None:
            return "pytorch"
        with safe_open(tensors, framework="np") as f:
            return "flax" if (f.metadata() or {}).get("format") == "flax" else "safetensors"
    except OSError:
        return "pytorch"
    except SafetensorError as e:
        raise ValueError(f"model.safetensors is not a safetensors file ({e}; a git-LFS pointer or a cut "
                         "download?)") from e


def _from_pretrained(cls, model: str, revision: str | None, what: str, field: str) -> tuple:
    """(model, params) from `_load`, reading PyTorch safetensors (no torch needed) when there are no Flax weights."""
    try:
        return _load(cls, model, revision, _weights(model, revision))
    except (OSError, ValueError) as e:
        raise _missing(what, model, field, e) from e


def load_flax_resnet(model: str, revision: str | None) -> tuple:
    """(FlaxResNetModel, params) from `model`, also from PyTorch-only checkpoints of basic-block ResNets.

    transformers' Flax basic block names its two convs `layer_0`/`layer_1` where the PyTorch
    checkpoint says `layer.0`/`layer.1`, so `from_pretrained(from_pt=True)` leaves every block of a
    ResNet-18/34 randomly initialised with only a warning (huggingface/transformers#39388, which
    names microsoft/resnet-18). The keys are renamed here and converted again.
    """
    import transformers
    from flax.traverse_util import flatten_dict
    from transformers import FlaxResNetModel
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
    from transformers.utils import cached_file

    field = "backbone.resnet.model"
    _check_kind(model, revision, "ResNet model", field, "resnet")
    try:
        weights = _weights(model, revision)
    except (OSError, ValueError) as e:
        raise _missing("ResNet model", model, field, e) from e
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the bug's warning lists every block key
    try:
        net, params = _load(FlaxResNetModel, model, revision, weights)
    except (OSError, ValueError) as e:
        raise _missing("ResNet model", model, field, e) from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    if weights == "flax":
        return net, params
    if any("layer_0" in "/".join(k) for k in flatten_dict(params)):  # basic blocks: the buggy mapping
        from safetensors.numpy import load_file

        try:
            path = cached_file(model, "model.safetensors", revision=revision)
        except OSError as e:
            raise _missing("ResNet safetensors weights (model.safetensors)", model, field, e) from e
        state = {re.sub(r"(\.layers\.\d+\.layer)\.(\d+)\.", r"\1.layer_\2.", k): v
                 for k, v in load_file(path).items()}
        params = convert_pytorch_state_dict_to_flax(state, net)
        missing = sorted(net.required_params - set(flatten_dict(params)))
        if missing:
            raise _missing("ResNet model", model, field, ValueError(
                f"{len(missing)} of its weights are not in model.safetensors, such as {'/'.join(missing[0])}"))
    return net, params


def _auto(kind: str, model: str, revision: str | None, what: str, field: str):
    import transformers

    try:
        return getattr(transformers, kind).from_pretrained(model, revision=revision)
    except (OSError, ValueError) as e:
        raise _missing(what, model, field, e) from e


def _describe(pre: ImagePreprocessor) -> dict:
    """The preprocessing's settings for a cache key (not its thread count, which leaves the pixels alone)."""
    settings = {k: v for k, v in dataclasses.asdict(pre).items() if k != "num_threads"}
    return json.loads(json.dumps(settings, default=str))


LOCAL_FOLDER = "<local folder>"


def model_key(model: str, field: str = "model") -> dict:
    """How a cache key names a model: a hub id as itself; a local folder by its files (names, sizes and the
    SHA-256 of their bytes, about a second per GB), not by its path or times, so a copied folder or a
    reinstalled package keeps its features and a retrained model gets new ones. Tools' own folders in it
    (`.cache`, where `hf download --local-dir` rewrites its metadata on every call, and `.git`) are left
    out."""
    if not os.path.isdir(model):
        return {field: model, f"{field}_files": None}
    h = hashlib.sha256()
    for root, dirs, files in os.walk(model, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in (".cache", ".git"))
        for f in sorted(files):
            path = os.path.join(root, f)
            h.update(f"{os.path.relpath(path, model)}:{os.path.getsize(path)}:{sha256(path)};".encode())
    return {field: LOCAL_FOLDER, f"{field}_files": h.hexdigest()[:20]}


def _on_devices(params, batch_size: int):
    """(params replicated over the local devices, a function that splits a batch over them).

    The batch axis is split only when batch_size divides evenly; otherwise batches stay whole."""
    mesh = Mesh(np.array(jax.local_devices()), ("batch",))
    split = batch_size % mesh.size == 0
    batch_sharding = NamedSharding(mesh, P("batch") if split else P())
    return jax.device_put(params, NamedSharding(mesh, P())), lambda x: jax.device_put(x, batch_sharding)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x


def _tokenizer_fns(tokenizer, batch_size: int, cap: int):
    def length(texts):
        """The longest caption's token count, at most the model's `cap`; captions cut there are counted."""
        lengths = [len(i) for i in tokenizer(list(texts), truncation=True, max_length=cap + 1)["input_ids"]]
        cut = sum(n > cap for n in lengths)
        if cut:
            log.warning("%d of %d captions are longer than the model's %d tokens and are cut there", cut,
                        len(lengths), cap)
        return min(max(lengths), cap)

    def tokenize(texts, max_length):
        t = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        return _pad(t["input_ids"].astype(np.int32), batch_size), _pad(t["attention_mask"].astype(np.int32), batch_size)

    return length, tokenize


def _encoders(image_fn, image_params, pre, text_fn, text_params, tokenize, batch_size: int, tokens: bool):
    """Host-side encode_images / encode_texts around jitted model functions: preprocess or tokenise,
    pad to the fixed batch, split it over the devices, and trim the padding from the outputs."""
    image_params, split = _on_devices(image_params, batch_size)
    text_params, _ = _on_devices(text_params, batch_size)

    def encode_images(images):
        n = len(images)
        out = {k: np.asarray(v)[:n] for k, v in image_fn(image_params, split(_pad(pre(images), batch_size))).items()}
        if tokens:
            out["image_mask"] = np.ones(out["image_tokens"].shape[:2], np.float32)
        return out

    def encode_texts(texts, max_length):
        ids, mask = tokenize(texts, max_length)
        return {k: np.asarray(v)[:len(texts)] for k, v in text_fn(text_params, split(ids), split(mask)).items()}

    return encode_images, encode_texts


def load_clip(model: str, revision: str | None, batch_size: int, tokens: bool) -> Backbone:
    """FlaxCLIPModel from `model` (hub id or folder), with its own image processor and tokenizer: the
    projected image and text embeddings, L2-normalised (with tokens, also the towers' last hidden states)."""
    from transformers import FlaxCLIPModel

    field = "backbone.clip.model"
    _check_kind(model, revision, "CLIP model", field, "clip")
    net, params = _from_pretrained(FlaxCLIPModel, model, revision, "CLIP model", field)
    pre = _image_processor(model, revision, "CLIP image processor", field)
    length, tokenize = _tokenizer_fns(_auto("AutoTokenizer", model, revision, "CLIP tokenizer", field), batch_size,
                                      net.config.text_config.max_position_embeddings)

    @jax.jit
    def image_fn(params, pixels):
        out = {"image": l2_normalize(net.get_image_features(pixels, params=params))}
        if tokens:  # the vision module takes channels last, as get_image_features hands it the pixels
            out["image_tokens"] = net.module.apply(
                {"params": params}, jnp.transpose(pixels, (0, 2, 3, 1)),
                method=lambda m, x: m.vision_model(pixel_values=x).last_hidden_state)
        return out

    @jax.jit
    def text_fn(params, ids, mask):
        out = {"text": l2_normalize(net.get_text_features(ids, mask, params=params))}
        if tokens:
            out["text_tokens"] = net.module.apply(
                {"params": params}, ids, mask,
                method=lambda m, i, a: m.text_model(input_ids=i, attention_mask=a,
                                                    position_ids=jnp.broadcast_to(jnp.arange(i.shape[1]), i.shape)
                                                    ).last_hidden_state)
            out["text_mask"] = mask
        return out

    encode_images, encode_texts = _encoders(image_fn, params, pre, text_fn, params, tokenize,
                                            batch_size, tokens)
    clip_key = {"kind": "clip", **model_key(model), "revision": revision, "commit": _commit(net), "tokens": tokens,
                "normalized": True}
    return Backbone("clip", _versioned({**clip_key, "preprocess": _describe(pre)}), _versioned(clip_key), encode_images,
                    encode_texts, length)


def load_resnet(model: str, text_model: str, revision: str | None, batch_size: int, tokens: bool) -> Backbone:
    """FlaxResNetModel pooled features plus a separate FlaxBertModel-family text encoder, mean pooled."""
    from transformers import FlaxAutoModel

    net, params = load_flax_resnet(model, revision)
    pre = _image_processor(model, revision, "ResNet image processor", "backbone.resnet.model")
    _check_kind(text_model, None, "text encoder", "backbone.resnet.text_model", None)
    text_net, text_params = _from_pretrained(FlaxAutoModel, text_model, None, "text encoder",
                                             "backbone.resnet.text_model")
    length, tokenize = _tokenizer_fns(
        _auto("AutoTokenizer", text_model, None, "text tokenizer", "backbone.resnet.text_model"), batch_size,
        text_net.config.max_position_embeddings)

    @jax.jit
    def image_fn(params, pixels):
        out = net(pixels, params=params, train=False)
        result = {"image": out.pooler_output.reshape(out.pooler_output.shape[:2])}
        if tokens:
            h = out.last_hidden_state  # [b, c, h, w]
            result["image_tokens"] = h.reshape(h.shape[0], h.shape[1], -1).transpose(0, 2, 1)
        return result

    @jax.jit
    def text_fn(params, ids, mask):
        h = text_net(ids, attention_mask=mask, params=params, train=False).last_hidden_state
        out = {"text": masked_mean(h, mask)}
        if tokens:
            out["text_tokens"], out["text_mask"] = h, mask
        return out

    encode_images, encode_texts = _encoders(image_fn, params, pre, text_fn, text_params, tokenize,
                                            batch_size, tokens)
    image_key = {"kind": "resnet", **model_key(model), "revision": revision, "commit": _commit(net),
                 "preprocess": _describe(pre), "tokens": tokens}
    text_key = {"kind": "resnet", **model_key(text_model, "text_model"), "text_commit": _commit(text_net),
                "tokens": tokens}
    return Backbone("resnet", _versioned(image_key), _versioned(text_key), encode_images, encode_texts, length)
