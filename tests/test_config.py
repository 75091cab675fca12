"""Every invalid config value stops at once with its field named, and writes nothing."""

import functools
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, load_config
from fusion_jax.sweep import train_and_evaluate
from fusion_jax.validate import ConfigError

INVALID = [
    ("methods", ("concat", "attention"), "methods", "allowed: concat, cross"),
    ("methods", (), "methods", "must not be empty"),
    ("seeds", (), "seeds", "must not be empty"),
    ("seeds", (42, 42), "seeds", "duplicates"),
    ("scales", (10**6,), "scales", "larger than the 2000 pairs"),
    ("scales", (0,), "scales", "positive"),
    ("scales", (30,), "scales", "training"),
    ("backbones", ("clip",), "backbones", "allowed: aligned, unaligned"),
    ("backbones", ("alignment=2",), "backbones", "0 <= A <= 1"),
    ("degradation.levels", (0.0, -0.1), "degradation.levels", ">= 0"),
    ("degradation.levels", (0.0, 1e7), "degradation.levels", "<= 1e+06"),
    ("degradation.levels", (0.1, 0.1000000001), "degradation.levels", "not distinct in float32"),
    ("degradation.levels", (0.0, 1e-50), "degradation.levels", "is 0 in float32"),
    ("seeds", (True,), "seeds", "integer in [0, 2^31)"),
    ("name", "..", "name", "not '.' or '..'"),
    ("backbones", ("alignment=+0.5", "alignment= 0.5"), "backbones", "the same file name, 'alignment=_0.5'"),
    ("compilation_cache", os.path.join(ROOT, "pyproject.toml"), "compilation_cache", "is a file, not a folder"),
    ("degradation.levels", (), "degradation.levels", "must not be empty"),
    ("degradation.scales", (512,), "degradation.scales", "not in scales"),
    ("degradation.scales", (128, 128), "degradation.scales", "duplicates"),
    ("degradation.backbones", ("aligned", "aligned"), "degradation.backbones", "duplicates"),
    ("degradation.backbones", ("alinged",), "degradation.backbones", "'alinged' is not in backbones"),
    ("pairs.train_fraction", 0.995, "scales", "and 1 validation pairs; need at least"),
    ("degradation.modality", "audio", "degradation.modality", "allowed: image, text, both"),
    ("degradation.kind", "blur", "degradation.kind", "allowed: none, gaussian"),
    ("train.learning_rate", 0.0, "train.learning_rate", "> 0"),
    ("train.epochs", 0, "train.epochs", ">= 1"),
    ("train.batch_size", 0, "train.batch_size", ">= 1"),
    ("train.dropout", 1.0, "train.dropout", "[0, 1)"),
    ("pairs.train_fraction", 1.0, "pairs.train_fraction", "(0, 1)"),
    ("head.num_heads", 3, "head.num_heads", "divide"),
    ("features", "flickr", "features", "allowed: synthetic"),
    ("compile_workers", -1, "compile_workers", ">= 0"),
    ("runs_per_chunk", -2, "runs_per_chunk", ">= 0"),
    ("lanes", -1, "lanes", ">= 0"),
    ("tsne_pairs", -1, "tsne_pairs", "integer >= 0"),
    ("pairs.split_seed", -1, "pairs.split_seed", "integer >= 0"),
    ("pairs.split_by", "caption", "pairs.split_by", "allowed: 'pair', 'image'"),
    ("pairs.split", "image", "pairs", "expected exactly split_seed, train_fraction, split_by"),
    ("train.learning_rate", float("inf"), "train.learning_rate", "float32's range"),
    ("train.learning_rate", 1e39, "train.learning_rate", "float32's range"),  # inf in float32
    ("train.learning_rate", 1e-50, "train.learning_rate", "float32's range"),  # 0 in float32
    ("train.weight_decay", float("nan"), "train.weight_decay", "float32's range"),
    ("train.weight_decay", 1e39, "train.weight_decay", "float32's range"),
    ("synthetic.n_images", 1, "synthetic.n_images", ">= 2"),
    ("backbones", ("aligned,unaligned",), "backbones", "several names are a quoted tuple"),
    ("synthetic.view_noise", -0.5, "synthetic.view_noise", ">= 0"),
    ("distributed.wait_seconds", 0, "distributed.wait_seconds", ">= 1"),
    ("distributed.num_processes", -1, "distributed.num_processes", "integer >= 0"),
    ("distributed.coordinator_address", "127.0.0.1:1234", "distributed.num_processes", "whole sweep alone"),
    ("distributed.num_processes", 2, "distributed.coordinator_address", "HOST:PORT"),
    ("distributed.coordinator_address", "myhost", "distributed.coordinator_address", "HOST:PORT"),
    ("distributed.coordinator_address", "127.0.0.1:99999", "distributed.coordinator_address", "1 to 65535"),
]


@pytest.mark.parametrize("field,value,named,allowed", INVALID, ids=[f"{f}={v}" for f, v, _, _ in INVALID])
def test_invalid_value(smoke_config, tmp_path, field, value, named, allowed):
    node = smoke_config
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    workdir = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        train_and_evaluate(smoke_config, str(workdir))
    assert e.value.field == named and str(e.value).startswith(f"config.{named}:") and allowed in str(e.value)
    assert not workdir.exists()


def test_a_second_start_in_a_busy_workdir_is_refused(smoke_config, tmp_path):
    from fusion_jax.workdir import prepare_workdir, sweep_lock

    workdir = str(tmp_path / "out")
    prepare_workdir(workdir, smoke_config.to_dict())
    with sweep_lock(workdir, 0):
        with pytest.raises(ConfigError, match=rf"is in use: another sweep \(process 0, pid {os.getpid()}\)"):
            train_and_evaluate(smoke_config, workdir)
        with sweep_lock(workdir, 1):  # another process index of a multi-process sweep
            pass
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    with sweep_lock(workdir, 1, 2):  # process 1 of an earlier start with two processes, still training
        earlier = rf"in use: another sweep \(process 1, pid {os.getpid()}\)"
        with pytest.raises(ConfigError, match=earlier):
            train_and_evaluate(smoke_config, workdir)  # one process
        with sweep_lock(workdir, 0, 2):  # its own start's process 1 is no obstacle to process 0
            pass
    with sweep_lock(workdir, 0, 1):  # process 1's lock released: a start with one process goes on
        pass


def test_a_cache_folder_that_cannot_be_made_is_refused_before_any_data_loads(smoke_config, tmp_path, monkeypatch):
    """The feature cache (for features from images) and the compilation cache are checked before the data
    loads and made before any feature is extracted, each refused in one line naming its field and where an
    empty cache_dir took its folder from."""
    from fusion_jax import sweep

    monkeypatch.setattr(sweep, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the check"))
    (tmp_path / "file").write_text("not a folder")
    config = load_config("demo", "smoke")
    config.cache_dir = str(tmp_path / "file" / "sub")
    with pytest.raises(ConfigError, match=r"^config.cache_dir: '.*/file/sub' cannot be made: '.*/file' is a file: "):
        train_and_evaluate(config, str(tmp_path / "a"))
    config.cache_dir = ""
    monkeypatch.setenv("FUSION_JAX_CACHE", str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=r"'.*/file' \(config.cache_dir is empty, so \$FUSION_JAX_CACHE\) is a "
                                          "file, not a folder"):
        train_and_evaluate(config, str(tmp_path / "a"))
    from fusion_jax.data import sources  # a cache folder that is there is read as it is, writable or not

    with monkeypatch.context() as m:
        m.setattr(sources, "unwritable_folder", lambda path: "is a folder this user cannot write to")
        m.setattr(config, "cache_dir", str(tmp_path))
        assert sources.cache_root(config) == str(tmp_path)
    made = []
    monkeypatch.setattr(sweep, "made_folder", lambda path: made.append(path) or "cannot be made: a read-only mount")
    smoke_config.compilation_cache = str(tmp_path / "xla")  # synthetic features: no feature cache to make
    with pytest.raises(ConfigError, match=r"^config.compilation_cache: '.*/xla' cannot be made: a read-only mount"):
        train_and_evaluate(smoke_config, str(tmp_path / "a"))
    assert made == [smoke_config.compilation_cache] and not (tmp_path / "a").exists()


def test_a_busy_foreign_or_unwritable_workdir_is_refused_before_any_data_loads(smoke_config, tmp_path, monkeypatch):
    """Feature extraction can take minutes: the workdir checks that need no features come first."""
    from fusion_jax import sweep
    from fusion_jax.workdir import prepare_workdir, sweep_lock

    monkeypatch.setattr(sweep, "load_features", lambda *a, **k: pytest.fail("features loaded before the check"))
    workdir = str(tmp_path / "out")
    prepare_workdir(workdir, smoke_config.to_dict())
    with sweep_lock(workdir, 0):
        with pytest.raises(ConfigError, match=r"is in use: another sweep \(process 0"):
            train_and_evaluate(smoke_config, workdir)
    other = smoke_config.copy_and_resolve_references()
    other.seeds = (7,)
    with pytest.raises(ConfigError, match=r"differs in seeds\)"):
        train_and_evaluate(other, workdir)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="config.workdir: cannot write to .*/file' is not a folder"):
        train_and_evaluate(smoke_config, str(tmp_path / "file" / "out"))
    assert sorted(os.listdir(workdir)) == [".lock-0", "groups", "sweep.json"]  # nothing written by the refusals


def test_process_id_out_of_range(smoke_config, tmp_path):
    smoke_config.distributed.update(num_processes=2, process_id=2, coordinator_address="127.0.0.1:1234")
    with pytest.raises(ConfigError, match=r"distributed.process_id: 2 must be an integer from 0 to num_processes - 1"):
        train_and_evaluate(smoke_config, str(tmp_path / "out"))


def test_split_by_image_names_its_scale_limit(smoke_config, tmp_path):
    """Split by image, each side holds at most twice its own captions (tests/test_pairs.py); the error says so."""
    smoke_config.pairs.split_by = "image"
    smoke_config.scales = (10**6,)
    with pytest.raises(ConfigError, match=r"larger than the 2000 pairs .*split_by='image'"):
        train_and_evaluate(smoke_config, str(tmp_path / "out"))


@pytest.mark.parametrize("n_images", [2, 100])
def test_split_by_image_counts_the_images_of_each_side(smoke_config, n_images):
    """Two images with captions split 0.8 / 0.2 give both to training: the error counts each side, not 'fewer than
    2 images with a caption' (which both have); images without a caption are in neither side."""
    import numpy as np

    from fusion_jax.data import FeatureSet
    from fusion_jax.validate import validate_scales

    fs = FeatureSet(image=np.ones((n_images, 4), np.float32), text=np.ones((300, 4), np.float32),
                    caption_image=np.repeat(np.arange(2), 150))
    smoke_config.pairs.split_by = "image"
    with pytest.raises(ConfigError, match=rf"'image' splits the 2 images of 'a' that have a caption \({n_images} images "
                                          r"in all\) into 2 for training and 0 for validation \(train_fraction 0.8\); "
                                          r"each side needs at least 2"):
        validate_scales(smoke_config, {"'a'": fs})
    smoke_config.pairs.split_by = "pair"
    validate_scales(smoke_config, {"'a'": fs})  # 600 pairs serve the smoke scales


def test_none_kind_needs_level_zero(smoke_config, tmp_path):
    smoke_config.degradation.kind = "none"
    with pytest.raises(ConfigError, match=r"degradation.levels: must be \(0.0,\)"):
        train_and_evaluate(smoke_config, str(tmp_path / "out"))


def test_unwritable_workdir(smoke_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="config.workdir: cannot write"):
        train_and_evaluate(smoke_config, str(blocker / "out"))


def test_command_line_error_is_one_line(tmp_path):
    workdir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fusion_jax.main", "--config=configs/synthetic.py:smoke",
         f"--workdir={workdir}", "--config.methods=('concat','late')"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "fusion_jax: error: config.methods: unknown method 'late'; allowed: concat, cross")
    assert "Traceback" not in proc.stderr and not workdir.exists()


@pytest.mark.parametrize("args, error", [
    (["--workdir="], "--workdir is empty (an unset variable?): give a folder, or leave the flag out"),
    (["train.epochs=2"], "unexpected arguments: train.epochs=2 (it takes flags only: --config=FILE, "),
])
def test_an_empty_workdir_or_a_stray_argument_is_one_line(args, error, tmp_path):
    """`--workdir=$OUT` with OUT unset wrote into results/<name> of the current folder (the committed demo's, say)."""
    config = os.path.join(ROOT, "configs", "synthetic.py")
    proc = subprocess.run([sys.executable, "-m", "fusion_jax.main", f"--config={config}:smoke", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(f"fusion_jax: error: {error}"), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)  # no results/synthetic_smoke


@pytest.mark.parametrize("module, flag, usage", [("fusion_jax.main", "-h", "Run a sweep: python -m fusion_jax.main "),
                                                 ("fusion_jax.report", "--help", "A sweep's report again: ")])
def test_help_asked_for_is_the_usage_on_stdout_with_status_0(module, flag, usage):
    """absl ends a help with status 1; asked for, it is not an error (-h reads as --help)."""
    proc = subprocess.run([sys.executable, "-m", module, flag], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(usage) and "Exit status: 0" in proc.stdout, proc.stderr


@pytest.mark.parametrize("module", ["fusion_jax.main", "fusion_jax.report"])
def test_a_help_whose_reader_leaves_early_is_no_error(module):
    """`--help | head`: the pipe closes before the usage is all written, which is no error of the config's."""
    proc = subprocess.Popen([sys.executable, "-m", module, "-h"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child writes: it imports for a second or more first
    assert proc.wait(timeout=120) == 0 and proc.stderr.read() == b""


def test_a_workdir_error_names_the_flag_or_the_field_it_came_from(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    # The flag wins over the config's field when both are given.
    for where, named in (([f"--workdir={blocker / 'a'}", f"--config.workdir={blocker / 'c'}"], f"--workdir: cannot "
                          f"write to '{blocker / 'a'}'"), ([f"--config.workdir={blocker / 'b'}"], "config.workdir")):
        proc = subprocess.run([sys.executable, "-m", "fusion_jax.main", "--config=configs/synthetic.py:smoke", *where],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith(f"fusion_jax: error: {named}"), proc.stderr[-2000:]
    (tmp_path / "results").write_text("not a folder")  # where the default workdir, results/<config.name>, goes
    proc = subprocess.run([sys.executable, "-m", "fusion_jax.main", f"--config={ROOT}/configs/synthetic.py:smoke"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "fusion_jax: error: workdir results/<config.name> (the default; --workdir=DIR gives another): cannot write to "
        "'results/synthetic_smoke'"), proc.stderr[-2000:]


@pytest.mark.parametrize("extracts", [True, False])
def test_the_first_ctrl_c_speaks_of_features_only_where_they_are_extracted(monkeypatch, capsys, extracts, tmp_path):
    import threading

    from fusion_jax import main

    monkeypatch.setattr(main.signal, "signal", lambda *a: None)  # leave the test runner's own handler
    stop = threading.Event()
    main._first_ctrl_c(stop, extracts, 2, None)
    err = capsys.readouterr().err
    assert stop.is_set() and err.startswith("fusion_jax: stopping (training stops before its next epoch")
    assert ("feature extraction after its current shard" in err) is extracts
    out = main._interrupted_message(str(tmp_path / "w"), extracts)  # no such folder: nothing trained
    assert out.endswith("run the same command to start again.") is not extracts
    assert ("any features extracted so far (cached): run the same command to resume." in out) is extracts


def test_the_interrupted_message_counts_what_the_workdir_keeps(tmp_path):
    from fusion_jax import main

    assert main._interrupted_message(str(tmp_path), False) == (
        "fusion_jax: interrupted before any group trained an epoch: run the same command to start again.")
    (tmp_path / "groups").mkdir()
    for name in ("a.json", "b.json", "c.failed.json", ".tmp-x1y2f.json"):  # a kill's temporary file
        (tmp_path / "groups" / name).write_text("{}")
    # c's and f's last epochs; d's first save unfinished; e's folder made, nothing saved; b's left by a stop after
    # its record
    for group, steps in (("c", ["3", "4"]), ("d", ["1.orbax-checkpoint-tmp"]), ("e", []), ("b", ["2"]), ("f", ["1"])):
        for step in steps:
            (tmp_path / "checkpoints" / group / step).mkdir(parents=True)
        (tmp_path / "checkpoints" / group).mkdir(parents=True, exist_ok=True)
    assert main._interrupted_message(str(tmp_path), True) == (
        f"fusion_jax: interrupted. Kept: 2 finished groups ({tmp_path}/groups/), the last epoch of 2 unfinished "
        f"groups ({tmp_path}/checkpoints/) and any features extracted so far (cached): run the same command to resume.")


def test_a_folder_of_features_files_is_refused_as_workdir_and_one_with_a_log_is_not(smoke_config, tmp_path):
    (tmp_path / "feats").mkdir()
    (tmp_path / "feats" / "mine.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds features files \(mine.npz\) and no sweep: use a new or empty"):
        train_and_evaluate(smoke_config, str(tmp_path / "feats"))
    assert sorted(os.listdir(tmp_path / "feats")) == ["mine.npz"]
    from fusion_jax.workdir import prepare_workdir
    (tmp_path / "logged").mkdir()
    (tmp_path / "logged" / "sweep.log").write_text("")  # `... | tee DIR/sweep.log` makes it first
    prepare_workdir(str(tmp_path / "logged"), smoke_config.to_dict())
    (tmp_path / "sampled").mkdir()
    (tmp_path / "sampled" / "tsne_aligned.npz").write_bytes(b"")  # a sweep's own t-SNE sample, not features
    prepare_workdir(str(tmp_path / "sampled"), smoke_config.to_dict())
    assert (tmp_path / "sampled" / "sweep.json").exists()


def test_a_sweep_json_that_cannot_be_opened_is_one_line_naming_it(smoke_config, tmp_path):
    from fusion_jax.workdir import check_workdir

    (tmp_path / "sweep.json").mkdir()  # damage from outside: not a file the sweep wrote
    with pytest.raises(ConfigError, match=r"config.workdir: .*sweep.json' cannot be read \(IsADirectoryError: "):
        check_workdir(str(tmp_path), smoke_config.to_dict())


def test_a_folder_of_someone_elses_report_files_or_results_json_is_refused(smoke_config, tmp_path, monkeypatch):
    """A sweep would overwrite summary.md, runs.csv, the tables and figures of a folder that holds no sweep; a
    results.json that names no config is not a sweep's. Refused before any data loads, nothing written."""
    from fusion_jax import sweep

    monkeypatch.setattr(sweep, "load_features", lambda *a, **k: pytest.fail("features loaded before the check"))
    (tmp_path / "notes").mkdir()
    for name in ("summary.md", "runs.csv", "fig_mine.png", "todo.txt"):
        (tmp_path / "notes" / name).write_text("mine")
    with pytest.raises(ConfigError, match=r"config.workdir: .*notes' holds files named as a sweep's report \(fig_mine.png, "
                                          r"runs.csv, summary.md\) but no sweep .*: use a new or empty folder"):
        train_and_evaluate(smoke_config, str(tmp_path / "notes"))
    for name in ("table3.md", "table3.csv", "against_paper.md"):  # each a report's name alone
        (tmp_path / name).mkdir()
        (tmp_path / name / name).write_text("mine")
        with pytest.raises(ConfigError, match=rf"holds files named as a sweep's report \({re.escape(name)}\) but no"):
            train_and_evaluate(smoke_config, str(tmp_path / name))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text('{"my": "data"}')
    with pytest.raises(ConfigError, match=r"results.json' is not a fusion_jax sweep's results.json \(it names no config"):
        train_and_evaluate(smoke_config, str(tmp_path / "other"))
    assert sorted(os.listdir(tmp_path / "notes")) == ["fig_mine.png", "runs.csv", "summary.md", "todo.txt"]
    assert os.listdir(tmp_path / "other") == ["results.json"]


def test_a_hand_made_config_that_is_not_a_whole_configdict_is_named(smoke_config):
    """A get_config() of one's own that returns a dict, or a ConfigDict without the base fields, is one error."""
    import ml_collections

    from fusion_jax.validate import validate

    with pytest.raises(ConfigError, match=r"^config: get_config\(\) returned type dict, not an ml_collections.Config"):
        validate(smoke_config.to_dict())
    del smoke_config.train
    with pytest.raises(ConfigError, match=r"^config: lacks the fields train: build it from fusion_jax.config_base.base"):
        validate(smoke_config)
    with pytest.raises(ConfigError, match=r"^config: lacks the fields backbones, cache_dir, .*, workdir: build it"):
        validate(ml_collections.ConfigDict({"name": "mine"}))


def test_another_config_in_a_run_of_several_processes_says_to_give_them_all_the_same(smoke_config, tmp_path):
    """Process 0 claims the new workdir first: a process given other flags is refused by a workdir of seconds ago."""
    from fusion_jax.workdir import check_workdir, prepare_workdir

    workdir = str(tmp_path / "out")
    prepare_workdir(workdir, smoke_config.to_dict())
    other = smoke_config.copy_and_resolve_references()
    other.train.learning_rate = 3e-4
    alone = "differs in train.learning_rate); use a new workdir or remove that one"
    with pytest.raises(ConfigError, match=re.escape(alone) + "$"):
        check_workdir(workdir, other.to_dict())
    other.distributed.num_processes = 2
    with pytest.raises(ConfigError, match=re.escape(alone + "; or, if another process of this run made it, give every "
                                                     "process the same config")):
        check_workdir(workdir, other.to_dict())


def test_a_blank_workdir_is_refused_and_a_tilde_is_the_home_folder(smoke_config, tmp_path, monkeypatch):
    """A shell leaves `~` in --workdir=~/x as it is: the sweep reads it as the home folder, not a folder named '~'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config.workdir: ' ' is blank: give a folder"):
        train_and_evaluate(smoke_config, " ")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match=f"config.workdir: cannot write to '{tmp_path / 'home' / 'file' / 'x'}'"):
        train_and_evaluate(smoke_config, "~/file/x")
    assert os.listdir(tmp_path) == ["home"]


def test_full_disk_is_refused_before_training(smoke_config, tmp_path, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(ConfigError, match="config.workdir: .* 1 MiB free"):
        train_and_evaluate(smoke_config, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--config=configs/synthetic.py:bogus"],
     "fusion_jax: error: ValueError: unknown variant 'bogus' of configs/synthetic.py; allowed: '' or 'smoke'"),
    (["--config=configs/nope.py"],
     "fusion_jax: error: cannot load --config: [Errno 2] No such file or directory: 'configs/nope.py' (a relative "
     f"path is read from the current folder, {ROOT})"),
    (["--config=configs/nope.py", "--config.seeds=(1,)"],  # an override of a config that did not load
     "fusion_jax: error: cannot load --config: [Errno 2] No such file or directory: 'configs/nope.py' (a relative "
     f"path is read from the current folder, {ROOT})"),
    (["--config=configs/synthetic.py", "--bogus=1"], "fusion_jax: error: Unknown command line flag 'bogus'"),
    ([], "fusion_jax: error: --config=FILE is required: the sweep's config file (configs/*.py[:variant]); --help for "
         "the usage"),
    (["--config=configs/synthetic.py", "--flagfile=/nonexistent/a.flags"],  # read as the --config flag is defined
     "fusion_jax: error: Unable to open flagfile: [Errno 2] No such file or directory: '/nonexistent/a.flags'"),
    (["--config=configs/synthetic.py", "--config.train.learningrate=0.1"],
     'fusion_jax: error: --config.train.learningrate: the config has no such field; '
     'Did you mean "learning_rate" instead of "learningrate"?'),
    (["--config=configs/synthetic.py:smoke", "--config.lerning_rate=0.1"],  # a field of a section, at the top
     "fusion_jax: error: --config.lerning_rate: the config has no such field; did you mean --config.train.learning_rate?"),
    (["--config=configs/synthetic.py", "--config.seed=1"],  # a top-level field
     'fusion_jax: error: --config.seed: the config has no such field; Did you mean "seeds" instead of "seed"?'),
    (["--config=configs/synthetic.py", "--config.scales=512", "-config.scales=1024"],  # ml_collections appends
     "fusion_jax: error: --config.scales given more than once; give each flag once"),
])
def test_bad_config_file_or_flag_is_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "fusion_jax.main", *args, f"--workdir={tmp_path / 'out'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == message, proc.stderr[-2000:]


def test_the_recorded_command_reads_as_typed_and_a_shell_takes_it_back():
    """Tuple overrides in double quotes, as the README writes them (shlex.join's '"'"' is hard to read); single
    quotes where a shell would expand inside double ones."""
    import shlex

    from fusion_jax.cli import command_line

    args = ["--config=configs/own_features.py", "--config.backbones=('siglip','clip_l14')", "--config.seeds=(42,)",
            "--workdir=my results", "$HOME", 'say "hi"', "", "it's", "!x", "back\\slash"]
    line = command_line("fusion_jax.main", args)
    assert line == ("python -m fusion_jax.main --config=configs/own_features.py \"--config.backbones=('siglip','clip_l14')\" "
                    "\"--config.seeds=(42,)\" \"--workdir=my results\" '$HOME' 'say \"hi\"' \"\" \"it's\" '!x' 'back\\slash'")
    assert shlex.split(line) == ["python", "-m", "fusion_jax.main", *args]


def test_a_config_file_that_fails_to_import_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("import not_a_module_of_fusion_jax\n\ndef get_config():\n    return None\n")
    proc = subprocess.run([sys.executable, "-m", "fusion_jax.main", f"--config={tmp_path / 'broken.py'}",
                           f"--workdir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == ("fusion_jax: error: cannot load --config: ModuleNotFoundError: "
                                                            "No module named 'not_a_module_of_fusion_jax'"), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_flag_repeated_through_a_flagfile_is_refused_and_two_flagfiles_are_not(tmp_path):
    (tmp_path / "a.flags").write_text("--config.scales=512\n")
    (tmp_path / "b.flags").write_text("--config.train.epochs=0\n")  # invalid: stops at validation
    run = lambda *args: subprocess.run([sys.executable, "-m", "fusion_jax.main", "--config=configs/synthetic.py:smoke",
                                        *args, f"--workdir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=120)
    proc = run(f"--flagfile={tmp_path / 'a.flags'}", "--config.scales=1024")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "fusion_jax: error: --config.scales given more than once; give each flag once"), proc.stderr[-2000:]
    proc = run(f"--flagfile={tmp_path / 'a.flags'}", f"--flagfile={tmp_path / 'b.flags'}")
    assert proc.returncode == 2 and "config.train.epochs: 0 must be" in proc.stderr, proc.stderr[-2000:]


def test_processes_preparing_one_workdir_at_once_do_not_collide(tmp_path):
    """The processes of a multi-process sweep all probe the workdir at start: each with its own probe."""
    from concurrent.futures import ThreadPoolExecutor

    from fusion_jax.workdir import prepare_workdir

    def claim(_):
        for _ in range(25):
            prepare_workdir(str(tmp_path / "out"), {"name": "same"})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(claim, range(8)))  # re-raises a worker's error
    assert sorted(os.listdir(tmp_path / "out")) == ["groups", "sweep.json"]


def test_two_configs_starting_at_once_in_one_workdir_claim_it_for_one(smoke_config, tmp_path, monkeypatch):
    """Both find no sweep.json; one creates it, and the other, finding it made since its check, is refused
    (before, the second rewrote it: the running sweep's workdir named the other config)."""
    import fusion_jax.workdir as workdir_lib
    from fusion_jax.files import atomic_create_json

    workdir, mine, other = str(tmp_path / "out"), smoke_config.to_dict(), {**smoke_config.to_dict(), "seeds": (7,)}

    def the_other_start_wins(path, obj):
        assert atomic_create_json(path, workdir_lib.results_fields(other))
        return atomic_create_json(path, obj)

    monkeypatch.setattr(workdir_lib, "atomic_create_json", the_other_start_wins)
    with pytest.raises(ConfigError, match=r"holds a sweep of another config \(differs in seeds\)"):
        workdir_lib.prepare_workdir(workdir, mine)
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["seeds"] == [7]
    assert [n for n in os.listdir(tmp_path / "out") if n.startswith(".tmp-")] == []
    assert not atomic_create_json(str(tmp_path / "out" / "sweep.json"), {"name": "late"})
    monkeypatch.undo()
    # The other start writes it just after this one's first check.
    workdir, refuse = str(tmp_path / "out2"), workdir_lib._refuse_other_sweep

    def then_the_other_start(*args, **kw):
        refuse(*args, **kw)
        atomic_create_json(os.path.join(workdir, "sweep.json"), workdir_lib.results_fields(other))

    monkeypatch.setattr(workdir_lib, "_refuse_other_sweep", then_the_other_start)
    with pytest.raises(ConfigError, match=r"holds a sweep of another config \(differs in seeds\)"):
        workdir_lib.prepare_workdir(workdir, mine)


def test_workdir_of_another_config_is_refused_and_one_saved_before_a_new_field_is_not(smoke_config, tmp_path):
    """prepare_workdir names the fields that differ; a sweep.json written before `degradation.scales`
    was saved is the same sweep as one at that field's default, and one written before `split_by_scale`
    was saved is not compared on it."""
    from fusion_jax.workdir import prepare_workdir

    workdir = str(tmp_path / "out")
    config = smoke_config.to_dict()
    prepare_workdir(workdir, config)
    other = {**config, "seeds": (7,)}
    with pytest.raises(ConfigError, match=r"differs in seeds\)"):
        prepare_workdir(workdir, other)
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert "keep" not in saved["checkpoint"] and "workdir" not in saved  # no field that may change on a resume
    del saved["degradation"]["scales"]
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(saved))
    prepare_workdir(workdir, config)
    del saved["pairs"]["split_by"]  # saved before the image split: the pairs were split at random
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(saved))
    prepare_workdir(workdir, config)
    with pytest.raises(ConfigError, match=r"differs in pairs.split_by\)"):
        prepare_workdir(workdir, {**config, "pairs": {**config["pairs"], "split_by": "image"}})
    with pytest.raises(ConfigError, match=r"differs in degradation.scales\)"):
        prepare_workdir(workdir, {**config, "degradation": {**config["degradation"], "scales": (128,)}})
    # The layout fields that name the groups (and so their finished files and checkpoints) must stay;
    # those that do not may change on a resume. A sweep.json from before split_by_scale was saved may
    # have had either value.
    del saved["split_by_scale"]
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(saved))
    prepare_workdir(workdir, config)
    prepare_workdir(workdir, {**config, "split_by_scale": True})
    os.remove(tmp_path / "out" / "sweep.json")
    prepare_workdir(workdir, config)
    for field, value in (("split_by_scale", True), ("max_runs_per_program", 3)):
        with pytest.raises(ConfigError, match=rf"differs in {field}\)"):
            prepare_workdir(workdir, {**config, field: value})
    prepare_workdir(workdir, {**config, "runs_per_chunk": 3, "lanes": 2, "compile_workers": 2, "tsne_pairs": 10,
                              "checkpoint": {**config["checkpoint"], "keep": 1}, "compilation_cache": "/xla",
                              "distributed": {**config["distributed"], "num_processes": 1, "timeout_seconds": 9}})
    levels = config["degradation"]["levels"]  # the same numbers written as ints: the same sweep
    prepare_workdir(workdir, {**config, "degradation": {**config["degradation"], "levels": [int(x) if x == int(x)
                                                                                           else x for x in levels]}})
    # Finished results without sweep.json (as committed results folders are) hold their config too.
    os.remove(tmp_path / "out" / "sweep.json")
    (tmp_path / "out" / "results.json").write_text(json.dumps({"config": config}))
    with pytest.raises(ConfigError, match=r"differs in seeds\)"):
        prepare_workdir(workdir, other)
    prepare_workdir(workdir, config)
    assert (tmp_path / "out" / "sweep.json").exists()


def test_a_workdir_of_checkpoints_alone_or_of_a_sweep_json_that_is_no_object_is_refused(smoke_config, tmp_path):
    """Checkpoints without sweep.json (which names their config) are a sweep's all the same, and a sweep.json
    that is valid JSON but not an object (a list) was not written by a sweep: both refused in one line."""
    from fusion_jax.workdir import check_workdir

    (tmp_path / "stopped" / "checkpoints" / "aligned-concat" / "1").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"stopped' holds a sweep's groups or checkpoints but no sweep.json"):
        check_workdir(str(tmp_path / "stopped"), smoke_config.to_dict())
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "sweep.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"sweep.json' holds a JSON list, not what the sweep wrote; remove"):
        check_workdir(str(tmp_path / "listed"), smoke_config.to_dict())


def test_a_resume_may_find_data_and_models_elsewhere_once_their_identity_is_recorded(smoke_config, tmp_path):
    """Locations (cache_dir, model folders, npz.dir) must match only in a workdir without features.json;
    with it, the features' identity is compared instead. A Flickr8k folder (fingerprinted by its
    images' names and sizes, not bytes) must always match."""
    from fusion_jax.workdir import check_workdir, prepare_workdir

    workdir = str(tmp_path / "out")
    models = lambda at: {"clip": {"model": f"{at}/c"}, "resnet": {"model": f"{at}/r", "text_model": f"{at}/t"}}
    config = {**smoke_config.to_dict(), "cache_dir": "/a", "data": {"flickr8k_dir": "/f"}, "npz": {"dir": "/n"},
              "backbone": models("/m")}
    moved = {**config, "cache_dir": "/b", "npz": {"dir": "/n2"}, "backbone": models("/m2")}
    prepare_workdir(workdir, config)
    check_workdir(workdir, moved)  # before any data loads: the features, and so this question, are not known yet
    with pytest.raises(ConfigError, match=r"differs in backbone.clip.model, backbone.resnet.model, "
                                          r"backbone.resnet.text_model, cache_dir, npz.dir\)"):
        prepare_workdir(workdir, moved, {"aligned": {"data": "x"}})
    prepare_workdir(workdir, config, {"aligned": {"data": "x"}})  # records features.json
    prepare_workdir(workdir, moved, {"aligned": {"data": "x"}})
    with pytest.raises(ConfigError, match=r"differs in data.flickr8k_dir\)"):
        prepare_workdir(workdir, {**moved, "data": {"flickr8k_dir": "/g"}}, {"aligned": {"data": "x"}})
    with pytest.raises(ConfigError, match=r"other features \(differs in aligned.data\)"):
        prepare_workdir(workdir, moved, {"aligned": {"data": "y"}})


@pytest.mark.parametrize("field,value", [("data.image_size", 4), ("data.embedded_seed", -1), ("data.embedded_images", 1),
                                         ("backbone.embedded.clip_steps", 0), ("backbone.embedded.n_images", 1)])
def test_invalid_embedded_values_are_one_line_errors(tmp_path, field, value):
    """The embedded dataset's and tiny backbones' sizes are checked before anything runs."""
    config = load_config("demo", "smoke")
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=rf"config\.{field}: {value!r} must be an integer >= "):
        train_and_evaluate(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_embedded_backbones_never_train_on_the_sweeps_own_images(tmp_path):
    """The embedded dataset of one seed is a prefix of the same seed's larger one: the backbones' seed must
    differ from the sweep's (the demo: 1 and 0)."""
    config = load_config("demo", "smoke")
    config.backbone.embedded.seed = config.data.embedded_seed
    with pytest.raises(ConfigError, match=r"config\.backbone\.embedded\.seed: 0 must differ from data.embedded_seed"):
        train_and_evaluate(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


FULL_DISK = """
import errno, os, sys
from absl import app
import fusion_jax.main as m

def full(config, workdir, **kwargs):  # a group's record, written after its training, meets a full disk
    raise OSError(errno.ENOSPC, "No space left on device", workdir + "/groups/aligned-concat.json")

def too_large(config, workdir, **kwargs):  # features larger than the host's memory, as numpy says it
    raise MemoryError("Unable to allocate 977. MiB for an array with shape (250000, 1024) and data type float32")

def read_only(config, workdir, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", workdir + "/groups/aligned-concat.json")

def broken_disk(config, workdir, **kwargs):  # not mended by space: a traceback
    raise OSError(errno.EIO, "Input/output error", workdir + "/groups/aligned-concat.json")

def done(config, workdir, **kwargs):  # a report that wrote a figure, after an earlier one's summary and figure
    for name in ("fig_old.png", "summary.md", "results.json", "fig_new.png"):
        open(os.path.join(workdir, name), "w").close()
        os.utime(os.path.join(workdir, name), (1, 1) if name in ("fig_old.png", "summary.md") else None)
    return {"failed_groups": []}

m.train_and_evaluate = {"full": full, "too_large": too_large, "read_only": read_only, "broken_disk": broken_disk,
                        "done": done}[sys.argv[2]]
sys.argv = ["fusion_jax.main", "--config=configs/synthetic.py:smoke", "--workdir=" + sys.argv[1]]
app.run(m.main, flags_parser=m.parse_flags)
"""


def test_a_full_disk_or_memory_is_said_in_one_line_with_what_to_do(tmp_path):
    """Not a traceback: the sweep resumes once there is space, as after any stop."""
    said = lambda proc: proc.stderr.strip().splitlines()[-1] if "Traceback" not in proc.stderr else proc.stderr
    run = lambda what: subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), what], cwd=ROOT,
                                      capture_output=True, text=True, timeout=120)
    proc = run("full")
    assert proc.returncode == 2 and said(proc) == (
        f"fusion_jax: error: cannot write {tmp_path}/groups/aligned-concat.json: No space left on device; free space "
        "(or mend that), then rerun the same command to resume"), proc.stderr[-2000:]
    proc = run("too_large")
    assert proc.returncode == 1 and said(proc) == (
        "fusion_jax: error: out of memory: Unable to allocate 977. MiB for an array with shape (250000, 1024) and data "
        "type float32 (launch/README.md, 'Memory', says what a sweep holds)"), proc.stderr[-2000:]
    proc = run("read_only")
    assert proc.returncode == 2 and said(proc) == (
        f"fusion_jax: error: cannot write {tmp_path}/groups/aligned-concat.json: Read-only file system; free space "
        "(or mend that), then rerun the same command to resume"), proc.stderr[-2000:]
    proc = run("broken_disk")  # space would not mend it: the traceback, status 1
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "free space" not in proc.stderr, proc.stderr[-2000:]


def test_the_last_line_names_only_what_this_sweeps_report_wrote(tmp_path):
    """Files older than results.json are an earlier report's (its figure and summary stay when this one's report
    could not rewrite them): not named as this sweep's."""
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), "done"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == f"results in {tmp_path}/: results.json, runs.csv, fig_new.png"


def test_a_write_that_fails_names_its_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from fusion_jax import files
    from fusion_jax.files import atomic_write

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a flush to a full disk: no file named

    with pytest.raises(OSError) as raised:
        atomic_write(str(tmp_path / "results.json"), full)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "results.json")
    assert os.listdir(tmp_path) == []

    def read_only(dir, prefix, suffix):  # the temporary file cannot be made: named as the file being written
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, prefix + "abc" + suffix))

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as raised:
        atomic_write(str(tmp_path / "results.json"), lambda f: None)
    assert raised.value.errno == errno.EROFS and raised.value.filename == str(tmp_path / "results.json")


def test_atomic_writes_are_readable_by_all_and_a_file_is_created_once(tmp_path, monkeypatch):
    """Results and state files 0644 (mkstemp's are 0600); without hard links (some network file systems) an
    existing sweep.json is still kept, not replaced: a start with another config must not take the workdir over."""
    import errno

    from fusion_jax import files

    files.atomic_write_json(str(tmp_path / "a.json"), {})
    assert files.atomic_create_json(str(tmp_path / "b.json"), {})
    assert [os.stat(tmp_path / n).st_mode & 0o777 for n in ("a.json", "b.json")] == [0o644, 0o644]

    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(files.os, "link", no_links)
    path = str(tmp_path / "c" / "sweep.json")
    os.mkdir(tmp_path / "c")
    assert files.atomic_create_json(path, {"name": "first"})
    assert not files.atomic_create_json(path, {"name": "second"})
    assert json.loads(open(path).read()) == {"name": "first"} and os.listdir(tmp_path / "c") == ["sweep.json"]


def test_an_output_folder_is_refused_in_words_that_say_why(tmp_path, monkeypatch):
    """files.unwritable_folder, behind every command line's output folder: each reason its own words."""
    from fusion_jax import files

    (tmp_path / "a_file").write_text("")
    (tmp_path / "locked").mkdir()
    assert files.unwritable_folder(" ") == "is empty (an unset variable?): give a folder"
    assert files.unwritable_folder(str(tmp_path)) is None
    assert files.unwritable_folder(str(tmp_path / "new" / "x")) is None
    assert files.unwritable_folder(str(tmp_path / "a_file")) == "is a file, not a folder"
    assert files.unwritable_folder(str(tmp_path / "a_file" / "x")) == \
        f"cannot be made: {str(tmp_path / 'a_file')!r} is a file"
    writable = files.os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: not p.endswith("locked") and writable(p, mode))
    assert files.unwritable_folder(str(tmp_path / "locked")) == "is a folder this user cannot write to"
    assert files.unwritable_folder(str(tmp_path / "locked" / "x")) == \
        f"cannot be made: {str(tmp_path / 'locked')!r} is not writable"


def test_the_full_configs_are_the_studies_the_readme_describes():
    """The shipped configs at full size (the tests otherwise load their smoke variants): each one's study, as
    README.md's table of configs describes it, at the paper's scales, seeds and noise levels where it follows it."""
    from fusion_jax.config_base import PAPER_NOISE, PAPER_SCALES, PAPER_SEEDS

    study = lambda c: (c.features, tuple(c.backbones), tuple(c.scales), tuple(c.seeds), tuple(c.degradation.levels),
                       c.degradation.modality, tuple(c.degradation.backbones))
    want = {"clip_sweep": ("flickr8k", ("clip",), PAPER_SCALES, PAPER_SEEDS, (0.0,), "image", ()),
            "resnet_sweep": ("flickr8k", ("resnet",), PAPER_SCALES, PAPER_SEEDS, (0.0,), "image", ()),
            "noise_sweep": ("flickr8k", ("clip",), (16384,), PAPER_SEEDS, PAPER_NOISE, "image", ()),
            "demo": ("embedded", ("clip", "resnet"), (1024, 2048, 4096), PAPER_SEEDS, PAPER_NOISE, "image", ("clip",)),
            "own_features": ("npz", (), PAPER_SCALES, PAPER_SEEDS, (0.0,), "image", ()),
            "synthetic": ("synthetic", ("aligned", "unaligned"), (1024, 2048, 4096), PAPER_SEEDS, PAPER_NOISE, "image",
                          ())}
    for name, expected in want.items():
        config = load_config(name)
        assert config.name == name and study(config) == expected, (name, study(config))
        assert (config.train.epochs, config.train.batch_size) == (10, 32), name


# README.md's table of config fields: (its row, what the row says, the field, the value every full config has).
README_DEFAULTS = [
    ("`train.*`", "`learning_rate` 1e-4", "train.learning_rate", 1e-4),
    ("`train.*`", "`weight_decay` 0.01", "train.weight_decay", 0.01),
    ("`train.*`", "`dropout` 0.1", "train.dropout", 0.1),
    ("`train.*`", "`eval_batch_size` (1024)", "train.eval_batch_size", 1024),
    ("`head.*`", "`hidden` 256, `mlp_hidden` 128, `num_heads` 4", "head", {"hidden": 256, "mlp_hidden": 128,
                                                                          "num_heads": 4}),
    ("`data.hub_id`", "(default `jxie/flickr8k`)", "data.hub_id", "jxie/flickr8k"),
    ("`data.max_bad_fraction`", "(0.01)", "data.max_bad_fraction", 0.01),
    ("`data.embedded_images`", "(8000 images by default, 3000 in the demo, 64 px)", "data.image_size", 64),
    ("`backbone.batch_size`", "(64)", "backbone.batch_size", 64),
    ("`distributed.*`", "`timeout_seconds` (300) for connecting, `wait_seconds` (86400)", "distributed",
     {"timeout_seconds": 300, "wait_seconds": 86400}),
    ("`checkpoint.keep`", "(2)", "checkpoint.keep", 2),
    ("`tsne_pairs`", "(800; 100 in the smoke variants", "tsne_pairs", 800),
    ("`synthetic.*`", "`n_images` (2000), `captions_per_image` (5), `latent_dim` (16), `dim` (128), `caption_noise` "
     "(0.6), `view_noise` (0.3)", "synthetic", {"n_images": 2000, "captions_per_image": 5, "latent_dim": 16,
                                                "dim": 128, "caption_noise": 0.6, "view_noise": 0.3, "seed": 0}),
]


def test_every_full_config_has_the_defaults_readme_gives_and_no_smoke_setting():
    """What README.md's table says of the fields, and the configs at full size: each claim is in its row, and every
    shipped config that has the field holds it; the smoke variants' own settings stay in them."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    names = ("clip_sweep", "resnet_sweep", "noise_sweep", "demo", "own_features", "synthetic")
    configs = {name: load_config(name) for name in names}
    for row, says, field, value in README_DEFAULTS:
        assert any(line.startswith(f"| {row}") and says in line for line in readme), (row, says)
        holding = []
        for name, config in configs.items():
            try:
                got = functools.reduce(getattr, field.split("."), config)
            except AttributeError:
                continue
            got = {k: got[k] for k in value} if isinstance(value, dict) else got
            assert got == value, (name, field, got)
            holding.append(name)
        assert holding, field
    assert configs["demo"].data.embedded_images == 3000 and configs["clip_sweep"].data.embedded_images == 8000
    assert configs["demo"].backbone.embedded == configs["clip_sweep"].backbone.embedded  # the package's defaults
    for name in ("demo", "synthetic"):
        assert load_config(name, "smoke").tsne_pairs == 100


@pytest.mark.parametrize("field, edge, past", [
    ("seeds", (2**31 - 1,), (2**31,)),
    ("data.max_bad_fraction", 0.0, -0.01), ("data.max_bad_fraction", 1.0, 1.01),
    ("backbone.batch_size", 1, 0),
    ("degradation.levels", (0.0, 1e6), (0.0, 1.01e6)),  # degrade.MAX_LEVEL
    ("distributed.timeout_seconds", 1, 0), ("distributed.wait_seconds", 1, 0),
])
def test_each_bound_admits_its_edge_and_refuses_past_it(field, edge, past):
    from fusion_jax.validate import validate

    config = load_config("demo", "smoke")
    *parents, leaf = field.split(".")
    node = functools.reduce(getattr, parents, config)
    setattr(node, leaf, edge)
    validate(config)
    setattr(node, leaf, past)
    with pytest.raises(ConfigError, match=f"config.{field}: "):
        validate(config)


def test_one_named_process_needs_no_coordinator_and_the_last_port_is_a_port(monkeypatch):
    from fusion_jax.validate import validate

    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    config = load_config("demo", "smoke")
    config.distributed.num_processes = 1
    validate(config)
    d = config.distributed
    d.num_processes, d.process_id, d.coordinator_address = 2, 1, "localhost:65535"
    validate(config)
    d.coordinator_address = "localhost:65536"
    with pytest.raises(ConfigError, match="config.distributed.coordinator_address: .*the port from 1 to 65535"):
        validate(config)


def test_the_smallest_scale_a_too_large_one_is_told_of_is_allowed(smoke_config):
    """The hint "allowed: LOW..LIMIT" names a scale that passes (scales 2 and 3 give one validation pair here)."""
    import numpy as np

    from fusion_jax.data import FeatureSet
    from fusion_jax.data.pairs import max_pairs
    from fusion_jax.validate import validate_scales

    fs = FeatureSet(image=np.ones((30, 4), np.float32), text=np.ones((60, 4), np.float32),
                    caption_image=np.repeat(np.arange(30), 2))
    smoke_config.train.batch_size, smoke_config.pairs.train_fraction = 1, 0.5
    limit = max_pairs(fs.caption_image, fs.n_images, **smoke_config.pairs)
    smoke_config.scales = (limit + 1,)
    with pytest.raises(ConfigError, match=rf"allowed: 4\.\.{limit}$"):
        validate_scales(smoke_config, {"'a'": fs})
    smoke_config.scales = (4,)
    validate_scales(smoke_config, {"'a'": fs})


def test_the_embedded_backbones_seed_is_refused_only_where_they_would_train_on_the_sweeps_images():
    from fusion_jax.validate import validate

    config = load_config("demo", "smoke")
    config.backbone.embedded.seed = config.data.embedded_seed
    with pytest.raises(ConfigError, match="config.backbone.embedded.seed: .* must differ from data.embedded_seed"):
        validate(config)
    config.features = "flickr8k"  # the sweep's images are Flickr8k's: any seed of the embedded dataset will do
    validate(config)


def test_a_scale_of_every_pair_and_one_that_leaves_a_single_batch_are_allowed(smoke_config):
    """The largest scale is the pairs available (max_pairs), the smallest the one that leaves train.batch_size
    training pairs: both edges run, one pair past either is refused."""
    import numpy as np

    from fusion_jax.data import FeatureSet
    from fusion_jax.data.pairs import max_pairs, split_sizes
    from fusion_jax.validate import validate_scales

    fs = FeatureSet(image=np.ones((30, 4), np.float32), text=np.ones((60, 4), np.float32),
                    caption_image=np.repeat(np.arange(30), 2))
    limit = max_pairs(fs.caption_image, fs.n_images, **smoke_config.pairs)
    low = next(s for s in range(2, limit) if split_sizes(s, smoke_config.pairs.train_fraction)[0]
               == smoke_config.train.batch_size)
    for scales, ok in (((low, limit), True), ((limit + 1,), False), ((low - 1,), False)):
        smoke_config.scales = scales
        if ok:
            validate_scales(smoke_config, {"'a'": fs})
        else:
            with pytest.raises(ConfigError, match="config.scales: scale"):
                validate_scales(smoke_config, {"'a'": fs})
