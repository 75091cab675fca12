"""Your own features (config.features = "npz"): a sweep on .npz files, and clear errors for bad ones."""

import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import ROOT, load_config
from fusion_jax.data.dataset import DataUnavailableError
from fusion_jax.data.npz import load
from fusion_jax.data.pairs import PAIRS
from fusion_jax.sweep import train_and_evaluate
from fusion_jax.validate import ConfigError


def _features(n_images=150, captions=3, d=16, seed=0, tokens=0):
    """Aligned features: image and captions noisy views of one latent through one map."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_images, 8))
    caption_image = np.repeat(np.arange(n_images), captions)
    w = rng.standard_normal((8, d))
    image, text = z @ w, z[caption_image] @ w + 0.3 * rng.standard_normal((len(caption_image), d))
    if tokens:
        image = image[:, None, :] + 0.1 * rng.standard_normal((n_images, tokens, d))
    return {"image": image.astype(np.float32), "text": text.astype(np.float32), "caption_image": caption_image}


def _config(folder, backbones=("mine",)):
    config = load_config("own_features")
    config.npz.dir = str(folder)
    config.backbones = backbones
    config.scales = (128, 256)
    config.seeds = (42, 123)
    config.train.epochs = 2
    config.tsne_pairs = 100
    return config


def test_token_features_with_masks_load_as_token_features(tmp_path):
    f = _features(tokens=4)
    f["image_mask"] = np.ones(f["image"].shape[:2], np.int8)
    np.savez(tmp_path / "tok.npz", **f)
    fs = load(str(tmp_path / "tok.npz"))
    assert fs.image.shape == (150, 4, 16) and fs.image_mask.dtype == np.float32 and fs.text_mask is None
    assert fs.provenance["tokens"] and fs.caption_image.dtype == np.int32
    # Read-only: groups of every backbone share these arrays (a write would reach another group's runs).
    assert not any(a.flags.writeable for a in (fs.image, fs.text, fs.image_mask))


def test_padding_may_hold_anything_and_loads_as_zeros(tmp_path):
    """Masked slots are never read: NaN, Inf or huge values there load as 0, on either side; a real
    token's NaN is refused."""
    f = _features(tokens=4)
    f["text"] = np.repeat(f["text"][:, None], 3, 1)
    real = {}
    for side, tokens in (("image", 4), ("text", 3)):
        f[f"{side}_mask"] = np.ones(f[side].shape[:2], np.int8)
        f[f"{side}_mask"][3:, tokens // 2:] = 0
        real[side] = f[side].copy()
        f[side][3:, tokens // 2:] = np.float32(np.nan)
        f[side][5, -1], f[side][6, -1] = np.inf, 1e30
    np.savez(tmp_path / "pad.npz", **f)
    fs = load(str(tmp_path / "pad.npz"))
    np.testing.assert_array_equal(fs.image, np.where(f["image_mask"][..., None] > 0, real["image"], 0))
    np.testing.assert_array_equal(fs.text, np.where(f["text_mask"][..., None] > 0, real["text"], 0))
    f["image"][4, 1] = np.nan  # a real token
    np.savez(tmp_path / "pad.npz", **f)
    with pytest.raises(DataUnavailableError, match=r"image holds NaN or Inf \(as float32\) in rows \[4\]"):
        load(str(tmp_path / "pad.npz"))


def test_nonfinite_rows_are_found_across_blocks():
    """The finiteness check reads the features a block of rows at a time: rows at block edges are found."""
    from fusion_jax.data.npz import _nonfinite_rows

    x = np.ones((10, 3, 2), np.float32)
    x[[0, 3, 4, 9], [0, 2, 1, 2], [1, 0, 1, 1]] = [np.nan, np.inf, -np.inf, np.nan]
    for block_bytes in (1, x[:1].nbytes, 4 * x[:1].nbytes, 64 << 20):  # 1 row (at least), 1, 4 and all rows
        np.testing.assert_array_equal(_nonfinite_rows(x, block_bytes), [0, 3, 4, 9])
    assert _nonfinite_rows(x[:0]).size == 0 and _nonfinite_rows(np.ones((3, 2), np.float32)).size == 0


BAD = [
    (lambda f: f.pop("caption_image"), "missing array(s) caption_image"),
    (lambda f: f.update(labels=np.zeros(3)), "unknown array(s) labels"),
    (lambda f: f.update(image=(10 * f["image"]).astype(np.int32)), "image has dtype int32; expected floating point"),
    (lambda f: f.update(caption_image=f["caption_image"] + 1), "indices from 1 to 150, outside [0, 150)"),
    (lambda f: f.update(caption_image=f["caption_image"] - 1), "indices from -1 to 148, outside [0, 150)"),
    (lambda f: f.update(image=np.ascontiguousarray(f["image"].T)),
     "outside [0, 16): the rows of image, shape (16, 150) (one row per image; is image transposed?)"),
    (lambda f: f.update(caption_image=f["caption_image"].astype(np.float32)), "expected integers"),
    (lambda f: f.update(caption_image=f["caption_image"].astype("timedelta64[s]")), "dtype timedelta64[s]; expected int"),
    (lambda f: f.update(caption_image=f["caption_image"].astype(object)),
     "caption_image is an array of Python objects, which only pickle reads (not loaded, as it could run code): save it "
     "as integers"),
    (lambda f: f.update(image=np.repeat(f["image"][:, None], 2, 1), image_mask=np.ones((150, 2)).astype(object)),
     "image_mask is an array of Python objects, which only pickle reads (not loaded, as it could run code): save it "
     "as numbers 0 and 1"),
    (lambda f: f.update(text_mask=np.ones((450, 2))), "text_mask is given, but text is not token features"),
    (lambda f: f.update(image=np.repeat(f["image"][:, None], 2, 1), image_mask=np.full((150, 2), 0.5)),
     "image_mask must hold 0 and 1 only"),
    (lambda f: f.update(text=np.repeat(f["text"][:, None], 2, 1), text_mask=np.full((450, 2), np.nan)),
     "text_mask must hold 0 and 1 only"),
    (lambda f: f.update(image=np.repeat(f["image"][:, None], 2, 1), image_mask=np.where(np.eye(150, 2) > 0, 0.5, 1)),
     "image_mask must hold 0 and 1 only"),  # a few values off among 0s and 1s
    (lambda f: f.update(text=f["text"][:10]), "text has 10 rows but caption_image has shape (450,): one image row per caption"),
    (lambda f: f["text"].__setitem__((7, 3), np.nan), "text holds NaN or Inf (as float32) in rows [7]"),
    (lambda f: f.update(image=f["image"].astype(np.float64) * 1e300), "image holds NaN or Inf (as float32)"),
    (lambda f: f.update(text=f["text"] * -1e20), "text reaches |x| = "),  # finite, but its squares are not
    (lambda f: f.update(image=-np.abs(f["image"]) * 1e20), "image reaches |x| = "),  # huge below zero alone
    (lambda f: f.update(image=np.repeat(f["image"][:, None], 2, 1), image_mask=np.eye(150, 2)),
     "image_mask has rows with no real token (rows [2, 3, 4, 5, 6])"),
    (lambda f: f.update(image=f["image"][:, :0]), "image has shape (150, 0): it needs rows, and features of at"),
    (lambda f: f.update(text=f["text"][:0], caption_image=f["caption_image"][:0]), "text has shape (0, 16): it needs"),
    (lambda f: f.update(image=np.float32(1)), "image has shape (); expected [n, d] (pooled) or [n, tokens, d]"),
    (lambda f: f.update(text=f["text"][:, 0]), "text has shape (450,); expected [n, d] (pooled) or [n, tokens, d]"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(";")[0][:30] for _, m in BAD])
def test_a_bad_file_is_named_with_what_is_wrong(tmp_path, change, message):
    f = _features()
    change(f)
    np.savez(tmp_path / "bad.npz", **f)
    with pytest.raises(DataUnavailableError) as e:
        load(str(tmp_path / "bad.npz"))
    assert str(e.value).startswith(f"features file {tmp_path / 'bad.npz'}: ") and message in str(e.value)


@pytest.mark.parametrize("content,message", [
    (b"not a zip", "cannot be read as .npz: it is not a zip archive of arrays as np.savez writes (it begins b'not a '"),
    (b"", "cannot be read as .npz: it is not a zip archive of arrays as np.savez writes (it is empty)"),
    (b"PK\x03\x04broken", "cannot be read as .npz ("), (None, "holds one array")])
def test_not_an_npz_file(tmp_path, content, message):
    """Files that np.load cannot read as np.savez writes them: one line naming the file, never a traceback."""
    path = tmp_path / "broken.npz"
    if content is None:
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(DataUnavailableError, match=re.escape(message)):
        load(str(path))


def test_a_zip_of_other_files_is_not_npz(tmp_path):
    path = tmp_path / "zipped.npz"
    with zipfile.ZipFile(path, "w") as z:
        for name in ("image", "text", "caption_image"):
            z.writestr(f"{name}.npy", b"not an array")
    with pytest.raises(DataUnavailableError, match=re.escape("array(s) caption_image, image, text: not .npy data")):
        load(str(path))


def test_a_damaged_array_is_named(tmp_path):
    """A member of the archive whose .npy header is damaged: the error names the array, not only numpy's words."""
    np.savez(tmp_path / "good.npz", **_features())
    with zipfile.ZipFile(tmp_path / "good.npz") as z, zipfile.ZipFile(tmp_path / "bad.npz", "w") as w:
        for name in z.namelist():
            data = z.read(name)
            w.writestr(name, data[:6] + b"\x20\x67" + data[8:] if name == "text.npy" else data)  # format version
    with pytest.raises(DataUnavailableError, match=r"bad.npz: array text cannot be read \(ValueError: .*format version"):
        load(str(tmp_path / "bad.npz"))


def test_config_errors_name_the_field_and_the_files_there(tmp_path):
    np.savez(tmp_path / "a.npz", **_features())
    np.savez(tmp_path / "b.npz", **_features(seed=1))
    with pytest.raises(ConfigError, match=r"config.backbones: no features file .*'c'; npz.dir holds: a, b"):
        train_and_evaluate(_config(tmp_path, ("a", "c")), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="config.npz.dir: is empty; features 'npz' needs the folder"):
        train_and_evaluate(_config("", ("a",)), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="config.npz.dir: '.*nowhere' is not a folder"):
        train_and_evaluate(_config(tmp_path / "nowhere", ("a",)), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="without its .npz ending"):
        train_and_evaluate(_config(tmp_path, ("a.npz",)), str(tmp_path / "out"))
    (tmp_path / "gone.npz").symlink_to(tmp_path / "elsewhere" / "gone.npz")
    with pytest.raises(ConfigError, match=r"config.backbones: '.*gone.npz' \(backbone 'gone'\) is a link to "
                                          r"'.*elsewhere/gone.npz', which does not exist"):
        train_and_evaluate(_config(tmp_path, ("gone",)), str(tmp_path / "out"))
    (tmp_path / "gone.npz").unlink()
    (tmp_path / "gone.npz").symlink_to("gone.npz")  # relative, to itself
    with pytest.raises(ConfigError, match=r"is a link to '.*/gone.npz', which cannot be followed \(a loop of links\?\)"):
        train_and_evaluate(_config(tmp_path, ("gone",)), str(tmp_path / "out"))
    (tmp_path / "gone.npz").unlink()
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(ConfigError, match=r"config.backbones: '.*d.npz' \(backbone 'd'\) is a folder, not a file"):
        train_and_evaluate(_config(tmp_path, ("d",)), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"config.backbones: no features file .*'c'; npz.dir holds: a, b$"):
        train_and_evaluate(_config(tmp_path, ("c",)), str(tmp_path / "out"))  # a folder is not a backbone
    np.savez(tmp_path / "clip l14.npz", **_features())  # would share group names with clip_l14
    with pytest.raises(ConfigError, match=r"backbone 'clip l14': a file name of letters, digits and _ . = - only"):
        train_and_evaluate(_config(tmp_path, ("clip l14",)), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"config.backbones: must not be empty; npz.dir holds: .*clip l14"):
        train_and_evaluate(_config(tmp_path, ()), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"several names must be a quoted tuple of strings"):
        train_and_evaluate(_config(tmp_path, ("(a,b)",)), str(tmp_path / "out"))  # --config.backbones=(a,b)
    one_image = {**_features(), "caption_image": np.zeros(450, np.int64)}
    np.savez(tmp_path / "one.npz", **one_image)
    with pytest.raises(ConfigError, match=r"config.scales: backbone 'one' makes no pairs: .* at least 2 images are "
                                          r"needed \(450 captions of 1 image\(s\), 150 images\)"):
        train_and_evaluate(_config(tmp_path, ("one",)), str(tmp_path / "out"))
    synthetic = load_config("synthetic", "smoke")
    synthetic.features = "npz"
    with pytest.raises(ConfigError, match="config.npz.dir: features 'npz' needs the field npz.dir"):
        train_and_evaluate(synthetic, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_command_line_says_a_bad_file_in_one_line(tmp_path):
    f = _features()
    f.pop("text")
    np.savez(tmp_path / "mine.npz", **f)
    out = subprocess.run([sys.executable, "-m", "fusion_jax.main", "--config=configs/own_features.py",
                          f"--config.npz.dir={tmp_path}", "--config.backbones=('mine',)",
                          f"--workdir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"fusion_jax: error: features file {tmp_path / 'mine.npz'}: missing array(s) text; "
        "it needs image, text, caption_image (it holds caption_image, image)")


def _tiny_npz_sweep(tmp_path, epochs: int = 1):
    (tmp_path / "a").mkdir()
    np.savez(tmp_path / "a" / "mine.npz", **_features())
    config = _config(tmp_path / "a")
    config.scales, config.seeds, config.train.epochs = (128,), (42,), epochs
    return config


def test_a_changed_file_is_refused_by_its_workdir_and_a_moved_one_is_not(tmp_path, caplog):
    """The workdir records each file's SHA-256 (features.json): a regenerated file cannot mix with the
    groups trained on the old one; the same file in another folder resumes the sweep."""
    import logging
    import shutil

    caplog.set_level(logging.INFO, logger="fusion_jax")
    config = _tiny_npz_sweep(tmp_path)
    first = train_and_evaluate(config, str(tmp_path / "out"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    config.npz.dir = str(tmp_path / "b")
    again = train_and_evaluate(config, str(tmp_path / "out"))
    assert "0 groups to train (2 finished, kept)" in caplog.text and again["runs"] == first["runs"]
    # A rerun that trains nothing says so, and names the process that trained the runs, passed on by a second rerun.
    assert again["timing"]["groups_trained"] == 0 and again["timing"]["trained_by"] == {"command": None, **first["timing"]}
    third = train_and_evaluate(config, str(tmp_path / "out"), command="python -m fusion_jax.main --again")
    assert third["timing"]["trained_by"] == again["timing"]["trained_by"] and third["command"].endswith("--again")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert re.search(r"Made by `python -m fusion_jax.main --again` .*, in \d+ s by the process that wrote it \(0 of 2 "
                     r"groups trained there\); the last process that trained any, `fusion_jax.sweep.train_and_evaluate`, "
                     rf"took {first['timing']['seconds']:.0f} s \(2 of 2 trained there\)\.", summary), summary[:600]
    np.savez(tmp_path / "b" / "mine.npz", **_features(seed=1))
    with pytest.raises(ConfigError, match=r"config.workdir: .* holds a sweep begun on other features "
                                          r"\(differs in mine.sha256\)"):
        train_and_evaluate(config, str(tmp_path / "out"))


def test_images_with_different_numbers_of_captions_claim_the_pair_draw(tmp_path):
    """The sweep records how it drew the negatives' images (results.json, the workdir's claim); a start made
    before the draw balanced them (no claim of it) is refused, not resumed with other pairs."""
    import json

    f = _features()
    keep = np.flatnonzero(np.arange(450) % 3 <= f["caption_image"] % 3)  # 1, 2 or 3 captions an image
    f.update(text=f["text"][keep], caption_image=f["caption_image"][keep])
    np.savez(tmp_path / "mine.npz", **f)
    config = _config(tmp_path)
    config.scales, config.seeds, config.train.epochs, config.tsne_pairs = (128,), (42,), 1, 0
    results = train_and_evaluate(config, str(tmp_path / "out"))
    assert results["backbones"]["mine"]["pairs"] == PAIRS
    claim = json.loads((tmp_path / "out" / "features.json").read_text())
    assert claim["mine"].pop("pairs") == PAIRS
    (tmp_path / "out" / "features.json").write_text(json.dumps(claim))  # as a start before the claim wrote it
    with pytest.raises(ConfigError, match=r"differs in mine.pairs\); its pairs were drawn by an earlier"):
        train_and_evaluate(config, str(tmp_path / "out"))


def test_save_then_load_gives_the_same_features(tmp_path):
    """npz.save writes any FeatureSet (here synthetic token features with masks) that load reads back."""
    from fusion_jax.data import synthetic
    from fusion_jax.data.npz import save

    fs = synthetic.generate("aligned", 30, 2, 4, 8, 0.5, 0.2, seed=0, tokens=3)
    path = tmp_path / "new" / "aligned.npz"  # its folder made
    save(str(path), fs)
    back = load(str(path))
    for name in ("image", "text", "caption_image", "image_mask", "text_mask"):
        np.testing.assert_array_equal(getattr(back, name), getattr(fs, name))
    assert back.provenance["tokens"] and path.stat().st_mode & 0o777 == 0o644


def test_a_sweep_on_your_own_features_equals_the_sweep_on_their_source(tmp_path):
    """Synthetic features saved with npz.save (named as their backbone) train to the same bits as the
    synthetic source itself: the npz source changes where features come from, nothing else."""
    from fusion_jax.data.npz import save
    from fusion_jax.data.sources import load_features

    source = load_config("synthetic", "smoke")
    source.backbones, source.scales, source.seeds, source.train.epochs = ("aligned",), (128,), (42,), 1
    source.degradation.levels = (0.0, 0.3)
    save(str(tmp_path / "aligned.npz"), load_features(source, "aligned"))
    mine = _config(tmp_path, ("aligned",))
    mine.scales, mine.seeds, mine.train.epochs, mine.degradation.levels = (128,), (42,), 1, (0.0, 0.3)
    results = train_and_evaluate(mine, str(tmp_path / "npz"))
    strip = lambda runs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in runs]
    assert strip(results["runs"]) == strip(train_and_evaluate(source, str(tmp_path / "synthetic"))["runs"])
    prov = results["backbones"]["aligned"]
    assert prov["dataset"] == "npz" and prov["file"] == "aligned.npz" and len(prov["sha256"]) == 64
    assert (prov["n_images"], prov["n_captions"], prov["dim_image"], prov["tokens"]) == (200, 1000, 32, False)
    assert prov["alignment"]["recall@1"] > 5 * prov["alignment"]["chance@1"]  # measured on the file's features
    summary = (tmp_path / "npz" / "summary.md").read_text()
    assert "your features (.npz files in npz.dir" in summary and "- **aligned** (zero-shot recall@1" in summary


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_arrays_are_read_into_aligned_memory_once(tmp_path, save):
    """npz_array reads a member straight into 64-byte aligned memory (which a CPU's jax devices use in place),
    the same values as numpy's own reader; Fortran-ordered arrays take numpy's path. A file's features load
    with a peak of about their size: a loaded copy aligned after would double it."""
    import tracemalloc

    from fusion_jax.data.aligned import ALIGNMENT, npz_array

    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((300, 7), dtype=np.float32), "f64": rng.standard_normal(5),
              "i8": np.arange(11, dtype=">i8"), "empty": np.zeros((0, 4), np.float32),
              "fortran": np.asfortranarray(rng.standard_normal((6, 5)))}
    save(tmp_path / "a.npz", **arrays)
    with np.load(tmp_path / "a.npz") as z:
        for name, want in arrays.items():
            got = npz_array(z, name)
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name
            assert name in ("fortran", "empty") or got.ctypes.data % ALIGNMENT == 0, name

    text = rng.standard_normal((2000, 1000), dtype=np.float32)  # 8 MB
    np.savez(tmp_path / "mine.npz", image=text[:200], text=text, caption_image=np.repeat(np.arange(200), 10))
    tracemalloc.start()
    try:
        fs = load(str(tmp_path / "mine.npz"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fs.text.ctypes.data % ALIGNMENT == 0 and np.array_equal(fs.text, text)
    assert peak < 1.5 * (fs.text.nbytes + fs.image.nbytes), peak


def test_each_sides_dimension_is_recorded(tmp_path):
    from fusion_jax.data.sources import load_features

    f = _features()
    f["text"] = np.ascontiguousarray(f["text"][:, :8])
    np.savez(tmp_path / "mine.npz", **f)
    prov = load_features(_config(tmp_path), "mine").provenance
    assert (prov["dim_image"], prov["dim_text"]) == (16, 8) and prov["alignment"]["defined"] is False
    assert not {"tokens_image", "tokens_text"} & set(prov)  # pooled: Table 3 counts FLOPs on one slot a side


def test_caption_indices_beyond_int32_are_refused_not_wrapped(tmp_path):
    f = _features()
    f["caption_image"] = f["caption_image"].astype(np.int64)
    f["caption_image"][7] = 2**32 + 3  # int32 would read it as image 3
    np.savez(tmp_path / "wide.npz", **f)
    with pytest.raises(DataUnavailableError, match=r"indices from 0 to 4294967299, outside \[0, 150\)"):
        load(str(tmp_path / "wide.npz"))


def test_an_empty_backbone_name_is_refused_as_a_name(tmp_path):
    from fusion_jax.data import npz

    (tmp_path / ".npz").write_bytes(b"")  # a hidden file whose name is the ending alone
    with pytest.raises(ValueError, match="a file name of letters, digits"):
        npz.check(str(tmp_path), "")


# --- what a rerun keeps, records and refuses (on tiny npz sweeps) ---------------------------------------------

def test_a_rerun_that_trains_groups_names_no_earlier_process_as_their_trainer(tmp_path):
    """timing.trained_by is for a rerun that trains nothing: one that trains a group is its own trainer."""
    config = _tiny_npz_sweep(tmp_path)
    train_and_evaluate(config, str(tmp_path / "out"))
    next((tmp_path / "out" / "groups").glob("*.json")).unlink()  # that group trains again
    again = train_and_evaluate(config, str(tmp_path / "out"))
    assert again["timing"]["groups_trained"] == 1 and "trained_by" not in again["timing"]


def test_a_resumed_group_keeps_the_losses_of_the_epochs_before_its_checkpoint(tmp_path):
    """A group stopped after epoch 2 of 3 resumes from that checkpoint; epoch 1's loss comes back from its
    saved losses file, so train_loss_by_epoch has no gap."""
    class Stop(Exception):
        pass

    def stop(group, epochs_done):
        if epochs_done == 2:
            raise Stop

    config = _tiny_npz_sweep(tmp_path, epochs=3)
    with pytest.raises(Stop):
        train_and_evaluate(config, str(tmp_path / "out"), on_epoch=stop)
    resumed = train_and_evaluate(config, str(tmp_path / "out"))
    assert all(len(r["train_loss_by_epoch"]) == 3 and None not in r["train_loss_by_epoch"] for r in resumed["runs"])


def test_a_finished_record_of_other_runs_is_refused_before_any_group_trains(tmp_path):
    """A mended group record is refused at the start, not after hours of training the unfinished groups."""
    import json

    config = _tiny_npz_sweep(tmp_path)
    train_and_evaluate(config, str(tmp_path / "out"))
    bad, unfinished = sorted((tmp_path / "out" / "groups").glob("*.json"))
    bad.write_text(json.dumps([{**r, "seed": 7} for r in json.loads(bad.read_text())]))
    unfinished.unlink()
    trained = []
    with pytest.raises(ConfigError, match="holds other runs than group"):
        train_and_evaluate(config, str(tmp_path / "out"), on_epoch=lambda g, e: trained.append(g.name))
    assert trained == [] and not unfinished.exists()
