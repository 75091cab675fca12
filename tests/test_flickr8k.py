"""Flickr8k loaders on a tiny fixture in the real layout, with the token file's known quirks."""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from fusion_jax.data import flickr8k
from fusion_jax.data.dataset import BadImageError, DataUnavailableError

SIZES = {"b_img.jpg": (64, 48), "a_img.jpg": (40, 30), "f_img.jpg": (32, 32),
         "c_img.jpg": (50, 20), "e_img.jpg": (16, 64), "d_img.jpg": (48, 64)}  # name: (W, H)
CORRUPT = "z_bad.jpg"
UNCAPTIONED = "y_lonely.jpg"


def caption(name: str, k: int) -> str:
    return f"A picture of {name[0]} number {k} ."


def write_fixture(root, image_dir: str = "Flicker8k_Dataset", edit: str = "") -> str:
    """Images (6 good, 1 corrupt, 1 uncaptioned) and a CRLF token file full of quirks under `root`."""
    folder = root / image_dir
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in {**SIZES, UNCAPTIONED: (8, 8)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name, quality=90)
    (folder / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "._a_img.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS's metadata beside an image: not an image
    names = list(SIZES) + [CORRUPT]
    lines = [f"{name}#{k}\t{caption(name, k)}{edit if (name, k) == ('a_img.jpg', 2) else ''}"
             for k in (3, 0, 4, 1, 2) for name in names]  # interleaved, k out of order
    lines[7:7] = [f"ghost.jpg#{k}\tA missing image {k} ." for k in range(5)]
    lines[3:3] = ["a_img.jpg.1#0\tA duplicate .", "", "c_img.jpg.1#1\tAnother duplicate .",
                  "no tab at all", "a_img.jpg\tno hash", "a_img.jpg#x\tbad k", "   "]
    (root / "Flickr8k.token.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return str(root)


@pytest.fixture
def root(tmp_path):
    return write_fixture(tmp_path)


def test_stats_and_summary_log(root, caplog):
    with caplog.at_level(logging.INFO, logger="fusion_jax"):
        _, stats = flickr8k.load_flickr8k_folder_with_stats(root)
    assert stats == flickr8k.Flickr8kStats(n_images=7, n_captions=35, missing_image_captions=5, missing_images=1,
                                           jpg1_lines=2, malformed_lines=3, uncaptioned_images=1)
    summaries = [r for r in caplog.records if r.getMessage().startswith("flickr8k:")]
    assert len(summaries) == 1 and summaries[0].levelno == logging.WARNING
    assert "7 images, 35 captions" in summaries[0].getMessage() and "kept" not in summaries[0].getMessage()


def test_repeated_keys_and_bytes_that_are_not_utf8_are_kept_and_counted(tmp_path, caplog):
    root = write_fixture(tmp_path)
    token = os.path.join(root, "Flickr8k.token.txt")
    with open(token, "ab") as f:
        f.write(b"a_img.jpg#0\tThe same key again .\r\nb_img.jpg#7\tA caf\xe9 in Latin-1 .\r\n")
        f.write("b_img.jpg#8\tA valid U+FFFD \ufffd in UTF-8 .\r\n".encode())  # not counted: it is UTF-8
    with caplog.at_level(logging.INFO, logger="fusion_jax"):
        ds, stats = flickr8k.load_flickr8k_folder_with_stats(root)
    assert (stats.n_captions, stats.repeated_keys, stats.undecodable_lines) == (38, 1, 1)
    assert "The same key again ." in ds.captions and "A caf\ufffd in Latin-1 ." in ds.captions
    assert "A valid U+FFFD \ufffd in UTF-8 ." in ds.captions
    message = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("flickr8k:"))
    assert message.endswith("; kept 1 lines repeating an earlier <image>#<k>, 1 lines with bytes that are not UTF-8")


def test_captions_kept_with_their_images(root):
    ds = flickr8k.load_flickr8k_folder(root)
    assert ds.name == "flickr8k"
    assert ds.image_ids == tuple(sorted(list(SIZES) + [CORRUPT]))
    assert ds.caption_image.dtype == np.int32 and ds.caption_image.shape == (ds.n_captions,)
    assert np.all(np.diff(ds.caption_image) >= 0)  # grouped per image
    expected = [(name, caption(name, k)) for name in ds.image_ids for k in range(5)]  # sorted by (image, k)
    assert [(ds.image_ids[i], c) for i, c in zip(ds.caption_image, ds.captions)] == expected
    assert all("\r" not in c for c in ds.captions)


def test_load_image(root):
    ds = flickr8k.load_flickr8k_folder(root)
    for i, name in enumerate(ds.image_ids):
        if name == CORRUPT:
            with pytest.raises(BadImageError, match=CORRUPT):
                ds.load_image(i)
            continue
        image = ds.load_image(i)
        w, h = SIZES[name]
        assert image.dtype == np.uint8 and image.shape == (h, w, 3)


def test_an_image_the_system_cannot_read_stops_the_run_instead_of_being_dropped_for_good():
    """A decode failure drops the image (and the feature cache remembers it); an OSError with an errno
    (permissions, a vanished file, an I/O error) is the system's, to mend: it stops the run, naming the file."""
    def denied():
        raise PermissionError(13, "Permission denied", "im3.jpg")

    with pytest.raises(DataUnavailableError, match="cannot read image im3.jpg: Permission denied; mend that"):
        flickr8k._decode("im3.jpg", denied)
    with pytest.raises(BadImageError, match="UnidentifiedImageError"):
        flickr8k._decode("im3.jpg", lambda: Image.open(io.BytesIO(b"not an image")))


@pytest.mark.parametrize("pixels", [np.zeros((4, 4), np.uint16), np.zeros((4, 4), np.int32),
                                    np.zeros((4, 4), np.float32)])
def test_images_of_more_than_8_bits_are_unreadable_not_clipped_white(pixels):
    with pytest.raises(BadImageError, match="not 8-bit"):
        flickr8k._decode("x.jpg", lambda: Image.fromarray(pixels))
    assert flickr8k._decode("x.jpg", lambda: Image.fromarray(pixels.astype(np.uint8))).shape == (4, 4, 3)


def test_load_image_file_removed_after_load(root):
    """A file gone since the folder was read stops the run (a rerun reads the folder again), rather than
    being dropped as unreadable and remembered so by the feature cache."""
    ds = flickr8k.load_flickr8k_folder(root)
    os.remove(os.path.join(root, "Flicker8k_Dataset", ds.image_ids[0]))
    with pytest.raises(DataUnavailableError, match=f"cannot read image .*{ds.image_ids[0]}: No such file"):
        ds.load_image(0)


def test_a_missing_folder_or_a_file_is_named(tmp_path):
    with pytest.raises(DataUnavailableError, match=r"directory '.*/none' does not exist"):
        flickr8k.load_flickr8k_folder(str(tmp_path / "none"))
    (tmp_path / "file").write_text("")
    with pytest.raises(DataUnavailableError, match=r"directory '.*/file' is a file, not a folder"):
        flickr8k.load_flickr8k_folder(str(tmp_path / "file"))


def test_alternative_folder_spelling(tmp_path):
    ds, stats = flickr8k.load_flickr8k_folder_with_stats(write_fixture(tmp_path, "Flickr8k_Dataset"))
    assert stats.n_images == 7 and stats.n_captions == 35
    assert ds.load_image(ds.image_ids.index("a_img.jpg")).shape == (30, 40, 3)


def test_a_bom_an_upper_case_suffix_and_an_empty_caption(tmp_path):
    """A token file saved with a byte-order mark still finds its first line's image; `.JPG` is an image; a line
    with an empty caption is malformed, not a caption; one captioned image is too few to pair."""
    folder = tmp_path / "Flicker8k_Dataset"
    folder.mkdir()
    for name in ("a.JPG", "b.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / name, format="JPEG")
    lines = ["a.JPG#0\tA first caption .", "b.jpg#0\tA second .", "b.jpg#1\t  ", "b.jpg#2\tA third ."]
    (tmp_path / "Flickr8k.token.txt").write_bytes(("\n".join(lines) + "\n").encode("utf-8-sig"))
    ds, stats = flickr8k.load_flickr8k_folder_with_stats(str(tmp_path))
    assert ds.image_ids == ("a.JPG", "b.jpg") and ds.captions == ("A first caption .", "A second .", "A third .")
    assert (stats.malformed_lines, stats.missing_image_captions) == (1, 0)
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataUnavailableError, match="has 1 images with captions"):
        flickr8k.load_flickr8k_folder(str(tmp_path))


def test_fingerprint(tmp_path):
    a = flickr8k.load_flickr8k_folder(write_fixture(tmp_path / "a"))
    assert flickr8k.load_flickr8k_folder(str(tmp_path / "a")).fingerprint == a.fingerprint
    assert flickr8k.load_flickr8k_folder(write_fixture(tmp_path / "b")).fingerprint == a.fingerprint
    changed = flickr8k.load_flickr8k_folder(write_fixture(tmp_path / "c", edit=" Changed"))
    assert changed.fingerprint != a.fingerprint
    with open(tmp_path / "a" / "Flicker8k_Dataset" / "a_img.jpg", "ab") as f:
        f.write(b"\0")  # a changed image size changes the key too
    assert flickr8k.load_flickr8k_folder(str(tmp_path / "a")).fingerprint != a.fingerprint


def assert_both_ways(error: pytest.ExceptionInfo) -> None:
    assert "flickr8k_dir" in str(error.value) and "hub_id" in str(error.value)


@pytest.mark.parametrize("remove", ["root", "images", "tokens", "image files", "nested"])
def test_missing_data(root, remove):
    target = {"root": root + "_nope", "images": os.path.join(root, "Flicker8k_Dataset"),
              "tokens": os.path.join(root, "Flickr8k.token.txt")}.get(remove)
    if remove == "images":
        os.rename(target, target + "_moved")
    elif remove == "tokens":
        os.remove(target)
    elif remove == "image files":  # the folders are there, the images are not
        for name in os.listdir(os.path.join(root, "Flicker8k_Dataset")):
            os.remove(os.path.join(root, "Flicker8k_Dataset", name))
    elif remove == "nested":  # an archive unpacked one level too deep
        os.rename(os.path.join(root, "Flicker8k_Dataset"), os.path.join(root, "inner"))
        os.makedirs(os.path.join(root, "Flicker8k_Dataset"))
        os.rename(os.path.join(root, "inner"), os.path.join(root, "Flicker8k_Dataset", "Flicker8k_Dataset"))
    with pytest.raises(DataUnavailableError) as error:
        flickr8k.load_flickr8k(target if remove == "root" else root, "")
    assert_both_ways(error)
    assert ("one folder deeper, in " in str(error.value)) == (remove == "nested")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: offline env vars and the datasets cache in tmp_path."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def test_dispatch(root, offline):
    assert flickr8k.load_flickr8k(root, "some/repo").n_captions == 35  # folder wins
    with pytest.raises(DataUnavailableError) as error:
        flickr8k.load_flickr8k("", "")
    assert_both_ways(error)
    with pytest.raises(DataUnavailableError, match="OFFLINE") as error:
        flickr8k.load_flickr8k("", "someone/flickr8k")
    assert_both_ways(error)


def hub_rows(n: int = 3) -> dict:
    rng = np.random.default_rng(1)
    rows = {"image": [Image.fromarray(rng.integers(0, 256, (10 + i, 20, 3), dtype=np.uint8)) for i in range(n)]}
    for k in range(5):
        rows[f"caption_{k}"] = [f"row {i} caption {k}" for i in range(n)]
    return rows


def test_hub_loader_on_local_parquet(tmp_path, offline):
    import datasets

    folder = tmp_path / "hub_copy"
    (folder / "data").mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), **{f"caption_{k}": datasets.Value("string") for k in range(5)}})
    datasets.Dataset.from_dict(hub_rows(), features=features).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    ds = flickr8k.load_flickr8k("", str(folder))
    assert ds.name == "flickr8k" and ds.image_ids == ("00000", "00001", "00002")
    assert ds.captions == tuple(f"row {i} caption {k}" for i in range(3) for k in range(5))
    assert ds.caption_image.dtype == np.int32 and list(ds.caption_image) == [i for i in range(3) for _ in range(5)]
    image = ds.load_image(2)
    assert image.dtype == np.uint8 and image.shape == (12, 20, 3)
    again = flickr8k.load_flickr8k_hub(str(folder))
    assert again.fingerprint == ds.fingerprint and len(ds.fingerprint) == 64
    # Every split is read, train first: the study draws its own pairs from all of Flickr8k's images.
    more = {k: v[:2] for k, v in hub_rows(5).items()}
    more = {k: [f"test {c}" for c in v] if k.startswith("caption") else v for k, v in more.items()}
    datasets.Dataset.from_dict(more, features=features).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    both = flickr8k.load_flickr8k_hub(str(folder))
    assert both.n_images == 5 and both.captions[:15] == ds.captions and both.captions[15].startswith("test ")
    assert both.fingerprint != ds.fingerprint


def test_hub_loader_unreachable(tmp_path, offline):
    with pytest.raises(DataUnavailableError) as error:
        flickr8k.load_flickr8k_hub("someone/not-a-cached-flickr8k")
    assert_both_ways(error)
    assert error.value.__cause__ is not None


def test_hub_column_shapes():
    import datasets

    rows = hub_rows(2)
    listed = datasets.Dataset.from_dict({"image": rows["image"], "filename": ["x.jpg", "y.jpg"],
                                         "captions": [["one", "two", " "], ["three"]]})
    ds = flickr8k.flickr8k_from_hf_dataset(listed, "mem")
    assert ds.image_ids == ("x.jpg", "y.jpg") and ds.captions == ("one", "two", "three")
    assert list(ds.caption_image) == [0, 0, 1]
    edited = datasets.Dataset.from_dict({"image": rows["image"], "filename": ["x.jpg", "y.jpg"],
                                         "captions": [["one", "two", " "], ["three, edited"]]})
    assert flickr8k.flickr8k_from_hf_dataset(edited, "mem").fingerprint != ds.fingerprint  # the same source, other rows
    single = flickr8k.flickr8k_from_hf_dataset(datasets.Dataset.from_dict({"image": rows["image"], "caption": ["a", "b"]}), "m")
    assert single.captions == ("a", "b") and list(single.caption_image) == [0, 1]
    with pytest.raises(DataUnavailableError, match="text"):
        flickr8k.flickr8k_from_hf_dataset(datasets.Dataset.from_dict({"image": rows["image"], "text": ["a", "b"]}), "m")


def test_write_folder_marks_a_standin_and_never_overwrites_real_data(tmp_path):
    """write_flickr8k_folder: the loader names its folder a stand-in; a rewrite leaves no stale images;
    a folder of real-looking data (a token file, no marker) is refused and left as it was."""
    from fusion_jax.data.embedded import generate_embedded

    root = str(tmp_path / "standin")
    flickr8k.write_flickr8k_folder(generate_embedded(n_images=3, image_size=16), root, size=(20, 10))
    flickr8k.write_flickr8k_folder(generate_embedded(n_images=2, image_size=16), root, size=(20, 10))
    ds, stats = flickr8k.load_flickr8k_folder_with_stats(root)
    assert (ds.name, ds.n_images, stats.uncaptioned_images) == ("flickr8k-standin", 2, 0)
    keys = [line.split("\t")[0] for line in (tmp_path / "standin" / "Flickr8k.token.txt").read_text().splitlines()]
    assert keys == [f"embedded_{i:05d}.jpg#{k}" for i in range(2) for k in range(5)]  # Flickr8k's numbering
    assert ds.load_image(1).shape == (10, 20, 3)

    real = write_fixture(tmp_path / "real")
    before = (tmp_path / "real" / "Flickr8k.token.txt").read_bytes()
    with pytest.raises(FileExistsError, match="no fusion_jax_standin.json"):
        flickr8k.write_flickr8k_folder(generate_embedded(n_images=2, image_size=16), real)
    assert (tmp_path / "real" / "Flickr8k.token.txt").read_bytes() == before
    assert flickr8k.load_flickr8k_folder_with_stats(real)[0].name == "flickr8k"


def test_the_revisions_a_config_pins_reach_the_hub(monkeypatch, tmp_path):
    """data.hub_revision reaches datasets.load_dataset, backbone.<name>.revision the model's first hub call
    (its config): a pinned sweep reads what it pinned, not the hub's newest."""
    import datasets
    import transformers

    from conftest import load_config
    from fusion_jax.data import sources

    asked = []

    def record(name, *args, revision=None, **kwargs):
        asked.append((name, revision))
        raise OSError("not fetched in tests")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no reachability probe before the (recorded) hub calls
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, revision=None, **kw: record(hub_id, revision=revision))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record)
    config = load_config("noise_sweep")
    config.data.hub_revision, config.backbone.clip.revision = "0123abc", "4567def"
    with pytest.raises(DataUnavailableError, match=r"\(revision 0123abc\)"):
        sources.load_dataset(config)
    ds = flickr8k.load_flickr8k(write_fixture(tmp_path), "")
    with pytest.raises(DataUnavailableError, match="cannot load the CLIP model"):
        sources.extract_features(config, ds, "clip")
    assert asked == [("jxie/flickr8k", "0123abc"), ("openai/clip-vit-base-patch32", "4567def")]


def test_an_unreachable_hub_is_named_before_any_hub_client_retries(monkeypatch):
    """Without the offline variables, a hub that does not answer (HF_ENDPOINT at a closed local port here) is
    said at once, in one error, before datasets' own retries."""
    import datasets

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("datasets was asked"))
    with pytest.raises(DataUnavailableError, match="the Hugging Face hub cannot be reached") as error:
        flickr8k.load_flickr8k("", "someone/flickr8k")
    assert_both_ways(error)
    # A dataset saved on disk (its folder as hub_id) needs no hub.
    monkeypatch.setattr(flickr8k, "load_flickr8k_hub", lambda hub_id, revision: ("loaded", hub_id))
    assert flickr8k.load_flickr8k("", os.path.dirname(__file__)) == ("loaded", os.path.dirname(__file__))
    # The caption's number after the last '#': an image name may hold one.
    assert flickr8k._parse_line("a#b.jpg#2\tA caption .") == ("a#b.jpg", 2, "A caption .")
