"""End to end: a smoke sweep into tmp_path, its results files, and kill-and-resume."""

import csv
import io
import itertools
import json
import logging
import os
import re
import types

import jax
import ml_collections
import numpy as np
import pytest

from fusion_jax import metrics as metrics_lib
from fusion_jax import report
from fusion_jax.groups import (GPU_COMPILER_OPTIONS, ONCE_COMPILER_OPTIONS, CompiledAhead, build_program,
                               compiler_options, group_data, layout, per_run_program, plan, run_slots)
from fusion_jax.programs import Later
from fusion_jax.metrics import METRICS
from fusion_jax.sweep import train_and_evaluate
from fusion_jax.workdir import prepare_workdir


def _tiny(config):
    config.backbones = ("aligned",)
    config.scales = (128,)
    return config


def _by_run(results):
    return {(r["backbone"], r["method"], r["scale"], r["seed"], r["degradation"]["level"]): r for r in results["runs"]}


def test_smoke_sweep_writes_results(smoke_sweep):
    smoke_config, results, tmp_path = smoke_sweep
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk) == {"command", "source", "config", "versions", "device", "timing", "backbones", "failed_groups",
                            "runs", "summary", "comparisons"}
    assert on_disk["source"] == report.source() and all(r["source"] == on_disk["source"] for r in on_disk["runs"])
    assert on_disk["timing"]["groups_trained"] == on_disk["timing"]["groups"] > 0 and on_disk["timing"]["seconds"] > 0
    assert on_disk["config"]["seeds"] == [42, 123]
    assert on_disk["versions"]["jax"] and on_disk["device"]["platform"] == jax.devices()[0].platform
    assert on_disk["device"]["matmul_precision"] == (jax.config.jax_default_matmul_precision or "default")
    here = {**{k: on_disk["device"][k] for k in ("platform", "device_kind", "matmul_precision")},
            "local_devices": jax.local_device_count()}  # where each run trained
    assert all(r["device"] == here for r in on_disk["runs"]) and "different devices" not in \
        (tmp_path / "summary.md").read_text()
    for prov in on_disk["backbones"].values():  # what each scale's validation shares with training
        assert set(prov["split_overlap"]) == {str(s) for s in smoke_config.scales}
        assert all(0 < o["val_pairs_with_a_training_image"] <= 1 for o in prov["split_overlap"].values())
    assert "## What validation shares with training (80% train, pairs split at random" in \
        (tmp_path / "summary.md").read_text()

    n_runs = len(smoke_config.backbones) * 2 * len(smoke_config.scales) * 2 * len(smoke_config.degradation.levels)
    assert len(on_disk["runs"]) == n_runs
    for r in on_disk["runs"]:
        assert set(r["degradation"]) == {"kind", "level"}
        curve = r["train_loss_by_epoch"]  # each epoch's mean loss, the last the final one
        assert len(curve) == smoke_config.train.epochs and curve[-1] == r["final_train_loss"] and min(curve) > 0
        assert all(0.0 <= r["metrics"][m] <= 1.0 for m in METRICS)
        assert 0.5 <= r["majority_baseline"] <= 1.0
        assert r["params"] > 0 and r["train_seconds"] > 0
        assert r["n_train"] == round(smoke_config.pairs.train_fraction * r["scale"]) == r["scale"] - r["n_val"]
    assert len(on_disk["summary"]) == n_runs // 2
    by = _by_run(on_disk)  # the noise reaches every noisy run: it trains otherwise than at level 0
    noisy = [k for k in by if k[-1] > 0]
    assert noisy and all(by[k]["train_loss_by_epoch"] != by[(*k[:-1], 0.0)]["train_loss_by_epoch"] for k in noisy)
    s = on_disk["summary"][0]
    assert s["n_seeds"] == 2 and all(f"{m}_{k}" in s for m in METRICS for k in ("mean", "std"))
    assert len(on_disk["comparisons"]) == n_runs // 4
    for c in on_disk["comparisons"]:
        by = _by_run(on_disk)
        key = (c["backbone"], c["scale"], c["degradation"]["level"])
        want = np.mean([by[(key[0], "concat", key[1], s, key[2])]["metrics"]["accuracy"]
                        - by[(key[0], "cross", key[1], s, key[2])]["metrics"]["accuracy"] for s in (42, 123)])
        assert c["concat_minus_cross"] == pytest.approx(want)

    rows = list(csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text())))
    assert len(rows) == n_runs and float(rows[0]["accuracy"]) == on_disk["runs"][0]["metrics"]["accuracy"]
    assert [(r["degradation_kind"], float(r["degradation_level"]), int(r["seed"])) for r in rows] == \
        [(x["degradation"]["kind"], x["degradation"]["level"], x["seed"]) for x in on_disk["runs"]]
    md = (tmp_path / "summary.md").read_text()
    assert "| aligned | concat | 128 |" in md and "concat − cross" in md
    assert (tmp_path / "fig_training_loss.png").exists()
    assert not (tmp_path / "checkpoints").exists()

    # A second call finds every group finished and trains nothing.
    calls = []
    again = train_and_evaluate(smoke_config, str(tmp_path), on_epoch=lambda g, e: calls.append((g.name, e)))
    assert calls == [] and again["runs"] == results["runs"]


def test_the_benchmark_trains_as_the_sweep_does(smoke_sweep):
    """bench.time_jax on the smoke sweep's first group, its runs in chunks of 3 (runs of two lengths in a chunk): the
    sweep's accuracy for each run, in the group's order, and its final losses; each run's steps over all its epochs;
    the steps executed (a chunk's idle slots too) more than the runs' own."""
    from fusion_jax import bench
    from fusion_jax.data.sources import load_features
    from fusion_jax.train import steps_per_epoch

    smoke_config, results, _ = smoke_sweep
    config = smoke_config.copy_and_resolve_references()
    config.runs_per_chunk = 3
    group = plan(config)[0]
    features = {group.backbone: load_features(config, group.backbone)}
    timed = bench.time_jax(config, [group], features, {bench.flops_key(group): 1.0}, 1, lambda s: None)["groups"][0]
    runs = {(r["scale"], r["seed"], r["degradation"]["level"]): r for r in results["runs"]
            if (r["backbone"], r["method"]) == (group.backbone, group.method)}
    swept = [runs[(r.scale, r.seed, r.level)] for r in group.runs]
    assert len({r["n_train"] for r in swept}) == 2 and timed["runs_per_chunk"] == 3
    assert timed["accuracy_per_run"] == [r["metrics"]["accuracy"] for r in swept]
    assert timed["final_train_loss"] == pytest.approx(np.mean([r["final_train_loss"] for r in swept]), rel=1e-6)
    assert timed["steps_per_run"] == [config.train.epochs * steps_per_epoch(r["n_train"], config.train.batch_size)
                                      for r in swept]
    assert timed["executed_flops"] > timed["train_flops"] == sum(timed["steps_per_run"])


def test_plan_gives_the_levels_to_the_listed_backbones_and_scales_only(smoke_config):
    """degradation.backbones and degradation.scales: the levels where both list the run (an empty
    list is everyone), level 0 alone elsewhere; each group in scale, seed, level order."""
    config = smoke_config
    config.degradation.backbones, config.degradation.scales = ("aligned",), (256,)
    groups = plan(config)
    assert [g.name for g in groups] == ["aligned-concat", "aligned-cross", "unaligned-concat", "unaligned-cross"]
    levels = lambda g: [(r.scale, r.seed, r.level) for r in g.runs]
    assert levels(groups[0]) == [(128, 42, 0.0), (128, 123, 0.0), (256, 42, 0.0), (256, 42, 0.3),
                                 (256, 123, 0.0), (256, 123, 0.3)]
    assert levels(groups[2]) == [(s, seed, 0.0) for s in (128, 256) for seed in (42, 123)]
    config.degradation.scales = ()
    assert len(plan(config)[0].runs) == 2 * 2 * 2 and len(plan(config)[2].runs) == 2 * 2
    config.degradation.backbones = ("unaligned", "aligned")
    assert [len(g.runs) for g in plan(config)] == [2 * 2 * 2] * 4
    config.max_runs_per_program = 8  # a group of exactly the cap stays whole: its workdir files keep their name
    assert [g.name for g in plan(config)] == [g.name for g in groups]


def test_compile_workers_are_half_the_cores_unless_configured(smoke_config, monkeypatch):
    from fusion_jax.groups import compile_workers

    for cores, workers in ((4, 2), (1, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        assert compile_workers(smoke_config) == workers
    smoke_config.compile_workers = 3
    assert compile_workers(smoke_config) == 3


def test_feature_notes_name_a_noise_study_off_unit_norm_and_images_without_captions(smoke_config, caplog):
    """The noise note only for a backbone that has noise levels and only for the degraded modality (real
    tokens by mask); logged, and returned for results.json."""
    import dataclasses

    from fusion_jax.data.sources import load_features
    from fusion_jax.feature_report import feature_notes

    config = smoke_config
    config.degradation.backbones = ("aligned",)
    groups = plan(config)
    features = {b: load_features(config, b) for b in config.backbones}  # unit vectors, every image captioned
    assert feature_notes(config, groups, features) == {}
    larger = lambda fs, m: dataclasses.replace(fs, **{m: 3.0 * getattr(fs, m)})
    assert feature_notes(config, groups, {**features, "unaligned": larger(features["unaligned"], "image"),
                                          "aligned": larger(features["aligned"], "text")}) == {}
    with caplog.at_level(logging.WARNING, logger="fusion_jax"):
        notes = feature_notes(config, groups, {**features, "aligned": larger(features["aligned"], "image")})
    (note,) = notes["aligned"]
    assert note.startswith("the noise study degrades its image features, whose norms are 3, not 1") and list(notes) == [
        "aligned"] and f"backbone 'aligned': {note}" in caplog.text
    image = features["aligned"].image.copy()
    image[len(image) // 2:] *= 3  # the rows read are spread over the whole set, not its first
    half = dataclasses.replace(features["aligned"], image=image)
    (note,) = feature_notes(config, groups, {**features, "aligned": half})["aligned"]
    assert note.startswith("the noise study degrades its image features, whose norms are 1-3, not 1")
    tokens = np.ones((features["aligned"].n_images, 3, 4), np.float32) / 2  # the real tokens unit vectors
    mask = np.ones(tokens.shape[:2], np.int32)
    mask[:, 2] = 0
    tokens[:, 2] = 0.0  # padding
    fs = dataclasses.replace(features["aligned"], image=tokens, image_mask=mask)
    assert feature_notes(config, groups, {**features, "aligned": fs}) == {}
    more = features["unaligned"]
    more = dataclasses.replace(more, image=np.concatenate([more.image, more.image[:5]]))  # 5 images, no caption
    assert feature_notes(config, groups, {**features, "unaligned": more}) == {
        "unaligned": [f"5 of its {more.n_images} images have no caption: pairs never draw them"]}
    # One file under two names: the second backbone's runs repeat the first's. A copy is as good as the same
    # arrays; another mask, or none, is not.
    same = {"aligned": features["aligned"], "unaligned": dataclasses.replace(features["aligned"])}
    assert feature_notes(config, groups, same) == {
        "unaligned": ["it holds the same features as backbone 'aligned' (array for array): its runs repeat that "
                      "backbone's"]}
    copied = dataclasses.replace(features["aligned"], text=features["aligned"].text.copy())
    assert feature_notes(config, groups, {**features, "unaligned": copied}) == feature_notes(config, groups, same)
    assert feature_notes(config, groups, {"aligned": fs, "unaligned": dataclasses.replace(fs, image_mask=None)}) == {}
    from fusion_jax.feature_report import same_features  # compared in blocks of rows: each block counts

    last = copied.text.copy()
    last[-1, -1] += 1
    for block_bytes in (1, 64 << 20):
        assert same_features(features["aligned"], copied, block_bytes)
        assert not same_features(features["aligned"], dataclasses.replace(copied, text=last), block_bytes)


class Killed(Exception):
    pass


def test_compiled_ahead_shares_programs_evaluates_later_the_same_and_stops_cleanly_after_an_error(monkeypatch):
    """CompiledAhead: groups of the same shapes (two backbones, both with noise) share their three
    programs; a group's evaluate is compiled in the background (a Later) and gives the counts of the
    program compiled at once. An error while groups build drops the builds not started and waits for
    those in progress: no compile thread outlives the `with` block."""
    import threading

    from fusion_jax import bench

    grid = bench.GRIDS["tiny"]
    config = bench.bench_config(grid)
    config.backbones, config.degradation.backbones = ("aligned", "unaligned"), ()
    groups = plan(config)
    features = {b: bench.bench_features(grid, b) for b in config.backbones}
    with CompiledAhead(config, groups, features, 1) as ahead:
        program = ahead.program(0)
        data, runs = ahead.data(program), jax.device_put(program.runs, program.by_run)
        state, _ = program.train_epoch(program.init(runs, data), runs, data)
        assert isinstance(program.evaluate, Later)
        at_once = build_program(config, groups[0], features["aligned"]).evaluate
        np.testing.assert_array_equal(program.evaluate(state, runs, data), at_once(state, runs, data))
        assert program.evaluate.seconds > 0
        others = [ahead.program(i) for i in range(1, 4)]
        for other in others:  # each evaluate called, so compiled (by its worker or here) before the block ends
            data, runs = ahead.data(other), jax.device_put(other.runs, other.by_run)
            own = features[other.group.backbone]  # its own features (the two backbones share their image side)
            np.testing.assert_array_equal(data["image"], own.image)
            np.testing.assert_array_equal(data["text"], own.text)
            assert np.asarray(other.evaluate(other.init(runs, data), runs, data)).shape == (len(other.slots), 5)
        assert [g.name for g in groups] == ["aligned-concat", "aligned-cross", "unaligned-concat", "unaligned-cross"]
        epoch = lambda p: p.train_epoch.program
        assert epoch(others[1]) is epoch(program) and others[1].init is program.init
        assert epoch(others[2]) is epoch(others[0]) and epoch(others[0]) is not epoch(program)
    assert (ahead.programs.compiled, ahead.programs.shared) == (6, 6)
    assert ahead.programs.held == 0  # every group built: each program is held by its groups alone
    import fusion_jax.groups as groups_lib

    builds, build = [], groups_lib.build_program
    monkeypatch.setattr(groups_lib, "build_program", lambda *a, **k: builds.append(1) or build(*a, **k))
    with pytest.raises(Killed):
        with CompiledAhead(config, groups, features, 1):
            raise Killed
    assert not [t for t in threading.enumerate() if t.name.startswith("fusion_jax-compile")]
    assert len(builds) <= 1  # the one worker's build in progress at most; the other three never start


def test_an_ending_sweep_waits_for_the_compilation_under_way_not_the_rest_of_its_build(monkeypatch):
    """A sweep that ends (an error, a stop) while a group builds waits for the compilation under way, not
    for the build's other programs (ProgramCache.close)."""
    import threading

    from fusion_jax import bench
    import fusion_jax.groups as groups_lib

    grid = bench.GRIDS["tiny"]
    config = bench.bench_config(grid)
    groups = plan(config)
    features = {b: bench.bench_features(grid, b) for b in config.backbones}
    compiled_one, closed = threading.Event(), threading.Event()
    call, close = groups_lib.ProgramCache.__call__, groups_lib.ProgramCache.close

    def slow(self, lowered, options=None):  # the sweep ends while the first program is (still) compiling
        program = call(self, lowered, options)
        compiled_one.set()
        assert closed.wait(120)
        return program

    monkeypatch.setattr(groups_lib.ProgramCache, "__call__", slow)
    monkeypatch.setattr(groups_lib.ProgramCache, "close", lambda self: close(self) or closed.set())
    with pytest.raises(Killed):
        with CompiledAhead(config, groups, features, 1) as ahead:
            assert compiled_one.wait(120)
            raise Killed
    assert ahead.programs.compiled == 1  # init; not train_epoch, evaluate or the other groups'


def test_compiled_ahead_builds_at_the_callers_matmul_precision_and_names_a_group_that_fails(monkeypatch):
    """`jax.default_matmul_precision` holds in its own thread only: the compile threads take the caller's.
    A build that fails (not for NaN features) raises its own error with a note naming its group."""
    from fusion_jax import bench
    import fusion_jax.groups as groups_lib

    grid = bench.GRIDS["tiny"]
    config = bench.bench_config(grid)
    groups = plan(config)[:2]
    features = {b: bench.bench_features(grid, b) for b in config.backbones}
    texts, cache_call = [], groups_lib.ProgramCache.__call__
    monkeypatch.setattr(groups_lib.ProgramCache, "__call__",
                        lambda self, lowered, *a, **k: texts.append(lowered.as_text()) or cache_call(self, lowered, *a, **k))
    with jax.default_matmul_precision("highest"):
        with CompiledAhead(config, groups[:1], features, 1) as ahead:
            ahead.program(0).evaluate.compile()
    assert len(texts) >= 3 and all("HIGHEST" in t for t in texts if "dot_general" in t)  # init, train, evaluate
    build = groups_lib.build_program

    def failing(config, group, *a, **k):
        if group.name == groups[1].name:
            raise MemoryError("RESOURCE_EXHAUSTED while compiling")
        return build(config, group, *a, **k)

    monkeypatch.setattr(groups_lib, "build_program", failing)
    with CompiledAhead(config, groups, features, 1) as ahead:
        ahead.program(0)
        with pytest.raises(MemoryError) as error:
            ahead.program(1)
    assert f"fusion_jax: while building the programs of group {groups[1].name}" in error.value.__notes__


def test_program_cache_shares_only_programs_of_the_same_text_and_argument_types():
    """Two programs of one text (the second argument unread) but other argument shapes do not share."""
    import jax.numpy as jnp

    from fusion_jax.programs import ProgramCache

    cache, f = ProgramCache(), jax.jit(lambda x, y: x * 2)
    a = cache(f.lower(jnp.ones(3), jnp.ones((4, 5), jnp.int32)))
    b = cache(jax.jit(lambda x, y: x * 2).lower(jnp.ones(3), jnp.ones((4, 6), jnp.int32)))
    c = cache(jax.jit(lambda x, y: x * 2).lower(jnp.ones(3), jnp.ones((4, 5), jnp.int32)))
    assert a is c and a is not b and (cache.compiled, cache.shared) == (2, 1)
    np.testing.assert_array_equal(b(jnp.ones(3), jnp.ones((4, 6), jnp.int32)), 2 * np.ones(3))


def test_program_cache_compiles_again_after_a_failed_compilation():
    """A failed compilation is not kept: the next group of those shapes compiles again (out of memory while
    another group trained may be over by then)."""
    from fusion_jax.programs import ProgramCache

    class Flaky:
        in_tree, args_info, calls = "tree", "args", 0

        def as_text(self):
            return "program"

        def compile(self, options):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")
            return "compiled"

    cache = ProgramCache()
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        cache(Flaky())
    assert cache(Flaky()) == "compiled" and cache(Flaky()) == "compiled"
    assert Flaky.calls == 2 and (cache.compiled, cache.shared) == (1, 1)


def test_a_group_waiting_on_a_compilation_that_fails_compiles_on_its_own(monkeypatch):
    """Groups of one shape build at once (a worker each): the one waiting for the other's compilation, which
    fails, compiles the program itself rather than failing with it, and adds none of its frames to the
    first group's error (whose traceback the first group logs)."""
    import concurrent.futures
    import threading
    import time
    import traceback

    from fusion_jax.programs import ProgramCache

    waiting, calls, exception = threading.Event(), [], concurrent.futures.Future.exception

    def waited_on(future, *a, **k):  # the second group waits for the first's compilation
        if threading.current_thread().name == "second":
            waiting.set()
        return exception(future, *a, **k)

    class Slow:
        in_tree, args_info = "tree", "args"

        def as_text(self):
            return "program"

        def compile(self, options):
            calls.append(threading.current_thread().name)
            if len(calls) == 1:
                assert waiting.wait(10)
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")
            return "compiled"

    monkeypatch.setattr(concurrent.futures.Future, "exception", waited_on)
    cache, out = ProgramCache(), {}

    def build(name):
        try:
            out[name] = cache(Slow())
        except jax.errors.JaxRuntimeError as e:
            out[name] = e

    first = threading.Thread(target=build, args=("first",), name="first")
    first.start()
    deadline = time.time() + 120
    while not calls:
        assert time.time() < deadline, "the first compilation never started"
        time.sleep(0.01)
    second = threading.Thread(target=build, args=("second",), name="second")
    second.start()
    first.join(), second.join()
    assert isinstance(out["first"], jax.errors.JaxRuntimeError) and out["second"] == "compiled"
    assert calls == ["first", "second"] and (cache.compiled, cache.shared) == (1, 0)
    frames = [f.name for f in traceback.extract_tb(out["first"].__traceback__)]
    assert frames[0] == "build" and not {"waited_on", "result", "__get_result"} & set(frames), frames


def test_a_closed_program_cache_compiles_nothing_more():
    """After close() (a sweep that ends), a program not compiled yet is refused; one compiled is still shared."""
    import concurrent.futures

    from fusion_jax.programs import ProgramCache

    class Lowered:
        in_tree, args_info = "tree", "args"

        def __init__(self, text):
            self.text = text

        def as_text(self):
            return self.text

        def compile(self, options):
            return f"compiled {self.text}"

    cache = ProgramCache()
    assert cache(Lowered("a")) == "compiled a"
    cache.close()
    assert cache(Lowered("a")) == "compiled a"
    with pytest.raises(concurrent.futures.CancelledError, match="no more programs compile"):
        cache(Lowered("b"))
    assert (cache.compiled, cache.shared) == (1, 1)


def test_program_cache_keys_compiler_options_and_clear_keeps_what_is_compiling():
    """Other compiler options are another program; clear() forgets the programs compiled, not one a build is
    compiling (which a group of its shapes would otherwise compile a second time)."""
    import threading

    from fusion_jax.programs import ProgramCache

    release, compiling = threading.Event(), threading.Event()

    class Lowered:
        in_tree, args_info = "tree", "args"

        def __init__(self, text, slow=False):
            self.text, self.slow = text, slow

        def as_text(self):
            return self.text

        def compile(self, options):
            if self.slow:
                compiling.set()
                assert release.wait(60)
            return (self.text, options)

    cache = ProgramCache()
    assert cache(Lowered("a"), {"o": 1}) == ("a", {"o": 1}) and cache(Lowered("a"), {"o": 2}) == ("a", {"o": 2})
    assert cache(Lowered("a"), {"o": 1}) == ("a", {"o": 1}) and (cache.compiled, cache.shared) == (2, 1)
    slow = threading.Thread(target=cache, args=(Lowered("b", slow=True),))
    slow.start()
    assert compiling.wait(60)
    cache.clear()
    assert cache.held == 1  # "b", still compiling
    release.set()
    slow.join()
    assert cache(Lowered("b")) == ("b", None) and (cache.compiled, cache.shared) == (3, 2)
    cache.clear()
    assert cache.held == 0


def test_a_later_programs_compile_and_settle_wait_only_where_they_should(caplog):
    """compile() returns at once while another thread compiles the program (a worker must not stall behind a
    call); settle() waits for that compilation; a compilation refused because the sweep ended is not warned of."""
    import concurrent.futures
    import threading

    release, started = threading.Event(), threading.Event()

    def make():
        started.set()
        assert release.wait(60)
        return lambda x: x + 1

    program = Later("group g: evaluate", make)
    calling = threading.Thread(target=program, args=(1,))
    calling.start()
    try:
        assert started.wait(60)
        compiling = threading.Thread(target=program.compile)
        compiling.start()
        compiling.join(30)
        assert not compiling.is_alive()  # returned at once, the call still compiling
        settling = threading.Thread(target=program.settle)
        settling.start()
        settling.join(0.5)
        assert settling.is_alive()  # waits for the call's compilation
    finally:
        release.set()
    settling.join(30), calling.join(30)
    assert not settling.is_alive() and program(2) == 3

    def refused():  # as ProgramCache refuses once closed
        raise concurrent.futures.CancelledError("the sweep has ended: no more programs compile")

    with caplog.at_level(logging.WARNING, logger="fusion_jax"):
        Later("group h: evaluate", refused).compile()
    assert "compilation failed" not in caplog.text


def test_own_failure_is_xlas_error_through_its_causes_but_not_the_workdirs():
    """A group fails alone on XLA's errors (out of memory), also wrapped as a cause (Later's compilation); an
    error of the workdir, or anything else, is the sweep's."""
    from fusion_jax.groups import own_failure
    from fusion_jax.validate import ConfigError

    def caused(error, cause):
        error.__cause__ = cause
        return error

    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")
    assert own_failure(oom) and own_failure(MemoryError()) and own_failure(caused(RuntimeError("compile"), oom))
    assert not own_failure(caused(ConfigError("workdir", "cannot write"), caused(TimeoutError(), oom)))
    assert not own_failure(TypeError("a bug")) and not own_failure(ValueError("tensorstore"))
    broken = Later("group g: evaluate", lambda: (_ for _ in ()).throw(oom))
    with pytest.raises(RuntimeError, match="compilation failed") as error:
        broken()
    assert own_failure(error.value)


def test_a_later_program_compiles_once_and_again_where_that_failed(caplog, monkeypatch):
    """The first of compile() and a call compiles; a compilation that failed in the background (compile(),
    out of memory while another group trained, say) is logged and tried again by the call, which raises
    its error naming the program where it fails too."""
    made = []

    def make(broken=False):
        made.append(broken)
        if broken:
            raise ValueError("no such op")
        return lambda x: x + 1

    program = Later("group g: evaluate", make)
    assert program(1) == 2 and program(2) == 3
    program.compile()
    assert made == [False] and program.seconds > 0
    broken = Later("group g: evaluate", lambda: make(broken=True))
    with caplog.at_level(logging.WARNING, logger="fusion_jax"):
        broken.compile()
    assert "group g: evaluate: compilation failed in the background (ValueError('no such op'))" in caplog.text
    for _ in range(2):
        with pytest.raises(RuntimeError, match="group g: evaluate: compilation failed: ValueError.'no such op'"):
            broken()
    assert made == [False, True, True, True]
    once_broken = Later("group g: evaluate", lambda: make(broken=len(made) == 4))
    once_broken.compile()
    assert once_broken(1) == 2 and made == [False, True, True, True, True, False]
    # The benchmark's compile and wait times: every compilation, and every call's wait, counted.
    from fusion_jax import programs

    clock = [0.0]
    monkeypatch.setattr(programs, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def compiling(broken):  # a second each
        clock[0] += 1.0
        return make(broken)

    timed = Later("group g: evaluate", lambda: compiling(broken=len(made) == 6))
    timed.compile()  # fails
    assert timed(1) == 2 and timed(2) == 3  # the first call compiles again; the second waits for nothing
    assert made[6:] == [True, False] and timed.seconds == 2.0 and timed.waited == 1.0


def test_kill_and_resume_equals_uninterrupted(smoke_config, tmp_path, caplog, monkeypatch):
    """With a compilation cache too: the resumed sweep loads the unfinished group's programs, which
    the uninterrupted sweep compiled (the killed one laid its runs out otherwise). A group whose runs
    end above metrics.UNCONVERGED_LOSS says so (here by a threshold of 0)."""
    from fusion_jax import sweep

    config = _tiny(smoke_config)
    config.scales = (64, 128)  # runs of two lengths: the resumed layout puts them in other slots than the group's order
    config.train.epochs = 3
    config.compilation_cache = str(tmp_path / "xla")
    config.lanes = 2  # on any machine: the lanes' split and join are programs too
    ticks = itertools.count()  # sweep's clock only, a second a look: each epoch trains for exactly one
    monkeypatch.setattr(sweep, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks)),
                                                             monotonic=sweep.time.monotonic, sleep=sweep.time.sleep))
    with caplog.at_level(logging.WARNING, logger="fusion_jax"):
        clean = train_and_evaluate(config, str(tmp_path / "clean"))
    assert "diverged" not in caplog.text

    second = plan(config)[1].name

    def kill(group, epochs_done):
        # Called once the epoch's checkpoint is on disk (a kill here loses nothing), its losses file too.
        folder = tmp_path / "resumed" / "checkpoints" / group.name
        assert (folder / str(epochs_done)).is_dir() and (folder / "losses" / f"{epochs_done}.json").exists()
        if group.name == second and epochs_done == 2:
            raise Killed

    config.runs_per_chunk = 1  # the resumed sweep lays its runs out otherwise: checkpoints hold them in group order
    with pytest.raises(Killed):
        train_and_evaluate(config, str(tmp_path / "resumed"), on_epoch=kill)
    config.runs_per_chunk = 0
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert os.listdir(tmp_path / "resumed" / "checkpoints" / second)

    # As older code left none: epoch 1's is lost (a gap in the curve); epoch 2's is the checkpoint's own.
    for epoch in (1, 2):
        os.remove(tmp_path / "resumed" / "checkpoints" / second / "losses" / f"{epoch}.json")
    calls = []
    monkeypatch.setattr(metrics_lib, "UNCONVERGED_LOSS", 0.0)
    with caplog.at_level(logging.INFO, logger="fusion_jax"):
        resumed = train_and_evaluate(config, str(tmp_path / "resumed"), on_epoch=lambda g, e: calls.append((g.name, e)))
    assert calls == [(second, 3)]  # the finished group is not retrained; the other continues after epoch 2
    n = len(plan(config)[1].runs)
    assert f"group {second}: {n} of its {n} runs end with a mean training loss above 0.00" in caplog.text
    assert caplog.text.count("diverged") == 1  # the finished group was not trained here
    cache = re.escape(str(tmp_path / "xla"))
    loaded = re.search(rf"compilation cache {cache}: (\d+) XLA compilations loaded, 0 compiled", caplog.text)
    assert loaded and int(loaded[1]) >= 3, caplog.text  # init, train and evaluate at least (JAX counts)
    a, b = _by_run(clean), _by_run(resumed)
    assert a.keys() == b.keys()
    if jax.devices()[0].platform == "cpu":  # on XLA:CPU another chunk layout moves a loss by an ulp or so
        for k in a:
            assert a[k]["metrics"] == b[k]["metrics"]
            assert a[k]["final_train_loss"] == pytest.approx(b[k]["final_train_loss"], rel=1e-6)
            lost = k[:2] == (plan(config)[1].backbone, plan(config)[1].method)  # its epoch 1's file removed above
            assert (b[k]["train_loss_by_epoch"][0] is None) == lost
            assert b[k]["train_loss_by_epoch"][lost:] == pytest.approx(a[k]["train_loss_by_epoch"][lost:], rel=1e-6)
        assert resumed["summary"] == clean["summary"]
    else:  # on an H200 the layout alone moved cross's final losses by up to 1.3e-5 relative
        for k in a:
            flip = 1 / (k[2] - round(config.pairs.train_fraction * k[2]))  # one validation pair flipped
            assert a[k]["metrics"]["accuracy"] == pytest.approx(b[k]["metrics"]["accuracy"], abs=flip + 1e-9)
            assert a[k]["final_train_loss"] == pytest.approx(b[k]["final_train_loss"], rel=1e-4)
    for results in (clean, resumed):  # the resumed group's seconds: the 2 it had trained before, then 1
        _assert_train_seconds(results, config.train.epochs, config.train.batch_size)


def _assert_train_seconds(results, seconds, batch_size):
    """Each group's training `seconds` shared among its runs in proportion to their steps per epoch."""
    key = lambda r: (r["backbone"], r["method"])
    for _, group in itertools.groupby(sorted(results["runs"], key=key), key):
        group = list(group)
        steps = np.array([-(-r["n_train"] // batch_size) for r in group])
        np.testing.assert_allclose([r["train_seconds"] for r in group], seconds * steps / steps.sum(), rtol=1e-6)


@pytest.mark.parametrize("devices, k", [(1, 3), (2, 2), (3, 2), (2, 0), (4, 5), (2, 50)])
def test_layout_places_each_run_once_in_balanced_chunks(devices, k):
    steps = [52, 52, 52, 103, 103, 103, 103, 103, 103, 26]
    slots, k = layout(steps, devices, k)
    assert k <= -(-len(steps) // devices)  # at most a device's share: no chunk of only empty slots
    assert sorted(slots[slots >= 0].tolist()) == list(range(len(steps)))
    np.testing.assert_array_equal(slots[run_slots(slots)], np.arange(len(steps)))  # each run's slot holds it
    assert len(slots) % (devices * k) == 0
    chunks = slots.reshape(devices, -1, k)
    cost = lambda c: max((steps[i] for i in c if i >= 0), default=0)  # a chunk runs as long as its longest run
    loads = [sum(cost(c) for c in d) for d in chunks]
    assert max(loads) - min(loads) <= max(steps)
    for d in chunks:  # runs are chunked longest first: a chunk's runs end together where they can
        for c in d:
            run = [steps[i] for i in c if i >= 0]
            assert run == sorted(run, reverse=True)


def test_layout_chunks_runs_of_equal_steps_in_group_order():
    slots, k = layout([52, 52, 52, 103, 103, 103, 103, 103, 103, 26], 1, 3)
    assert k == 3 and slots.tolist() == [3, 4, 5, 6, 7, 8, 0, 1, 2, 9, -1, -1]
    for asked in (0, 9):  # one chunk per device
        slots, k = layout([5, 9, 7], 2, asked)
        assert k == 2 and slots.tolist() == [1, 2, 0, -1]
    # A device's load is its chunks' longest runs: one chunk holding a long run weighs as three of short ones.
    slots, k = layout([100] + [20] * 7, 2, 2)
    assert slots.tolist() == [0, 1, -1, -1, -1, -1, 2, 3, 4, 5, 6, 7]


def test_workdir_of_another_config_is_refused(smoke_config, tmp_path):
    from fusion_jax.validate import ConfigError

    config = _tiny(smoke_config)
    config.train.epochs = 1
    config.methods = ("concat",)
    train_and_evaluate(config, str(tmp_path))
    config.seeds = (1, 2)
    with pytest.raises(ConfigError, match="seeds"):
        train_and_evaluate(config, str(tmp_path))


def test_token_features_run_end_to_end(smoke_config, tmp_path):
    config = _tiny(smoke_config)
    config.synthetic.tokens = 4
    config.train.epochs = 1
    config.seeds = (42,)
    config.degradation.modality = "both"
    results = train_and_evaluate(config, str(tmp_path))
    assert len(results["runs"]) == 4 and all(r["final_train_loss"] > 0 for r in results["runs"])
    prov = results["backbones"]["aligned"]
    assert (prov["tokens_image"], prov["tokens_text"]) == (4, 4)  # Table 3 counts FLOPs on these inputs
    assert (prov["dim_image"], prov["dim_text"]) == (config.synthetic.dim,) * 2 != (4, 4)  # each token's width
    assert "(every slot counted, padding included: aligned image 4, text 4)" in (tmp_path / "table3.md").read_text()


def test_aligned_synthetic_is_learned_by_both_heads(tmp_path):
    from conftest import load_config

    config = load_config("synthetic")
    config.backbones = ("aligned",)
    config.scales = (config.scales[-1],)
    config.seeds = (42,)
    config.degradation.levels, config.tsne_pairs = (0.0,), 0
    prepare_workdir(str(tmp_path), config.to_dict())  # an earlier run of this config, with a t-SNE (not compared),
    for name in ("tsne_aligned.npz", "fig_tsne.png"):  # left these
        (tmp_path / name).write_bytes(b"")
    results = train_and_evaluate(config, str(tmp_path))
    assert {r["method"] for r in results["runs"]} == {"concat", "cross"}
    assert not any(f.startswith(("tsne_", "fig_tsne")) for f in os.listdir(tmp_path))  # tsne_pairs = 0: none
    for r in results["runs"]:
        assert r["metrics"]["accuracy"] > r["majority_baseline"] + 0.25, r


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="the lighter compile is used on CPUs only")
def test_init_and_evaluate_compiled_lighter_give_the_same_bits():
    """build_program compiles init and evaluate with ONCE_COMPILER_OPTIONS: the same parameters, bit
    for bit, and the same validation counts as the default compilation (of evaluate over all runs at once,
    where build_program's takes a chunk of runs at a time)."""
    from fusion_jax import bench

    grid = bench.GRIDS["tiny"]
    config, features = bench.bench_config(grid), bench.bench_features(grid, "aligned")
    config.lanes, config.runs_per_chunk = 2, 1  # with one jax device, two lanes: their split and join run once too
    for group in plan(config):
        options = []  # what each compilation of the build was given, in order
        program = build_program(config, group, features,
                                programs=lambda lowered, o=None: options.append(o) or lowered.compile(o))
        lanes = [ONCE_COMPILER_OPTIONS] * 2 if program.train_epoch.lanes > 1 else []  # split, join
        assert jax.device_count() > 1 or lanes
        assert options == [ONCE_COMPILER_OPTIONS, None, *lanes, ONCE_COMPILER_OPTIONS]  # init, train_epoch, ..., evaluate
        data = group_data(features, program.replicated)
        runs = jax.device_put(program.runs, program.by_run)
        per_run = lambda f, axes: per_run_program(f, axes, program.by_run)  # default compile options
        state = program.init(runs, data)
        default = per_run(program.trainer.init, (0, None))(runs, data)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), state, default)
        state, _ = program.train_epoch(state, runs, data)
        np.testing.assert_array_equal(program.evaluate(state, runs, data),
                                      per_run(program.trainer.evaluate, (0, 0, None))(state, runs, data))


def test_the_progress_bar_says_when_a_group_waits_for_its_compilation(smoke_config, tmp_path, capsys, monkeypatch):
    import time

    import fusion_jax.groups as groups_lib

    config = smoke_config
    config.backbones, config.methods, config.scales, config.train.epochs = ("aligned",), ("concat",), (128,), 1
    train_and_evaluate(config, str(tmp_path / "ok"))
    err = capsys.readouterr().err
    assert "group 1/1 aligned-concat (compiling)" in err and "group 1/1 aligned-concat: 100%" in err, err[-2000:]

    def out_of_memory(*args, **kwargs):
        time.sleep(0.5)  # while the sweep waits for the build
        raise MemoryError("compiling")

    monkeypatch.setattr(groups_lib, "build_program", out_of_memory)  # the group fails alone, in its build
    assert train_and_evaluate(config, str(tmp_path / "failed"))["failed_groups"]
    last = capsys.readouterr().err.rsplit("group 1/1 aligned-concat", 1)[1]
    assert not last.startswith(" (compiling)"), last  # the bar's last word: no longer compiling


def test_the_progress_bar_is_redrawn_through_a_long_epoch():
    """While an epoch runs, the bar is redrawn (its elapsed time moves) until the epoch ends; a disabled bar is
    left alone."""
    import io
    import threading
    import time

    from tqdm.auto import tqdm

    from fusion_jax.sweep import _redrawn

    out = io.StringIO()
    with tqdm(total=2, unit="epoch", file=out, mininterval=0) as progress:
        with _redrawn(progress, every=0.01):
            deadline = time.monotonic() + 30
            while out.getvalue().count("\r") < 4 and time.monotonic() < deadline:  # the first draw and 3 more
                time.sleep(0.01)
            assert out.getvalue().count("\r") >= 4, out.getvalue()
        drawn = out.getvalue()
        time.sleep(0.05)
        assert out.getvalue() == drawn and not any(t.name == "fusion_jax-progress" for t in threading.enumerate())
    with tqdm(total=2, disable=True) as progress, _redrawn(progress, every=0.01):
        assert not any(t.name == "fusion_jax-progress" for t in threading.enumerate())


def test_features_larger_than_a_device_fail_their_groups_at_once_in_one_line(smoke_config, tmp_path, monkeypatch,
                                                                             caplog):
    """Where a backbone's features exceed a device's memory (its allocator's bytes_limit, which a CPU does not
    report), each of its groups fails before anything compiles for it, in one line that says what and where
    (they compiled, then failed putting the features there, in XLA's traceback)."""
    import fusion_jax.groups as groups_lib
    from fusion_jax.data.sources import load_features

    config = smoke_config
    config.backbones, config.scales, config.train.epochs = ("aligned",), (128,), 1
    need = sum(a.nbytes for a in load_features(config, "aligned").arrays().values())
    group = plan(config)[0]

    class Device:
        def __init__(self, limit):
            self.limit = limit

        def memory_stats(self):
            return None if self.limit is None else {"bytes_limit": self.limit}

        def __str__(self):
            return "cuda:0"

    groups_lib.check_fits(group, load_features(config, "aligned"), [Device(None), Device(need)])  # fits
    with pytest.raises(groups_lib.FeaturesTooLarge, match=r"take 0\.15 MiB .* device cuda:0 holds at most 0\.10 MiB"):
        groups_lib.check_fits(group, load_features(config, "aligned"), [Device(need), Device(2**20 // 10)])

    monkeypatch.setattr(groups_lib, "device_memory", lambda device: need - 1)
    monkeypatch.setattr(groups_lib, "make_train", lambda *a, **k: pytest.fail("a group that cannot fit compiled"))
    results = train_and_evaluate(config, str(tmp_path))
    assert not results["runs"] and len(results["failed_groups"]) == 2
    for failure in results["failed_groups"]:
        assert failure["error"].startswith(f"group {failure['group']}: the features of backbone 'aligned' take ")
        assert "image [200, 32] float32: 0.02 MiB" in failure["error"] and "no group of this backbone" in failure["error"]
    said = [r for r in caplog.records if "no group of this backbone" in r.getMessage()]
    assert len(said) == 2 and not any(r.exc_info for r in said)


@pytest.mark.skipif(jax.device_count() > 1 or jax.devices()[0].platform != "cpu",
                    reason="chunks of 2 runs, on one device, are the CPU's default")
def test_evaluation_memory_is_a_chunks_not_the_groups(smoke_config):
    """evaluate takes a device's runs a chunk at a time, as training does: its scratch memory does not grow with
    the runs of the group (it held every run's evaluation batch at once: 10x more at 18 runs of token features)."""
    from fusion_jax.data.sources import load_features

    config = smoke_config
    config.synthetic.tokens, config.backbones, config.methods, config.scales = 16, ("aligned",), ("cross",), (256,)
    features = load_features(config, "aligned")
    scratch = []
    for seeds in ((42,), (42, 123, 456, 7, 8, 9)):
        config.seeds = seeds
        group, = plan(config)
        program = build_program(config, group, features)
        assert program.chunk == 2 and len(program.slots) >= 2 * len(seeds)
        scratch.append(program.evaluate.memory_analysis().temp_size_in_bytes)
    assert scratch[1] < 1.5 * scratch[0], scratch


@pytest.mark.skipif(jax.device_count() > 1 or jax.devices()[0].platform != "cpu",
                    reason="lanes run on a CPU with one device")
def test_lanes_train_every_run_to_the_same_bits_as_one_program():
    """Two and three lanes (programs side by side, each over a share of the chunks; with two, one lane
    has an empty chunk) give every run the state, losses and validation counts of one program over
    all chunks, bit for bit, in both heads, noise study included."""
    from fusion_jax import bench

    grid = bench.GRIDS["tiny"]
    config, features = bench.bench_config(grid), bench.bench_features(grid, "aligned")
    config.seeds = (42, 123, 456)  # 6 runs in each group: 3 chunks of 2
    for group in plan(config):
        trained = []
        for n in (1, 2, 3):
            config.lanes = n
            program = build_program(config, group, features)
            assert (program.train_epoch.lanes, program.chunk) == (n, 2)
            data, runs = group_data(features, program.replicated), jax.device_put(program.runs, program.by_run)
            state, losses = program.train_epoch(program.init(runs, data), runs, data)
            counts = program.evaluate(state, runs, data)
            trained.append(jax.tree_util.tree_map(lambda x: np.asarray(x)[program.index], (state, losses, counts)))
        for other in trained[1:]:
            jax.tree_util.tree_map(np.testing.assert_array_equal, trained[0], other)


def test_lanes_by_default_one_per_core_and_full_chunk_on_a_one_device_cpu_only(monkeypatch):
    from fusion_jax.groups import lanes

    config = ml_collections.ConfigDict({"lanes": 0})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert lanes(config, "cpu", 1, 9, 2) == 4 and lanes(config, "cpu", 1, 5, 2) == 2
    assert lanes(config, "cpu", 1, 3, 2) == 1 and lanes(config, "cpu", 2, 9, 2) == 1
    assert lanes(config, "gpu", 1, 9, 2) == 1
    config.lanes = 2
    assert lanes(config, "cpu", 1, 9, 2) == 2 and lanes(config, "cpu", 1, 9, 9) == 1
    # Never more lanes than full chunks: layout then keeps the chunks of k runs (and their bits).
    for n_runs, k in ((5, 4), (9, 4), (9, 2), (7, 3)):
        for asked in (0, 2, 3, 8):
            config.lanes = asked
            assert layout([10] * n_runs, lanes(config, "cpu", 1, n_runs, k), k)[1] == k


def test_gpu_compiler_options_are_options_this_xla_knows():
    """GPU_COMPILER_OPTIONS are what a GPU build gives all its programs (build_program takes them from
    compiler_options, as the test above checks on the CPU); XLA refuses a name it does not know on any
    backend, so a renamed flag fails here, on the CPU, rather than on a user's GPU."""
    assert compiler_options("gpu") == (GPU_COMPILER_OPTIONS, GPU_COMPILER_OPTIONS)
    assert compiler_options("tpu") == (None, None)
    lowered = jax.jit(lambda a: a @ a).lower(np.eye(3, dtype=np.float32))
    np.testing.assert_array_equal(lowered.compile(GPU_COMPILER_OPTIONS)(np.eye(3, dtype=np.float32)), np.eye(3))
    with pytest.raises(Exception, match="No such compile option"):
        lowered.compile({"xla_gpu_enable_triton_gemm_renamed": False})
