"""The benchmark (fusion_jax/bench.py) on its seconds-long `tiny` grid, and its lazy torch import."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_module_does_not_import_torch():
    """Importing the benchmark (and the package) leaves torch unimported: the reference loads lazily."""
    code = "import sys, fusion_jax.bench, fusion_jax.cost; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def _stand_in_reference(**functions):
    """The PyTorch reference's module as bench_torch calls it, with `functions` in place of training (a head
    that goes to any device): what a run is given, without torch training it."""
    import types

    return types.SimpleNamespace(make_head_torch=lambda *a: types.SimpleNamespace(to=lambda device: None),
                                 **functions)


def test_tiny_benchmark_writes_timings(tmp_path):
    """`--tiny` in process, two rounds: the JSON and Markdown files exist, with positive timings for
    both ways, each way's median round and every round's wall time."""
    pytest.importorskip("torch", reason="torch is not installed: the benchmark's PyTorch reference needs it")
    from fusion_jax import bench, bench_markdown

    logged = []
    result = bench.run_benchmark("tiny", str(tmp_path), command="pytest tiny", log=logged.append, repeats=2,
                                 torch_runs=1)
    path = tmp_path / f"{bench.device_name()}-tiny-x2.json"
    md = (tmp_path / f"{bench.device_name()}-tiny-x2.md").read_text()
    assert path.exists() and "ran 2 times, in turn" in md
    # One reference run of each group's two: its time is an estimate, marked so, and the accuracies compare those runs.
    assert result["speedup"]["estimated"] and "| runs per second |" in md and md.count("(est.)") >= 5
    assert "mean val. accuracy (mean of the groups' means, the runs the reference trained), concat" in md
    assert all(g["trained_index"] == [0] for g in result["torch"]["groups"])
    saved = json.loads(path.read_text())
    # Without --compilation-cache nothing goes through a persistent cache, though this test process has one.
    assert saved["jax"]["compilation_cache"] == {"dir": None, "hits": 0, "misses": 0}
    assert saved["speedup"] == result["speedup"]
    rounds = saved["repeats"]
    assert rounds["rounds"] == 2 and len(rounds["jax_wall_s"]) == len(rounds["torch_wall_s"]) == 2
    assert saved["jax"]["wall_s"] == min(rounds["jax_wall_s"]) and saved["torch"]["wall_s"] == min(rounds["torch_wall_s"])
    for key in ("command", "source", "versions", "device", "env", "grid", "flops", "matmul_peak", "jax", "torch",
                "speedup"):
        assert key in saved, key
    assert saved["command"] == "pytest tiny" and saved["versions"]["jax"] and saved["versions"]["torch"]
    jax_side, torch_side = saved["jax"], saved["torch"]
    n_groups = len(saved["grid"]["groups"])
    assert len(jax_side["groups"]) == len(torch_side["groups"]) == n_groups == 2
    assert jax_side["runs"] == torch_side["runs"] == saved["grid"]["runs"] == 4
    for key in ("wall_s", "compile_s", "train_s", "runs_per_s", "train_flops", "achieved_gflops", "fraction_of_peak"):
        assert jax_side[key] > 0, key
    for key in ("wall_s", "runs_per_s", "achieved_gflops"):
        assert torch_side[key] > 0, key
    for side in (jax_side, torch_side):
        assert side["runs_per_s"] == pytest.approx(side["runs"] / side["wall_s"])
        assert side["achieved_gflops"] == pytest.approx(side["train_flops"] / side["wall_s"] / 1e9)
    assert saved["matmul_peak"]["gflops"] == max(saved["matmul_peak"][k]["gflops"] for k in ("before", "after")) > 0
    assert jax_side["achieved_gflops_steady"] == pytest.approx(jax_side["train_flops"] / jax_side["train_s"] / 1e9)
    sides = [line.split()[0][1:] for line in logged if line.startswith(("[jax ", "[torch "))]
    assert sides == 2 * (["jax"] * 2 + ["torch"] * 2) and saved["order"] == "jax, then torch"  # round after round
    speedup, jax_wall, torch_wall = saved["speedup"], saved["jax"]["wall_s"], saved["torch"]["wall_s"]
    assert speedup["wall"] == pytest.approx(torch_wall / jax_wall)
    assert speedup["excluding_compile"] == pytest.approx(torch_wall / (jax_wall - saved["jax"]["wait_s"]))
    assert rounds["speedup_per_round"] == pytest.approx([t / j for j, t in zip(rounds["jax_wall_s"],
                                                                               rounds["torch_wall_s"])])
    # jax's setting as the session has it (conftest pins "highest" on a GPU; default, full float32, on a CPU).
    import jax

    setting = jax.config.jax_default_matmul_precision or "default"
    assert saved["matmul_precision"]["jax"] == setting and saved["matmul_precision"]["torch"].startswith("highest")
    assert f"Float32 matmul precision: jax {setting}" in (tmp_path / f"{bench.device_name()}-tiny-x2.md").read_text()
    assert jax_side["wall_s"] >= jax_side["wait_s"] + jax_side["train_s"] + jax_side["eval_s"]
    assert all(g["executed_flops"] >= g["train_flops"] for g in jax_side["groups"])
    assert all(0 <= g["accuracy_mean"] <= 1 for g in jax_side["groups"] + torch_side["groups"])
    assert all(len(g["accuracy_per_run"]) == g["runs"] for g in jax_side["groups"])
    assert saved["matmul_peak"]["before"]["calls"] >= 1 and set(saved["flops"]["train_step_per_run"]) == {"concat", "cross"}
    # The Markdown shows the JSON's own numbers, each in its own row and column.
    assert f"| wall time (s) | {jax_wall:.1f} | {torch_wall:.1f} (estimated; " in md
    assert f"**Speed-up: {speedup['wall']:.2f}x** (against the estimated reference time)" in md
    assert f"({speedup['excluding_compile']:.2f}x without the time spent waiting for it)" in md
    ratios = rounds["speedup_per_round"]
    assert f"(from {min(ratios):.2f}x to {max(ratios):.2f}x)" in md
    assert (f"| % of matmul peak (wall) | {100 * jax_side['fraction_of_peak']:.1f} | "
            f"{100 * torch_side['fraction_of_peak']:.1f} (est.) |") in md
    assert (f"| achieved GFLOP/s, % of peak (training epochs only) | {jax_side['achieved_gflops_steady']:.1f}, "
            f"{100 * jax_side['fraction_of_peak_steady']:.1f} |") in md
    for a, b in zip(jax_side["groups"], torch_side["groups"]):
        assert (f"| {a['group']} | {a['runs']} | {', '.join(map(str, a['scales']))} | {sum(a['steps_per_run'])} | "
                f"{a['compile_s']:.2f} | {a['wait_s']:.2f} | {a['train_s']:.2f} | {b['wall_s']:.2f} (est.) |") in md
    for m in ("concat", "cross"):
        mine = [np.mean([a["accuracy_per_run"][i] for i in b["trained_index"]])
                for a, b in zip(jax_side["groups"], torch_side["groups"]) if a["group"].endswith(f"-{m}")]
        theirs = [b["accuracy_mean"] for b in torch_side["groups"] if b["group"].endswith(f"-{m}")]
        assert f"the runs the reference trained), {m} | {np.mean(mine):.3f} | {np.mean(theirs):.3f} |" in md
    executed = sum(g["executed_flops"] for g in jax_side["groups"]) / jax_side["train_flops"]
    assert f"fusion_jax executed {executed:.2f}x that work" in md
    # The tiny grid's chunks have no idle steps (1.00x) and its two rounds' ratios may print alike: made to differ.
    for g in saved["jax"]["groups"]:
        g["executed_flops"] *= 1.5
    saved["repeats"]["speedup_per_round"] = [2.5, 2.0]
    again = bench_markdown.markdown(saved)
    assert f"fusion_jax executed {1.5 * executed:.2f}x that work" in again and "(from 2.00x to 2.50x)" in again
    saved["repeats"] = {"rounds": 1}
    assert "Both sides ran" not in bench_markdown.markdown(saved)
    # Each row its own field, each side its own column: values that differ everywhere.
    saved["jax"].update(compile_s=1.25, wait_s=2.5, train_s=3.75, eval_s=5.0, runs_per_s=0.125, achieved_gflops=7.5,
                        fraction_of_peak=0.1234)
    saved["torch"].update(runs_per_s=0.0625, achieved_gflops=1.5, fraction_of_peak=0.0321)
    saved["torch"]["groups"][0]["trained_runs"] = 3
    again = bench_markdown.markdown(saved)
    trained = sum(g["trained_runs"] for g in saved["torch"]["groups"])
    for row in (f"measured for {trained} of {torch_side['runs']} runs",
                f"| compilation, in {jax_side['workers']} worker thread(s) (s) | 1.2 | – |",
                "| of the wall time, waiting for compilation (s) | 2.5 | – |",
                "| of the wall time, training epochs (s) | 3.8 | – |", "| runs per second | 0.125 | 0.062 (est.) |",
                "| achieved GFLOP/s (wall) | 7.5 | 1.5 (est.) |", "| % of matmul peak (wall) | 12.3 | 3.2 (est.) |"):
        assert row in again, row


def test_grid_plans_noise_at_one_scale_and_split_by_scale_the_same_runs():
    """The bench grid is a sweep config: the noise levels at the noise study's scale only; split by
    scale, the same runs in the same order."""
    from fusion_jax import bench
    from fusion_jax.groups import plan

    full = [r for g in plan(bench.bench_config(bench.GRIDS["full"])) for r in g.runs]  # the noise study: one backbone
    assert {r.backbone for r in full if r.level} == {"aligned"} and len(full) == 2 * 2 * 4 * 3 + 2 * 3 * 5
    grid = bench.GRIDS["quick"]
    config = bench.bench_config(grid)
    whole = plan(config)
    assert {(r.scale, r.level) for g in whole for r in g.runs} == {(2048, 0.0), (4096, 0.0), (4096, 0.1)}
    assert sum(len(g.runs) for g in whole) == 18
    config.split_by_scale = True
    split = plan(config)
    assert [g.name for g in split] == [f"aligned-{m}-s{s}" for m in grid.methods for s in grid.scales]
    assert all(len(g.scales) == 1 for g in split)
    for m in grid.methods:
        assert [r for g in split if g.method == m for r in g.runs] == [r for g in whole if g.method == m for r in g.runs]


def test_persistent_cache_loads_a_program_compiled_before_and_restores_the_setting(tmp_path):
    """xla_cache.persistent_cache: a new function object with the same program is loaded from the folder
    (a hit, no miss); afterwards the process's own cache setting is back."""
    import jax
    import jax.numpy as jnp

    from fusion_jax import bench_markdown, xla_cache

    before, min_seconds = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    x = jnp.arange(8.0)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 60.0)  # a setting that would keep this one out
    try:
        with xla_cache.persistent_cache(str(tmp_path)):
            with xla_cache.cache_events() as first:
                jax.jit(lambda v: jnp.sin(v) * 3.0 + 1.0)(x).block_until_ready()
            with xla_cache.cache_events() as second:
                jax.jit(lambda v: jnp.sin(v) * 3.0 + 1.0)(x).block_until_ready()
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 60.0
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
    assert first == {"hits": 0, "misses": 1} and second == {"hits": 1, "misses": 0}
    assert os.listdir(tmp_path)  # the entry is in the block's folder, not the session's
    assert jax.config.jax_compilation_cache_dir == before
    note = lambda hits, misses: bench_markdown._cache_note({"dir": str(tmp_path), "hits": hits, "misses": misses})
    assert "cold" in note(0, 3) and "warm: " in note(3, 0) and "partly warm" in note(1, 2)
    assert "none of its programs" in note(0, 0) and bench_markdown._cache_note({"dir": None}) == ""


def test_matmul_peak_times_one_call(monkeypatch):
    """Seconds per matmul (a round's time over its calls) and 2·size³ FLOPs each, on a clock that ticks 10 ms a look:
    the first call's 10 ms asks for 5 calls a round (50 ms), and each round's two looks 10 ms apart give 2 ms a call."""
    import types

    from fusion_jax import bench

    ticks = itertools.count()
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: 0.01 * next(ticks)))
    peak = bench.matmul_peak(8, reps=2)
    assert peak["calls"] == 5 and peak["seconds"] == pytest.approx(0.002)
    assert peak["gflops"] == pytest.approx(2 * 8**3 / 0.002 / 1e9)


def test_median_run_and_bad_repeats():
    from fusion_jax import bench

    runs = [{"wall_s": w} for w in (5.0, 1.0, 3.0)]
    assert bench._median_run(runs)["wall_s"] == 3.0 and bench._median_run(runs[:2])["wall_s"] == 1.0
    with pytest.raises(ValueError, match="repeats"):
        bench.run_benchmark("tiny", "/nonexistent", repeats=0)


@pytest.mark.parametrize("flag", ["--runs-per-chunk=-1", "--lanes=-1", "--compile-workers=0", "--torch-threads=0",
                                  "--repeats=0", "--torch-runs=0"])
def test_bad_flags_are_refused_before_anything_runs(flag, capsys):
    from fusion_jax import bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", "--out=/nonexistent", flag])
    assert e.value.code == 2 and f"{flag.split('=')[0]} must be at least" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--compilation-cache"])
def test_an_output_folder_that_cannot_be_made_is_refused_before_anything_runs(flag, tmp_path, capsys):
    from fusion_jax import bench

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", f"--out={tmp_path / 'out'}", f"{flag}={tmp_path / 'a_file'}"])
    assert e.value.code == 2 and f"{flag}: '{tmp_path / 'a_file'}' is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--tiny", f"--out={tmp_path / 'out'}", f"{flag}={tmp_path / 'a_file' / 'below'}"])
    assert "cannot be made: " in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # an unset variable: --out=$OUT
        bench.main(["--tiny", f"--out={tmp_path / 'out'}", f"{flag}="])
    assert f"{flag}: '' is empty (an unset variable?): give a folder" in capsys.readouterr().err


def test_an_output_folder_the_file_system_refuses_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    """A folder that permissions call writable and the file system refuses (/proc to root, a read-only mount)."""
    import errno

    from fusion_jax import bench, files

    def refuse(path, exist_ok=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(files.os, "makedirs", refuse)
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", f"--out={tmp_path / 'out'}"])
    assert e.value.code == 2
    assert f"--out: '{tmp_path / 'out'}' cannot be made: Read-only file system" in capsys.readouterr().err


def test_reference_time_is_estimated_only_when_runs_were_left_out():
    """--torch-runs N trains N runs per (group, scale): with every run trained the time is measured,
    not marked estimated; with fewer it is estimated, overhead included; 0 is refused."""
    pytest.importorskip("torch", reason="torch is not installed: the benchmark's PyTorch reference needs it")
    from fusion_jax import bench, cost
    from fusion_jax.bench_torch import time_torch

    grid = bench.GRIDS["tiny"]
    config = bench.bench_config(grid)
    groups = [g for g in bench.plan(config) if g.method == "concat"]
    assert len(groups[0].runs) == 2  # one scale: levels 0 and 0.1
    features = {"aligned": bench.bench_features(grid, "aligned")}
    flops = {"concat": cost.train_step_flops(config, "concat", grid.dim, grid.dim)}
    timed = lambda n: time_torch(config, groups, features, flops, bench.load_reference(), "cpu", 1, n, lambda s: None)
    every = timed(2)
    assert not every.get("estimated") and not every["groups"][0].get("estimated")
    one = timed(1)
    g = one["groups"][0]
    assert one["estimated"] and g["estimated"] and g["trained_runs"] == 1
    # The measured group time (its one run and the pairs) plus the left-out run, as long as the trained one.
    assert g["wall_s"] == pytest.approx(g["measured_wall_s"] + g["run_s"][0])
    assert one["wall_s"] == pytest.approx(one["measured_wall_s"] + g["wall_s"] - g["measured_wall_s"])  # the side's
    with pytest.raises(ValueError, match="torch-runs must be at least 1"):
        bench.run_benchmark("tiny", "/nonexistent", torch_runs=0)


def test_the_references_noise_is_normalize_v_plus_sigma_z_fixed_per_run():
    import numpy as np

    from fusion_jax.bench_torch import noisy_image

    x = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert noisy_image(x, 0.0, 42, 128) is x
    y = noisy_image(x, 0.3, 42, 128)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
    assert 0.5 < float(np.mean(np.sum(x * y, axis=1))) < 0.99  # moved, but not far at sigma 0.3 in 16 dims
    np.testing.assert_array_equal(noisy_image(x, 0.3, 42, 128), y)
    assert not np.array_equal(noisy_image(x, 0.3, 123, 128), y)
    # As much noise as the trainer's (fusion_jax.degrade, other draws): the same mean cosine to the clean rows.
    import jax

    from fusion_jax.degrade import gaussian

    x = np.random.default_rng(1).standard_normal((4000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cosine = lambda y: float(np.mean(np.sum(x * np.asarray(y), axis=1)))
    ours = gaussian(x, np.arange(len(x)), jax.random.PRNGKey(0), np.float32(0.3))
    assert cosine(noisy_image(x, 0.3, 42, 128)) == pytest.approx(cosine(ours), abs=0.02)


def test_each_reference_run_trains_its_epochs_on_its_own_features_and_validates_on_its_split():
    """time_torch_group with a stand-in for the reference (it records what each run is given; no training): a
    noisy run's features noised, an order per epoch, validation on the validation pairs, the last epoch's loss,
    every epoch's steps, and the FLOPs of every run of the group where one run per scale trains."""
    pytest.importorskip("torch", reason="torch is not installed: the benchmark's PyTorch reference needs it")
    from fusion_jax import bench
    from fusion_jax.bench_torch import noisy_image, time_torch_group
    from fusion_jax.data import build_pairs
    from fusion_jax.train import steps_per_epoch

    grid = bench.GRIDS["tiny"]
    config = bench.bench_config(grid)
    config.train.epochs, config.scales, config.degradation.scales = 2, (128, 256), ()
    (group, _) = bench.plan(config)  # concat: scales 128 and 256, levels 0 and 0.1
    features = bench.bench_features(grid, "aligned")
    given = []

    def train_reference(head, arrays, train, orders, lr, wd, epochs, batch, device):
        given.append({"image": arrays["image"], "orders": orders, "n_train": len(train["label"])})
        per_epoch = steps_per_epoch(len(train["label"]), batch)
        return [float(e + 1) for e in range(epochs) for _ in range(per_epoch)]  # epoch e's loss: e + 1

    def evaluate_reference(head, arrays, split, device):
        given[-1]["n_val"] = len(split["label"])
        return (1, 0, 0, 1)

    ref = _stand_in_reference(train_reference=train_reference, evaluate_reference=evaluate_reference)
    out = time_torch_group(config, group, features, ref, step_flops=10.0)
    pairs = {s: build_pairs(features.caption_image, features.n_images, s, **config.pairs) for s in (128, 256)}
    for spec, seen in zip(group.runs, given):
        p = pairs[spec.scale]
        np.testing.assert_array_equal(seen["image"], noisy_image(features.image, spec.level, spec.seed, spec.scale))
        assert (spec.level > 0) == (not np.array_equal(seen["image"], features.image))
        assert len(seen["orders"]) == 2 and not np.array_equal(*seen["orders"])
        assert (seen["n_train"], seen["n_val"]) == (p.n_train, len(p.label) - p.n_train)
    steps = [2 * steps_per_epoch(pairs[r.scale].n_train, config.train.batch_size) for r in group.runs]
    assert out["steps_per_run"] == steps and out["final_train_loss"] == 2.0 and out["accuracy_mean"] == 1.0
    assert out["train_flops"] == 10.0 * sum(steps)
    one = time_torch_group(config, group, features, ref, step_flops=10.0, runs_per_scale=1)
    assert one["trained_index"] == [0, 2] and one["train_flops"] == 10.0 * sum(steps)


def test_the_thread_check_reports_milliseconds_per_step(monkeypatch):
    """torch_thread_check on a clock that a stand-in reference moves by 2 ms a step of 32 pairs: 2 ms per step on
    each thread count (the warm-up's steps not counted)."""
    torch = pytest.importorskip("torch", reason="torch is not installed: the benchmark's PyTorch reference needs it")
    import types

    from fusion_jax import bench, bench_torch
    from fusion_jax.train import steps_per_epoch

    clock = [0.0]
    monkeypatch.setattr(bench_torch, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def train_reference(head, arrays, train, orders, lr, wd, epochs, batch, device):
        clock[0] += 0.002 * steps_per_epoch(len(orders[0]), batch)
        return []

    ref = _stand_in_reference(train_reference=train_reference)
    threads = torch.get_num_threads()
    try:
        check = bench_torch.torch_thread_check(ref, bench.bench_features(bench.GRIDS["tiny"], "aligned"), 2, steps=4)
    finally:
        torch.set_num_threads(threads)
    assert check == {"1_threads_ms_per_step": pytest.approx(2.0), "2_threads_ms_per_step": pytest.approx(2.0)}


def test_after_a_persistent_cache_block_programs_are_not_cached_in_its_folder(tmp_path):
    import jax
    import jax.numpy as jnp

    from fusion_jax import xla_cache

    with xla_cache.persistent_cache(str(tmp_path / "bench")):
        jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()
    before = sorted(os.listdir(tmp_path / "bench"))
    assert before  # the block's program is there
    jax.jit(lambda x: x * 7.0 - 2.0)(jnp.ones(5)).block_until_ready()
    assert sorted(os.listdir(tmp_path / "bench")) == before
