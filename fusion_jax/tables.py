"""The report's tables (1: metrics per scale, 2: noise study; 3, efficiency, in efficiency.py), ours beside
the paper's, and the helpers the summary and figures share.

Each `tableN(results)` returns (markdown, csv rows); rows carry a `block` and `source` column so
that the paper's figures are never mistaken for ours. Values are percent unless named otherwise.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from fusion_jax import metrics as metrics_lib
from fusion_jax import paper
from fusion_jax.data.dataset import STANDIN_NAME

ALPHA = 0.05
_DATA = {"flickr8k": "Flickr8k", "embedded": "embedded procedural dataset (not Flickr8k)",
         "synthetic": "synthetic latent-variable features (not Flickr8k)",
         "npz": "your features (.npz files in npz.dir; not known to be Flickr8k)",
         STANDIN_NAME: "a stand-in folder in Flickr8k's layout (features.standins: embedded images; not Flickr8k)"}
_DATA_SHORT = {"flickr8k": "Flickr8k", "embedded": "embedded (not Flickr8k)", "synthetic": "synthetic (not Flickr8k)",
               "npz": "npz files",
               STANDIN_NAME: "stand-in (not Flickr8k)"}
PAPER_REFERENCE = f"paper ({paper.SETTING})"


def data_of(results: dict) -> str:
    """The data behind a sweep's features: config.features, or STANDIN_NAME when a backbone's
    provenance names a stand-in folder (features.standins) loaded as flickr8k."""
    datasets = {b.get("dataset") for b in results.get("backbones", {}).values()}
    return STANDIN_NAME if STANDIN_NAME in datasets else results["config"]["features"]


def data_label(features: str, short: bool = False) -> str:
    """Plain name of the data behind `config.features` (`short`: for a table cell)."""
    return (_DATA_SHORT if short else _DATA).get(features, f"{features} (not Flickr8k)")


def is_paper_setting(results: dict, backbone: str) -> bool:
    """True when the backbone's features are the paper's own setting: pooled CLIP ViT-B/32 features (the
    hub's model by its id, 512-d) of Flickr8k, pairs split 80/20 at random, trained as the paper trains
    (`training_differences`). A local model folder cannot be told from another CLIP (the stand-ins'
    random one has the same sizes), so its rows stay apart."""
    prov = results.get("backbones", {}).get(backbone, {})
    pairs = results.get("config", {}).get("pairs", {})
    return (data_of(results) == paper.FEATURES and backbone == paper.BACKBONE and prov.get("model") == paper.MODEL
            and not prov.get("tokens") and prov.get("dim_image") == prov.get("dim_text") == paper.DIM
            and pairs.get("split_by", "pair") == "pair" and pairs.get("train_fraction", 0.8) == 0.8
            and not training_differences(results))


def training_differences(results: dict) -> list[str]:
    """Where the sweep trains otherwise than the paper: ['`train.epochs` 2 (the paper's 10)', ...] over
    `paper.TRAINING` (a field the config lacks counts as the paper's)."""
    cfg = results.get("config", {})
    out = []
    for field, theirs in paper.TRAINING.items():
        section, key = field.split(".")
        ours = (cfg.get(section) or {}).get(key, theirs)
        if ours != theirs:
            out.append(f"`{field}` {ours} (the paper's {theirs})")
    return out


def is_paper_noise(results: dict, backbone: str) -> bool:
    """is_paper_setting, with the paper's noise: Gaussian, on the image features (its v)."""
    deg = results.get("config", {}).get("degradation", {})
    return (is_paper_setting(results, backbone) and deg.get("kind", "gaussian") == "gaussian"
            and deg.get("modality", "image") == "image")


def pct(mean: float | None, std: float | None = None, scale: float = 100.0) -> str:
    """'65.0 ± 3.7' from fractions (scale 100) or points (scale 1); '–' for a missing mean."""
    if mean is None or not math.isfinite(mean):
        return "–"
    return f"{scale * mean:.1f}" + ("" if std is None or not math.isfinite(std) else f" ± {scale * std:.1f}")


def not_a_number(diff: float, p: float | None) -> bool:
    """A concat − cross difference or p-value that is not a number (from a NaN metric)."""
    return not math.isfinite(diff) or (p is not None and not math.isfinite(p))


def untested(diff: float, p: float | None, n_seeds: int) -> bool:
    """A concat − cross difference no test can decide: one seed, the same nonzero gap on every seed (the
    t-test needs the gaps to vary; a sign test on so few seeds could not reach p < 0.05), or not a number."""
    return n_seeds < 2 or not_a_number(diff, p) or (p is None and abs(diff) >= 1e-12)


def one_decimal(v: float) -> str:
    """v with one decimal, or two significant digits where that would write a nonzero v as 0.0 (a
    significant gap of 0.02 points; Flickr8k's recall@1 chance, about 0.012%)."""
    return f"{v:.1f}" if abs(v) >= 0.05 or v == 0 else np.format_float_positional(v, precision=2, fractional=False)


def points_text(diff: float | None, p: float | None = None, n_seeds: int = 0) -> str:
    """A concat − cross difference (a fraction) as signed points with one decimal ('+2.8', '+0.0' for a
    tiny gap, never '-0.0'); a significant one as the verdict writes it (`one_decimal`: '+0.037', not
    '+0.0' beside "concat +0.037"); '–' for none or not a number."""
    if diff is None or not math.isfinite(diff):
        return "–"
    if favoured(diff, p, n_seeds):
        return ("-" if diff < 0 else "+") + one_decimal(abs(100 * diff))
    return f"{100 * diff:+z.1f}"


def p_text(p: float | None) -> str:
    """A p-value for a table cell: 3 significant digits, more where 3 would round it across ALPHA
    (0.04996 is not written "0.05" beside a significant verdict)."""
    if p is None or not math.isfinite(p):
        return "–"
    for digits in range(3, 18):
        text = f"{p:.{digits}g}"
        if (float(text) < ALPHA) == (p < ALPHA):
            return text
    return repr(p)


def favoured(diff: float, p: float | None, n_seeds: int) -> str | None:
    """'concat' or 'cross' when a concat − cross difference favours one (p < ALPHA); None when tied or
    `untested` (a NaN metric decides nothing)."""
    if untested(diff, p, n_seeds) or abs(diff) < 1e-12 or (p is not None and p >= ALPHA):
        return None
    return "concat" if diff > 0 else "cross"


def holm_index(results: dict) -> dict[tuple, float | None]:
    """Holm-adjusted p-values (metrics.holm) keyed (backbone, scale, level) like `comparison_index`: a backbone's
    comparisons without noise are one family, those with noise another; None where untested."""
    families: dict[tuple, list[dict]] = {}
    for c in results["comparisons"]:
        families.setdefault((c["backbone"], level(c) > 0), []).append(c)
    out = {}
    for family in families.values():
        p = [None if untested(c["concat_minus_cross"], c["p_value"], c["n_seeds"]) else c["p_value"] for c in family]
        out.update({(c["backbone"], c["scale"], level(c)): q for c, q in zip(family, metrics_lib.holm(p))})
    return out


def seeds_text(entries: list[dict]) -> str:
    """'3 seeds', '1 seed', or '2-3 seeds' when the entries' (summary cells' or comparisons') seed counts differ."""
    n = sorted({e["n_seeds"] for e in entries}) or [0]
    return f"{n[0]} seed{'s' if n[0] != 1 else ''}" if len(n) == 1 else f"{n[0]}-{n[-1]} seeds"


def verdict(diff: float, p: float | None, n_seeds: int) -> str:
    """`favoured` in words: 'concat +2.8' / 'cross +1.0'; 'not significant (cross +1.0 at 3 seeds, p = ...)'
    (which says no more than that: not that the heads are equal); 'tied' for no gap on any seed; or why it
    is untested: one seed's gap, or 'untested (concat +2.0 on each of 3 seeds: ...)' for equal gaps (zero
    variance, no t-test)."""
    seeds = f"{n_seeds} seed{'s' if n_seeds != 1 else ''}"
    if not_a_number(diff, p):
        return "untested (not a number: a NaN metric)"
    ahead = ("no mean gap" if abs(diff) < 1e-12 else  # seeds' gaps that cancel: no head named
             f"{'concat' if diff > 0 else 'cross'} +{one_decimal(100 * abs(diff))}")
    if n_seeds < 2:
        return "untested (no gap on its one seed; no test possible)" if diff == 0 else \
            f"{ahead} on its one seed (no test possible)"
    if p is None:
        return (f"tied (the same on all {seeds})" if abs(diff) < 1e-12 else
                f"untested ({ahead} on each of {seeds}: the same gap on every seed leaves no t-test)")
    return ahead if favoured(diff, p, n_seeds) else f"not significant ({ahead} at {seeds}, p = {p_text(p)})"


def level(entry: dict) -> float:
    """The degradation level of a summary, comparison or run entry."""
    return float(entry["degradation"]["level"])


def comparison_index(results: dict) -> dict[tuple, dict]:
    """comparisons keyed by (backbone, scale, level)."""
    return {(c["backbone"], c["scale"], level(c)): c for c in results["comparisons"]}


def summary_index(results: dict) -> dict[tuple, dict]:
    """summary keyed by (backbone, method, scale, level)."""
    return {(s["backbone"], s["method"], s["scale"], level(s)): s for s in results["summary"]}


def seed_pairs(runs: list[dict]) -> tuple[list[float], list[float]]:
    """(concat, cross) accuracies of one cell's runs paired by seed: the seeds both methods ran, in order. The
    one pairing behind the comparisons' t-tests (report.compare) and Table 2's and fig_noise's spreads."""
    acc = {m: {r["seed"]: r["metrics"]["accuracy"] for r in runs if r["method"] == m} for m in ("concat", "cross")}
    seeds = sorted(set(acc["concat"]) & set(acc["cross"]))
    return [acc["concat"][s] for s in seeds], [acc["cross"][s] for s in seeds]


def paired_differences(results: dict, backbone: str, scale: int, lvl: float) -> list[float]:
    """Per-seed concat − cross accuracy (fractions) for one (backbone, scale, level)."""
    concat, cross = seed_pairs([r for r in results["runs"]
                                if r["backbone"] == backbone and r["scale"] == scale and level(r) == lvl])
    return [a - b for a, b in zip(concat, cross)]


def noise_settings(results: dict) -> list[tuple[str, int, list[float]]]:
    """(backbone, scale, sorted levels) where both methods were compared under noise (a level above 0)."""
    levels: dict[tuple, set] = {}
    for c in results["comparisons"]:
        levels.setdefault((c["backbone"], c["scale"]), set()).add(level(c))
    return [(b, sc, sorted(lv)) for (b, sc), lv in levels.items() if max(lv) > 0]


def markdown_table(header: list[str], rows: list[list], align: str = "") -> list[str]:
    """A Markdown table; `align` is one of 'l'/'r' per column (default left)."""
    align = align or "l" * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def to_csv(rows: list[dict]) -> str:
    """CSV text of dict rows (the union of their keys, in first-seen order); None is written empty."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def _round(x: float | None, scale: float = 100.0, digits: int = 2) -> float | None:
    return None if x is None or not math.isfinite(x) else round(scale * x, digits)


def split_text(results: dict, short: bool = False) -> str:
    """How the sweep split its pairs: '80% train, pairs split at random (the paper's split)' or '80% train,
    split by image (no validation image or caption in training)'; `short` leaves out the parenthesis."""
    pairs = results["config"].get("pairs", {})
    share = f"{100 * pairs['train_fraction']:.0f}% train" if "train_fraction" in pairs else "train/validation"
    by_image = pairs.get("split_by", "pair") == "image"
    text = f"{share}, {'split by image' if by_image else 'pairs split at random'}"
    return text if short else text + (" (no validation image or caption in training)" if by_image
                                      else " (the paper's split)")


def _ours_header(results: dict, difference: str = "`concat − cross`") -> str:
    """What our rows are; `difference`: the name of the table's concat − cross column."""
    cfg = results["config"]
    seeds = ", ".join(str(s) for s in cfg.get("seeds", []))
    return (f"**Ours**: {data_label(data_of(results))} (`config.features = {cfg['features']}`), config "
            f"`{cfg.get('name', '?')}`, seeds {seeds}, {split_text(results)}; "
            "validation metrics in percent, mean ± sample std over "
            "seeds. `majority` is the majority-class share of the validation set (the accuracy of always "
            f"predicting the larger class). {difference} is the mean over paired seeds of the accuracy "
            "difference in points (the difference of the two means when both methods have every seed), with "
            f"a two-sided paired t-test over seeds; p ≥ {ALPHA} reads \"not significant\" (without a p-value: "
            "\"no test possible\" on one seed, \"untested\" for the same nonzero gap on every seed, \"tied\" for no "
            "gap on any). p is each test's own; the CSV's `p_holm` adjusts it by Holm's method over the backbone's "
            "tests without noise (one family) or with noise (another), as summary.md's verdicts after correction.")


def _paper1_cells(row: dict) -> list[str]:
    return [f"{row['acc_mean']:.1f} ± {row['acc_std']:.1f}", "not reported",
            f"{row['f1_mean']:.1f} ± {row['f1_std']:.1f}", f"{row['precision_mean']:.1f} ± {row['precision_std']:.1f}",
            f"{row['recall_mean']:.1f} ± {row['recall_std']:.1f}", len(paper.PROTOCOL["seeds"])]


def _paper1_csv(row: dict, block: str) -> dict:
    return {"block": block, "source": "paper", "data": "Flickr8k", "backbone": "CLIP ViT-B/32",
            "scale": row["scale"], "method": row["method"], "accuracy_mean_pct": row["acc_mean"],
            "accuracy_std_pct": row["acc_std"], "majority_baseline_pct": None,
            "f1_mean_pct": row["f1_mean"], "f1_std_pct": row["f1_std"],
            "precision_mean_pct": row["precision_mean"], "precision_std_pct": row["precision_std"],
            "recall_mean_pct": row["recall_mean"], "recall_std_pct": row["recall_std"],
            "n_seeds": len(paper.PROTOCOL["seeds"]), "concat_minus_cross_pts": None, "p_value": None,
            "verdict": "p not reported by the paper"}


TOKEN_ALIGNMENT = ("With token features, the retrieval compares the means of each side's token states (what "
                   "`concat` sees), not a model's projected embeddings.")


def token_backbones(results: dict) -> list[str]:
    """The backbones whose features are token states (their alignment is measured on token means)."""
    return [b for b, prov in (results.get("backbones") or {}).items() if prov.get("tokens")]


def alignment(provenance: dict) -> dict:
    """A backbone's measured alignment (data.sources: recall@k, chance@k, defined or a reason), or {} where it
    was not measured (records of early code hold a synthetic backbone's dial there: a number, not a measure)."""
    a = provenance.get("alignment", {})
    return a if isinstance(a, dict) else {}


def _alignment_lines(results: dict) -> list[str]:
    rows = []
    for name, prov in (results.get("backbones") or {}).items():
        a = alignment(prov)
        dims = f"{prov.get('dim_image', '?')} / {prov.get('dim_text', '?')}"
        if a.get("defined"):
            rows.append([name, dims, pct(a["recall@1"]), one_decimal(100 * a["chance@1"])])
        else:
            rows.append([name, dims, "–", a.get("reason", "not measured")])
    if not rows:
        return []
    return ["", "Feature alignment of our backbones (zero-shot image → caption retrieval by cosine):", "",
            *markdown_table(["backbone", "d_v / d_t", "recall@1 (%)", "chance@1 (%)"], rows, "llrr")] + (
        ["", TOKEN_ALIGNMENT] if token_backbones(results) else [])


def table1(results: dict) -> tuple[str, list[dict]]:
    """Table 1 at degradation level 0: ours per backbone/scale/method, the paper's beside or apart."""
    data = data_label(data_of(results), short=True)
    comps, holm = comparison_index(results), holm_index(results)
    header = ["source", "data", "backbone", "scale", "method", "accuracy", "majority", "F1", "precision", "recall",
              "seeds", "concat − cross (pts)", "p", "verdict"]
    md_rows, csv_rows, placed = [], [], set()
    level0 = sorted((s for s in results["summary"] if level(s) == 0.0),
                    key=lambda s: (s["backbone"], s["scale"], s["method"]))
    for s in level0:
        c = comps.get((s["backbone"], s["scale"], 0.0))
        diff, p, n = (c["concat_minus_cross"], c["p_value"], c["n_seeds"]) if c else (None, None, s["n_seeds"])
        verdict_text = verdict(diff, p, n) if c else (
            "no comparison (one method only)" if len({t["method"] for t in level0 if t["backbone"] == s["backbone"]
                                                      and t["scale"] == s["scale"]}) < 2
            else "no comparison (no seed trained both methods)")
        md_rows.append(["ours", data, s["backbone"], s["scale"], s["method"], pct(s["accuracy_mean"], s["accuracy_std"]),
                        pct(s["majority_baseline_mean"]), pct(s["f1_mean"], s["f1_std"]),
                        pct(s["precision_mean"], s["precision_std"]), pct(s["recall_mean"], s["recall_std"]),
                        s["n_seeds"], points_text(diff, p, n), p_text(p), verdict_text])
        row = {"block": "ours", "source": "ours", "data": data, "backbone": s["backbone"], "scale": s["scale"],
               "method": s["method"], "majority_baseline_pct": _round(s["majority_baseline_mean"])}
        for m in ("accuracy", "f1", "precision", "recall"):
            row[f"{m}_mean_pct"], row[f"{m}_std_pct"] = _round(s[f"{m}_mean"]), _round(s[f"{m}_std"])
        csv_rows.append({**row, "n_seeds": s["n_seeds"], "concat_minus_cross_pts": _round(diff), "p_value": p,
                         "p_holm": holm.get((s["backbone"], s["scale"], 0.0)), "verdict": verdict_text})
        theirs = paper.table1_row(s["scale"], s["method"]) if is_paper_setting(results, s["backbone"]) else None
        if theirs is not None:
            placed.add((theirs["scale"], theirs["method"]))
            md_rows.append(["**paper**", "Flickr8k", "CLIP ViT-B/32", theirs["scale"], theirs["method"],
                            *_paper1_cells(theirs), "–", "–", "p not reported by the paper"])
            csv_rows.append(_paper1_csv(theirs, "paper beside ours (same backbone, data and scale)"))
    lines = ["# Table 1: accuracy, F1, precision, recall by scale (no degradation)", "", _ours_header(results), ""]
    if placed:
        lines += [f"Rows marked **paper** are the paper's Table 1 ({paper.SETTING}) for the same backbone, data "
                  "and scale, placed beside ours. The paper does not say whether its std is the sample std (ours is).",
                  ""]
    lines += markdown_table(header, md_rows, "lllrlrrrrrrrrl") if md_rows else ["(no runs at degradation level 0)"]
    lines += _alignment_lines(results)
    rest = [r for r in paper.table1() if (r["scale"], r["method"]) not in placed]
    if rest:
        block = f"reference only: {PAPER_REFERENCE}, not comparable with ours"
        lines += ["", f"## For reference only: {PAPER_REFERENCE}, Table 1", "",
                  f"The paper's own figures on its own data ({paper.SETTING}); "
                  + ("our rows above are on other data, so these are not comparable with them."
                     if data_of(results) != paper.FEATURES else "the scales and methods our rows above do not hold."
                     if any(is_paper_setting(results, b) for b in results.get("backbones") or {}) else
                     "our rows above are not its exact setting (pooled features of the hub's CLIP ViT-B/32, pairs "
                     "split 80/20 at random, its training and head" + "".join(f"; here {d}" for d in
                                                                            training_differences(results))
                     + "), so these are not placed beside them.")
                  + f" Percent, mean ± std over {len(paper.PROTOCOL['seeds'])} seeds.", "",
                  *markdown_table(["source", "scale", "method", "accuracy", "majority", "F1", "precision", "recall",
                                   "seeds"], [[PAPER_REFERENCE, r["scale"], r["method"], *_paper1_cells(r)]
                                              for r in rest], "lrlrrrrrr")]
        csv_rows += [_paper1_csv(r, block) for r in rest]
    lines += ["", f"Paper: {paper.CITATION}."]
    return "\n".join(lines) + "\n", csv_rows


def table2(results: dict) -> tuple[str, list[dict]]:
    """Table 2, the noise study: concat and cross accuracy per sigma, the advantage and its test."""
    cfg = results["config"]
    data = data_label(data_of(results), short=True)
    summ, comps, holm = summary_index(results), comparison_index(results), holm_index(results)
    deg = cfg.get("degradation", {})
    lines = ["# Table 2: accuracy under Gaussian feature noise", "",
             _ours_header(results, "`advantage` (concat − cross)"), "",
             f"Noise: v' = normalize(v + N(0, σ²I)) on the `{deg.get('modality', 'image')}` features "
             f"(`degradation.kind = {deg.get('kind', '?')}`); at σ = 0 the features as they are. `advantage` is "
             "concat − cross accuracy in points, ± the sample std of the per-seed paired differences.", ""]
    md_rows, csv_rows = [], []
    for b, sc, levels in noise_settings(results):
        for lv in levels:
            cc, cr, c = summ.get((b, "concat", sc, lv)), summ.get((b, "cross", sc, lv)), comps.get((b, sc, lv))
            if cc is None or cr is None or c is None:
                continue
            d = paired_differences(results, b, sc, lv)
            d_std = metrics_lib.mean_std(d)[1]
            words = verdict(c["concat_minus_cross"], c["p_value"], c["n_seeds"])
            md_rows.append(["ours", data, b, sc, f"{lv:g}", pct(cc["accuracy_mean"], cc["accuracy_std"]),
                            pct(cr["accuracy_mean"], cr["accuracy_std"]), pct(cc["majority_baseline_mean"]),
                            (points_text(c["concat_minus_cross"], c["p_value"], c["n_seeds"])
                             + ("" if d_std is None or not math.isfinite(d_std) else f" ± {100 * d_std:.1f}")),
                            p_text(c["p_value"]), words])
            csv_rows.append({"block": "ours", "source": "ours", "data": data, "backbone": b, "scale": sc, "sigma": lv,
                             "concat_mean_pct": _round(cc["accuracy_mean"]), "concat_std_pct": _round(cc["accuracy_std"]),
                             "cross_mean_pct": _round(cr["accuracy_mean"]), "cross_std_pct": _round(cr["accuracy_std"]),
                             "majority_baseline_pct": _round(cc["majority_baseline_mean"]),
                             "advantage_pts": _round(c["concat_minus_cross"]), "advantage_std_pts": _round(d_std),
                             "p_value": c["p_value"], "p_holm": holm.get((b, sc, lv)), "n_seeds": c["n_seeds"],
                             "verdict": words})
    if md_rows:
        lines += markdown_table(["source", "data", "backbone", "scale", "σ", "concat accuracy", "cross accuracy",
                                 "majority", "advantage (pts)", "p", "verdict"], md_rows, "lllrrrrrrrl")
    elif any(level(s) > 0 for s in results["summary"]):
        lines += ["No concat − cross comparison under noise in these results: the noisy cells have one method "
                  "(their accuracies are in summary.md)."]
    else:
        lines += ["No noise study in these results: no run has a degradation level above 0."]
    setting = any(is_paper_noise(results, b) for b in results.get("backbones") or {})
    block = f"{PAPER_REFERENCE}, Table 2 (scale not stated)" + ("" if setting else ", not comparable with ours")
    lines += ["", f"## {block}", "",
              f"The paper's figures on its own data ({paper.SETTING}); "
              + ("not comparable with ours (other data)." if data_of(results) != paper.FEATURES
                 else "the paper does not state the scale of this study." if setting else
                 "not comparable with ours: not its setting (pooled features of the hub's CLIP ViT-B/32, pairs "
                 "split 80/20 at random, its training and head, Gaussian noise on the image features).")
              + f" Percent, mean ± std over {len(paper.PROTOCOL['seeds'])} seeds; advantage as printed in the paper"
              + _paper_advantage_note() + ".", "",
              *markdown_table(["source", "σ", "concat accuracy", "cross accuracy", "advantage"],
                              [[PAPER_REFERENCE, f"{r['sigma']:g}", f"{r['concat_mean']:.1f} ± {r['concat_std']:.1f}",
                                f"{r['cross_mean']:.1f} ± {r['cross_std']:.1f}", r["advantage"]]
                               for r in paper.table2()], "lrrrl"),
              "", f"Paper: {paper.CITATION}."]
    csv_rows += [{"block": block, "source": "paper", "data": "Flickr8k", "backbone": "CLIP ViT-B/32", "scale": None,
                  "sigma": r["sigma"], "concat_mean_pct": r["concat_mean"], "concat_std_pct": r["concat_std"],
                  "cross_mean_pct": r["cross_mean"], "cross_std_pct": r["cross_std"], "majority_baseline_pct": None,
                  "advantage_pts": r["advantage_pp"], "advantage_std_pts": None, "p_value": None, "n_seeds": len(paper.PROTOCOL["seeds"]),
                  "verdict": r["advantage"]} for r in paper.table2()]
    return "\n".join(lines) + "\n", csv_rows


def _paper_advantage_note() -> str:
    """Where the paper's printed advantage is not the difference of its printed means: said, not mended."""
    off = [r for r in paper.table2()
           if r["advantage_pp"] is not None and abs(r["concat_mean"] - r["cross_mean"] - r["advantage_pp"]) > 0.05]
    return "" if not off else " (" + "; ".join(
        f"at σ = {r['sigma']:g} {r['advantage_pp']:+.1f}, where its means differ by "
        f"{r['concat_mean'] - r['cross_mean']:+.1f}" for r in off) + ")"
