"""Flax feature models vs their PyTorch originals, from the same tiny random weights (no network).

Each PyTorch model is saved with `save_pretrained` (safetensors) and loaded with
`Flax*.from_pretrained(dir, from_pt=True)`; the BERT one is loaded in a child process where torch
cannot be imported, which proves the safetensors conversion path needs no torch. Both sides compute
in float32 on the same inputs, so the only differences are summation order (<= 4e-6 here on
activations of size ~1-10): rtol=1e-4 with atol=1e-5 (for entries near zero) leaves over an order of
magnitude of headroom and still catches any wrong or missing weight.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

torch = pytest.importorskip("torch", reason="torch (dev extra) is needed for the PyTorch parity tests")
jax = pytest.importorskip("jax")
transformers = pytest.importorskip("transformers")

# Each from_pretrained(from_pt=True) first builds a randomly initialised Flax model op by op (one
# XLA compile per primitive, ~10 s for the tiny CLIP on 2 CPU cores): this module takes ~30 s.
TOL = dict(rtol=1e-4, atol=1e-5)


# Run in a fresh interpreter: with sys.modules["torch"] = None before transformers is imported,
# `import torch` raises and transformers sees torch as not installed, as on a torch-free machine.
NO_TORCH_BERT = """
import sys
sys.modules["torch"] = None
import json, jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls on a GPU too (not TF32)
from transformers import FlaxAutoModel
from transformers.utils import is_torch_available
from fusion_jax.features.backbones import _from_pretrained
assert not is_torch_available()
model, out_path = sys.argv[1], sys.argv[2]
ids, mask = np.array(json.loads(sys.argv[3])), np.array(json.loads(sys.argv[4]))
net, params = _from_pretrained(FlaxAutoModel, model, None, "text encoder", "backbone.resnet.text_model")
out = jax.jit(lambda p: net(input_ids=ids, attention_mask=mask, params=p))(params)
np.savez(out_path, last=np.asarray(out.last_hidden_state), pooled=np.asarray(out.pooler_output))
"""


def _np(x) -> np.ndarray:
    """A torch or jax array as numpy."""
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.fixture(autouse=True)
def _full_precision():
    """Full float32 matmuls/convs in JAX even on accelerators (no TF32/bf16 passes)."""
    with jax.default_matmul_precision("float32"):
        yield


def test_clip_flax_matches_torch(tmp_path):
    from transformers import CLIPConfig, CLIPModel, FlaxCLIPModel

    vocab = 100
    # CLIP pools the text at the EOS token: newer code finds `eos_token_id`, older code (and any
    # config with eos_token_id == 2) takes argmax(input_ids). The EOS below is the largest id and
    # the config's eos_token_id, so both rules pick the same position in torch and Flax.
    eos = vocab - 1
    text = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    text.update(max_position_embeddings=16, eos_token_id=eos, bos_token_id=vocab - 2, pad_token_id=1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=text, vision_config={**vision, "intermediate_size": 37}, projection_dim=16)
    torch.manual_seed(0)
    pt_model = CLIPModel(config).eval()
    pt_model.save_pretrained(tmp_path, safe_serialization=True)
    fx_model = FlaxCLIPModel.from_pretrained(str(tmp_path), from_pt=True)

    rng = np.random.default_rng(0)
    ids = rng.integers(2, vocab - 2, (3, 12))
    ids[:, 0] = vocab - 2
    lengths = [12, 7, 4]
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, n - 1], ids[row, n:], mask[row, :n] = eos, 1, 1
    pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)

    with torch.no_grad():
        pt_ids, pt_mask, pt_pix = torch.tensor(ids), torch.tensor(mask), torch.tensor(pixels)
        pt_out = pt_model(input_ids=pt_ids, attention_mask=pt_mask, pixel_values=pt_pix)
        pt_img = pt_model.get_image_features(pixel_values=pt_pix)
        pt_txt = pt_model.get_text_features(input_ids=pt_ids, attention_mask=pt_mask)
    # One jitted program: op-by-op (eager) Flax calls would compile every primitive separately.
    @jax.jit
    def flax_outputs(params, ids, mask, pixels):
        out = fx_model(input_ids=ids, attention_mask=mask, pixel_values=pixels, params=params)
        img = fx_model.get_image_features(pixel_values=pixels, params=params)
        return out, img, fx_model.get_text_features(input_ids=ids, attention_mask=mask, params=params)

    fx_out, fx_img, fx_txt = flax_outputs(fx_model.params, ids, mask, pixels)

    assert fx_img.shape == (2, 16) and fx_txt.shape == (3, 16)
    np.testing.assert_allclose(_np(fx_img), _np(pt_img), **TOL)
    np.testing.assert_allclose(_np(fx_txt), _np(pt_txt), **TOL)
    for name in ("vision_model_output", "text_model_output"):
        for field in ("last_hidden_state", "pooler_output"):
            fx, pt = getattr(fx_out, name)[field], getattr(pt_out, name)[field]
            np.testing.assert_allclose(_np(fx), _np(pt), **TOL, err_msg=f"{name}.{field}")
    np.testing.assert_allclose(_np(fx_out.logits_per_image), _np(pt_out.logits_per_image), **TOL)


def _load_flax_resnet(path):
    """The package's loader (with its basic-block key fix), and the plain from_pt load it replaces."""
    from transformers import FlaxResNetModel

    from fusion_jax.features.backbones import load_flax_resnet

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        plain = FlaxResNetModel.from_pretrained(str(path), from_pt=True).params
    finally:
        transformers.logging.set_verbosity(verbosity)
    return load_flax_resnet(str(path), None), plain


def test_resnet_flax_matches_torch_in_eval_mode(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 2, 1, 1], layer_type="basic")
    torch.manual_seed(0)
    pt_model = ResNetModel(config)
    # Fresh batch norms are identities (mean 0, var 1, weight 1, bias 0): perturb them so a wrong
    # mapping of the running statistics or affine terms into Flax's batch_stats would show.
    with torch.no_grad():
        for module in pt_model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    pt_model.eval().save_pretrained(tmp_path, safe_serialization=True)
    (fx_model, fx_params), plain_params = _load_flax_resnet(tmp_path)

    pixels = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        pt_out = pt_model(torch.tensor(pixels))
    forward = jax.jit(lambda params, x: fx_model(x, params=params, train=False))
    fx_out = forward(fx_params, pixels)
    assert fx_out.last_hidden_state.shape == (2, 64, 2, 2) and fx_out.pooler_output.shape == (2, 64, 1, 1)
    np.testing.assert_allclose(_np(fx_out.last_hidden_state), _np(pt_out.last_hidden_state), **TOL)
    np.testing.assert_allclose(_np(fx_out.pooler_output), _np(pt_out.pooler_output), **TOL)
    if plain_params is not None:  # the unpatched load really is wrong (not just differently named)
        plain = forward(plain_params, pixels).pooler_output
        assert np.abs(_np(plain) - _np(pt_out.pooler_output)).max() > 1e-2
    # A checkpoint without one of the weights stops the load rather than leaving it out.
    from safetensors.numpy import load_file, save_file

    from fusion_jax.data.dataset import DataUnavailableError
    from fusion_jax.features.backbones import load_flax_resnet

    state = load_file(tmp_path / "model.safetensors")
    del state[next(k for k in state if k.endswith("layer.0.convolution.weight"))]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DataUnavailableError, match="1 of its weights are not in model.safetensors"):
        load_flax_resnet(str(tmp_path), None)


def _offline_hub_copy(cache: str, repo_id: str, folder: str) -> None:
    """`folder` as the hub's cache holds a download of `repo_id`, every file the loader asks for
    and the folder lacks marked as absent (what huggingface_hub records after a lookup)."""
    import shutil

    commit = "0" * 40
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(folder, os.path.join(repo, "snapshots", commit))
    absent = os.path.join(repo, ".no_exist", commit)
    os.makedirs(absent)
    for name in ("flax_model.msgpack", "flax_model.msgpack.index.json", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json", "generation_config.json", "adapter_config.json",
                 "custom_generate/generate.py"):
        os.makedirs(os.path.dirname(os.path.join(absent, name)), exist_ok=True)
        open(os.path.join(absent, name), "w").close()


def test_bert_loads_from_torch_safetensors_without_torch(tmp_path):
    """A hub model with PyTorch weights in both formats loads from its safetensors in a process without torch."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    torch.manual_seed(0)
    pt_model = BertModel(config).eval()
    pt_model.save_pretrained(tmp_path / "model", safe_serialization=True)
    pt_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    shutil.copy(tmp_path / "bin" / "pytorch_model.bin", tmp_path / "model")  # which would need torch
    _offline_hub_copy(str(tmp_path / "hub"), "someone/bert", str(tmp_path / "model"))

    ids = np.random.default_rng(2).integers(0, 100, (2, 10))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    outputs = []
    for model, env in ((str(tmp_path / "model"), {}),
                       ("someone/bert", {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")})):
        outputs.append(tmp_path / f"flax_out{len(outputs)}.npz")
        args = [model, str(outputs[-1]), json.dumps(ids.tolist()), json.dumps(mask.tolist())]
        run = subprocess.run([sys.executable, "-c", NO_TORCH_BERT, *args], capture_output=True, text=True,
                             timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
    with torch.no_grad():
        pt_out = pt_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    for path in outputs:
        fx_out = np.load(path)
        np.testing.assert_allclose(fx_out["last"], _np(pt_out.last_hidden_state), **TOL)
        np.testing.assert_allclose(fx_out["pooled"], _np(pt_out.pooler_output), **TOL)
