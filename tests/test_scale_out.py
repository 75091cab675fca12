"""Scale-out behaviour: sharding over devices, split programs, corrupt checkpoints, NaN groups."""

import copy
import dataclasses
import errno
import itertools
import json
import logging
import math
import os
import pathlib
import pickle
import re
import subprocess
import sys
import tempfile
import threading
import time
import types

import numpy as np
import pytest

from conftest import ROOT, host_devices, load_config, without_compilation_cache
from fusion_jax.groups import plan
from fusion_jax.sweep import train_and_evaluate


def _small(config):
    config.backbones = ("aligned",)
    config.methods = ("concat",)
    config.scales = (128,)
    config.train.epochs = 2
    return config


def _metrics(results):
    return {(r["method"], r["scale"], r["seed"], r["degradation"]["level"]):
            (r["metrics"], r["final_train_loss"], r["train_loss_by_epoch"]) for r in results["runs"]}


def _assert_same(a, b):
    """The same runs, metrics and losses (each epoch's too: a resumed group's curve across the restart)."""
    a, b = _metrics(a), _metrics(b)
    assert a.keys() == b.keys()
    for k in a:
        for m in a[k][0]:
            assert a[k][0][m] == pytest.approx(b[k][0][m], abs=1e-5), (k, m)
        assert a[k][1] == pytest.approx(b[k][1], rel=1e-5), k
        assert a[k][2] == pytest.approx(b[k][2], rel=1e-5), k


def _sweep_on_devices(n_devices, workdir):
    env = host_devices(n_devices)
    args = ["--config=configs/synthetic.py:smoke", f"--workdir={workdir}", "--config.backbones=aligned",
            "--config.scales=128", "--config.seeds=(42,123,456)", "--config.methods=cross"]
    proc = subprocess.run([sys.executable, "-m", "fusion_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["device"]["count"] == n_devices
    return results


def test_one_device_equals_four(tmp_path):
    # 6 runs per group: on 4 devices in chunks of 2 (the CPU default), three devices get a chunk, one an empty one.
    one = _sweep_on_devices(1, tmp_path / "one")
    four = _sweep_on_devices(4, tmp_path / "four")
    assert len(four["runs"]) == len(one["runs"]) == 3 * 2
    _assert_same(one, four)


def test_split_programs_equal_one_program(smoke_config, tmp_path):
    whole = train_and_evaluate(_small(smoke_config), str(tmp_path / "whole"))
    smoke_config.max_runs_per_program = 3
    assert [g.name for g in plan(smoke_config)] == ["aligned-concat-part1of2", "aligned-concat-part2of2"]
    split = train_and_evaluate(smoke_config, str(tmp_path / "split"))
    _assert_same(whole, split)


def test_split_by_scale_equals_one_program(smoke_config, tmp_path):
    config = smoke_config
    config.backbones, config.methods, config.train.epochs = ("aligned",), ("concat",), 2
    whole = train_and_evaluate(config, str(tmp_path / "whole"))
    config.split_by_scale = True
    assert [g.name for g in plan(config)] == ["aligned-concat-s128", "aligned-concat-s256"]
    split = train_and_evaluate(config, str(tmp_path / "split"))
    assert len(split["runs"]) == len(whole["runs"]) == 2 * 2 * 2  # scales x seeds x levels
    _assert_same(whole, split)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(smoke_config, tmp_path, caplog):
    config = _small(smoke_config)
    config.train.epochs = 3
    clean = train_and_evaluate(config, str(tmp_path / "clean"))

    class Stop(Exception):  # an error of on_epoch's is the sweep's, not its group's: it ends the sweep
        pass

    def stop(group, epochs_done):
        if epochs_done == 2:
            raise Stop

    with pytest.raises(Stop):
        train_and_evaluate(config, str(tmp_path / "run"), on_epoch=stop)
    latest = tmp_path / "run" / "checkpoints" / "aligned-concat" / "2"
    damaged = 0
    for root, _, files in os.walk(latest):
        for f in files:
            path = os.path.join(root, f)
            if os.path.getsize(path) > 0:
                with open(path, "r+b") as fh:
                    fh.write(b"\x00garbage\xff" * 8)
                damaged += 1
    assert damaged
    calls = []
    resumed = train_and_evaluate(config, str(tmp_path / "run"), on_epoch=lambda g, e: calls.append(e))
    assert "corrupt or incomplete" in caplog.text and "falling back to the one after epoch 1" in caplog.text
    assert calls == [2, 3]  # epoch 2's checkpoint was bad: retrained from epoch 1's
    aside = os.listdir(tmp_path / "run" / "checkpoints-corrupt" / "aligned-concat")
    assert len(aside) == 1 and aside[0].startswith("2-")  # kept for a look, not deleted
    assert "1 corrupt checkpoint(s) kept in" in caplog.text  # and the sweep's end says where
    _assert_same(clean, resumed)


def test_a_checkpoint_the_machine_fails_to_read_is_kept_for_the_rerun(smoke_config, tmp_path, monkeypatch, caplog):
    """An I/O or permission error, or memory running out, while restoring is the machine's, not the checkpoint's:
    the checkpoint stays where it is (not set aside as corrupt, the group not retrained from its start)."""
    import orbax.checkpoint as ocp

    from fusion_jax.validate import ConfigError

    config = _small(smoke_config)
    config.train.epochs = 3

    def stop(group, epochs_done):
        if epochs_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(config, str(tmp_path), on_epoch=stop)
    group = tmp_path / "checkpoints" / "aligned-concat"
    read = ocp.CheckpointManager.restore

    def failing(error):
        def restore(self, step, *args, **kwargs):
            raise error
        return restore

    # tensorstore's error for a file it may not open, as Orbax passes it on (its path and spec shortened)
    denied = ValueError('PERMISSION_DENIED: Error opening "zarr" driver: Error reading "w/.zarray" in OCDBT database '
                        'at local file "1/default/": Failed to open: "1/default/d/0b98": Permission denied '
                        "[os_error_code='13'] [tensorstore_spec='{}']")
    for error in (OSError(errno.EIO, "Input/output error", str(group / "2")), denied):
        monkeypatch.setattr(ocp.CheckpointManager, "restore", failing(error))
        with pytest.raises(ConfigError, match="cannot read the checkpoint after epoch 2 .* it is kept"):
            train_and_evaluate(config, str(tmp_path))
    for error in (MemoryError(), OSError(errno.ENOMEM, "Cannot allocate memory")):
        monkeypatch.setattr(ocp.CheckpointManager, "restore", failing(error))
        train_and_evaluate(config, str(tmp_path))  # the group fails alone, as out of memory in training would
        assert json.loads((tmp_path / "groups" / "aligned-concat.failed.json").read_text())["error"].startswith(
            "group aligned-concat: MemoryError")
    assert "corrupt" not in caplog.text and not (tmp_path / "checkpoints-corrupt").exists()
    assert sorted(os.listdir(group / "2")) == sorted(os.listdir(group / "1"))

    monkeypatch.setattr(ocp.CheckpointManager, "restore", read)
    calls = []
    results = train_and_evaluate(config, str(tmp_path), on_epoch=lambda g, e: calls.append(e))
    assert calls == [3]  # resumed from epoch 2
    assert len(results["runs"]) == 2 * 2 and not results.get("failed_groups")


def test_orbax_repeating_a_full_disk_is_quieted_and_nothing_else(monkeypatch):
    """Orbax's threads log a full disk's error in a group's checkpoints with tracebacks several times, and
    tensorstore's writes in flight meet the closed loop, before the sweep says it in one line: those alone are
    dropped, and the closed loop only once a save met a full disk."""
    import errno
    import logging
    import types

    from fusion_jax import checkpoint

    monkeypatch.setattr(checkpoint, "_open", set())
    monkeypatch.setattr(checkpoint, "_failed_save_at", -float("inf"))

    def record(msg, error=None, level=logging.ERROR, path="/x/orbax/checkpoint/_src/future.py"):
        exc_info = (type(error), error, None) if error else None
        return logging.LogRecord("absl", level, path, 1, msg, None, exc_info)

    quiet = checkpoint._QuietOnAFullDisk().filter
    full = OSError(errno.ENOSPC, "No space left on device")
    assert quiet(record("Save Finalize thread failed.", full))  # no group checkpoints open: another's Orbax
    checkpoint._open.add("/w/checkpoints/aligned-concat")
    assert quiet(record("raised", OSError(errno.EIO, "Input/output error")))  # another error is Orbax's to say
    assert quiet(record("No space left on device", level=logging.WARNING))
    assert quiet(record("No space left on device", path="/x/fusion_jax/sweep.py"))  # not Orbax's
    assert quiet(record("%d", "not a number"))  # a record that does not format is left to the handler

    seen = []
    hook = checkpoint._quiet_closed_loop(seen.append)

    def raised_in(filename):
        try:
            exec(compile("raise RuntimeError('Event loop is closed')", filename, "exec"))
        except RuntimeError as e:
            return types.SimpleNamespace(exc_value=e, exc_traceback=e.__traceback__.tb_next)

    closed = raised_in("/usr/lib/python3.11/asyncio/base_events.py")  # from native code, asyncio's frames alone
    checkpoint._open.clear()
    hook(closed)
    assert len(seen) == 1  # no group checkpoints open, none failed: said
    checkpoint._open.add("/w/checkpoints/aligned-concat")
    assert not quiet(record("Save Finalize thread failed.", full))
    assert not quiet(record("Error writing \"x\" in 3.orbax-checkpoint-tmp [os_error_code='28']"))
    checkpoint._open.clear()
    assert checkpoint._saving()  # (a save met a full disk: what follows is its aftermath)
    hook(closed)
    assert len(seen) == 1  # dropped
    monkeypatch.setattr(checkpoint, "_failed_save_at", time.monotonic() - checkpoint._AFTERMATH_SECONDS - 1)
    hook(closed)
    assert len(seen) == 2  # a minute on, said again
    for other in (raised_in("/work/fusion_jax/sweep.py"),
                  types.SimpleNamespace(exc_value=ValueError("Event loop is closed"), exc_traceback=None)):
        hook(other)
    assert len(seen) == 4


def test_a_checkpoint_whose_arrays_changed_but_still_read_is_refused(tmp_path):
    """Orbax keeps no checksum: arrays that still decompress, but are not those saved (here another save's
    files in their place, as a flipped bit that decodes would be), restored silently before digests."""
    import shutil

    from fusion_jax.checkpoint import DIGESTS, GroupCheckpoints
    from fusion_jax.validate import ConfigError

    trees = [{"params": {"w": np.full((8, 4), v, np.float32)}, "epoch": np.int32(1)} for v in (1.0, 2.0)]
    saved = []
    for i, tree in enumerate(trees):
        ckpt = GroupCheckpoints(str(tmp_path / f"c{i}"), keep=2)
        ckpt.save(1, tree)
        ckpt.save(2, tree)
        ckpt.close()
        saved.append(ckpt)
    assert sorted(os.listdir(tmp_path / "c0" / DIGESTS)) == ["1.json", "2.json"]
    many = GroupCheckpoints(str(tmp_path / "many"), keep=2)
    for epoch in range(1, 6):
        many.save(epoch, trees[0])
    many.close()  # the digests of epochs no longer kept go with a later save (when Orbax has removed the epochs)
    digests = set(os.listdir(tmp_path / "many" / DIGESTS))
    assert many.all_epochs() == [4, 5] and {"4.json", "5.json"} <= digests and "1.json" not in digests
    assert len(digests) <= 3
    np.testing.assert_array_equal(saved[0].restore(2, trees[0])["params"]["w"], trees[0]["params"]["w"])
    wider = {"params": {"w": np.zeros((8, 4), np.float64)}, "epoch": np.int32(1)}  # read as stored, then compared
    with pytest.raises(ValueError, match=r"\['params'\]\['w'\]: float32\[8, 4\] in the checkpoint, float64\[8, 4\] "
                                         "expected"):
        saved[0].restore(2, wider)
    shutil.rmtree(tmp_path / "c0" / "2")
    shutil.copytree(tmp_path / "c1" / "2", tmp_path / "c0" / "2")
    again = GroupCheckpoints(str(tmp_path / "c0"), keep=2)
    with pytest.raises(ValueError, match=r"1 arrays differ from those saved \(CRC-32\), such as \['params'\]\['w'\]"):
        again.restore(2, trees[0])
    np.testing.assert_array_equal(again.restore(1, trees[0])["params"]["w"], trees[0]["params"]["w"])
    digests = json.loads((tmp_path / "c0" / DIGESTS / "1.json").read_text())
    (tmp_path / "c0" / DIGESTS / "1.json").write_text(json.dumps({k: v for k, v in digests.items() if "w" not in k}))
    with pytest.raises(ValueError, match=r"1 arrays differ .* such as \['params'\]\['w'\]"):  # one it does not list
        again.restore(1, trees[0])
    os.remove(tmp_path / "c0" / DIGESTS / "2.json")  # saved before digests: read as it is
    np.testing.assert_array_equal(again.restore(2, trees[0])["params"]["w"], trees[1]["params"]["w"])
    # A file the checkpoint lacks is the checkpoint's fault, set aside by the sweep (not ConfigError: kept for a
    # rerun); an I/O error is the machine's.
    for error, raised in ((FileNotFoundError(errno.ENOENT, "No such file or directory"), FileNotFoundError),
                          (OSError(errno.EIO, "Input/output error"), ConfigError)):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(again._manager, "restore", lambda *a, **k: (_ for _ in ()).throw(error))
            with pytest.raises(raised) as caught:
                again.restore(2, trees[0])
        assert caught.type is raised
    assert again.move_aside(2, str(tmp_path / "aside")).startswith(str(tmp_path / "aside" / "2-"))
    assert again.all_epochs() == [1] and again.latest_epoch() == 1
    again.close()


def test_each_epochs_saved_losses_are_read_back_as_that_epochs(tmp_path):
    """GroupCheckpoints.losses: epoch e's row from losses/<e>.json; a row missing, unreadable or of another
    number of runs reads as NaN (a gap in the curve, never another epoch's)."""
    from fusion_jax import checkpoint
    from fusion_jax.checkpoint import LOSSES, GroupCheckpoints

    ckpt = GroupCheckpoints(str(tmp_path / "c"), keep=2)
    assert os.path.abspath(tmp_path / "c") in checkpoint._open  # Orbax's full-disk storms quieted while open
    for epoch in range(1, 6):
        ckpt.save_losses(epoch, np.asarray([epoch, 10 * epoch], np.float32))
    ckpt.save_losses(6, np.asarray([np.nan, np.inf]))  # a diverged epoch: a gap in the curve, never a loss of 0
    ckpt.close()
    assert os.path.abspath(tmp_path / "c") not in checkpoint._open
    np.testing.assert_array_equal(ckpt.losses(6, 2)[5], [np.nan, np.nan])
    os.remove(tmp_path / "c" / LOSSES / "2.json")
    (tmp_path / "c" / LOSSES / "3.json").write_text("[1.0, ")
    (tmp_path / "c" / LOSSES / "4.json").write_text("[1.0]")
    np.testing.assert_array_equal(ckpt.losses(5, 2), [[1, 10], [np.nan] * 2, [np.nan] * 2, [np.nan] * 2, [5, 50]])
    np.testing.assert_array_equal(ckpt.losses(1, 2), [[1, 10]])


# What Orbax's background write raised on a full disk (a 1 MiB tmpfs, orbax-checkpoint 0.12.8), shortened.
FULL_DISK = ValueError("RESOURCE_EXHAUSTED: Error writing \"a/0.0\" in OCDBT database at local file \"/mnt/c/1.orbax-"
                       "checkpoint-tmp/\": Failed to write 2844384 bytes to file 4: No space left on device "
                       "[os_error_code='28']")


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), FULL_DISK])
def test_a_checkpoint_close_whose_wait_fails_still_closes_the_manager(tmp_path, monkeypatch, error):
    """A failed background save raises from close's wait, as one line of the workdir (a ConfigError, which
    ends the sweep: a full disk fails every group); Orbax's manager (its threads) is closed all the same."""
    from fusion_jax import checkpoint
    from fusion_jax.checkpoint import GroupCheckpoints
    from fusion_jax.validate import ConfigError

    ckpt = GroupCheckpoints(str(tmp_path / "c"), keep=2)
    monkeypatch.setattr(checkpoint, "_failed_save_at", -math.inf)
    closed, close = [], ckpt._manager.close
    monkeypatch.setattr(ckpt._manager, "wait_until_finished", lambda: (_ for _ in ()).throw(error))
    monkeypatch.setattr(ckpt._manager, "close", lambda: closed.append(1) or close())
    with pytest.raises(ConfigError, match=r"cannot write checkpoints in .*: No space left on device"):
        ckpt.close()
    assert closed == [1]
    # Orbax's threads may still print the full disk's errors for a while: they stay quieted after the close.
    assert os.path.abspath(tmp_path / "c") not in checkpoint._open and checkpoint._failed_save_at > -math.inf
    monkeypatch.setattr(ckpt._manager, "wait_until_finished", lambda: (_ for _ in ()).throw(ValueError("other")))
    with pytest.raises(ValueError, match="^other$"):  # not a write's: as it is
        ckpt.wait()


def test_a_workdir_mended_by_hand_is_refused_naming_what_not_mixed_into(smoke_config, tmp_path):
    """Between attempts a workdir's state files may be edited or removed by hand: a group's record of other
    runs, a sweep.json gone from a sweep that has trained, a damaged one. Each is refused in one line
    before any training, rather than mixed into this config's results. A finished group's checkpoints
    (left by a stop before their removal) go on the next attempt."""
    from fusion_jax.validate import ConfigError

    config = _small(smoke_config)
    config.methods, config.seeds, config.train.epochs = ("concat", "cross"), (42,), 1
    workdir = tmp_path / "run"
    train_and_evaluate(config, str(workdir))
    record = workdir / "groups" / "aligned-concat.json"
    runs = json.loads(record.read_text())
    record.write_text(json.dumps([{**r, "seed": 7} for r in runs]))
    with pytest.raises(ConfigError, match=r"aligned-concat.json' holds other runs than group aligned-concat has"):
        train_and_evaluate(config, str(workdir))
    record.write_text(json.dumps([{k: v for k, v in r.items() if k != "degradation"} for r in runs]))
    with pytest.raises(ConfigError, match=r"aligned-concat.json' does not hold a finished group's runs \(KeyError: "
                                          r"'degradation'\); remove it to train group aligned-concat again"):
        train_and_evaluate(config, str(workdir))
    record.write_text(json.dumps(runs))
    (workdir / "checkpoints" / "aligned-concat" / "1").mkdir(parents=True)  # as a stop would leave them
    train_and_evaluate(config, str(workdir))  # trains nothing
    assert not (workdir / "checkpoints").exists()

    (workdir / "results.json").unlink()
    (workdir / "sweep.json").unlink()
    more = _small(load_config("synthetic", "smoke"))
    more.methods, more.seeds, more.train.epochs = ("concat", "cross"), (42, 123), 1
    with pytest.raises(ConfigError, match=r"holds a sweep's groups or checkpoints but no sweep.json"):
        train_and_evaluate(more, str(workdir))
    (workdir / "sweep.json").write_text('{"name": ')
    with pytest.raises(ConfigError, match=r"sweep.json' cannot be read \(JSONDecodeError"):
        train_and_evaluate(config, str(workdir))


def test_a_checkpoint_folder_that_cannot_be_made_is_one_line(smoke_config, tmp_path):
    """Orbax once made checkpoint folders in the background, and a folder it could not make (a full disk)
    left its threads, and the sweep, waiting forever."""
    from fusion_jax.validate import ConfigError

    (tmp_path / "checkpoints").write_text("")  # a file where the folder goes
    with pytest.raises(ConfigError, match=r"cannot write checkpoints in .*aligned-concat': Not a directory"):
        train_and_evaluate(_small(smoke_config), str(tmp_path))


def _nan_in_unaligned_image_row_3(monkeypatch):
    """The sweep's features, with a NaN in row 3 of the `unaligned` backbone's image features; returns the
    real loader."""
    import fusion_jax.sweep as sweep

    real = sweep.load_features

    def poisoned(config, backbone, dataset=None, **kw):
        fs = real(config, backbone, dataset, **kw)
        if backbone == "unaligned":
            image = fs.image.copy()  # a FeatureSet's arrays are read-only
            image[3, 0] = np.nan
            fs = dataclasses.replace(fs, image=image)
        return fs

    monkeypatch.setattr(sweep, "load_features", poisoned)
    return real


def test_nan_features_stop_their_groups_and_the_others_finish(smoke_config, tmp_path, monkeypatch, caplog):
    import fusion_jax.sweep as sweep

    real = _nan_in_unaligned_image_row_3(monkeypatch)
    config = smoke_config
    config.methods = ("concat",)
    config.scales = (128,)
    config.train.epochs, config.tsne_pairs = 1, 100  # as the smoke variant (the fixture leaves it out)
    results = train_and_evaluate(config, str(tmp_path))
    assert {r["backbone"] for r in results["runs"]} == {"aligned"}
    assert [f["group"] for f in results["failed_groups"]] == ["unaligned-concat"]
    assert "NaN or Inf" in results["failed_groups"][0]["error"] and "rows [3]" in results["failed_groups"][0]["error"]
    # The report is drawn all the same (the failed backbone has no t-SNE panel: no run of it finished).
    assert (tmp_path / "fig_tsne.png").exists() and (tmp_path / "table1.md").exists()
    assert "the report's" not in caplog.text and "cannot be drawn" not in caplog.text  # its errors
    # Resumed with the NaN gone, the failed group is trained again (and the log says what it was).
    monkeypatch.setattr(sweep, "load_features", real)
    caplog.set_level(logging.INFO, logger="fusion_jax")
    again = train_and_evaluate(config, str(tmp_path))
    assert again["failed_groups"] == [] and {r["backbone"] for r in again["runs"]} == {"aligned", "unaligned"}
    assert "training group unaligned-concat again, which failed in an earlier attempt: group unaligned-concat: " \
           "image features of backbone 'unaligned' hold NaN or Inf" in caplog.text


def test_a_failed_groups_record_is_read_for_the_log(tmp_path):
    from fusion_jax.sweep import _recorded_error

    record = tmp_path / "g.failed.json"
    record.write_text(json.dumps({"error": "x" * 500}))
    assert _recorded_error(str(record)) == "x" * 200 + "..."
    record.write_text(json.dumps({"error": "group g: loss\n  is NaN"}))
    assert _recorded_error(str(record)) == "group g: loss is NaN"
    record.write_text("{not json")
    assert _recorded_error(str(record)) == "its record is unreadable"


def test_nan_in_a_row_only_padding_reads_is_named(smoke_config, tmp_path, monkeypatch, caplog):
    """A smaller scale's runs are padded to the group's largest with pairs of feature row 0, read
    with zero weight; a NaN there would turn the loss NaN (0 x NaN), so the check names the row."""
    import fusion_jax.sweep as sweep
    from fusion_jax.data import build_pairs

    real = sweep.load_features
    config = smoke_config
    config.backbones, config.methods, config.scales, config.train.epochs = ("aligned",), ("concat",), (128, 256), 1

    def poisoned(config, backbone, dataset=None, **kw):
        fs = real(config, backbone, dataset, **kw)
        for scale in config.scales:
            pairs = build_pairs(fs.caption_image, fs.n_images, scale, config.pairs.split_seed,
                                config.pairs.train_fraction)
            assert 0 not in pairs.caption_idx  # row 0 is read by padding alone
        text = fs.text.copy()
        text[0, :] = np.nan
        return dataclasses.replace(fs, text=text)

    monkeypatch.setattr(sweep, "load_features", poisoned)
    results = train_and_evaluate(config, str(tmp_path))
    error = results["failed_groups"][0]["error"]
    assert "text features" in error and "rows [0]" in error
    # A report, though no run finished: the summary names the failure, and no figure of no runs is drawn.
    assert "aligned-concat" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "fig_accuracy_vs_scale.png").exists() and "the report's" not in caplog.text


_PORTS = itertools.count()


def _free_port() -> int:
    """A port free now, for a coordinator that binds it seconds later: below Linux's ephemeral range (32768-60999),
    where no bind to port 0 elsewhere (the other xdist worker's) can take it meanwhile; each worker its own
    range, each call its own port."""
    import socket

    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    for _ in range(1000):
        port = 20000 + 1000 * (worker % 10) + next(_PORTS) % 1000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
            return port
    raise AssertionError(f"no free port in 20000-30999 for worker {worker}")


SMALL = ["--config=configs/synthetic.py:smoke", "--config.backbones=aligned", "--config.scales=128",
         "--config.train.epochs=2"]


class _Process(subprocess.Popen):
    """A child whose stdout and stderr go to temporary files, read by out() and err() once it has ended: a
    pipe nobody reads while the test waits would block a child that writes more than the pipe holds."""

    def __init__(self, argv: list[str], **kw):
        self._files = [tempfile.TemporaryFile("w+") for _ in range(2)]
        super().__init__(argv, stdout=self._files[0], stderr=self._files[1], text=True, **kw)

    def _read(self, i: int) -> str:
        self._files[i].seek(0)
        return self._files[i].read()

    def out(self) -> str:
        return self._read(0)

    def err(self) -> str:
        return self._read(1)

    def __del__(self, *args, **kw):
        for f in self._files:
            f.close()
        super().__del__(*args, **kw)


def _main(args, **kw):
    return _Process([sys.executable, "-m", "fusion_jax.main", *SMALL, *args], cwd=ROOT, **kw)


def test_initialize_gives_a_process_alone_on_its_node_every_device(smoke_config, monkeypatch):
    """JAX's SLURM detection alone gives each task the device numbered like its rank on the node: one GPU per
    node for one task per node."""
    import jax
    from fusion_jax import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for name in ("JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES", "SLURM_GPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    for per_node, visible, want in (("1(x4)", None, []), ("4", None, None), ("2,1,1", None, None),
                                    ("4", "3", []), ("4", "0,1,2,3", None), ("4", "2,3", None)):
        monkeypatch.setenv("SLURM_TASKS_PER_NODE", per_node)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        distributed.initialize(smoke_config)
        assert calls[-1]["local_device_ids"] == want, (per_node, visible)
        assert calls[-1]["num_processes"] is None and calls[-1]["process_id"] is None  # from SLURM
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "a100:2")  # SLURM shows each task its own two GPUs (here "2,3"): both
    distributed.initialize(smoke_config)
    assert calls[-1]["local_device_ids"] == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # not bound to tasks (--gpu-bind=none): JAX's default
    distributed.initialize(smoke_config)
    assert calls[-1]["local_device_ids"] is None
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,1")
    distributed.initialize(smoke_config)
    assert calls[-1]["local_device_ids"] is None  # JAX reads the variable
    smoke_config.distributed.num_processes = 1  # one task of an allocation runs alone
    distributed.initialize(smoke_config)
    assert len(calls) == 9  # the six above, two with SLURM_GPUS_PER_TASK, JAX_LOCAL_DEVICE_IDS: not this one


def test_a_coordinator_port_in_use_is_refused_before_jax_distributed_starts(smoke_config):
    """gRPC's coordinator crashed process 0 (a segfault) on a taken port; another sweep's coordinator shares
    it, and the two sweeps' processes met and killed each other."""
    import socket

    import jax

    from fusion_jax import distributed
    from fusion_jax.validate import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        smoke_config.distributed.update(num_processes=2, process_id=0, coordinator_address=f"127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=rf"config.distributed.coordinator_address: port {port} is in use"):
            distributed.initialize(smoke_config)
        # A process id from the cluster: on process 0's node the others would find its coordinator there.
        smoke_config.distributed.process_id = -1
        assert distributed._coordinator_port(smoke_config.distributed) is None
    assert not jax.distributed.is_initialized()


def test_a_coordinator_port_whose_connections_linger_is_not_refused(smoke_config, monkeypatch):
    """A killed coordinator leaves its port's connections in TIME-WAIT for about a minute: gRPC binds it
    (SO_REUSEADDR), so the check lets the resume go on rather than call the port in use."""
    import socket

    import jax

    from fusion_jax import distributed

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's (its connections inherit it)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the coordinator's side closes first: its port's end goes to TIME-WAIT
        client.close()
    if os.path.exists("/proc/net/tcp"):  # Linux: the kernel's table of connections (state 06: TIME-WAIT)
        lingers = lambda: any(r[1].endswith(f":{port:04X}") and r[3] == "06" for r in (
            line.split() for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]))
        for _ in range(100):  # the client's closing packet may be processed a moment later
            if lingers():
                break
            time.sleep(0.01)
        assert lingers()
    started = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: started.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    smoke_config.distributed.update(num_processes=2, process_id=0, coordinator_address=f"127.0.0.1:{port}")
    distributed.initialize(smoke_config)
    assert started and started[0]["coordinator_address"] == f"127.0.0.1:{port}"


def test_under_slurm_process_0_refuses_jaxs_port_when_another_job_has_it(smoke_config, monkeypatch):
    """JAX's SLURM port, SLURM_JOB_ID % 4096 + 61440, is the same for jobs 4096 apart on one node."""
    import socket

    import jax

    from fusion_jax import distributed
    from fusion_jax.validate import ConfigError

    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("jax.distributed started"))
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    with socket.socket() as taken:
        for job in range(4096):  # a port of JAX's SLURM range that this test can take
            try:
                taken.bind(("127.0.0.1", job + 61440))
                break
            except OSError:
                continue
        taken.listen()
        monkeypatch.setenv("SLURM_JOB_ID", str(job + 3 * 4096))
        port_of_job = rf"port {job + 61440} is in use .*JAX's port for SLURM job {job + 3 * 4096}"
        with pytest.raises(ConfigError, match=port_of_job):
            distributed.initialize(smoke_config)
        monkeypatch.setenv("JAX_COORDINATOR_PORT", str(job + 61440))
        with pytest.raises(ConfigError, match="set JAX_COORDINATOR_PORT to another"):
            distributed.initialize(smoke_config)
        monkeypatch.setenv("SLURM_PROCID", "1")  # not the coordinator's process: nothing to check here
        monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: None)
        distributed.initialize(smoke_config)


def test_a_second_start_on_a_running_sweeps_workdir_is_refused_before_jax_distributed_starts(
        smoke_config, tmp_path, monkeypatch):
    """Process 1 of a second start, given the running sweep's coordinator address, would connect to that
    coordinator, which then stops the running sweep's processes: it checks the workdir's locks first."""
    import jax

    from fusion_jax.validate import ConfigError
    from fusion_jax.workdir import prepare_workdir, sweep_lock

    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("jax.distributed started"))
    prepare_workdir(str(tmp_path), smoke_config.to_dict())
    smoke_config.distributed.update(num_processes=2, process_id=1, coordinator_address="127.0.0.1:1234")
    with sweep_lock(str(tmp_path), 0, 2):  # process 0 of the running sweep (its process 1's lock is alike)
        with pytest.raises(ConfigError, match=rf"is in use: another sweep \(process 0, pid {os.getpid()}\)"):
            train_and_evaluate(smoke_config, str(tmp_path))


def test_a_coordinator_address_alone_is_a_config_error(tmp_path):
    """JAX_COORDINATOR_ADDRESS without a cluster that says how many processes: a one-line config error
    (JAX's ValueError, before any connection, was a traceback), and no workdir made."""
    env = {k: v for k, v in host_devices(1).items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    proc = _main([f"--workdir={tmp_path / 'out'}"], env={**env, "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"})
    assert proc.wait(timeout=120) == 2
    err = proc.err()
    last = err.strip().splitlines()[-1]
    assert last.startswith("fusion_jax: error: config.distributed.num_processes: is 0 (from the cluster) and "
                           "jax.distributed cannot start"), err[-2000:]
    assert "unset JAX_COORDINATOR_ADDRESS (=127.0.0.1:1)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


class _Store:
    """The coordination service of jax.distributed as one process sees it: the key-value store, where the
    test sets the other processes' keys (except those saying that a start-up's statuses were read: the
    others have always read them)."""

    def __init__(self):
        self.kv = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        if key in self.kv and not allow_overwrite:  # as jax.distributed's store
            raise RuntimeError(f"ALREADY_EXISTS: key {key}")
        self.kv[key] = value

    def blocking_key_value_get(self, key, ms):
        return self.kv[key]

    def key_value_dir_get(self, prefix):
        if prefix.startswith("fusion_jax/start-read/"):
            return [(f"{prefix}{i}", "1") for i in range(64)]
        return sorted((k, v) for k, v in self.kv.items() if k.startswith(prefix))


@pytest.fixture
def store(monkeypatch):
    """A fresh `_Store` in place of jax.distributed's client, with fusion_jax.distributed's state reset."""
    from fusion_jax import distributed

    store = _Store()
    monkeypatch.setattr(distributed, "_client", lambda: store)
    monkeypatch.setattr(distributed, "_starts", itertools.count())
    for name, value in (("_sweep_call", 0), ("_out_of_step", False), ("stopped_in_step", False)):
        monkeypatch.setattr(distributed, name, value)
    return store


def test_a_finished_process_waits_for_the_others_at_the_end(store, monkeypatch):
    """Not at JAX's shutdown barrier, where a process is aborted after 5 minutes (results/multiprocess/);
    it learns there which other processes failed while training; a Ctrl-C (`stop`) ends the wait, and
    the others then leave at once too (not through JAX's shutdown barrier, which would wait for it)."""
    from fusion_jax import distributed

    assert distributed.wait_for_all(0, 1, 60) == [] and not store.kv
    store.kv.update({f"fusion_jax/end/0/here/{i}": "1" for i in range(1, 11)})  # the others have come
    distributed.share_failure(10, 11, RuntimeError("out of\nmemory"))
    distributed.share_failure(2, 11, ValueError("bad"))
    distributed.share_failure(0, 11, ValueError("this process's own"))
    assert distributed.wait_for_all(0, 11, 86400) == ["process 2: ValueError: bad",
                                                      "process 10: RuntimeError: out of memory"]
    assert not distributed._out_of_step
    monkeypatch.setattr(distributed, "_sweep_call", 1)  # the next sweep has keys of its own
    stop = threading.Event()
    stop.set()  # a Ctrl-C in the wait is shared: the others stop after their epoch and come, and it goes on
    threading.Timer(0.3, store.kv.__setitem__, ("fusion_jax/end/1/here/1", "1")).start()
    assert distributed.wait_for_all(0, 2, 60, stop) == [] and not distributed._out_of_step
    assert store.kv["fusion_jax/end/1/stopped/0"] and distributed.peers_stopped(1) == [0]
    monkeypatch.setattr(distributed, "_sweep_call", 2)
    store.kv["fusion_jax/end/2/gone/0"] = "1"  # process 0 waited out and left: process 1 leaves at once too
    assert distributed.wait_for_all(1, 3, 86400) == [] and distributed._out_of_step
    monkeypatch.setattr(distributed, "_sweep_call", 3)
    monkeypatch.setattr(distributed, "_out_of_step", False)
    with pytest.raises(distributed.WaitedOut, match="the other processes did not finish within"):
        distributed.wait_for_all(1, 2, 0.1)
    assert store.kv["fusion_jax/end/3/gone/1"] and distributed._out_of_step


def test_on_a_cpu_the_devices_read_the_hosts_features_in_place():
    """A FeatureSet's arrays are read-only and 64-byte aligned, a copy where they came otherwise: on a CPU every
    jax device then holds the host's array itself (an unaligned one is copied to each device: the features
    were in memory once more per device)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from fusion_jax.data import FeatureSet
    from fusion_jax.groups import group_data, run_mesh

    rng = np.random.default_rng(0)
    buffer = np.zeros(8000 + 32, np.float32)
    start = -buffer.ctypes.data % 64 // 4 + 4
    image = buffer[start:start + 8000].reshape(1000, 8)
    image[...] = rng.standard_normal((1000, 8), dtype=np.float32)
    assert image.ctypes.data % 64 == 16
    text = rng.standard_normal((3000, 8), dtype=np.float32)
    fs = FeatureSet(image, text, np.repeat(np.arange(1000), 3))
    assert fs.image.ctypes.data % 64 == 0 and fs.text.ctypes.data % 64 == 0
    np.testing.assert_array_equal(fs.image, image)
    with pytest.raises(ValueError, match="read-only"):
        fs.image[0, 0] = 1.0
    for again in (copy.deepcopy(fs), pickle.loads(pickle.dumps(fs))):  # built through __init__ too
        assert again.image.ctypes.data % 64 == 0 and not again.image.flags.writeable
        np.testing.assert_array_equal(again.text, fs.text)
    if jax.devices()[0].platform != "cpu":
        pytest.skip("a CPU's devices share the host's memory")
    data = group_data(fs, NamedSharding(run_mesh(), P()))
    for name in ("image", "text"):
        shards = data[name].addressable_shards
        assert shards and all(np.shares_memory(np.asarray(s.data), getattr(fs, name)) for s in shards), name


def test_process_0_waits_for_the_groups_of_the_others_by_the_clock(tmp_path, monkeypatch, smoke_config):
    """Process 0 gives the other processes' groups distributed.wait_seconds of the clock, not that many of its
    one-second sleeps: each look between them (the records on a shared file system, the key-value store)
    takes time too."""
    from fusion_jax import distributed, sweep
    clock, looks = [0.0], []

    def slow_look(index, count):  # a slow key-value store: 10 s a look
        looks.append(clock[0])
        clock[0] += 10.0
        return []

    monkeypatch.setattr(sweep, "time", types.SimpleNamespace(  # sweep's clock only, not the process's
        monotonic=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s)))
    monkeypatch.setattr(distributed, "peer_failures", slow_look)
    with pytest.raises(distributed.WaitedOut, match="not finished by the other processes after 30 s"):
        sweep._gather(str(tmp_path), plan(smoke_config), 0, 2, 30.0, threading.Event())
    assert looks == [0.0, 11.0, 22.0]


def test_a_stop_in_one_process_stops_all_and_they_leave_together(store, monkeypatch):
    """Ctrl-C to one process (or to all, as multiprocess_localhost.sh sends it) while they train: every
    process stops before its next epoch and waits for the others, then all exit in step (process 0 leaving
    first took its coordinator with it: the others died with SIGABRT)."""
    import time

    from fusion_jax import distributed

    stop = threading.Event()
    with distributed.failures_shared(0, 2, 60, stop):  # process 0 trains; process 1 is stopped
        store.kv["fusion_jax/end/0/stopped/1"] = "1"
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stop.is_set()  # process 0 stops before its next epoch
    store.kv["fusion_jax/end/0/here/1"] = "1"  # process 1 waits at the end
    with pytest.raises(distributed.Stopped, match="group g: stopped after epoch 3"):
        with distributed.failures_shared(0, 2, 60, stop):
            raise distributed.Stopped("group g: stopped after epoch 3")
    assert store.kv["fusion_jax/end/0/stopped/0"] and store.kv["fusion_jax/end/0/here/0"]
    assert distributed.stopped_in_step and not distributed._out_of_step  # through JAX's shutdown, together
    monkeypatch.setattr(distributed, "_sweep_call", 1)  # the next sweep: process 1 came and left out of step
    store.kv.update({"fusion_jax/end/1/here/1": "1", "fusion_jax/end/1/gone/1": "1"})
    with pytest.raises(distributed.Stopped):
        with distributed.failures_shared(0, 2, 60, stop):
            raise distributed.Stopped("group g: stopped after epoch 4")
    assert distributed._out_of_step and not distributed.stopped_in_step  # leaves at once, not through JAX's barrier


def test_a_stopped_process_tells_the_others_at_once_not_after_its_epoch(store):
    import time

    from fusion_jax import distributed

    stop = threading.Event()
    with distributed.failures_shared(1, 2, 60, stop):
        stop.set()  # Ctrl-C while an epoch of minutes runs on
        deadline = time.monotonic() + 10
        while "fusion_jax/end/0/stopped/1" not in store.kv and time.monotonic() < deadline:
            time.sleep(0.05)
        assert distributed.peers_stopped(0) == [1]
        assert distributed.peers_stopped(1) == []  # its own stop is not a peer's


def test_the_coordination_service_failing_ends_the_stop_watch_with_a_warning(store, monkeypatch, caplog):
    """Not with a thread's traceback on stderr: a warning that Ctrl-C no longer passes between the processes."""
    import time

    from fusion_jax import distributed

    def unreachable(prefix):
        raise RuntimeError("UNAVAILABLE: failed to connect to the coordination service")

    monkeypatch.setattr(store, "key_value_dir_get", unreachable)
    seen = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    watch = distributed._PeerStops(1, threading.Event())
    deadline = time.monotonic() + 10
    while watch._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    watch.close()
    assert not seen, seen
    assert "process 1: the coordination service failed (RuntimeError: UNAVAILABLE" in caplog.text
    assert "a Ctrl-C of another process does not reach this one" in caplog.text


def test_a_process_leaves_through_jaxs_shutdown_only_where_all_leave_together(monkeypatch):
    """sys.exit (JAX's shutdown barrier) where the processes leave together; os._exit where one leaves out of
    step: the barrier would wait 5 minutes for it, then abort (SIGABRT, exit status 134)."""
    import jax

    from fusion_jax import distributed

    class AtOnce(BaseException):
        pass

    monkeypatch.setattr(distributed.os, "_exit", lambda code: (_ for _ in ()).throw(AtOnce(code)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    for out_of_step, interrupted, in_step, how in ((False, False, False, SystemExit), (True, False, False, AtOnce),
                                                   (False, True, False, AtOnce), (False, True, True, SystemExit)):
        monkeypatch.setattr(distributed, "_out_of_step", out_of_step)
        monkeypatch.setattr(distributed, "stopped_in_step", in_step)
        with pytest.raises(how) as left:
            distributed.leave(3, interrupted)
        assert left.value.args == (3,)


def test_a_sweep_alone_after_a_distributed_one_in_the_same_python_process_is_refused(smoke_config, monkeypatch):
    """jax.distributed cannot be left: a later sweep for 1 process (or another count) would run as one of the
    earlier count's processes, waiting for peers that are gone."""
    import jax

    from fusion_jax import distributed
    from fusion_jax.validate import ConfigError

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    for n, wanted in ((0, "1 process"), (1, "1 process"), (3, "3 processes")):
        smoke_config.distributed.num_processes = n
        with pytest.raises(ConfigError, match=f"asks for {wanted}, but this Python process has joined a "
                                              "jax.distributed run already as process 1 of 2"):
            distributed.initialize(smoke_config)
    smoke_config.distributed.update(num_processes=2, process_id=0)
    with pytest.raises(ConfigError, match="distributed.process_id: asks for process 0 of 2, but .* as process 1 of 2"):
        distributed.initialize(smoke_config)
    smoke_config.distributed.process_id = 1
    assert distributed.initialize(smoke_config) == (1, 2)


def test_a_multi_process_sweep_after_jax_has_run_in_the_process_is_a_config_error(smoke_config, monkeypatch):
    """jax.distributed starts only before JAX's first use in a process: from Python, after other JAX work,
    the sweep says so and how to run it (its RuntimeError was all there was)."""
    import jax

    from fusion_jax import distributed
    from fusion_jax.validate import ConfigError

    jax.devices()  # JAX has run here (as in every test process)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # leaves the preemption setting as it is
    smoke_config.distributed.update(num_processes=2, process_id=1, coordinator_address="127.0.0.1:1")
    with pytest.raises(ConfigError, match="JAX has run in this Python process already"):
        distributed.initialize(smoke_config)
    assert not jax.distributed.is_initialized()


def test_a_process_failing_while_training_waits_for_the_others_then_raises_its_own_error(store, caplog, monkeypatch):
    """The failure is shared, the wait's own trouble (the others not coming in time) only logged; process
    0's WaitedOut, which has waited already, is shared without a second wait."""
    from fusion_jax import distributed

    store.kv.update({"fusion_jax/end/0/here/0": "1", "fusion_jax/end/0/failed/0": "OSError: disk full"})
    with pytest.raises(PermissionError, match="checkpoints"):  # not a group's own error (out of memory would be)
        with distributed.failures_shared(1, 2, 60):
            raise PermissionError("cannot write checkpoints")
    assert store.kv["fusion_jax/end/0/failed/1"] == "PermissionError: cannot write checkpoints"
    assert "process 1 of 2 failed (PermissionError: cannot write checkpoints); it waits for the other" in caplog.text
    assert "other processes failed too: process 0: OSError: disk full" in caplog.text
    caplog.clear()
    monkeypatch.setattr(distributed, "_sweep_call", 1)  # the next sweep: process 0 never comes
    with pytest.raises(ValueError, match="bad"):
        with distributed.failures_shared(1, 2, 0.1):
            raise ValueError("bad")
    assert "waiting for the other processes ended with WaitedOut: the other processes did not finish" in caplog.text
    monkeypatch.setattr(distributed, "_sweep_call", 2)
    with pytest.raises(distributed.WaitedOut):
        with distributed.failures_shared(0, 2, 0.1):
            raise distributed.WaitedOut("groups ['x'] not finished by the other processes after 1 s")
    assert store.kv["fusion_jax/end/2/failed/0"].startswith("WaitedOut: groups ['x']")
    assert "fusion_jax/end/2/here/0" not in store.kv  # no second wait
    assert store.kv["fusion_jax/end/2/gone/0"] and distributed._out_of_step  # the others leave, and it at once
    monkeypatch.setattr(distributed, "_sweep_call", 3)  # stopping because another failed is not a failure
    store.kv["fusion_jax/end/3/here/0"] = "1"
    with pytest.raises(distributed.PeerFailed):
        with distributed.failures_shared(1, 2, 60):
            raise distributed.PeerFailed("1 of 2 processes failed, so this one stops too")
    assert store.kv["fusion_jax/end/3/here/1"] and not any(k.startswith("fusion_jax/end/3/failed/") for k in store.kv)


def test_a_stop_while_waiting_for_the_others_start_up_is_shared_in_step(store):
    """A Ctrl-C while a process waits for the others' start-up (hours of feature extraction elsewhere) ends
    the start-up of every process together, as a failed one does."""
    from fusion_jax import distributed

    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()  # Ctrl-C

    def process_1_done():  # half a second after the Ctrl-C, however late its timer fired
        stop.wait(60)
        time.sleep(0.5)
        store.kv["fusion_jax/start/0/1"] = "ok"

    threading.Thread(target=process_1_done).start()
    with pytest.raises(KeyboardInterrupt, match="stopped while waiting for the other processes' start-up"):
        with distributed.checked_start(0, 2, 60, stop):
            pass
    assert store.kv["fusion_jax/start/0/0"] == "ok" and "fusion_jax/start-stopped/0/0" in store.kv
    assert distributed.stopped_in_step
    distributed._starts = itertools.count()  # process 1 of the same start, extracting features: its next shard
    del store.kv["fusion_jax/start/0/1"]  # not yet posted then
    with pytest.raises(distributed.PeerFailed, match="process 0: Stopped: stopped while waiting for the other"):
        with distributed.checked_start(1, 2, 60):
            distributed.raise_if_a_peer_failed_to_start()
            pytest.fail("went on extracting")
    distributed._starts = itertools.count()  # process 1 again, its start-up over before process 0's stop came
    del store.kv["fusion_jax/start/0/1"], store.kv["fusion_jax/start-read/0/1"]
    with pytest.raises(BaseException) as caught:  # a peer's stop, not its own (Stopped, a KeyboardInterrupt)
        with distributed.checked_start(1, 2, 60):
            pass
    assert caught.type is distributed.PeerFailed and "process 0: Stopped: stopped while" in str(caught.value)
    assert not distributed.stopped_in_step


def test_a_stop_during_start_up_is_shared_with_the_other_processes(store):
    """A stop (Ctrl-C) while a process loads its data is posted like an error, so the others stop with it
    (PeerFailed) instead of waiting for a status that never comes."""
    from fusion_jax import distributed
    from fusion_jax.sweep import Stopped

    store.kv["fusion_jax/start/0/0"] = "ok"  # process 0's start-up went well
    with pytest.raises(Stopped):
        with distributed.checked_start(1, 2, 60):
            raise Stopped("stopped while extracting clip's features")
    assert store.kv["fusion_jax/start/0/1"] == "Stopped: stopped while extracting clip's features"
    assert distributed.stopped_in_step  # every process leaves the start-up here: main.py exits normally
    distributed._starts = itertools.count()  # process 0 of the same start reads it
    del store.kv["fusion_jax/start/0/0"]  # which it posts then
    with pytest.raises(distributed.PeerFailed, match="process 1: Stopped: stopped while extracting"):
        with distributed.checked_start(0, 2, 60):
            pass


def test_a_process_extracting_features_stops_within_a_shard_of_a_peers_failed_start(store, caplog):
    """The failed process says so at once; another, hours into its feature extraction, stops after its
    next shard rather than at the end of its start-up (there it would name only the first failure)."""
    from fusion_jax import distributed
    from fusion_jax.sweep import _stop_if_set

    shards = []
    with caplog.at_level(logging.ERROR, logger="fusion_jax"):
        with pytest.raises(ValueError):
            with distributed.checked_start(1, 3, 60):
                store.kv.update({"fusion_jax/start/0/0": "ok", "fusion_jax/start/0/2": "ok"})
                raise ValueError("no captions file")
    assert "process 1 of 3 failed to start (ValueError: no captions file); the others stop" in caplog.text
    distributed._starts = itertools.count()  # process 0 of the same start, extracting features, before that
    del store.kv["fusion_jax/start/0/0"], store.kv["fusion_jax/start/0/1"]
    with pytest.raises(distributed.PeerFailed, match=r"^1 of 3 processes failed to start, so this one stops too; "
                                                      r"process 1: ValueError: no captions file$"):
        with distributed.checked_start(0, 3, 60):
            for shard in range(3):
                _stop_if_set(threading.Event(), "clip")
                shards.append(shard)
                if shard == 1:  # process 1 fails while process 0 extracts its second shard
                    store.kv["fusion_jax/start/0/1"] = "ValueError: no captions file"
    assert shards == [0, 1] and store.kv["fusion_jax/start/0/0"].startswith("PeerFailed: 1 of 3")
    distributed._starts = itertools.count()  # process 2, which did its start-up alone: process 0 is not named
    del store.kv["fusion_jax/start/0/2"]  # which it posts then
    with pytest.raises(distributed.PeerFailed, match=r"^1 of 3 processes failed to start, so this one stops too; "
                                                      r"process 1: ValueError: no captions file$"):
        with distributed.checked_start(2, 3, 60):
            pass
    _stop_if_set(threading.Event(), "clip")  # outside a start-up: nothing to read


def test_each_group_goes_to_one_process():
    from fusion_jax import distributed

    for n in range(7):
        for count in range(1, 5):
            shares = [distributed.mine(list(range(n)), i, count) for i in range(count)]
            assert sorted(sum(shares, [])) == list(range(n)) and max(map(len, shares)) - min(map(len, shares)) <= 1
    # Dealt in turn, not in blocks: the plan lists a backbone's groups together (concat, then cross).
    assert distributed.mine(list(range(5)), 1, 2) == [1, 3]


def test_a_resume_deals_the_unfinished_groups_evenly_by_process_0s_view(smoke_config, tmp_path, monkeypatch, store):
    """Groups are dealt after the finished ones are left out: a 2-process resume after process 1 died (its
    groups 1 and 3 unfinished) gives each process one, not both to process 1. Which are finished is process
    0's view of the workdir, in every process (a host's file system cache may not show a record yet)."""
    from fusion_jax import distributed
    from fusion_jax.workdir import prepare_workdir

    groups = plan(smoke_config)
    prepare_workdir(str(tmp_path), smoke_config.to_dict())  # this host sees no finished group yet
    monkeypatch.setattr(distributed, "initialize", lambda config: (1, 2))  # this is process 1 of the resume
    store.kv.update({"fusion_jax/start/0/0": "ok", "fusion_jax/start/1/0": "ok", "fusion_jax/start-shared/0": "{}",
                     "fusion_jax/start-shared/1": json.dumps({"finished": [groups[0].name, groups[2].name]}),
                     "fusion_jax/end/1/here/0": "1"})  # process 0 waits at the end once this one stops
    trained, stop = [], threading.Event()
    on_epoch = lambda group, epochs: (trained.append(group.name), stop.set())
    with pytest.raises(KeyboardInterrupt, match="stopped"):
        train_and_evaluate(smoke_config, str(tmp_path), on_epoch=on_epoch, stop=stop)
    assert trained == [groups[3].name]  # process 0 takes groups[1]


def test_a_process_whose_own_group_failed_says_so_in_its_exit(smoke_config, tmp_path, monkeypatch, store):
    """Process 1 of 2: its group's NaN features fail that group (recorded for process 0's results); after the
    end wait it raises GroupsFailed (exit 1, as process 0's), not "this process's groups are done"."""
    import fusion_jax.sweep as sweep
    from fusion_jax import distributed

    _nan_in_unaligned_image_row_3(monkeypatch)
    monkeypatch.setattr(distributed, "initialize", lambda config: (1, 2))
    config = smoke_config
    config.methods, config.scales, config.degradation.levels = ("concat",), (128,), (0.0,)
    store.kv.update({"fusion_jax/start/0/0": "ok", "fusion_jax/start/1/0": "ok", "fusion_jax/start-shared/0": "{}",
                     "fusion_jax/start-shared/1": json.dumps({"finished": []}), "fusion_jax/end/1/here/0": "1"})
    with pytest.raises(sweep.GroupsFailed, match=r"^1 of this process's groups failed \(results.json lists them\): "
                                                 r"group unaligned-concat: image features .* hold NaN or Inf"):
        train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "groups" / "unaligned-concat.failed.json").exists()
    assert not (tmp_path / "groups" / "aligned-concat.json").exists()  # process 0's


@pytest.fixture(scope="module")
def small_sweep_results(tmp_path_factory):
    """The results of the SMALL sweep in one process on one CPU device, uninterrupted."""
    workdir = tmp_path_factory.mktemp("one")
    single = _main([f"--workdir={workdir}"], env=host_devices(1))
    assert single.wait(timeout=300) == 0, single.err()[-2000:]
    return json.loads((workdir / "results.json").read_text())


def test_two_processes_equal_one(tmp_path, small_sweep_results):
    # On CPUs: two processes on one GPU would share it, and a GPU's numbers depend on the chunk layout.
    port = _free_port()
    common = [f"--workdir={tmp_path / 'two'}", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2"]
    procs = [_main([*common, f"--config.distributed.process_id={i}"], env=host_devices(1)) for i in (0, 1)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.err()[-2000:]
    _assert_same(small_sweep_results, json.loads((tmp_path / "two" / "results.json").read_text()))
    assert "process 1 of 2" in procs[1].err()


def test_a_two_process_sweep_killed_resumes_in_one_process(tmp_path, small_sweep_results):
    """Process 1's groups resume from their own checkpoints (Orbax had written them without arrays).
    SIGTERM ends process 1 (JAX's preemption service had taken it, and the process trained on)."""
    import signal

    port = _free_port()
    common = [f"--workdir={tmp_path}", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2"]
    procs = [_main([*common, f"--config.distributed.process_id={i}"], env=without_compilation_cache(host_devices(1)))
             for i in (0, 1)]
    from fusion_jax import distributed

    config = load_config("synthetic", "smoke")  # as SMALL sets it
    config.backbones, config.scales, config.train.epochs = ("aligned",), (128,), 2
    second = distributed.mine(plan(config), 1, 2)
    try:
        _wait_for_a_checkpoint(procs[1], tmp_path / "checkpoints" / second[0].name, freeze=True)
    finally:
        procs[1].send_signal(signal.SIGTERM)
        procs[1].send_signal(signal.SIGCONT)
        procs[0].send_signal(signal.SIGKILL)
        try:
            assert procs[1].wait(timeout=30) == -signal.SIGTERM
        finally:
            for p in procs:
                p.kill()
                p.wait(timeout=60)
    restarted = _main([f"--workdir={tmp_path}"], env=host_devices(1))
    try:
        code = restarted.wait(timeout=300)
    finally:
        restarted.kill()
    log = restarted.err()
    assert code == 0, log[-3000:]
    assert re.search(f"group {second[0].name}: resuming from the checkpoint after epoch [12] of 2", log), log[-3000:]
    assert "corrupt" not in log
    _assert_same(small_sweep_results, json.loads((tmp_path / "results.json").read_text()))


SAVE_IN_TWO_PROCESSES = """
import sys, jax, numpy as np
port, me, out = sys.argv[1:]
jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2, process_id=int(me))
from fusion_jax.checkpoint import GroupCheckpoints
ckpt = GroupCheckpoints(out + "/group" + me, keep=2)
for epoch in (1, 2, 3):  # both processes at once, as a sweep's do
    ckpt.save(epoch, {"state": {"w": np.arange(6, dtype=np.float32).reshape(2, 3) + int(me)},
                      "seconds": np.float32(me)})
ckpt.close()
"""


def test_each_process_writes_its_own_groups_checkpoints(tmp_path):
    """Orbax writes host arrays from process 0 alone; a group that process 1 trained was saved without
    them, and could not resume. (Processes that saved at once also read each other's signals of a
    made directory, and failed a save now and then: checkpoint.py makes directories in the foreground.)"""
    import jax
    from fusion_jax.checkpoint import GroupCheckpoints

    port = _free_port()
    procs = [_Process([sys.executable, "-c", SAVE_IN_TWO_PROCESSES, str(port), str(i), str(tmp_path)],
                      cwd=ROOT, env=host_devices(1)) for i in (0, 1)]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0], [p.err()[-2000:] for p in procs]
    abstract = {"state": {"w": jax.ShapeDtypeStruct((2, 3), np.float32)}, "seconds": jax.ShapeDtypeStruct((), np.float32)}
    for me in (0, 1):
        ckpt = GroupCheckpoints(str(tmp_path / f"group{me}"), keep=2)
        tree = ckpt.restore(ckpt.latest_epoch(), abstract)
        np.testing.assert_array_equal(tree["state"]["w"], np.arange(6).reshape(2, 3) + me)
        assert tree["seconds"] == me
        for shape, dtype, message in (((2,), np.float32, r"float32\[\] in the checkpoint, float32\[2\] expected"),
                                      ((), np.float64, r"float32\[\] in the checkpoint, float64\[\] expected")):
            with pytest.raises(ValueError, match=r"\['seconds'\]: " + message):  # not cast, not reshaped
                ckpt.restore(3, {**abstract, "seconds": jax.ShapeDtypeStruct(shape, dtype)})
        ckpt.close()


@pytest.mark.parametrize("bad", [0, 1])
def test_a_process_failing_at_start_stops_all_at_once(tmp_path, bad):
    """One process's workdir cannot be created: both processes stop at once, the other naming it
    (before checked_start, the other waited in jax.distributed for distributed.timeout_seconds)."""
    import time

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    port = _free_port()
    common = [f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
              "--config.distributed.timeout_seconds=240"]
    t0 = time.perf_counter()
    procs = [_main([*common, f"--workdir={blocker / 'sub' if i == bad else tmp_path / 'good'}",
                    f"--config.distributed.process_id={i}"], env=host_devices(1)) for i in (0, 1)]
    codes = [p.wait(timeout=200) for p in procs]
    errors = [p.err() for p in procs]
    assert codes == [2, 2], errors
    assert time.perf_counter() - t0 < 120
    # The folder came from --workdir, and the error names the flag (the other process's report of it too).
    error_line = next(line for line in errors[bad].splitlines() if line.startswith("fusion_jax: error:"))
    assert error_line.startswith("fusion_jax: error: --workdir: cannot write") and "config.workdir" not in error_line
    assert f"process {bad} of 2 failed to start (ConfigError: " in errors[bad]  # at once, in the log
    assert f"process {bad}: ConfigError: --workdir: cannot write" in errors[1 - bad], errors[1 - bad][-2000:]
    assert not (tmp_path / "good" / "results.json").exists()


def test_a_group_that_fails_on_its_own_is_recorded_and_the_others_finish(smoke_config, tmp_path, monkeypatch,
                                                                         caplog):
    """XLA out of memory compiling a group, or running its epoch, fails that group alone, logged with its
    traceback; a later group of the same shapes compiles again; the failed epoch's group keeps its
    checkpoints, and a rerun trains both groups again, that one from its last checkpoint."""
    import dataclasses

    import jax

    import fusion_jax.groups as groups_lib

    config = smoke_config
    config.methods, config.scales, config.degradation.levels = ("concat",), (128,), (0.0,)
    config.compile_workers = 1  # the groups build one after the other, whatever the cores
    first, second = [g.name for g in plan(config)]  # aligned-concat, unaligned-concat: programs of one shape
    compile_calls, compile_ = [], jax.stages.Lowered.compile

    def out_of_memory_once(lowered, *a, **k):
        compile_calls.append(1)
        if len(compile_calls) == 2:  # the first group's train_epoch (after its init)
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory while compiling")
        return compile_(lowered, *a, **k)

    program_, epochs = groups_lib.CompiledAhead.program, []

    def out_of_memory_in_epoch_2(self, i):
        program = program_(self, i)
        if program.group.name != second:
            return program
        train_epoch = program.train_epoch

        def failing(*args):
            epochs.append(1)
            if len(epochs) == 2:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory\nin epoch 2")
            return train_epoch(*args)
        return dataclasses.replace(program, train_epoch=failing)

    monkeypatch.setattr(jax.stages.Lowered, "compile", out_of_memory_once)
    monkeypatch.setattr(groups_lib.CompiledAhead, "program", out_of_memory_in_epoch_2)
    results = train_and_evaluate(config, str(tmp_path))
    assert not results["runs"] and [f["group"] for f in results["failed_groups"]] == [first, second]
    assert results["failed_groups"][0]["error"].startswith(f"group {first}: JaxRuntimeError: RESOURCE_EXHAUSTED: "
                                                           "out of memory while compiling")
    assert results["failed_groups"][1]["error"] == (
        f"group {second}: JaxRuntimeError: RESOURCE_EXHAUSTED: out of memory in epoch 2")
    assert f"group {second} failed; the sweep goes on" in caplog.text and "Traceback" in caplog.text
    assert (tmp_path / "checkpoints" / second / "1").is_dir()
    assert (results["timing"]["groups"], results["timing"]["groups_trained"]) == (2, 0)
    assert sorted(os.listdir(tmp_path / "groups")) == [f"{first}.failed.json", f"{second}.failed.json"]
    monkeypatch.undo()
    caplog.clear()
    caplog.set_level(logging.INFO, logger="fusion_jax")
    again = train_and_evaluate(config, str(tmp_path))
    assert again["failed_groups"] == [] and len(again["runs"]) == 2 * len(config.seeds)
    assert again["timing"]["groups_trained"] == 2 and sorted(os.listdir(tmp_path / "groups")) == [
        f"{first}.json", f"{second}.json"]  # the earlier attempt's failure records gone
    assert f"group {second}: resuming from the checkpoint after epoch 1 of 2" in caplog.text
    assert f"training group {first} again, which failed in an earlier attempt: group {first}: JaxRuntimeError" \
        in caplog.text


def test_an_error_that_is_not_its_groups_own_ends_the_sweep(smoke_config, tmp_path):
    """An error of on_epoch's, or a bug's (a TypeError), is not recorded as a failed group: every group would
    fail alike."""
    config = _small(smoke_config)

    def broken(group, epochs_done):
        raise TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):
        train_and_evaluate(config, str(tmp_path), on_epoch=broken)
    assert not list((tmp_path / "groups").iterdir())


def test_failed_groups_in_two_processes_end_both_with_status_1(tmp_path):
    """A learning rate of 1e13 fails both groups (NaN loss), one in each process: process 0 writes the results
    and lists both; process 1 says which of its own failed; both exit 1, together (JAX's shutdown in step)."""
    port = _free_port()
    common = [f"--workdir={tmp_path}", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2", "--config.train.learning_rate=1e13"]
    procs = [_main([*common, f"--config.distributed.process_id={i}"], env=host_devices(1)) for i in (0, 1)]
    codes = [p.wait(timeout=240) for p in procs]
    errors = [p.err() for p in procs]
    assert codes == [1, 1], errors
    assert "fusion_jax: failed: group aligned-cross: non-finite training loss" in errors[0]
    assert re.search(r"fusion_jax: failed: 1 of this process's groups failed \(results.json lists them\): "
                     r"group aligned-cross: non-finite training loss", errors[1]), errors[1][-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [f["group"] for f in results["failed_groups"]] == ["aligned-concat", "aligned-cross"]


def test_a_process_failing_while_training_is_named_and_the_others_keep_their_groups(tmp_path):
    """Process 1 cannot write its group's checkpoints: it waits while process 0 trains its own group, then
    both stop at once (no 5-minute abort at JAX's shutdown barrier), process 0 naming process 1's error."""
    import time

    from fusion_jax.workdir import prepare_workdir

    config = load_config("synthetic", "smoke")  # as SMALL sets it
    config.backbones, config.scales, config.train.epochs = ("aligned",), (128,), 2
    prepare_workdir(str(tmp_path), config.to_dict())
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "aligned-cross").write_text("a file where process 1's group checkpoints")
    port = _free_port()
    common = [f"--workdir={tmp_path}", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2"]
    t0 = time.perf_counter()
    procs = [_main([*common, f"--config.distributed.process_id={i}"], env=host_devices(1)) for i in (0, 1)]
    codes = [p.wait(timeout=240) for p in procs]
    errors = [p.err() for p in procs]
    assert codes == [2, 2] and time.perf_counter() - t0 < 200, errors
    assert "process 1 of 2 failed (ConfigError: config.workdir: cannot write checkpoints" in errors[1]
    assert re.search(r"fusion_jax: error: 1 of 2 processes failed while training, so results.json is not written: "
                     r"process 1: ConfigError: --workdir: cannot write checkpoints in .*aligned-cross", errors[0])
    assert (tmp_path / "groups" / "aligned-concat.json").exists() and not (tmp_path / "results.json").exists()


def _wait_for_a_checkpoint(proc, folder, timeout=240, freeze=False):
    """Wait until a running sweep has saved a checkpoint step into `folder`. freeze: then stop the process
    (SIGSTOP) at once, so that the caller's signal finds the group mid-way (a small group's epochs take
    tens of milliseconds); SIGKILL ends a stopped process, other signals wait for SIGCONT."""
    import signal
    import time

    def saved():
        try:
            return any(name.isdigit() for name in os.listdir(folder))
        except FileNotFoundError:  # not yet made, or removed with its group's end
            return False

    deadline = time.time() + timeout
    while not saved():
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before its checkpoint"
        time.sleep(0.01)
    if freeze:
        proc.send_signal(signal.SIGSTOP)


def test_sigkill_then_restart_equals_uninterrupted(tmp_path, small_sweep_results):
    import signal

    workdir = tmp_path / "killed"
    victim = _main([f"--workdir={workdir}"], env=without_compilation_cache(host_devices(1)))
    _wait_for_a_checkpoint(victim, workdir / "checkpoints" / "aligned-cross", freeze=True)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert not (workdir / "results.json").exists()
    restarted = _main([f"--workdir={workdir}"], env=host_devices(1))
    assert restarted.wait(timeout=300) == 0
    log = restarted.err()
    assert "resuming from the checkpoint after epoch" in log and "1 group to train" in log
    assert restarted.out().strip().endswith(", fig_accuracy_vs_scale.png, fig_noise.png, fig_training_loss.png, "
                                                    "fig_tsne.png")
    _assert_same(small_sweep_results, json.loads((workdir / "results.json").read_text()))


def test_a_stop_asked_while_a_group_compiles_trains_no_epoch(smoke_config, tmp_path, monkeypatch):
    import threading

    from fusion_jax import groups, sweep

    stop, build = threading.Event(), groups.CompiledAhead.program

    def program(self, i):
        out = build(self, i)
        stop.set()  # as a Ctrl-C while the main thread waited for the build
        return out

    monkeypatch.setattr(groups.CompiledAhead, "program", program)
    with pytest.raises(sweep.Stopped, match="stopped before group aligned-concat"):
        train_and_evaluate(_small(smoke_config), str(tmp_path), stop=stop)
    assert not (tmp_path / "checkpoints" / "aligned-concat").exists()


def test_ctrl_c_stops_after_the_epoch_says_how_to_resume_and_keeps_the_checkpoints(tmp_path):
    import signal

    workdir = tmp_path / "interrupted"
    # Python's own SIGINT handler in the child, whatever the test runner inherited (a background job ignores
    # SIGINT); set in the child itself, as a fork-time hook could deadlock a parent that runs JAX's threads.
    argv = ["fusion_jax.main", *SMALL, f"--workdir={workdir}"]
    victim = _Process(
        [sys.executable, "-c", "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
         f"sys.argv = {argv!r}; runpy.run_module('fusion_jax.main', run_name='__main__')"],
        cwd=ROOT, env=without_compilation_cache(os.environ))
    first = workdir / "checkpoints" / "aligned-concat"
    _wait_for_a_checkpoint(victim, first)
    victim.send_signal(signal.SIGINT)
    assert victim.wait(timeout=120) == 130
    err = victim.err()
    last = err.strip().splitlines()[-1]
    assert last.startswith("fusion_jax: interrupted.") and "run the same command" in err
    # A synthetic sweep extracts no features: neither message speaks of them.
    assert "stopping (training stops before its next epoch; Ctrl-C again" in err and "Traceback" not in err, err[-3000:]
    assert f"the last epoch of 1 unfinished group ({workdir}/checkpoints/)" in last or "1 finished group" in last, last
    assert "shard of features" not in err and "features" not in last, err[-3000:]
    # The signal came after epoch 1 of `concat`: it stopped before its epoch 2, or (the signal landing after
    # that check) finished `concat` and stopped before `cross`'s first epoch.
    kept = first.exists() and any(p.name.isdigit() for p in first.iterdir())
    assert kept or (workdir / "groups" / "aligned-concat.json").exists()
    assert not (workdir / "results.json").exists()


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_while_the_command_starts_ends_it_in_one_line(tmp_path, presses):
    """Ctrl-C before main() takes it over (here while the config loads, after jax's imports): one press ends the
    start with one line and status 130, never a traceback nor a sweep that trains on (a KeyboardInterrupt inside
    a garbage-collection callback of jax's was swallowed); a second press ends the process at once."""
    import signal

    config = tmp_path / "pressing.py"
    config.write_text(
        "import os, runpy, signal\n"
        f"smoke = runpy.run_path({str(pathlib.Path(ROOT) / 'configs' / 'synthetic.py')!r})['get_config']('smoke')\n"
        "def get_config():\n"
        f"    for _ in range({presses}):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return smoke\n")
    argv = ["fusion_jax.main", f"--config={config}", f"--workdir={tmp_path / 'out'}"]
    done = subprocess.run(  # Python's own SIGINT handler in the child, as in the test above
        [sys.executable, "-c", "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
         f"sys.argv = {argv!r}; runpy.run_module('fusion_jax.main', run_name='__main__')"],
        cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=120)
    if presses == 1:
        assert done.returncode == 130 and done.stderr.strip().splitlines() == [
            "fusion_jax: stopping as soon as the command has started (Ctrl-C again to end at once)",
            "fusion_jax: interrupted while starting, before the sweep began: nothing was written; run the same "
            "command to start it"], done.stderr[-3000:]
    else:
        assert done.returncode == -signal.SIGINT and done.stderr.strip() == (
            "fusion_jax: stopping as soon as the command has started (Ctrl-C again to end at once)"), done.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_a_last_update_that_diverges_fails_its_group_instead_of_scoring_nan_logits(smoke_config, tmp_path):
    """A step's loss comes before its update: one step at a huge learning rate leaves every loss finite and
    the head's logits non-finite. Its group fails, naming the runs, rather than scoring them as negatives.

    At 1e13 the hidden layers stay finite (about 1e28) and only the last layer's products overflow, so the
    logits are non-finite on any device. At 1e38 the first layers overflow, and on an H100 the logits came
    out finite (results/gpu-tests/nvidia-h100-rerun.log): a NaN before a ReLU need not reach them."""
    config = smoke_config
    config.backbones, config.methods, config.scales, config.seeds = ("aligned",), ("concat",), (128,), (42,)
    config.degradation.levels, config.train.epochs, config.train.batch_size = (0.0,), 1, 102  # one step
    config.train.learning_rate = 1e13
    results = train_and_evaluate(config, str(tmp_path))
    assert not results["runs"] and len(results["failed_groups"]) == 1, results
    assert "non-finite validation logits after training of runs (scale 128, seed 42, level 0)" in \
        results["failed_groups"][0]["error"]


def test_a_loss_gone_non_finite_is_blamed_on_its_own_run(smoke_config, tmp_path, monkeypatch):
    """One run's loss NaN at the last step of its epoch (here put there by hand): the group fails naming that run
    alone, in the group's order whatever its slot."""
    import fusion_jax.groups as groups_lib

    config = smoke_config
    config.backbones, config.methods, config.scales, config.train.epochs = ("aligned",), ("concat",), (128,), 1
    config.degradation.levels, config.seeds = (0.0,), (42, 123, 456)
    program_ = groups_lib.CompiledAhead.program

    def nan_in_seed_123(self, i):
        program = program_(self, i)
        train_epoch = program.train_epoch

        def epoch(*args):
            state, losses = train_epoch(*args)
            losses = np.array(losses)
            losses[program.index[1], -1] = np.nan  # the group's second run: seed 123
            return state, losses
        return dataclasses.replace(program, train_epoch=epoch)

    monkeypatch.setattr(groups_lib.CompiledAhead, "program", nan_in_seed_123)
    results = train_and_evaluate(config, str(tmp_path))
    assert [f["error"] for f in results["failed_groups"]] == [
        "group aligned-concat: non-finite training loss in epoch 1 of runs (scale 128, seed 123, level 0)"]


def test_a_failing_checkpoint_close_does_not_hide_the_groups_nan_loss(smoke_config, tmp_path, monkeypatch, caplog):
    """A training error (here a loss gone NaN at a huge learning rate) is what the group records, even
    when closing its checkpoints fails too; the close failure is logged."""
    from fusion_jax.checkpoint import GroupCheckpoints

    def broken_close(self):
        raise OSError("disk gone")

    monkeypatch.setattr(GroupCheckpoints, "close", broken_close)
    config = smoke_config
    config.backbones, config.methods, config.scales, config.train.epochs = ("aligned",), ("concat",), (128,), 1
    config.train.learning_rate = 1e38
    results = train_and_evaluate(config, str(tmp_path))
    assert "non-finite training loss" in results["failed_groups"][0]["error"]
    assert "closing its checkpoints failed" in caplog.text
