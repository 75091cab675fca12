"""The stand-ins (features.standins): a Flickr8k-shaped folder and models that the paper's own configs
load and run end to end, as `python -m fusion_jax.features.standins` prints."""

import json
import os
import shlex
import shutil

import numpy as np
import pytest

from conftest import load_config
from fusion_jax.data.dataset import DataUnavailableError
from fusion_jax.data.embedded import generate_embedded
from fusion_jax.data.flickr8k import load_flickr8k_folder_with_stats
from fusion_jax.features import backbones, standins
from fusion_jax.sweep import train_and_evaluate


def test_standins_run_the_paper_configs_end_to_end(tmp_path, capsys, monkeypatch):
    assert standins.main(["--out", str(tmp_path), "--tiny", "--images", "24"]) == 0
    printed = capsys.readouterr().out
    # Each sweep on its own backbone's models, the one cache, its own workdir (the text encoder: a tiny stand-in).
    models = tmp_path / "models"
    backbone = {"clip": {"--config.backbone.clip.model": f"{models}/clip"},
                "resnet": {"--config.backbone.resnet.model": f"{models}/resnet",
                           "--config.backbone.resnet.text_model": f"{models}/text"}}
    lines = [shlex.split(line) for line in printed.splitlines() if line.startswith("  python -m fusion_jax.main")]
    assert [line[:4] for line in lines] == [["python", "-m", "fusion_jax.main", f"--config=configs/{name}.py"]
                                            for name in ("clip_sweep", "resnet_sweep", "noise_sweep")]
    for line, name, kind in zip(lines, ("clip_sweep", "resnet_sweep", "noise_sweep"), ("clip", "resnet", "clip")):
        assert dict(flag.split("=", 1) for flag in line[4:]) == {
            "--config.data.flickr8k_dir": f"{tmp_path}/flickr8k", "--config.cache_dir": f"{tmp_path}/cache",
            "--config.scales": "(64,128,)", **backbone[kind], "--workdir": f"{tmp_path}/results/{name}"}
    # 24 images give 240 pairs: the printed commands run at scales that fit (the paper's start at 2048).
    assert printed.count("--config.scales='(64,128,)'") == 3
    assert standins.fitting_scales(8091 * 5) is None

    ds, stats = load_flickr8k_folder_with_stats(str(tmp_path / "flickr8k"))
    assert (ds.name, ds.n_images, ds.n_captions) == ("flickr8k-standin", 24, 120)
    assert (stats.missing_image_captions, stats.malformed_lines, stats.uncaptioned_images) == (0, 0, 0)
    source = generate_embedded(n_images=24, seed=0, image_size=128)
    assert ds.captions == source.captions
    np.testing.assert_array_equal(ds.caption_image, source.caption_image)
    assert ds.load_image(3).shape == (375, 500, 3)

    from fusion_jax.features.preprocess import ImagePreprocessor

    pre = ImagePreprocessor.from_pretrained(str(models / "resnet"), num_threads=1)  # as resnet-18's: 256 -> 224
    assert (pre.shortest_edge, pre.crop_hw, pre.resample) == (int(32 / 0.875), (32, 32), 3)
    resnet = backbones.load_resnet(str(models / "resnet"), str(models / "text"), None, batch_size=8, tokens=False)
    images = resnet.encode_images([ds.load_image(i) for i in range(3)])["image"]
    texts = resnet.encode_texts(list(ds.captions[:5]), 16)["text"]
    assert images.shape == (3, 32) and texts.shape == (5, 32)
    # With tokens: the image's states [n, h * w, channels] and the text's [n, length, width], whose means
    # (over the image's positions, over the caption's real tokens) are the pooled features. A ResNet of
    # 64-pixel inputs ends on 2 x 2 positions (the stand-in's 32 on one, where any order would do).
    wider = standins.write_resnet(str(tmp_path / "resnet64"), {**standins.SIZES["tiny"], "image_size": 64})
    with_tokens = backbones.load_resnet(wider, str(models / "text"), None, batch_size=8, tokens=True)
    image_out = with_tokens.encode_images([ds.load_image(i) for i in range(3)])
    text_out = with_tokens.encode_texts(list(ds.captions[:5]), 16)
    assert image_out["image_tokens"].shape == (3, 4, 32) and text_out["text_tokens"].shape == (5, 16, 32)
    np.testing.assert_allclose(image_out["image_tokens"].mean(1), image_out["image"], atol=1e-5)
    mask = text_out["text_mask"][..., None]
    np.testing.assert_allclose((text_out["text_tokens"] * mask).sum(1) / mask.sum(1), texts, atol=1e-5)
    # Each side's cache key names only its own model: another text encoder leaves the image features cached.
    assert "text_model" not in resnet.image_key and "preprocess" not in resnet.text_key and "model" not in resnet.text_key
    for key, field, folder in ((resnet.image_key, "model", "resnet"), (resnet.text_key, "text_model", "text")):
        assert {k: key[k] for k in (field, f"{field}_files")} == backbones.model_key(str(models / folder), field)
    assert resnet.image_key["commit"] is None  # a local folder (a hub model records the commit it was loaded at)
    # The keys' fields as the caches made so far have them (a new field would orphan every entry).
    assert set(resnet.image_key) == {"kind", "model", "model_files", "revision", "commit", "preprocess", "tokens"}
    assert set(resnet.text_key) == {"kind", "text_model", "text_model_files", "text_commit", "tokens"}
    with monkeypatch.context() as m:
        m.setattr(backbones, "EXTRACTOR_VERSION", 2)
        m.setattr(backbones, "_commit", lambda net: type(net).__name__)  # as a hub model's commit: each its own
        bumped = backbones.load_resnet(str(models / "resnet"), str(models / "text"), None, batch_size=8, tokens=False)
    text_commit = bumped.text_key["text_commit"]
    assert text_commit not in (None, "FlaxResNetModel")
    assert bumped.image_key == {**resnet.image_key, "extractor": 2, "commit": "FlaxResNetModel"}
    assert bumped.text_key == {**resnet.text_key, "extractor": 2, "text_commit": text_commit}
    assert np.isfinite(images).all() and np.isfinite(texts).all()

    # A model of another kind is refused, naming the field (transformers would load a CLIP folder as a random
    # ResNet-50 with a warning); so is a folder without its image processor.
    clip, resnet_dir, text = (str(models / n) for n in ("clip", "resnet", "text"))
    for load, field, message in (
            (lambda: backbones.load_resnet(clip, text, None, 8, False), "resnet.model", "'clip' model, not a ResNet"),
            (lambda: backbones.load_resnet(resnet_dir, clip, None, 8, False), "resnet.text_model",
             "'clip' model, not a text encoder such as BERT"),
            (lambda: backbones.load_resnet(resnet_dir, resnet_dir, None, 8, False), "resnet.text_model", "'resnet'"),
            (lambda: backbones.load_clip(resnet_dir, None, 8, False), "clip.model", "'resnet' model, not a CLIP"),
            (lambda: backbones.load_clip(text, None, 8, False), "clip.model", "'bert' model, not a CLIP model")):
        with pytest.raises(DataUnavailableError, match=f"--config.backbone.{field}: .*{message}"):
            load()
    shutil.copytree(clip, tmp_path / "no_processor")
    os.remove(tmp_path / "no_processor" / "preprocessor_config.json")
    with pytest.raises(DataUnavailableError, match="cannot load the CLIP image processor .*backbone.clip.model"):
        backbones.load_clip(str(tmp_path / "no_processor"), None, 8, False)

    config = load_config("clip_sweep")
    config.data.flickr8k_dir = str(tmp_path / "flickr8k")
    config.backbone.clip.model = str(models / "clip")
    config.cache_dir = str(tmp_path / "cache")
    config.scales, config.seeds, config.train.epochs, config.tsne_pairs = (64,), (42,), 1, 100
    results = train_and_evaluate(config, str(tmp_path / "results"))
    assert [(r["method"], r["scale"]) for r in results["runs"]] == [("concat", 64), ("cross", 64)]
    assert all(np.isfinite(r["metrics"]["accuracy"]) for r in results["runs"])
    # Labelled as a stand-in, never as Flickr8k: the paper's rows stay in their own block.
    assert results["backbones"]["clip"]["dataset"] == "flickr8k-standin"
    table1 = (tmp_path / "results" / "table1.md").read_text()
    assert "| stand-in (not Flickr8k) | clip | 64 |" in table1 and "For reference only" in table1
    assert "| **paper** |" not in table1
    assert "Features: a stand-in folder" in (tmp_path / "results" / "summary.md").read_text()


def test_the_writer_never_overwrites_a_model_it_did_not_write(tmp_path):
    (tmp_path / "models" / "resnet").mkdir(parents=True)
    (tmp_path / "models" / "resnet" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"models/resnet' holds files but no fusion_jax_standin.json"):
        standins.write_standins(str(tmp_path), n_images=8, tiny=True)
    assert sorted(os.listdir(tmp_path)) == ["models"] and os.listdir(tmp_path / "models") == ["resnet"]


@pytest.mark.parametrize("out, problem", [("", "is empty (an unset variable?): give a folder"),
                                          ("a_file", "is a file, not a folder")])
def test_an_out_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch, out, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as e:
        standins.main(["--out", out, "--tiny"])
    assert e.value.code == 2 and f"error: --out: {out!r} {problem}" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing written (an empty --out was the current folder)


def test_the_paper_sized_standins_are_vit_b32_resnet18_and_minilm():
    """The stand-ins time a reproduction only if they have the real models' sizes: CLIP's as transformers'
    defaults (documented as openai/clip-vit-base-patch32's), ResNet-18's 11,176,512 weights without its
    classifier (torchvision's resnet18 has 11,689,512 with its 513,000), the shipped MiniLM's config."""
    import jax
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, FlaxResNetModel

    from fusion_jax.features.embedded_models import pretrained_minilm, resnet18_config

    paper = standins.SIZES["paper"]
    for ours, reference in ((paper["clip_text"], CLIPTextConfig()), (paper["clip_vision"], CLIPVisionConfig())):
        assert ours == {k: getattr(reference, k) for k in ours}
    assert paper["projection_dim"] == CLIPConfig().projection_dim and paper["image_size"] == 224
    resnet = FlaxResNetModel(resnet18_config(paper["resnet_widths"]), _do_init=False)
    shapes = jax.eval_shape(lambda key: resnet.init_weights(key, (1, 224, 224, 3)), jax.random.PRNGKey(0))
    assert sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"])) == 11_176_512
    with open(os.path.join(pretrained_minilm(), "config.json")) as f:
        minilm = json.load(f)
    assert paper["text"] == {k: minilm[k] for k in paper["text"]}


def test_a_refusal_exits_2_and_the_default_is_flickr8ks_8091_images(tmp_path, capsys, monkeypatch):
    (tmp_path / "models" / "clip").mkdir(parents=True)
    (tmp_path / "models" / "clip" / "config.json").write_text("{}")
    assert standins.main(["--out", str(tmp_path), "--tiny"]) == 2
    assert "error: " in capsys.readouterr().err and os.listdir(tmp_path) == ["models"]
    asked = []

    class Asked(Exception):
        pass

    def write_standins(out, n_images, tiny):
        asked.append((n_images, tiny))
        raise Asked  # what main asked for is all this test needs

    monkeypatch.setattr(standins, "write_standins", write_standins)
    for argv, expected in (([], (8091, False)), (["--tiny"], (48, True)), (["--images", "9"], (9, False)),
                           (["--images", str(standins.MIN_IMAGES)], (standins.MIN_IMAGES, False))):
        with pytest.raises(Asked):
            standins.main(["--out", str(tmp_path / "new"), *argv])
        assert asked.pop() == expected


def test_an_empty_model_folder_is_written_into(tmp_path, monkeypatch):
    """A models/<role> folder made by hand, empty, holds nothing to protect."""
    from fusion_jax.data.dataset import STANDIN_FILE

    for name in ("write_clip", "write_resnet", "write_text"):
        monkeypatch.setattr(standins, name, lambda *a, **k: "written")
    (tmp_path / "models" / "clip").mkdir(parents=True)
    paths, _ = standins.write_standins(str(tmp_path), n_images=8, tiny=True)
    assert paths["clip"] == "written" and (tmp_path / "models" / "clip" / STANDIN_FILE).exists()
