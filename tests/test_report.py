"""The side-by-side report: tables 1-3 beside the paper's, figures, and `python -m fusion_jax.report`."""

import itertools
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from fusion_jax import efficiency, figures, paper, report, summary, tables
from fusion_jax.data.dataset import STANDIN_NAME
from fusion_jax.metrics import METRICS
from fusion_jax.report import compare, render_report, summarize
from fusion_jax.summary import answer, summary_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = [f"table{i}.{ext}" for i in (1, 2, 3) for ext in ("md", "csv")]
PNG = b"\x89PNG\r\n\x1a\n"


def _run(backbone, method, scale, seed, level, acc):
    return {"backbone": backbone, "method": method, "scale": scale, "seed": seed,
            "degradation": {"kind": "gaussian", "level": level},
            "metrics": {"accuracy": acc, "f1": acc, "precision": acc, "recall": acc}, "majority_baseline": 0.5,
            "params": 295554 if method == "concat" else 559490, "train_seconds": 0.5, "final_train_loss": 0.3,
            "train_loss_by_epoch": [0.69, 0.5 - 0.1 * (method == "cross"), 0.3],
            "n_train": int(0.8 * scale), "n_val": scale - int(0.8 * scale)}


def fake_results(features="flickr8k", backbones=("clip",), scales=(2048, 4096), levels=(0.0, 0.1),
                 seeds=(42, 123, 456), identical_diffs=False, dims=(512, 512)):
    """A results dict by hand: concat ahead by a noisy 3 points (or exactly 2 with `identical_diffs`)."""
    rng = np.random.default_rng(0)
    runs = []
    for b in backbones:
        for sc in scales:
            for lv in levels:
                for i, s in enumerate(seeds):
                    base = 0.8 + 0.01 * i - lv
                    gap = 0.02 if identical_diffs else 0.03 + 0.01 * rng.standard_normal()
                    runs += [_run(b, "concat", sc, s, lv, base + gap), _run(b, "cross", sc, s, lv, base)]
    config = {"name": "fake", "features": features, "backbones": list(backbones), "seeds": list(seeds),
              "degradation": {"kind": "gaussian", "modality": "image", "levels": list(levels)},
              "head": {"hidden": 256, "mlp_hidden": 128, "num_heads": 4},
              "train": {"dropout": 0.1, "batch_size": 32},
              "pairs": {"split_seed": 0, "train_fraction": 0.8, "split_by": "pair"}}
    prov = {b: {"dim_image": dims[0], "dim_text": dims[1], "tokens": False,
                "model": "openai/clip-vit-base-patch32" if b == "clip" else "microsoft/resnet-18",
                "alignment": {"defined": True, "recall@1": 0.4, "recall@5": 0.7, "chance@1": 0.005,
                              "chance@5": 0.025, "n_images": 100}} for b in backbones}
    return {"command": "test", "config": config, "versions": {"jax": "x", "flax": "y"},
            "device": {"platform": "cpu", "device_kind": "cpu", "count": 1}, "backbones": prov,
            "runs": runs, "summary": summarize(runs), "comparisons": compare(runs)}


def write_tsne(workdir, backbone, n, d_v, d_t, seed=0):
    """A fake `tsne_<backbone>.npz`: matched pairs that share a latent."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 8))
    image = z @ rng.standard_normal((8, d_v)) + 0.1 * rng.standard_normal((n, d_v))
    text = z @ rng.standard_normal((8, d_t)) + 0.1 * rng.standard_normal((n, d_t))
    np.savez(os.path.join(workdir, f"tsne_{backbone}.npz"), image=image.astype(np.float32),
             text=text.astype(np.float32))


def assert_no_nan(workdir):
    for name in TABLES:
        text = pathlib.Path(workdir, name).read_text()
        assert not re.search(r"\bnan\b", text, re.IGNORECASE), name


def assert_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG and os.path.getsize(path) > 10_000, path


# --- the table logic on hand-made results ----------------------------------------------------------

@pytest.mark.parametrize("diff, p, n, want", [
    (0.028, 0.01, 3, "concat +2.8"),
    (-0.010, 0.001, 3, "cross +1.0"),
    (0.028, 0.2, 3, "not significant (concat +2.8 at 3 seeds, p = 0.2)"),
    (-0.137, 0.0628, 3, "not significant (cross +13.7 at 3 seeds, p = 0.0628)"),  # not "tied": a gap, untested
    (0.028, None, 3, "untested (concat +2.8 on each of 3 seeds: the same gap on every seed leaves no t-test)"),
    (0.0, None, 3, "tied (the same on all 3 seeds)"),
    (-0.028, None, 1, "cross +2.8 on its one seed (no test possible)"),
    (0.0, None, 1, "untested (no gap on its one seed; no test possible)"),
    (0.028, 0.05, 3, "not significant (concat +2.8 at 3 seeds, p = 0.05)"),
    (0.0002, 1e-6, 3, "concat +0.02"),
    (float("nan"), float("nan"), 3, "untested (not a number"),
])
def test_verdict_words(diff, p, n, want):
    assert want in tables.verdict(diff, p, n)


def test_a_gap_is_signed_as_it_runs_and_two_seeds_can_decide_it():
    """points_text writes cross's lead with a minus; a t-test runs from 2 seeds on; only a nonzero gap the same on
    every seed (p None) is untested, no gap at all is tied; seed_pairs pairs the seeds both methods ran."""
    assert tables.points_text(-0.028, 0.01, 3) == "-2.8" and tables.points_text(0.028, 0.01, 3) == "+2.8"
    assert tables.points_text(-0.013, 0.3, 3) == "-1.3"  # not significant: signed all the same
    assert tables.favoured(0.05, 0.01, 2) == "concat" and tables.favoured(-0.05, 0.01, 2) == "cross"
    assert tables.untested(0.02, None, 3) and not tables.untested(0.0, None, 3) and not tables.untested(0.02, 0.5, 2)
    runs = [_run("b", method, 1024, seed, 0.0, acc) for method, seed, acc in (
        ("concat", 1, 0.7), ("concat", 2, 0.8), ("cross", 3, 0.1), ("cross", 2, 0.6), ("cross", 1, 0.5))]
    assert tables.seed_pairs(runs) == ([0.7, 0.8], [0.5, 0.6])


def test_table1_counts_the_seeds_both_methods_ran_in_its_verdict():
    """A cell whose cross ran one seed of concat's three: its comparison pairs one seed, and says so."""
    results = fake_results("synthetic", ("aligned",), scales=(1024,), levels=(0.0,))
    results["runs"] = [r for r in results["runs"] if r["method"] == "concat" or r["seed"] == 42]
    results["summary"], results["comparisons"] = summarize(results["runs"]), compare(results["runs"])
    rows = [r for r in tables.table1(results)[1] if r["source"] == "ours"]
    assert [r["n_seeds"] for r in rows] == [3, 1] and all("on its one seed (no test possible)" in r["verdict"]
                                                           for r in rows)


def test_holm_leaves_out_the_comparisons_no_test_decided():
    """A comparison with a NaN metric is no test: Holm adjusts the others as a family of their own size."""
    results = fake_results("synthetic", ("aligned",), scales=(1024, 2048, 4096), levels=(0.0,))
    for c, (diff, p) in zip(results["comparisons"], ((0.03, 0.01), (0.02, 0.04), (float("nan"), float("nan")))):
        c.update(concat_minus_cross=diff, p_value=p, n_seeds=3)
    holm = tables.holm_index(results)
    assert [holm[("aligned", s, 0.0)] for s in (1024, 2048)] == pytest.approx([0.02, 0.04])
    assert holm[("aligned", 4096, 0.0)] is None


def test_p_text_never_rounds_across_alpha_and_nan_decides_nothing():
    assert tables.p_text(0.04996) == "0.04996" and tables.p_text(0.0500001) == "0.05"
    assert tables.p_text(0.0123456) == "0.0123" and tables.p_text(float("nan")) == "–"
    assert tables.favoured(float("nan"), None, 3) is None and tables.favoured(0.03, float("nan"), 3) is None
    from fusion_jax import metrics
    assert metrics.paired_difference([float("nan"), 0.8, 0.9], [0.7, 0.7, 0.7])[1] is None


def test_the_answer_says_when_neither_head_beats_the_majority_baseline():
    results = fake_results("synthetic", ("aligned",), scales=(1024, 2048), levels=(0.0,))
    for s in results["summary"]:
        if s["scale"] == 1024:
            s["majority_baseline_mean"] = 0.9  # above both heads' accuracy
    line, = answer(results)
    assert "**At 1024 pairs neither head beats the majority-class baseline**" in line and "2048 pairs neither" not in line


def test_no_clean_runs_no_scale_figure_and_the_answer_keeps_the_noise(tmp_path):
    results = fake_results("synthetic", ("aligned",), levels=(0.0, 0.3))
    runs = [r for r in results["runs"] if r["degradation"]["level"] > 0]
    results.update(runs=runs, summary=summarize(runs), comparisons=compare(runs))
    assert figures.accuracy_vs_scale(results, str(tmp_path / "fig.png")) is None
    line, = answer(results)
    assert "no comparison without noise" in line and "(σ 0.3): concat ahead in" in line


def test_a_sweep_with_no_finished_run_says_so_rather_than_draw_an_empty_table():
    results = fake_results("synthetic", ("aligned",))
    results.update(runs=[], summary=[], comparisons=[])
    assert "## Every cell\n\n(no run finished)\n" in summary_markdown(results)
    results["failed_groups"] = [{"group": "aligned-concat", "backbone": "aligned", "error": "NaN"}]
    summary = summary_markdown(results)
    assert "(no run finished: every group failed, below)" in summary and "| backbone | method |" not in summary


def test_the_figures_plot_each_series_own_numbers(monkeypatch):
    """Accuracy against scale: each method's mean accuracy and the majority baseline, in percent; the noise
    figure: concat − cross per level, in points, worked out here from the runs."""
    import matplotlib.pyplot as plt

    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.setdefault(path, fig) and path)
    results = fake_results("synthetic", ("aligned",), scales=(1024, 2048), levels=(0.0, 0.1, 0.2))
    for r in results["runs"]:
        r["majority_baseline"] = 0.5 + 0.001 * r["scale"] / 1024
        r["metrics"]["f1"] = r["metrics"]["accuracy"] - 0.1
    results["summary"] = summarize(results["runs"])
    figures.accuracy_vs_scale(results, "scale")
    figures.noise_advantage(results, "noise")
    clean = lambda method, scale: [r for r in results["runs"] if (r["method"], r["scale"]) == (method, scale)
                                   and r["degradation"]["level"] == 0]
    ax = drawn["scale"].axes[0]
    for container in ax.containers:
        method = container.get_label().split(" ")[0]
        want = [100 * np.mean([r["metrics"]["accuracy"] for r in clean(method, sc)]) for sc in (1024, 2048)]
        np.testing.assert_allclose(np.asarray(container.lines[0].get_ydata(), float), want)
    base, = [l for l in ax.get_lines() if l.get_label() == "majority-class baseline (ours)"]
    np.testing.assert_allclose(np.asarray(base.get_ydata(), float), [100 * 0.501, 100 * 0.502])
    ax = drawn["noise"].axes[0]
    for container in ax.containers:
        scale = int(container.get_label().split()[-1])
        acc = lambda method, level: {r["seed"]: r["metrics"]["accuracy"] for r in results["runs"] if
                                     (r["method"], r["scale"], r["degradation"]["level"]) == (method, scale, level)}
        want = [100 * np.mean([acc("concat", lv)[s] - acc("cross", lv)[s] for s in (42, 123, 456)])
                for lv in (0.0, 0.1, 0.2)]
        np.testing.assert_allclose(np.asarray(container.lines[0].get_ydata(), float), want)
    assert len(drawn["noise"].axes[0].containers) == 2
    plt.close("all")


def test_the_papers_noise_curve_only_in_its_setting(tmp_path, monkeypatch):
    labels = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: labels.setdefault(path, [
        t.get_text() for t in fig.legends[0].get_texts()]) and path)
    text_noise = fake_results("flickr8k", ("clip",))
    text_noise["config"]["degradation"]["modality"] = "text"  # the paper's noise is on the image features
    for name, results in (("paper", fake_results("flickr8k", ("clip",))),
                          ("other", fake_results("synthetic", ("clip",))), ("text", text_noise)):
        figures.noise_advantage(results, name)
    assert any("Table 2 (scale not stated)" in t for t in labels["paper"])
    assert not any("Table 2" in t for t in labels["other"] + labels["text"])


def test_each_metric_reaches_its_own_columns_of_the_summary_and_table1():
    """With F1, precision and recall apart from accuracy and from each other (and their spreads over
    seeds too), the summary's means and stds and Table 1's cells, Markdown and CSV, are each metric's own,
    worked out here with numpy."""
    results = fake_results("synthetic", ("aligned",), levels=(0.0,))
    for r in results["runs"]:
        a, i = r["metrics"]["accuracy"], (42, 123, 456).index(r["seed"])
        r["metrics"] = {"accuracy": a, "f1": a - 0.1 + 0.01 * i, "precision": a - 0.2 - 0.02 * i,
                        "recall": 0.95 - 0.03 * i * i}
    results["summary"] = summarize(results["runs"])
    want = {}
    for (method, scale), group in itertools.groupby(sorted(results["runs"], key=lambda r: (r["method"], r["scale"])),
                                                    key=lambda r: (r["method"], r["scale"])):
        group = list(group)
        values = {m: np.array([r["metrics"][m] for r in group]) for m in METRICS}
        want[method, scale] = {m: (v.mean(), v.std(ddof=1)) for m, v in values.items()}
    assert len(want) == len(results["summary"]) == 4
    for s in results["summary"]:
        for m, (mean, std) in want[s["method"], s["scale"]].items():
            assert (s[f"{m}_mean"], s[f"{m}_std"]) == (pytest.approx(mean), pytest.approx(std)), m
    md, rows = tables.table1(results)
    columns = {"accuracy": 5, "f1": 7, "precision": 8, "recall": 9}  # of a Markdown row's cells
    lines = [l.split(" | ") for l in md.splitlines() if l.startswith("| ours |")]
    assert len(lines) == 4
    for cells in lines:
        for m, (mean, std) in want[cells[4], int(cells[3])].items():
            assert cells[columns[m]] == f"{100 * mean:.1f} ± {100 * std:.1f}", m
    ours = [r for r in rows if r["source"] == "ours"]
    assert len(ours) == 4
    for r in ours:
        for m, (mean, std) in want[r["method"], r["scale"]].items():
            assert (r[f"{m}_mean_pct"], r[f"{m}_std_pct"]) == (round(100 * mean, 2), round(100 * std, 2)), m


def test_table1_places_paper_rows_beside_ours_in_the_papers_setting():
    md, rows = tables.table1(fake_results("flickr8k", ("clip", "resnet")))
    lines = md.splitlines()
    for method, accuracy in (("concat", "77.9 ± 2.2"), ("cross", "73.5 ± 2.6")):  # each beside its own method
        ours = next(i for i, l in enumerate(lines) if l.startswith(f"| ours | Flickr8k | clip | 2048 | {method} |"))
        assert lines[ours + 1].startswith(f"| **paper** | Flickr8k | CLIP ViT-B/32 | 2048 | {method} | {accuracy} |")
    # resnet is not the paper's setting: no paper row beside it.
    resnet = next(i for i, l in enumerate(lines) if l.startswith("| ours | Flickr8k | resnet | 2048 | concat |"))
    assert not lines[resnet + 1].startswith("| **paper**")
    # The paper's scales we do not have go to the reference block, labelled.
    assert f"## For reference only: {tables.PAPER_REFERENCE}, Table 1" in md
    ref = md[md.index("## For reference only"):]
    assert "| 8192 | concat | 89.2 ± 0.6 |" in ref and "| 2048 | concat |" not in ref
    assert {r["block"] for r in rows} == {"ours", "paper beside ours (same backbone, data and scale)",
                                          f"reference only: {tables.PAPER_REFERENCE}, not comparable with ours"}
    assert all(r["source"] == "paper" for r in rows if r["block"] != "ours")
    assert "majority" in md and "| 50.0 |" in md  # the majority baseline beside every accuracy (ours: 0.5)
    assert "| 77.9 ± 2.2 | not reported |" in md  # the paper gives none


def test_the_paper_is_placed_beside_ours_only_when_trained_as_the_paper_trains():
    results = fake_results("flickr8k", ("clip",), levels=(0.0, 0.1))
    results["config"]["train"]["epochs"] = 2
    md, rows = tables.table1(results)
    assert "**paper**" not in md and not tables.is_paper_setting(results, "clip")
    assert "its training and head; here `train.epochs` 2 (the paper's 10)), so these are not placed" in md
    t2, rows2 = tables.table2(results)
    assert "not comparable with ours: not its setting" in t2
    assert all(r["block"].endswith("not comparable with ours") for r in rows2 if r["source"] == "paper")
    results["config"]["train"]["epochs"] = 10
    assert "the paper does not state the scale of this study." in tables.table2(results)[0]


def test_noise_at_one_level_only_is_a_noise_study_and_one_method_is_said(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fusion_jax.cost", None)
    results = fake_results("synthetic", ("aligned",), levels=(0.3,))
    md, _ = tables.table2(results)
    assert "| ours | synthetic (not Flickr8k) | aligned | 2048 | 0.3 |" in md
    assert "(table2.md)" in answer(results)[0]
    assert figures.noise_advantage(results, str(tmp_path / "noise.png")) is not None
    # One comparison with noise is no family to correct: its p-value is the verdict's, no Holm sentence.
    one = answer(fake_results("synthetic", ("aligned",), scales=(2048,), levels=(0.0, 0.3)))[0]
    assert one.endswith("With noise (σ 0.3): concat ahead in 1, cross in 0, neither in 0 of 1 comparisons (table2.md).")


def test_a_head_at_the_majority_baseline_is_named_and_token_alignment_is_said():
    results = fake_results("synthetic", ("aligned",), scales=(1024, 2048), levels=(0.0,))
    cross = next(s for s in results["summary"] if s["method"] == "cross" and s["scale"] == 2048)
    cross["majority_baseline_mean"] = cross["accuracy_mean"]
    concat = next(s for s in results["summary"] if s["method"] == "concat" and s["scale"] == 2048)
    line, = answer(results)
    assert (f"At 2048 pairs cross does not beat the majority-class baseline ({tables.pct(cross['accuracy_mean'])} "
            f"against {tables.pct(cross['majority_baseline_mean'])}; concat {tables.pct(concat['accuracy_mean'])})."
            in line)
    assert "At 1024 pairs" not in line and "neither head" not in line
    concat["majority_baseline_mean"] = concat["accuracy_mean"]
    both, = answer(results)
    assert "**At 2048 pairs neither head beats the majority-class baseline**" in both and "does not beat" not in both
    concat["majority_baseline_mean"] = cross["majority_baseline_mean"] = 0.5
    assert "of the token states' means" not in line and tables.TOKEN_ALIGNMENT not in summary_markdown(results)
    results["backbones"]["aligned"]["tokens"] = 4
    assert "zero-shot recall@1 40.0% of the token states' means" in answer(results)[0]
    assert tables.TOKEN_ALIGNMENT in summary_markdown(results) and tables.TOKEN_ALIGNMENT in tables.table1(results)[0]


def test_a_bare_alignment_dial_of_early_records_is_not_a_measure():
    results = fake_results("synthetic", ("aligned",), scales=(1024, 2048), levels=(0.0,))
    results["backbones"]["aligned"]["alignment"] = 0.5  # as synthetic provenance held it before its measure
    assert "alignment not measured" in answer(results)[0]
    assert "| aligned | – | – | – | – | not measured |" in summary_markdown(results)
    assert "| aligned | 512 / 512 | – | not measured |" in tables.table1(results)[0]


def test_against_compares_noisy_cells_only_under_the_same_noise():
    from fusion_jax.against import against_markdown

    base = fake_results("synthetic", ("aligned",), scales=(1024,), levels=(0.0, 0.3))
    text = json.loads(json.dumps(base))
    text["config"]["degradation"]["modality"] = "text"
    md = against_markdown(text, base, "b", "a", "cmd")
    assert "Cells with noise are not compared: the noise differs (`modality` \"image\" → \"text\")." in md
    assert "| aligned | 2 |" in md and "| 0.3 |" not in md  # the two σ 0 cells only, and their one comparison
    assert "token states differ" not in md  # the noise differs: one note, not a second one on dims


def test_the_papers_figures_agree_with_themselves_and_the_base_config_is_its_protocol():
    """paper.py is copied by hand: each lookup finds its own row, the printed advantages and ratios follow
    from the printed means and counts (to their rounding), and the configs' defaults are its protocol."""
    from fusion_jax.config_base import PAPER_NOISE, PAPER_SCALES, PAPER_SEEDS, base_config, flatten

    for row in paper.table1():
        assert paper.table1_row(row["scale"], row["method"]) == row
    assert paper.table1_row(2048, "late") is None and paper.table1_row(512, "concat") is None
    for row in paper.table2():
        gap = row["concat_mean"] - row["cross_mean"]
        assert abs(gap - row["advantage_pp"]) <= 0.15 and np.sign(gap) == np.sign(row["advantage_pp"]), row
    concat, cross = paper.table3()
    assert concat["rel_params"] == concat["rel_flops"] == 1.0
    assert cross["rel_params"] == pytest.approx(cross["params"] / concat["params"], abs=0.05)
    assert cross["rel_flops"] == pytest.approx(cross["flops_per_sample"] / concat["flops_per_sample"], abs=0.01)
    assert PAPER_SCALES == paper.PROTOCOL["scales"] == tuple(sorted({r["scale"] for r in paper.table1()}))
    assert PAPER_SEEDS == paper.PROTOCOL["seeds"] and len(PAPER_SEEDS) == 3
    assert PAPER_NOISE == tuple(r["sigma"] for r in paper.table2())
    defaults = flatten(base_config("x", "flickr8k").to_dict())
    assert {k: defaults[k] for k in paper.TRAINING} == paper.TRAINING
    assert set(paper.TRAINING) >= {"train.batch_size", "train.dropout", "train.weight_decay", "train.epochs",
                                   "head.hidden", "head.mlp_hidden", "head.num_heads"}


def test_table1_keeps_the_paper_apart_on_other_data():
    md, rows = tables.table1(fake_results("embedded", ("clip",)))
    main, ref = md.split("## For reference only")
    assert "**paper**" not in main and "ours | embedded (not Flickr8k)" in main
    assert f": {tables.PAPER_REFERENCE}, Table 1" in ref and "not comparable" in ref
    assert len([r for r in rows if r["source"] == "paper"]) == len(paper.TABLE1_ROWS)
    assert all(r["data"] == "Flickr8k" for r in rows if r["source"] == "paper")


@pytest.mark.parametrize("change", [{"model": "openai/clip-vit-large-patch14", "dim_image": 768, "dim_text": 768},
                                    {"model": "/models/clip"}, {"tokens": True},
                                    {"split_by": "image"}, {"train_fraction": 0.5}])
def test_other_clip_features_on_flickr8k_are_not_the_papers_setting(change):
    """Another CLIP, a local folder (it could be a stand-in's random weights), token features or another
    split of the pairs: the paper's rows go to the reference-only block, not beside ours."""
    results = fake_results("flickr8k", ("clip",))
    assert tables.is_paper_setting(results, "clip")
    pairs = results["config"]["pairs"]
    (pairs if set(change) <= set(pairs) else results["backbones"]["clip"]).update(change)
    assert not tables.is_paper_setting(results, "clip")
    md, _ = tables.table1(results)
    assert "**paper**" not in md.split("## For reference only")[0]


def test_a_standin_folder_is_never_labelled_flickr8k():
    """config.features is flickr8k, but the provenance names the stand-in folder (features.standins)."""
    results = fake_results("flickr8k", ("clip",))
    results["backbones"]["clip"]["dataset"] = STANDIN_NAME
    assert tables.data_of(results) == STANDIN_NAME and not tables.is_paper_setting(results, "clip")
    for make in (tables.table1, tables.table2):
        md, _ = make(results)
        main = md.split("## ")[0] if make is tables.table2 else md.split("## For reference only")[0]
        assert "**paper**" not in main and "| stand-in (not Flickr8k) |" in main and "| ours | Flickr8k" not in md


def test_the_same_gap_on_every_seed_is_said_as_it_is_not_called_tied():
    """Identical per-seed differences leave the t-test undefined (zero variance): the tables and the
    summary give the gap on each seed, never "tied" for a nonzero one."""
    results = fake_results("synthetic", ("aligned",), identical_diffs=True)
    assert all(c["p_value"] is None for c in results["comparisons"])
    for make in (tables.table1, tables.table2):
        md, rows = make(results)
        assert not [line for line in md.splitlines() if "tied" in line and "paper" not in line]  # (the paper's own say tied)
        assert all("concat +2.0 on each of 3 seeds" in r["verdict"] for r in rows if r["source"] == "ours")
    assert "concat +2.0 on each of 3 seeds" in summary_markdown(results) and "tied" not in summary_markdown(results)


def test_the_summary_answers_concat_or_cross_per_backbone():
    """The answer counts only significant differences, names a scale-dependent one, and says so when
    no difference is significant."""
    results = fake_results("synthetic", ("aligned", "unaligned"), scales=(1024, 2048), levels=(0.0, 0.1, 0.2))
    by_backbone = {c["backbone"]: c for c in results["comparisons"]}
    assert len(by_backbone) == 2
    flip = next(c for c in results["comparisons"] if c["backbone"] == "unaligned" and c["scale"] == 2048
                and tables.level(c) == 0)
    flip["concat_minus_cross"], flip["p_value"] = -0.04, 0.01
    aligned, unaligned = answer(results)
    assert aligned.startswith("- **aligned** (") and "**concat (at 2 of 2 scales; at both after Holm's correction)**" in aligned
    assert "1024: concat +" in aligned and "2048: concat +" in aligned
    assert "(σ 0.1-0.2): concat ahead in" in aligned and "of 4 comparisons (table2.md)." in aligned
    weak = next(s for s in results["summary"] if (s["backbone"], s["method"], s["scale"], tables.level(s))
                == ("aligned", "cross", 1024, 0.2))
    weak["accuracy_mean"] = weak["majority_baseline_mean"]  # at the baseline: not above it
    assert re.search(r"of 4 comparisons \(table2\.md\); in 1 of them a head does not beat the majority-class baseline, "
                     r"where a verdict says little\. After Holm's correction for the 4 tests with noise: concat ahead "
                     r"in [0-4]( \(\d+ at σ 0\.\d(, \d+ at σ 0\.\d)*\))?, cross in 0\.$", answer(results)[0])
    assert ("**it depends on the scale: concat at 1024, cross at 2048 pairs; after Holm's correction concat at 1024, "
            "cross at 2048**") in unaligned
    results["failed_groups"] = [{"group": "unaligned-cross", "backbone": "unaligned", "error": "NaN"}]
    assert "Group(s) unaligned-cross failed" in answer(results)[1] and "failed" not in answer(results)[0]
    results["failed_groups"] = [{"group": "unaligned-cross-s2048", "error": "NaN"}]  # a record before "backbone"
    assert "Group(s) unaligned-cross-s2048 failed" in answer(results)[1] and "failed" not in answer(results)[0]
    for c in results["comparisons"]:
        c["p_value"] = 0.5
    assert ("**no difference significant at 3 seeds (concat has fewer parameters: 295,554 against 559,490)**"
            in answer(results)[0])
    for r in results["runs"]:  # the note comes from the run records, never assumed
        r["params"] = 1000 if r["method"] == "cross" else 2000
    assert "(cross has fewer parameters: 1,000 against 2,000)**" in answer(results)[0]
    one_seed = next(c for c in results["comparisons"] if c["backbone"] == "aligned" and c["scale"] == 1024
                    and tables.level(c) == 0)
    one_seed["n_seeds"], one_seed["p_value"] = 1, None  # a scale with one seed names itself, not "1-3 seeds"
    assert "**no difference significant at 3 seeds, untested at 1024 pairs (cross has" in answer(results)[0]
    for c in results["comparisons"]:
        c["concat_minus_cross"] = float("nan")
    assert "**untested (see each scale)**" in answer(results)[0]
    summary = summary_markdown(results)
    assert summary.index("## Concat or cross?") < summary.index("## Every cell")
    # The paper's Table 4 beside the answers, every rule of it, in its words.
    rules = next(line for line in summary.splitlines() if line.startswith("The paper's decision rules (its Table 4"))
    assert summary.index(rules) < summary.index("## Every cell")
    for quality, size, method in paper.TABLE4_ROWS:
        assert quality in rules and f"{method} at {'any data size' if size == 'any' else size + ' pairs'}" in rules
    assert "weakly aligned: concat at <= 4K pairs, cross at >= 8K pairs;" in rules


def test_the_answer_says_which_verdicts_hold_after_holms_correction():
    """The clean scales of a backbone are one family, its noisy comparisons another; untested ones stay out."""
    results = fake_results("synthetic", ("aligned",), scales=(1024, 2048, 4096), levels=(0.0, 0.1))
    clean = sorted((c for c in results["comparisons"] if tables.level(c) == 0), key=lambda c: c["scale"])
    noisy = sorted((c for c in results["comparisons"] if tables.level(c) > 0), key=lambda c: c["scale"])

    def line(p_values, noisy_p=(0.5, 0.5, 0.5)):
        for c, p in zip(clean + noisy, (*p_values, *noisy_p)):
            c["p_value"] = p
        return answer(results)[0]

    got = line((0.013, 0.0463, 0.0363))  # 3 x 0.013 = 0.039; 2 x 0.0363 = 0.0726, 1 x 0.0463 below it
    assert ("**concat (at 3 of 3 scales; at 1024 after Holm's correction)**. Without noise, by scale: 1024: concat "
            in got)
    assert ", p = 0.013, Holm-adjusted 0.039; 2048: concat +" in got and ", p = 0.0363, Holm-adjusted 0.0726." in got
    assert "(at 3 of 3 scales; at all 3 after Holm's correction)" in line((0.001, 0.01, 0.02))
    assert "(at 3 of 3 scales; at none after Holm's correction)" in line((0.02, 0.03, 0.04))
    assert "(at 2 of 3 scales; at both after Holm's correction)" in line((0.01, 0.5, 0.02))
    assert "(at 1 of 3 scales; at none after Holm's correction)" in line((0.5, 0.03, 0.5))
    got = line((0.01, 0.5, None))  # no p-value at 4096 (untested): a family of 2
    assert "(at 1 of 3 scales; at 1024 after Holm's correction)" in got and "Holm-adjusted 0.02;" in got
    got = line((0.01, None, None))  # one test: nothing to correct
    assert "**concat (at 1 of 3 scales)**" in got and "Holm" not in got
    for c in clean[1:]:
        c["concat_minus_cross"] *= -1
    got = line((0.03, 0.001, 0.04))  # adjusted: concat at 1024 0.06, cross at 2048 0.003, cross at 4096 0.06
    assert "**it depends on the scale: concat at 1024, cross at 2048, 4096 pairs; after Holm's correction cross at " \
           "2048**" in got
    got = line((0.001, 0.01, 0.02))
    assert "pairs; after Holm's correction concat at 1024, cross at 2048, 4096**" in got
    got = line((0.04, 0.03, 0.045))
    assert "pairs; after Holm's correction at none**" in got
    for c in clean[1:]:
        c["concat_minus_cross"] *= -1
    got = line((0.5, 0.5, 0.5), noisy_p=(0.001, 0.04, 0.03))  # 0.003 holds; 0.06, 0.06 do not
    assert "Holm" not in got.split("With noise")[0]
    assert got.endswith("concat ahead in 3, cross in 0, neither in 0 of 3 comparisons (table2.md). After Holm's "
                        "correction for the 3 tests with noise: concat ahead in 1 (1024 at σ 0.1), cross in 0.")


def test_tables_csvs_give_the_holm_adjusted_p_of_each_family():
    """table1 and table2's `p_holm`: a backbone's comparisons without noise one family, with noise another."""
    results = fake_results("flickr8k", ("clip", "resnet"), scales=(2048, 4096, 8192), levels=(0.0, 0.1))
    for i, c in enumerate(results["comparisons"]):
        c["p_value"] = 0.001 * (i + 1)
    want = {}
    for (b, noisy) in itertools.product(("clip", "resnet"), (False, True)):
        family = [c for c in results["comparisons"] if c["backbone"] == b and (tables.level(c) > 0) == noisy]
        running = 0.0  # Holm by hand: (m - rank) p in increasing p, never below the one before
        for rank, c in enumerate(sorted(family, key=lambda c: c["p_value"])):
            running = max(running, (len(family) - rank) * c["p_value"])
            want[(c["backbone"], c["scale"], tables.level(c))] = running
    ours1 = [r for r in tables.table1(results)[1] if r["source"] == "ours"]
    ours2 = [r for r in tables.table2(results)[1] if r["source"] == "ours"]
    assert len(ours1) == 12 and len(ours2) == 12
    for r in ours1:
        assert r["p_holm"] == pytest.approx(want[(r["backbone"], r["scale"], 0.0)])
    for r in ours2:
        assert r["p_holm"] == pytest.approx(want[(r["backbone"], r["scale"], r["sigma"])])
    assert all(r.get("p_holm") is None for r in tables.table1(results)[1] if r["source"] != "ours")
    # The Markdown's p column is each test's own p (its header says so), the adjusted one is the CSV's alone.
    comps, (md1, _), (md2, _) = tables.comparison_index(results), tables.table1(results), tables.table2(results)
    checked = 0
    for k, q in want.items():
        md, prefix = ((md2, f"| ours | Flickr8k | {k[0]} | {k[1]} | {k[2]:g} |") if k[2] > 0 else
                      (md1, f"| ours | Flickr8k | {k[0]} | {k[1]} | "))
        rows = [row for row in md.splitlines() if row.startswith(prefix)]
        assert rows and all(f"| {tables.p_text(comps[k]['p_value'])} |" in row for row in rows), (k, rows)
        checked += tables.p_text(q) != tables.p_text(comps[k]["p_value"])
    assert checked == len(want)
    line = answer(results)[0]  # the summary's adjusted p are the tables'
    assert "2048: concat +" in line and f"Holm-adjusted {tables.p_text(want[('clip', 2048, 0.0)])};" in line


def test_the_answer_names_runs_whose_training_diverged():
    results = fake_results("synthetic", ("aligned", "unaligned"), levels=(0.0,))
    assert "diverged" not in "".join(answer(results))
    mine = [r for r in results["runs"] if r["backbone"] == "unaligned"]
    mine[0]["final_train_loss"], mine[1]["final_train_loss"] = 4e13, None
    del mine[2]["final_train_loss"]  # a record from before the field: not counted
    aligned, unaligned = answer(results)
    assert "diverged" not in aligned
    assert (f"**In 2 of its {len(mine) - 1} runs training diverged**: the last epoch's mean training loss is "
            "above 1.39 (2 ln 2; a 50/50 guess scores ln 2), up to 4e+13, not finite in 1 (runs.csv)") in unaligned


def test_the_answer_agrees_with_the_verdicts_on_one_seed_and_on_identical_gaps():
    same = answer(fake_results("synthetic", ("aligned",), levels=(0.0, 0.3), identical_diffs=True))[0]
    assert "**untested (see each scale)**" in same and "untested (concat +2.0 on each of 3 seeds" in same
    assert "(σ 0.3): concat ahead in 0, cross in 0, neither in 0, untested (one seed, the same gap" in same
    one = answer(fake_results("synthetic", ("aligned",), levels=(0.0, 0.3), seeds=(42,)))[0]
    assert "**untested (one seed: run 2 or more for a paired test)**" in one and "on its one seed" in one
    assert "neither in 0, untested (one seed, the same gap on every seed, or not a number) in 2 of 2" in one


def test_table2_noise_study_with_the_papers_table():
    results = fake_results("synthetic", ("aligned",), scales=(1024,), levels=(0.0, 0.1, 0.2))
    md, rows = tables.table2(results)
    ours = [r for r in rows if r["source"] == "ours"]
    assert [r["sigma"] for r in ours] == [0.0, 0.1, 0.2]
    for row in ours:  # the advantage and its spread: the per-seed paired differences, by hand
        by_seed = lambda method: {r["seed"]: r["metrics"]["accuracy"] for r in results["runs"]
                                  if r["method"] == method and r["degradation"]["level"] == row["sigma"]}
        concat, cross = by_seed("concat"), by_seed("cross")
        d = 100 * np.array([concat[seed] - cross[seed] for seed in (42, 123, 456)])
        assert row["advantage_pts"] == pytest.approx(d.mean(), abs=0.006)
        assert row["advantage_std_pts"] == pytest.approx(d.std(ddof=1), abs=0.006) and d.std() > 0.1
        for method in ("concat", "cross"):  # each head's own mean and spread over its seeds, CSV and Markdown
            acc = 100 * np.array(list(by_seed(method).values()))
            assert (row[f"{method}_mean_pct"], row[f"{method}_std_pct"]) == pytest.approx(
                (acc.mean(), acc.std(ddof=1)), abs=0.006)
        md_row = next(line for line in md.splitlines() if line.startswith(f"| ours | synthetic (not Flickr8k) | "
                                                                         f"aligned | 1024 | {row['sigma']:g} |"))
        assert md_row.split(" | ")[5:7] == [tables.pct(row["concat_mean_pct"] / 100, row["concat_std_pct"] / 100),
                                            tables.pct(row["cross_mean_pct"] / 100, row["cross_std_pct"] / 100)]
    assert f"## {tables.PAPER_REFERENCE}, Table 2" in md and "| concat +2.8 |" in md
    assert [r["advantage_pts"] for r in rows if r["source"] == "paper"] == [1.3, 1.9, 2.8, 0.0, 0.0, 0.0]
    md1, _ = tables.table2(fake_results("synthetic", ("aligned",), levels=(0.0,)))
    assert "No noise study" in md1 and "Table 2 (scale not stated)" in md1


def test_a_gap_that_rounds_to_zero_is_never_written_minus_zero():
    results = fake_results("synthetic", ("aligned",), scales=(1024,), levels=(0.0, 0.1))
    for r, gap in zip([r for r in results["runs"] if r["method"] == "concat"], itertools.cycle((-1e-4, 2e-4, -4e-4))):
        r["metrics"] = {k: v for k, v in next(c for c in results["runs"] if c["method"] == "cross" and all(
            c[f] == r[f] for f in ("scale", "seed", "degradation")))["metrics"].items()}
        r["metrics"]["accuracy"] += gap
    results["summary"], results["comparisons"] = summarize(results["runs"]), compare(results["runs"])
    text = "".join(tables.table1(results)[0] + tables.table2(results)[0] + summary_markdown(results))
    assert "-0.0" not in text and "| +0.0 |" in text


def test_table3_calls_the_cost_model_with_the_recorded_dims(monkeypatch):
    calls = []

    def fake_flops(method, d_v, d_t, config, image_tokens, text_tokens):
        calls.append((method, d_v, d_t, config["head"]["hidden"], image_tokens, text_tokens))
        return 1000.0 if method == "concat" else 750.0

    monkeypatch.setitem(sys.modules, "fusion_jax.cost", types.SimpleNamespace(
        forward_flops_per_sample=fake_flops, counting_platform=lambda: "cpu"))
    md, rows = efficiency.table3(fake_results("flickr8k", ("clip",), dims=(512, 384)))
    assert sorted(set(calls)) == [("concat", 512, 384, 256, 0, 0), ("cross", 512, 384, 256, 0, 0)]
    ours = {r["method"]: r for r in rows if r["source"] == "ours"}
    assert ours["cross"]["flops_per_sample"] == 750.0 and ours["cross"]["rel_flops"] == 0.75
    assert ours["concat"]["params"] == 295554 and ours["cross"]["train_seconds_per_run"] == 0.5
    assert "XLA's cost analysis" in md and "| 295,554 |" in md
    assert f"## {tables.PAPER_REFERENCE}, Table 3" in md and "| 757,000 |" in md
    calls.clear()  # token features: each side's recorded count to its own argument
    results = fake_results("synthetic", ("aligned",), dims=(16, 8))
    results["backbones"]["aligned"].update(tokens=True, tokens_image=5, tokens_text=3)
    efficiency.table3(results)
    assert sorted(set(calls)) == [("concat", 16, 8, 256, 5, 3), ("cross", 16, 8, 256, 5, 3)]
    # Each backbone's ratios against its own concat head (wider features, more weights); a cell whose runs
    # differ in size (a mix of sweeps) shows both counts and no ratio.
    results = fake_results("synthetic", ("aligned", "unaligned"), scales=(64,), levels=(0.0,))
    for r in results["runs"]:
        r["params"] *= 2 if r["backbone"] == "unaligned" else 1
    odd = next(r for r in results["runs"] if r["backbone"] == "unaligned" and r["method"] == "cross")
    odd["params"] += 1
    md, rows = efficiency.table3(results)
    ratios = {(r["backbone"], r["method"]): r["rel_params"] for r in rows if r["source"] == "ours"}
    assert ratios == {("aligned", "concat"): 1.0, ("aligned", "cross"): round(559490 / 295554, 4),
                      ("unaligned", "concat"): 1.0, ("unaligned", "cross"): None}
    assert f"| {2 * 559490:,} / {2 * 559490 + 1:,} | – |" in md
    params = {(r["backbone"], r["method"]): r["params"] for r in rows if r["source"] == "ours"}
    assert params[("unaligned", "cross")] == f"{2 * 559490} / {2 * 559490 + 1}" and params[("aligned", "cross")] == 559490


def test_table3_counts_flops_on_the_token_inputs_results_json_records():
    """Token features: FLOPs on [batch, tokens, d] as trained (padding slots too), where results.json records
    the counts; a token sweep from before they were recorded keeps pooled FLOPs and says so."""
    results = fake_results("synthetic", ("aligned", "unaligned"), dims=(16, 8))
    results["backbones"]["aligned"].update(tokens=True, tokens_image=5, tokens_text=3)
    results["backbones"]["unaligned"]["tokens"] = True  # counts not recorded (an npz or extracted source)
    flops, note = efficiency.forward_flops(results)
    pooled, _ = efficiency.forward_flops(fake_results("synthetic", ("aligned", "unaligned"), dims=(16, 8)))
    assert flops[("unaligned", "cross")] == pooled[("unaligned", "cross")]
    assert flops[("aligned", "concat")] > pooled[("aligned", "concat")]  # per-token work before pooling
    assert flops[("aligned", "cross")] > 3 * pooled[("aligned", "cross")]  # projections of every token
    assert "padding included: aligned image 5, text 3) and [batch, d] for pooled ones" in note
    assert "(unaligned: trained on token features, but this results.json does not record their token counts" in note
    results["backbones"]["unaligned"].update(tokens=4)  # an older synthetic sweep: 4 slots on both sides
    results["backbones"]["aligned"].update(tokens=True, tokens_image=5, tokens_text=0)  # npz: pooled text
    flops, note = efficiency.forward_flops(results)
    assert "padding included: aligned image 5, text pooled; unaligned image 4, text 4) and [batch, d] for pooled" in note
    assert flops[("unaligned", "cross")] > 3 * pooled[("unaligned", "cross")] and "does not record" not in note


def test_table3_says_where_flops_were_counted_without_a_cpu_backend(monkeypatch):
    """FLOPs compile for the host CPU; where jax has none (JAX_PLATFORMS), the note names the platform used."""
    from fusion_jax import cost

    assert "compiled for the host CPU" in efficiency.forward_flops(fake_results())[1]
    monkeypatch.setattr(cost, "counting_platform", lambda: "gpu")
    assert "compiled for gpu (jax has no CPU backend here" in efficiency.forward_flops(fake_results())[1]


def test_table3_without_cost_model_or_dims_writes_na_and_empty_csv_cells(monkeypatch):
    monkeypatch.setitem(sys.modules, "fusion_jax.cost", None)  # import raises ImportError
    md, rows = efficiency.table3(fake_results())
    assert all(r["flops_per_sample"] is None for r in rows if r["source"] == "ours") and "n/a" in md  # CSV: empty
    monkeypatch.delitem(sys.modules, "fusion_jax.cost")
    results = fake_results()
    results["backbones"] = {}
    md, rows = efficiency.table3(results)
    assert all(r["flops_per_sample"] is None for r in rows if r["source"] == "ours")
    assert "feature dims not recorded" in md


def test_source_is_the_commit_of_fusion_jax_own_checkout(tmp_path, monkeypatch):
    src = report.source()
    if os.path.exists(os.path.join(ROOT, ".git")):  # a folder, or a file in a worktree
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert src["commit"] == head and isinstance(src["dirty"], bool)
        assert summary.source_text({"source": src}) == f" at commit {head[:10]}" + \
            (" (with uncommitted changes to its code or configs)" if src["dirty"] else "")
    else:
        assert src == {"commit": None, "dirty": None}
    # dirty: a tracked file of the package differs from the commit.
    repo = tmp_path / "repo"
    (repo / "fusion_jax").mkdir(parents=True)
    (repo / "fusion_jax" / "report.py").write_text("v1")
    git = lambda *args: subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                                       check=True, capture_output=True)
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "v1")
    monkeypatch.setattr(report, "__file__", str(repo / "fusion_jax" / "report.py"))
    assert report.source()["dirty"] is False
    (repo / "fusion_jax" / "report.py").write_text("v2")
    report._source_of.cache_clear()
    assert report.source()["dirty"] is True
    # A copy installed inside some other checkout (a venv in a project's repository) is not that checkout's code.
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "venv" / "fusion_jax").mkdir(parents=True)
    monkeypatch.setattr(report, "__file__", str(tmp_path / "venv" / "fusion_jax" / "report.py"))
    assert report.source() == {"commit": None, "dirty": None} and summary.source_text({}) == ""


def test_runs_trained_by_other_code_are_named_in_the_summary():
    results = fake_results("synthetic", ("aligned",), levels=(0.0,))
    a, b = {"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": True}
    results["source"] = a
    assert summary.mixed_sources(results) == ""  # runs without a source (older results) say nothing
    for i, r in enumerate(results["runs"]):
        r["source"] = a if i < 4 else b
    line = summary.mixed_sources(results)
    assert f"commit {'b' * 10} (with uncommitted changes to its code or configs): {len(results['runs']) - 4} runs" in line
    assert f"commit {'a' * 10}: 4 runs" in line and line in summary_markdown(results)
    for r in results["runs"]:
        r["source"] = a
    assert summary.mixed_sources(results) == ""


def test_runs_trained_on_different_devices_are_named_in_the_summary():
    """Processes of one sweep on other hardware, or a resume on another machine: results.json's device is its
    writer's alone, each run says where it trained."""
    results = fake_results("synthetic", ("aligned",), levels=(0.0,))
    assert summary.mixed_devices(results) == ""  # runs without a device (older results) say nothing
    cpu = {"platform": "cpu", "device_kind": "cpu", "local_devices": 1, "matmul_precision": "default"}
    gpu = {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3", "local_devices": 8, "matmul_precision": "default"}
    for i, r in enumerate(results["runs"]):
        r["device"] = cpu if i < 4 else gpu
    line = summary.mixed_devices(results)
    assert line.startswith("**Runs trained on different devices**") and line in summary_markdown(results)
    assert "cpu (cpu), 1 device(s) per process, matmul precision default: 4 runs" in line
    assert f"gpu (NVIDIA H100 80GB HBM3), 8 device(s) per process, matmul precision default: {len(results['runs']) - 4} runs" in line
    for r in results["runs"]:
        r["device"] = cpu
    assert summary.mixed_devices(results) == "" and "different devices" not in summary_markdown(results)


# --- figures --------------------------------------------------------------------------------------

def test_the_tsne_sample_holds_matched_pairs(tmp_path):
    """Each sampled caption beside its own image (image row i and the captions of image i here carry i),
    pooled over the real tokens; distinct captions."""
    from fusion_jax.data import FeatureSet
    from fusion_jax.feature_report import tsne_sample

    caption_image = np.repeat(np.arange(20), 3)[::-1].copy()
    image = np.repeat(np.arange(20, dtype=np.float32)[:, None, None], 2, 1) * np.ones((1, 1, 4), np.float32)
    image_mask = np.ones((20, 2), np.float32)
    image[:, 1], image_mask[:, 1] = 1e3, 0  # padding: left out of the mean
    text = np.repeat(caption_image.astype(np.float32)[:, None], 4, 1)
    tsne_sample(str(tmp_path), "b", FeatureSet(image, text, caption_image, image_mask=image_mask), n=25)
    sample = np.load(tmp_path / "tsne_b.npz")
    assert sample["image"].shape == sample["text"].shape == (25, 4) and len(np.unique(sample["text"][:, 0])) > 5
    np.testing.assert_array_equal(sample["image"], sample["text"])


def test_tsne_leaves_out_pairs_with_nan_or_inf(tmp_path, monkeypatch):
    from fusion_jax import figures

    write_tsne(tmp_path, "clip", 60, 16, 16)
    z = dict(np.load(tmp_path / "tsne_clip.npz"))
    z["image"][:3, 0], z["text"][5, 2] = np.nan, np.inf
    np.savez(tmp_path / "tsne_clip.npz", **z)
    seen, embed = [], figures.tsne_embedding
    monkeypatch.setattr(figures, "tsne_embedding", lambda image, text: seen.append((image, text)) or embed(image, text))
    assert figures.tsne(str(tmp_path), fake_results(), str(tmp_path / "fig.png")) is not None
    (image, text), = seen
    assert len(image) == len(text) == 56 and np.isfinite(image).all() and np.isfinite(text).all()
    assert_png(tmp_path / "fig.png")


def _drawn(monkeypatch) -> dict:
    """path -> the figure `figures` would have saved there (kept open, for its artists)."""
    figs = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: figs.setdefault(path, fig) and path)
    return figs


def test_figures_say_what_features_they_show_and_keep_series_apart(tmp_path, monkeypatch):
    figs = _drawn(monkeypatch)
    # Panels in the config's order, as the tables are; a backbone the config does not list, last.
    results = fake_results("flickr8k", ("resnet", "clip", "aligned"))
    results["config"]["backbones"] = ["resnet", "clip"]
    assert figures.backbones(results) == ["resnet", "clip", "aligned"]
    results = fake_results("synthetic", ("aligned", "unaligned"), scales=(1024, 2048, 4096), levels=(0.0, 0.01, 0.05))
    results["backbones"]["unaligned"]["tokens"] = 4
    figures.accuracy_vs_scale(results, "acc")
    titles = [ax.get_title() for ax in figs["acc"].axes]
    assert "(pooled, d_v 512, d_t 512)" in titles[0] and "(token states, d_v 512, d_t 512)" in titles[1]
    assert "pairs split at random" in figs["acc"].get_suptitle()
    concat, cross = (next(c.lines[0] for c in figs["acc"].axes[0].containers if c.get_label() == f"{m} (ours)")
                     for m in ("concat", "cross"))
    assert concat.get_marker() != cross.get_marker()
    assert all(a < s < b for a, s, b in zip(concat.get_xdata(), (1024, 2048, 4096), cross.get_xdata()))
    figures.noise_advantage(results, "noise")  # three scales' series side by side, each at its own level
    for ax in figs["noise"].axes:
        xs = np.concatenate([c.lines[0].get_xdata() for c in ax.containers if "scale" in c.get_label()])
        assert len(set(xs)) == 9 and all(abs(x - min((0.0, 0.01, 0.05), key=lambda lv: abs(x - lv))) < 0.005 for x in xs)
    assert "error bars: std of the per-seed paired differences (3 seeds)" in figs["noise"].get_suptitle()
    holm = tables.holm_index(results)  # ringed: the favoured comparisons that hold after Holm's correction
    want = sum(bool(tables.favoured(c["concat_minus_cross"], c["p_value"], c["n_seeds"]))
               and holm[(c["backbone"], c["scale"], tables.level(c))] < 0.05 for c in results["comparisons"])
    rings = [line for ax in figs["noise"].axes for line in ax.get_lines() if line.get_markersize() == 12]
    assert want > 0 and sum(len(line.get_xdata()) for line in rings) == want
    assert "ringed: also after Holm's correction (summary.md)" in [t.get_text() for t in figs["noise"].legends[0].get_texts()]
    one = fake_results("synthetic", ("aligned",), levels=(0.0, 0.3), seeds=(42,))
    figures.noise_advantage(one, "one seed")
    labels = [t.get_text() for t in figs["one seed"].legends[0].get_texts()]
    assert "1 seed: the differences of single runs, no error bars" in figs["one seed"].get_suptitle()
    assert not any("filled" in t for t in labels) and "ours, hollow: untested (1 seed)" in labels


def test_tsne_of_features_all_alike_is_skipped_and_said(tmp_path, monkeypatch):
    figs = _drawn(monkeypatch)
    rng = np.random.default_rng(0)  # one row repeated (a collapsed encoder), not a constant one
    np.savez(tmp_path / "tsne_clip.npz", image=np.tile(rng.standard_normal(8), (50, 1)).astype(np.float32),
             text=rng.standard_normal((50, 8)).astype(np.float32))
    monkeypatch.setattr(figures, "tsne_embedding", lambda *a: pytest.fail("t-SNE of identical rows"))
    figures.tsne(str(tmp_path), fake_results(), "tsne")
    assert "all 50 pairs have the same image features: no t-SNE" in figs["tsne"].axes[0].get_title()


def test_tsne_links_pairs_only_in_a_joint_map_and_names_token_means(tmp_path, monkeypatch):
    figs = _drawn(monkeypatch)
    results = fake_results("synthetic", ("aligned", "unaligned"))
    results["backbones"]["aligned"]["tokens"] = 4
    write_tsne(tmp_path, "aligned", 60, 16, 16)
    write_tsne(tmp_path, "unaligned", 60, 16, 8, seed=1)
    figures.tsne(str(tmp_path), results, "tsne")
    joint, apart = figs["tsne"].axes
    assert "joint t-SNE of 60 pairs (means of token states, d = 16)" in joint.get_title()
    assert sum(line.get_label().startswith("matched pair") for line in joint.get_lines()) == 1
    assert len(joint.get_lines()) == figures.TSNE_LINKED_PAIRS
    assert "(pooled)" in apart.get_title() and not apart.get_lines()
    assert "synthetic" in figs["tsne"].get_suptitle()
    write_tsne(tmp_path, "org_model", 20, 4, 4)  # a hub id's file: named by the backbone, not by its file name
    assert figures.tsne_files(str(tmp_path), ["org/model", "aligned"])[0] == ("org/model", str(tmp_path / "tsne_org_model.npz"))


def test_render_report_on_hand_made_results(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fusion_jax.cost", None)
    results = fake_results("flickr8k", ("clip", "resnet"))
    write_tsne(tmp_path, "clip", 60, 16, 16)
    written = render_report(results, str(tmp_path))
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(TABLES + ["summary.md", *report.FIGURES])
    for name in names:
        if name.endswith(".png"):
            assert_png(tmp_path / name)
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name  # readable by all, as results are
    assert_no_nan(tmp_path)


def test_a_report_that_fails_half_way_leaves_the_earlier_one(tmp_path, monkeypatch, capsys):
    """render_report draws into a folder of its own first: a results.json edited by hand that breaks the tables
    (after summary.md was drawn) changes none of the earlier files; the command says so in one line."""
    from fusion_jax.report import _cannot_draw

    monkeypatch.setitem(sys.modules, "fusion_jax.cost", None)
    render_report(fake_results(), str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    from fusion_jax import tables

    def table2(results):
        return results["backbones"]["clip"]["a field"]  # as a field the table reads, missing

    monkeypatch.setattr(tables, "table2", table2)
    broken = fake_results(levels=(0.0,))  # also without the noise figure, which the earlier report drew
    broken["command"] = "another"  # so that summary.md (drawn first) differs
    with pytest.raises(KeyError, match="a field") as e:
        render_report(broken, str(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # and no staging folder left
    with pytest.raises(SystemExit) as exit_:
        _cannot_draw(e.value, str(tmp_path), "R")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and re.fullmatch(r"fusion_jax.report: error: R cannot be drawn: a field the report "
                                                  r"reads is missing or of another type \(KeyError: 'a field', at "
                                                  r"\w+.py:\d+\); nothing was written\n", err), err


@pytest.mark.parametrize("failing", ["fig_accuracy_vs_scale.png", "fig_training_loss.png", "fig_tsne.png"])
def test_a_figure_that_fails_is_named_and_the_rest_is_drawn(tmp_path, monkeypatch, caplog, failing):
    """The tables are written whatever a figure does; a failed figure drawn from the results is removed (it
    showed the earlier results), the t-SNE (from the sweep's sample files) stays. A draft folder of a report
    that was killed is removed; one of a report that still draws (this process) is not."""
    from fusion_jax import figures

    monkeypatch.setitem(sys.modules, "fusion_jax.cost", None)
    results = fake_results()
    write_tsne(tmp_path, "clip", 60, 16, 16)
    render_report(results, str(tmp_path))
    assert (tmp_path / failing).exists()
    from fusion_jax.report import _HOST

    drafts = {f".report-{_HOST}-999999999-killed": False, f".report-{_HOST}-{os.getpid()}-drawing": True,
              ".report-elsewhere-999999999-shared_filesystem": True}  # name: kept
    for name in drafts:
        (tmp_path / name).mkdir()

    def broken(*args):
        raise ValueError("a figure's bug")

    monkeypatch.setattr(figures, {"fig_accuracy_vs_scale.png": "accuracy_vs_scale", "fig_tsne.png": "tsne",
                                  "fig_training_loss.png": "training_loss"}[failing], broken)
    results["command"] = "again"
    failed = []
    with caplog.at_level(logging.ERROR, logger="fusion_jax"):
        written = {os.path.basename(p) for p in render_report(results, str(tmp_path), failed)}
    assert failed == [failing] and f"{tmp_path / failing} cannot be drawn" in caplog.text and "a figure's bug" in caplog.text
    assert written == set(TABLES + ["summary.md", *report.FIGURES]) - {failing}
    assert "`again`" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / failing).exists() == (failing == "fig_tsne.png")
    assert {name: (tmp_path / name).exists() for name in drafts} == drafts


def test_a_draft_of_another_users_process_is_alive(monkeypatch):
    """A pid this user may not signal is another user's live process (its draft is kept); a pid that is gone or
    out of range is not."""
    from fusion_jax import report

    assert report._alive(os.getpid()) and not report._alive(2**62)

    def not_permitted(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(report.os, "kill", not_permitted)
    assert report._alive(1)


def test_the_command_prints_each_file_it_wrote_and_exits_1_when_a_figure_fails(tmp_path, monkeypatch, capsys):
    """`python -m fusion_jax.report`'s body: every file written, one path a line on stdout; a figure that could
    not be drawn makes the exit status 1 (a script must not take the report as whole) and is named."""
    from absl import flags

    monkeypatch.setitem(sys.modules, "fusion_jax.cost", None)
    monkeypatch.setattr(flags, "FLAGS", types.SimpleNamespace(workdir=str(tmp_path), against=None))
    (tmp_path / "results.json").write_text(json.dumps(fake_results()))
    assert report.main(["report"]) is None
    printed = capsys.readouterr().out.splitlines()
    assert sorted(os.path.basename(p) for p in printed) == sorted(  # no t-SNE: the sweep writes its samples
        TABLES + ["summary.md", *set(report.FIGURES) - {"fig_tsne.png"}])
    assert all(os.path.dirname(p) == str(tmp_path) and os.path.isfile(p) for p in printed)

    def broken(*args):
        raise ValueError("a figure's bug")

    monkeypatch.setattr(figures, "accuracy_vs_scale", broken)
    with pytest.raises(SystemExit) as e:
        report.main(["report"])
    out, err = capsys.readouterr()
    assert e.value.code == 1 and err.endswith("fusion_jax.report: error: fig_accuracy_vs_scale.png could not be "
                                              "drawn (the error is above); the rest of the report is written\n")
    assert sorted(out.splitlines()) == sorted(set(printed) - {str(tmp_path / "fig_accuracy_vs_scale.png")})


def test_figures_skipped_without_noise_levels_or_tsne_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fusion_jax.cost", None)
    written = render_report(fake_results("embedded", levels=(0.0,)), str(tmp_path))
    names = {os.path.basename(p) for p in written}
    assert "fig_accuracy_vs_scale.png" in names and not names & {"fig_noise.png", "fig_tsne.png"}
    assert not (tmp_path / "fig_noise.png").exists() and not (tmp_path / "fig_tsne.png").exists()


def test_the_training_loss_figure_needs_recorded_curves_and_shows_gaps(tmp_path, monkeypatch):
    """Results of older code (no `train_loss_by_epoch`) draw no loss figure and remove an earlier one; an epoch
    that a run did not record (a resume of older checkpoints) is left out of its mean and said, as are runs
    without curves; a diverged run puts the axis on a log scale."""
    monkeypatch.setitem(sys.modules, "fusion_jax.cost", None)
    results = fake_results("synthetic", ("aligned", "unaligned"))
    render_report(results, str(tmp_path))
    assert_png(tmp_path / "fig_training_loss.png")
    figs = _drawn(monkeypatch)
    figures.training_loss(results, "plain")
    (ax, _), title = figs["plain"].axes, figs["plain"].get_suptitle()
    assert ax.get_yscale() == "linear" and "mean over 3 seeds; solid concat, dashed cross" in title
    assert "not drawn" not in title and "left out" not in title
    concat_2048 = next(line for line in ax.get_lines() if line.get_label() == "concat, scale 2048")
    assert list(concat_2048.get_ydata()) == pytest.approx([0.69, 0.5, 0.3])
    assert list(concat_2048.get_xdata()) == [1, 2, 3]  # the loss after epoch 1, 2, 3
    aligned = [r for r in results["runs"] if r["backbone"] == "aligned" and r["method"] == "concat"
               and r["scale"] == 2048 and tables.level(r) == 0]
    aligned[0]["train_loss_by_epoch"] = [None, 0.8, 0.3]  # the mean of the others at epoch 1
    aligned[1]["train_loss_by_epoch"] = [0.69, 0.5]  # a shorter run: padded, not an error
    del aligned[2]["train_loss_by_epoch"]
    figures.training_loss(results, "gaps")
    (ax, _), title = figs["gaps"].axes, figs["gaps"].get_suptitle()
    assert "1 run without noise recorded no losses (older code): not drawn" in title and "left out of its mean" in title
    concat_2048 = next(line for line in ax.get_lines() if line.get_label() == "concat, scale 2048")
    assert list(concat_2048.get_ydata()) == pytest.approx([0.69, 0.65, 0.3])
    aligned[0]["train_loss_by_epoch"] = [0.69, 4e3, 2e3]
    figures.training_loss(results, "diverged")
    assert figs["diverged"].axes[0].get_yscale() == "log"
    for r in results["runs"]:
        r.pop("train_loss_by_epoch", None)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "fusion_jax.cost", None)
    names = {os.path.basename(p) for p in render_report(results, str(tmp_path))}
    assert "fig_training_loss.png" not in names and not (tmp_path / "fig_training_loss.png").exists()
    assert "fig_accuracy_vs_scale.png" in names


def test_one_method_only_has_no_comparison_and_no_nan(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fusion_jax.cost", None)
    results = fake_results("synthetic", ("aligned",))
    runs = [r for r in results["runs"] if r["method"] == "concat"]
    results.update(runs=runs, summary=summarize(runs), comparisons=compare(runs))
    names = {os.path.basename(p) for p in render_report(results, str(tmp_path))}
    assert "fig_noise.png" not in names and "fig_accuracy_vs_scale.png" in names
    assert "no comparison (one method only)" in (tmp_path / "table1.md").read_text()
    assert "No concat − cross comparison under noise" in (tmp_path / "table2.md").read_text()
    assert_no_nan(tmp_path)


def test_tsne_embedding_joint_and_separate():
    rng = np.random.default_rng(0)
    img, txt, joint = figures.tsne_embedding(rng.standard_normal((10, 64)), rng.standard_normal((10, 64)))
    assert joint and img.shape == (10, 2)  # fewer rows than PCA's 50 dims
    img, txt, joint = figures.tsne_embedding(rng.standard_normal((40, 8)), rng.standard_normal((40, 8)))
    assert joint and img.shape == txt.shape == (40, 2) and np.isfinite(img).all()
    img, txt, joint = figures.tsne_embedding(rng.standard_normal((40, 12)), rng.standard_normal((40, 6)))
    assert not joint and img.shape == txt.shape == (40, 2) and np.isfinite(txt).all()
    img, txt, joint = figures.tsne_embedding(rng.standard_normal((10, 64)), rng.standard_normal((10, 32)))
    assert not joint and img.shape == txt.shape == (10, 2)  # each PCA to no more dims than the rows


def test_the_report_says_a_tsne_takes_seconds_only_where_it_draws_one(tmp_path):
    from fusion_jax.report import _writing

    assert _writing(str(tmp_path)) == "summary.md, tables 1-3, then the figures"  # tsne_pairs=0: no samples
    (tmp_path / "tsne_aligned.npz").write_bytes(b"")
    assert _writing(str(tmp_path)) == "summary.md, tables 1-3, then the figures (a t-SNE takes seconds per backbone)"


# --- end to end on a finished smoke sweep -----------------------------------------------------------

def test_report_of_a_smoke_sweep(smoke_sweep, tmp_path):
    import shutil

    _, results, workdir = smoke_sweep
    tmp_path = tmp_path / "sweep"
    shutil.copytree(workdir, tmp_path)
    for name in TABLES + ["fig_accuracy_vs_scale.png", "fig_noise.png"]:
        assert (tmp_path / name).exists(), name
    with np.load(tmp_path / "tsne_aligned.npz") as sample:  # the smoke variant's tsne_pairs
        assert sample["image"].shape == (100, 32) and sample["text"].shape == (100, 32)
    # Small stand-ins for the sweep's t-SNE samples (one with d_v != d_t), then the CLI once.
    write_tsne(tmp_path, "aligned", 80, 32, 32)
    write_tsne(tmp_path, "unaligned", 80, 32, 16, seed=1)
    os.remove(tmp_path / "fig_noise.png")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "fusion_jax.report", f"--workdir={tmp_path}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"writing the report into {tmp_path}/ ") and "is kept as it was" not in done.stderr
    for name in report.FIGURES:
        assert_png(tmp_path / name)
    assert_no_nan(tmp_path)
    for sample in tmp_path.glob("tsne_*.npz"):  # as after `git clean` of a committed sweep: its t-SNE stays, said
        sample.unlink()
    drawn = (tmp_path / "fig_tsne.png").read_bytes()
    again = subprocess.run([sys.executable, "-m", "fusion_jax.report", f"--workdir={tmp_path}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and (tmp_path / "fig_tsne.png").read_bytes() == drawn
    assert f"{tmp_path / 'fig_tsne.png'} is kept as it was: its samples (tsne_<backbone>.npz" in again.stderr
    t1, t2, t3 = ((tmp_path / f"table{i}.md").read_text() for i in (1, 2, 3))
    assert "| ours | synthetic (not Flickr8k) | aligned | 128 | concat |" in t1
    assert f"## For reference only: {tables.PAPER_REFERENCE}, Table 1" in t1 and "| 16384 | cross | 89.2 ± 1.4 |" in t1
    assert "**paper**" not in t1  # synthetic data: never beside ours
    assert f"## {tables.PAPER_REFERENCE}, Table 2" in t2 and "| ours | synthetic (not Flickr8k) | aligned | 128 | 0.3 |" in t2
    assert f"{results['runs'][0]['params']:,}" in t3 and f"## {tables.PAPER_REFERENCE}, Table 3" in t3
    assert "| 757,000 | 2.6 | 400,000 | 0.75 |" in t3  # the paper's ratios as printed, no digit added
    assert "+1.3, where its means differ by +1.4" in t2  # the paper's own rounding, said
    assert "n/a" not in t3.split("## ")[0], t3  # every FLOPs cell from the real cost model
    if any(c["p_value"] is None or c["p_value"] >= 0.05 for c in results["comparisons"]):
        assert re.search(r"not significant \((concat|cross) \+\d+\.\d at 2 seeds", t1 + t2)


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r["runs"][3].pop("metrics"), "run 3 has no 'metrics' dict"),
    (lambda r: r["runs"][0]["metrics"].update(accuracy=None), "run 0 has no number metrics.accuracy"),
    (lambda r: r["runs"][1]["metrics"].update(f1="0.5"), "run 1 has no number metrics.f1"),
    (lambda r: r["runs"][2].pop("train_seconds"), "run 2 has no 'train_seconds' int or float"),
    (lambda r: r["runs"][2].update(seed=True), "run 2 has no 'seed' int"),
    (lambda r: r["runs"][0]["degradation"].pop("level"), "run 0 has no degradation kind and level"),
    (lambda r: r.pop("summary"), "has no 'summary' list"),
    (lambda r: r.update(device=None), "has no 'device' dict"),
    (lambda r: r.clear(), "has no 'config' dict"),
    (lambda r: r.update(command=["python"]), "has a 'command' that is not a string"),
    (lambda r: r.update(timing={"seconds": 3}), "has a 'timing' without numbers seconds, groups_trained and groups"),
    (lambda r: r.update(timing={"seconds": 3, "groups_trained": 0, "groups": 2, "trained_by": {"seconds": "1"}}),
     "has a 'timing.trained_by' without numbers seconds, groups_trained and groups"),
    (lambda r: r.update(timing={"seconds": 3, "groups_trained": 0, "groups": 2,
                                "trained_by": {"command": 5, "seconds": 1, "groups_trained": 2, "groups": 2}}),
     "has a 'timing.trained_by' whose command is not a string"),
])
def test_results_a_report_cannot_be_drawn_from_are_named(edit, problem):
    from fusion_jax.report import results_problem

    results = fake_results()
    assert results_problem(results) is None and results_problem([]) == "holds a JSON list, not an object"
    assert results_problem({**results, "command": None, "timing": {"seconds": 3, "groups_trained": 0, "groups": 2,
                            "trained_by": {"command": None, "seconds": 1.5, "groups_trained": 2, "groups": 2}}}) is None
    edit(results)
    assert results_problem(results) == problem


def test_cli_without_results_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "fusion_jax.report", f"--workdir={tmp_path}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("fusion_jax.report: error: --workdir: no results.json in")
    results = fake_results()
    results["runs"][0].pop("params")
    (tmp_path / "results.json").write_text(json.dumps(results))
    done = subprocess.run([sys.executable, "-m", "fusion_jax.report", f"--workdir={tmp_path}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"fusion_jax.report: error: {tmp_path / 'results.json'} run 0 has no 'params' int, as a sweep writes it")
    assert os.listdir(tmp_path) == ["results.json"]  # nothing written
    done = subprocess.run([sys.executable, "-m", "fusion_jax.report"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == ("fusion_jax.report: error: --workdir=DIR is required: a "
                                                            "folder with a results.json (a finished sweep)")
    for flags, error in (([f"--workdir={tmp_path}", "--against="], "--against is empty (an unset variable?)"),
                         ([f"--workdir={tmp_path}", "--unknown"], "Unknown command line flag 'unknown'"),
                         (["--workdir="], "--workdir is empty (an unset variable?)")):
        done = subprocess.run([sys.executable, "-m", "fusion_jax.report", *flags], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.startswith(f"fusion_jax.report: error: {error}"), done.stderr


def test_the_command_draws_its_tables_from_the_runs(tmp_path, capsys):
    """`python -m fusion_jax.report` recomputes the summary and the paired tests from `runs`: an edit of a run
    shows in the report (the stored summary was drawn as it was)."""
    from fusion_jax.report import _read_results

    results = fake_results()
    for run in results["runs"]:
        run["metrics"]["accuracy"] = 0.99
    (tmp_path / "results.json").write_text(json.dumps(results))
    read = _read_results(str(tmp_path))
    assert read["summary"] == summarize(results["runs"]) != results["summary"]
    assert read["comparisons"] == compare(results["runs"]) and read["runs"] == results["runs"]
    assert "differ from what its runs give (edited, or written by other code or library versions?); the report " \
           "follows the runs" in capsys.readouterr().err
    results = fake_results()
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert _read_results(str(tmp_path))["summary"] == results["summary"] and not capsys.readouterr().err


def test_a_report_on_an_unfinished_sweep_says_to_finish_it(tmp_path, capsys):
    from fusion_jax.report import _read_results

    (tmp_path / "sweep.json").write_text("{}")
    (tmp_path / "groups").mkdir()
    for name in ("a-concat.json", "a-cross.failed.json", ".tmp-b-concat.json"):  # one finished group
        (tmp_path / "groups" / name).write_text("{}")
    with pytest.raises(SystemExit) as e:
        _read_results(str(tmp_path))
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"fusion_jax.report: error: --workdir: no results.json in {str(tmp_path)!r}: the sweep there has not finished "
        "(1 group done); run its command again, which resumes it and writes results.json and the report\n")
    from fusion_jax.workdir import sweep_lock

    with sweep_lock(str(tmp_path), 0), pytest.raises(SystemExit):  # as a sweep that trains there now
        _read_results(str(tmp_path))
    assert capsys.readouterr().err.endswith(f": its sweep is still running (1 group done; process 0, pid {os.getpid()}), "
                                            "and writes results.json and the report when it ends\n")


def test_against_compares_noisy_cells_only_on_features_of_the_same_shape():
    """σ is not the same amount of noise on 64 dims as on 512 (nor on token states): such noisy cells are
    left out of the comparison and said; the noise-free ones are compared."""
    from fusion_jax.against import against_markdown

    wide, narrow = fake_results(dims=(512, 512)), fake_results(dims=(64, 64))
    md = against_markdown(narrow, wide, "b", "a", "cmd")
    assert "Cells with noise of clip are not compared: the noised features' dims or token states differ" in md
    assert "| clip | concat | 2048 | 0 |" in md and "| clip | concat | 2048 | 0.1 |" not in md
    text_only = fake_results(dims=(512, 64))  # the images (the noised side) keep their dims
    assert "| clip | concat | 2048 | 0.1 |" in against_markdown(text_only, wide, "b", "a", "cmd")
    tokens = fake_results()
    tokens["backbones"]["clip"]["tokens"] = True
    assert "| clip | concat | 2048 | 0.1 |" not in against_markdown(tokens, wide, "b", "a", "cmd")


def test_summary_and_tables_write_a_dash_for_nan_and_a_tiny_significant_gap_as_the_verdict_does(tmp_path):
    """A NaN metric (a hand-edited or foreign results.json) is '–', not 'nan'; a significant gap under 0.05
    points is written with two significant digits in the difference column too, not +0.0."""
    results = fake_results(scales=(2048,), levels=(0.0,))
    results["summary"][0]["accuracy_mean"] = float("nan")
    results["comparisons"][0]["concat_minus_cross"], results["comparisons"][0]["p_value"] = 0.00037, 0.004
    md = summary.summary_markdown(results)
    table1, _ = tables.table1(results)
    assert "nan" not in md.lower() and "nan" not in table1.lower()
    assert "+0.037" in table1 and "+0.0 " not in table1 and "+0.037" in md


def test_against_another_sweep(tmp_path):
    """--against writes one sweep beside another: config differences (with the defaults of fields added
    later), accuracy shifts per backbone, who is ahead in both, every shared cell."""
    from fusion_jax.against import against_markdown

    base = fake_results("synthetic", ("aligned",), scales=(1024, 2048), levels=(0.0,))
    del base["config"]["pairs"]["split_by"]  # saved before the field existed: reads as "pair"
    other = json.loads(json.dumps(base))
    other["config"]["pairs"]["split_by"] = "image"
    for s in other["summary"]:
        s["accuracy_mean"] += 0.01 if s["scale"] == 1024 else -0.03
    other["comparisons"][0]["p_value"] = 0.5  # concat no longer significantly ahead at 1024
    other["config"]["distributed"] = {"num_processes": 4}  # how it ran, not what: left out
    other["backbones"]["aligned"]["model"] = "openai/clip-vit-large-patch14"
    base["backbones"]["aligned"]["tokens"] = 0  # synthetic's count of token slots: pooled, as `false` is
    base["summary"][1]["accuracy_mean"], other["summary"][1]["accuracy_mean"] = 0.7836, 0.7844  # 78.4 both
    other["summary"].append({**other["summary"][0], "scale": 8192})
    other["failed_groups"] = [{"group": "aligned-cross-s8192", "backbone": "aligned", "error": "NaN"}]
    other["config"]["name"], other["config"]["split_by_scale"] = "fake2", True  # a name; a field base never saved
    md = against_markdown(other, base, "b", "a", "cmd")
    assert "Config differences (a → b): `pairs.split_by` \"pair\" → \"image\"." in md
    assert "Feature differences of the backbones both have (aligned): `aligned.model` " in md and "tokens" not in md
    other["backbones"]["aligned"]["tokens"] = 4  # four token slots a side: a difference
    assert "`aligned.tokens` false → 4" in against_markdown(other, base, "b", "a", "cmd")
    other["backbones"]["aligned"]["tokens"] = False
    assert "Cells only in b: 1." in md and "Failed groups in b: aligned-cross-s8192." in md
    cell = base["summary"][1]
    assert f"| aligned | {cell['method']} | {cell['scale']} | 0 | 78.4 | 78.4 | +0.1 |" in md  # rounded after subtracting
    assert f"| aligned | 4 | {(1 + 0.08 + 1 - 3) / 4:+.2f} | -3.00 | +1.00 |" in md
    assert "| aligned | 2 | 2 / 0 / 0 / 0 | 1 / 0 / 1 / 0 | 1 |" in md
    one_seed = json.loads(json.dumps(other))
    one_seed["comparisons"][1]["n_seeds"] = 1  # untested, not "neither" (as summary.md says)
    assert "| aligned | 2 | 2 / 0 / 0 / 0 | 0 / 0 / 1 / 1 | 1 |" in against_markdown(one_seed, base, "b", "a", "cmd")
    apart = {**other, "summary": [{**s, "backbone": "elsewhere"} for s in other["summary"]]}
    assert "hold no cell in common" in against_markdown(apart, base, "b", "a", "cmd")
    apart["backbones"] = {"elsewhere": other["backbones"]["aligned"]}
    assert "The two sweeps share no backbone." in against_markdown(apart, base, "b", "a", "cmd")
    no_comparisons = {**other, "comparisons": []}  # one method only, say
    md = against_markdown(no_comparisons, base, "b", "a", "cmd")
    assert "No concat − cross comparison is in both sweeps" in md and "changed side" not in md
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(base))
    (tmp_path / "b" / "results.json").write_text(json.dumps(other))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "fusion_jax.report", f"--workdir={tmp_path / 'b'}",
                           f"--against={tmp_path / 'a'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    written = (tmp_path / "b" / "against_a.md").read_text()
    assert written.startswith("# b against a") and "| aligned | concat | 1024 | 0 |" in written
    for against, message in ((tmp_path / "b", "--against names the --workdir itself"),
                             (tmp_path / "nope", f"--against: no such folder: '{tmp_path / 'nope'}'")):
        done = subprocess.run([sys.executable, "-m", "fusion_jax.report", f"--workdir={tmp_path / 'b'}",
                               f"--against={against}"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        # (b's summary was edited above, apart from its runs: a note says so first)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == f"fusion_jax.report: error: {message}", \
            done.stderr


def test_a_resume_across_a_code_change_is_named_in_the_summary():
    """Runs of one workdir trained by two commits (a sweep resumed after an update) are counted by commit."""
    results = fake_results("synthetic", ("aligned",), scales=(1024,), levels=(0.0,))
    results["source"] = {"commit": "b" * 40, "dirty": False}
    for i, r in enumerate(results["runs"]):
        r["source"] = {"commit": ("a" if i < 2 else "b") * 40, "dirty": False}
    n = len(results["runs"])
    assert (f"**Runs trained by different code** (a resume after a change): commit bbbbbbbbbb: {n - 2} runs; "
            f"commit aaaaaaaaaa: 2 runs.") in summary_markdown(results)
    for r in results["runs"]:
        r["source"] = results["source"]
    assert "different code" not in summary_markdown(results)


def test_notes_on_the_features_open_the_summary_and_do_not_make_features_differ():
    from fusion_jax.data.featureset import feature_identity

    results = fake_results("synthetic", ("aligned",), scales=(1024,), levels=(0.0,))
    assert "Notes on the features" not in summary_markdown(results)
    results["backbones"]["aligned"]["notes"] = ["5 of its 300 images have no caption: pairs never draw them"]
    summary = summary_markdown(results)
    assert "## Notes on the features\n\n- **aligned**: 5 of its 300 images have no caption: pairs never draw them." in summary
    assert summary.index("## Notes on the features") < summary.index("## Concat or cross?")
    assert "notes" not in feature_identity(results["backbones"]["aligned"])
    results["backbones"]["aligned"].update(tokens_image=65, tokens_text=32)  # recorded by newer sweeps only
    assert not {"tokens_image", "tokens_text"} & set(feature_identity(results["backbones"]["aligned"]))


def test_a_hub_model_is_told_by_its_name_and_a_local_folder_by_its_files():
    """feature_identity: a hub model's id is what tells two sweeps' features apart (it has no files hash); a
    local folder's path is not (copies of one model hash alike), its files' hash is."""
    from fusion_jax.data.featureset import feature_identity

    hub = {"model": "openai/clip-vit-base-patch32", "model_files": None, "text_model": "x/y", "text_model_files": None}
    assert feature_identity(hub) == hub
    assert feature_identity({"model": "/home/me/clip", "model_files": "ab12", "text_model": "x/y",
                             "text_model_files": None}) == {"model_files": "ab12", "text_model": "x/y",
                                                            "text_model_files": None}


# --- Holm families, ties and boundaries of the verdicts ------------------------------------------------------

def test_holm_takes_every_noise_level_of_a_backbone_as_one_family():
    """All of a backbone's comparisons with noise are one Holm family, whatever their σ (not one per σ)."""
    results = fake_results("synthetic", ("aligned",), scales=(1024,), levels=(0.0, 0.1, 0.2))
    for c in results["comparisons"]:
        c["p_value"] = {0.0: 0.01, 0.1: 0.03, 0.2: 0.04}[tables.level(c)]
    holm = tables.holm_index(results)
    assert holm[("aligned", 1024, 0.0)] == pytest.approx(0.01)  # alone in its family
    assert [holm[("aligned", 1024, lv)] for lv in (0.1, 0.2)] == pytest.approx([0.06, 0.06])


def test_a_holm_adjusted_p_of_exactly_alpha_does_not_hold():
    """Holm's verdict holds where the adjusted p is below ALPHA, as each test's own: 2 x 0.025 = 0.05 does not,
    without noise or with it."""
    results = fake_results("synthetic", ("aligned",), scales=(1024, 2048), levels=(0.0,))
    for c, p in zip(sorted(results["comparisons"], key=lambda c: c["scale"]), (0.025, 0.5)):
        c["p_value"] = p
    line, = answer(results)
    assert "Holm-adjusted 0.05;" in line and "**concat (at 1 of 2 scales; at none after Holm's correction)**" in line
    results = fake_results("synthetic", ("aligned",), scales=(1024,), levels=(0.0, 0.1, 0.2))
    for c in results["comparisons"]:
        c["p_value"] = {0.0: 0.5, 0.1: 0.025, 0.2: 0.5}[tables.level(c)]
    line, = answer(results)
    assert line.endswith("After Holm's correction for the 2 tests with noise: concat ahead in 0, cross in 0.")


def test_heads_tied_on_every_seed_or_of_equal_size_favour_neither():
    """The same accuracy on every seed (a gap of 0, no p): tied, counted for no head, and no head is called the
    smaller where both have as many parameters; a mean gap of 0 from seeds that differ names no head either."""
    assert tables.favoured(0.0, None, 3) is None
    results = fake_results("synthetic", ("aligned",), scales=(1024,), levels=(0.0,))
    for r in results["runs"]:
        r["metrics"]["accuracy"], r["params"] = 0.7, 1000
    results["summary"], results["comparisons"] = summarize(results["runs"]), compare(results["runs"])
    line, = answer(results)
    assert "**no difference significant at 3 seeds**" in line and "1024: tied (the same on all 3 seeds)" in line
    assert "fewer parameters" not in line
    assert tables.verdict(0.0, 1.0, 3) == "not significant (no mean gap at 3 seeds, p = 1)"


def test_the_same_small_gap_on_every_seed_is_untested_not_a_verdict():
    """A gap of 0.05 points on every seed (p None: no t-test) favours no head, however small."""
    assert tables.untested(0.0005, None, 3) and tables.favoured(0.0005, None, 3) is None
    assert tables.points_text(0.0005, None, 3) == "+0.1"  # as any untested gap: one decimal


def test_accuracy_bars_are_the_seeds_std_in_points_and_the_loss_curve_their_mean(monkeypatch):
    """The bars of accuracy against scale are ± the summary's accuracy_std in points, as the means are; seeds'
    losses 0.9, 0.3, 0.3 at an epoch draw 0.5 there (their median would be 0.3)."""
    import matplotlib.pyplot as plt

    figs = _drawn(monkeypatch)
    results = fake_results("synthetic", ("aligned",), scales=(1024, 2048), levels=(0.0,))
    figures.accuracy_vs_scale(results, "scale")
    ax = figs["scale"].axes[0]
    assert len(ax.containers) == 2
    for container in ax.containers:
        method = container.get_label().split(" ")[0]
        std = [s["accuracy_std"] for s in sorted(results["summary"], key=lambda s: s["scale"]) if s["method"] == method]
        assert all(x > 0 for x in std)
        (bars,) = container.lines[2]
        half = [abs(seg[1][1] - seg[0][1]) / 2 for seg in bars.get_segments()]
        np.testing.assert_allclose(half, [100 * x for x in std], rtol=1e-9)
    cell = [r for r in results["runs"] if r["method"] == "concat" and r["scale"] == 2048]
    for r, first in zip(cell, (0.9, 0.3, 0.3)):
        r["train_loss_by_epoch"] = [first, 0.5, 0.3]
    figures.training_loss(results, "loss")
    line = next(x for x in figs["loss"].axes[0].get_lines() if x.get_label() == "concat, scale 2048")
    assert list(line.get_ydata()) == pytest.approx([0.5, 0.5, 0.3])
    plt.close("all")
