"""summary.md: what the paired tests favour per backbone ("Concat or cross?", with Holm's correction, the
majority-class baseline and diverged runs named), every cell over seeds, the alignment, what validation
shares with training, and the comparisons; all from a results dict (`report.write_results`)."""

from __future__ import annotations

import collections
import json
import re

from fusion_jax import metrics as metrics_lib
from fusion_jax import paper, tables


def source_text(results: dict) -> str:
    """' at commit 1a2b3c4d5e (with uncommitted changes to its code or configs)' from results["source"], or ''."""
    return _commit_text(results.get("source") or {}, " at commit ")


def _commit_text(src: dict, prefix: str) -> str:
    if not src.get("commit"):
        return ""
    return prefix + src["commit"][:10] + (" (with uncommitted changes to its code or configs)" if src.get("dirty") else "")


def mixed_sources(results: dict) -> str:
    """A warning when runs were trained by other code than the process that wrote the results (a resume
    after a change: the workdir checks the config and the features, not the code), else ''."""
    counts = collections.Counter(json.dumps(r.get("source") or {}, sort_keys=True) for r in results["runs"])
    if len(counts) < 2 and json.loads(next(iter(counts), "{}")) in ({}, results.get("source") or {}):
        return ""
    parts = [(_commit_text(json.loads(k), "commit ") or "code of unknown commit") + f": {n} runs"
             for k, n in counts.most_common()]
    return f"**Runs trained by different code** (a resume after a change): {'; '.join(parts)}."


def mixed_devices(results: dict) -> str:
    """A note when runs were finished on different devices (processes on other hardware, a resume elsewhere),
    whose numbers may then differ by float32 rounding (README, Keys), else ''. Runs of older code name none."""
    counts = collections.Counter(json.dumps(r["device"], sort_keys=True) for r in results["runs"]
                                 if isinstance(r.get("device"), dict))
    if len(counts) < 2:
        return ""
    described = lambda d: (f"{d.get('platform')} ({d.get('device_kind')}), {d.get('local_devices')} device(s) per "
                           f"process, matmul precision {d.get('matmul_precision')}")
    parts = [f"{described(json.loads(k))}: {n} runs" for k, n in counts.most_common()]
    return (f"**Runs trained on different devices** (processes on other hardware, or a resume elsewhere; each run "
            f"counts where its group finished, and the device below is the results' writer's): {'; '.join(parts)}.")


def answer(results: dict) -> list[str]:
    """Per backbone, which head the comparisons favour without noise (`tables.favoured`), each scale's
    verdict, and a count of the noisy comparisons: Markdown bullet lines for the summary's top."""
    out, cells, holm = [], tables.summary_index(results), tables.holm_index(results)
    favours = lambda c: tables.favoured(c["concat_minus_cross"], c["p_value"], c["n_seeds"])
    for b in results["config"].get("backbones") or dict.fromkeys(c["backbone"] for c in results["comparisons"]):
        mine = [c for c in results["comparisons"] if c["backbone"] == b]
        clean = sorted((c for c in mine if tables.level(c) == 0), key=lambda c: c["scale"])
        noisy = [c for c in mine if tables.level(c) > 0]
        a = tables.alignment((results.get("backbones") or {}).get(b, {}))
        aligned = (f"zero-shot recall@1 {100 * a['recall@1']:.1f}%"
                   + (" of the token states' means" if b in tables.token_backbones(results) else "") + ", "
                   f"chance {tables.one_decimal(100 * a['chance@1'])}%"
                   if a.get("defined") else "no shared space" if a else "alignment not measured")
        lost = [f["group"] for f in results.get("failed_groups") or []  # older records lack "backbone"
                if f.get("backbone") == b or ("backbone" not in f and re.match(rf"{re.escape(b)}-(concat|cross)(-|$)",
                                                                               f["group"]))]
        missing = f" Group(s) {', '.join(lost)} failed (see Failed groups): their scales are missing." if lost else ""
        missing += _unconverged_text([r for r in results.get("runs") or [] if r["backbone"] == b])
        if not clean:
            out.append(f"- **{b}** ({aligned}): **no comparison without noise**.{missing}{_noise_counts(noisy, cells, holm)}")
            continue
        concat = [c["scale"] for c in clean if favours(c) == "concat"]
        cross = [c["scale"] for c in clean if favours(c) == "cross"]
        untested = [c["scale"] for c in clean if tables.untested(c["concat_minus_cross"], c["p_value"], c["n_seeds"])]
        adjusted = {c["scale"]: holm[(b, c["scale"], 0.0)] for c in clean}
        corrected = sum(q is not None for q in adjusted.values()) > 1  # one test needs no correction
        held = {sc for sc, q in adjusted.items() if sc in concat + cross and q < tables.ALPHA} if corrected else set()
        if all(c["n_seeds"] < 2 for c in clean):
            choice = "untested (one seed: run 2 or more for a paired test)"
        elif len(untested) == len(clean):
            choice = "untested (see each scale)"
        elif concat and cross:
            choice = (f"it depends on the scale: concat at {', '.join(map(str, concat))}, "
                      f"cross at {', '.join(map(str, cross))} pairs"
                      + (f"; after Holm's correction {_held_text(concat, cross, held)}" if corrected else ""))
        elif concat or cross:
            choice = (f"{'concat' if concat else 'cross'} (at {len(concat or cross)} of {len(clean)} scales"
                      + (f"; {_held_text(concat, cross, held)} after Holm's correction" if corrected else "") + ")")
        else:
            tested = [c for c in clean if c["scale"] not in untested]
            choice = (f"no difference significant at {tables.seeds_text(tested)}"
                      + (f", untested at {', '.join(map(str, untested))} pairs" if untested else "")
                      + _fewer_params(results, b))
        gaps = "; ".join(f"{c['scale']}: {tables.verdict(c['concat_minus_cross'], c['p_value'], c['n_seeds'])}"
                         + (f", p = {tables.p_text(c['p_value'])}" if favours(c) and c["p_value"] is not None else "")
                         + (f", Holm-adjusted {tables.p_text(adjusted[c['scale']])}" if favours(c) and corrected else "")
                         for c in clean)
        below = {c["scale"]: _at_baseline(cells, c) for c in clean}
        idle = [sc for sc, ms in below.items() if len(ms) == 2]
        unlearned = (f" **At {', '.join(map(str, idle))} pairs neither head beats the majority-class baseline**: "
                     "nothing was learned there, so no verdict means anything (more pairs or epochs?)."
                     if idle else "")
        unlearned += "".join(_one_at_baseline_text(cells, c, below[c["scale"]][0]) for c in clean
                             if len(below[c["scale"]]) == 1)
        out.append(f"- **{b}** ({aligned}): **{choice}**. Without noise, by scale: {gaps}.{unlearned}{missing}"
                   + _noise_counts(noisy, cells, holm))
    return out


def _fewer_params(results: dict, backbone: str) -> str:
    """' (concat has fewer parameters: 295,554 against 559,490)' from the backbone's run records, or ''."""
    params = {r["method"]: r["params"] for r in results.get("runs") or [] if r["backbone"] == backbone
              and r.get("params")}
    if len(params) < 2 or len(set(params.values())) < 2:
        return ""
    (small, p), (_, q) = sorted(params.items(), key=lambda mp: mp[1])
    return f" ({small} has fewer parameters: {p:,} against {q:,})"


def _unconverged_text(runs: list[dict]) -> str:
    """' **In 3 of its 36 runs training diverged** ...' (metrics.unconverged), or '' (records that predate
    `final_train_loss` are not counted)."""
    known = [r for r in runs if "final_train_loss" in r]
    n_bad, worst = metrics_lib.unconverged_runs([r["final_train_loss"] for r in known])
    if not n_bad:
        return ""
    return (f" **In {n_bad} of its {len(known)} runs training diverged**: the last epoch's mean training "
            f"loss is above {metrics_lib.UNCONVERGED_LOSS:.2f} (2 ln 2; a 50/50 guess scores ln 2), {worst} "
            "(runs.csv): what their accuracies favour says little (a lower learning rate, or features nearer unit "
            "norm?).")


def _held_text(concat: list[int], cross: list[int], held: set[int]) -> str:
    """Which favourable scales hold after Holm's correction (`held`): 'at 1024', 'at both', 'at all 3',
    'at none'; by side where both sides have favourable scales ('concat at 1024, cross at 2048')."""
    if concat and cross:
        sides = [(m, [sc for sc in scales if sc in held]) for m, scales in (("concat", concat), ("cross", cross))]
        return ", ".join(f"{m} at {', '.join(map(str, scs))}" for m, scs in sides if scs) or "at none"
    favourable = concat or cross
    if len(held) == len(favourable) > 1:
        return "at both" if len(held) == 2 else f"at all {len(held)}"
    return f"at {', '.join(str(sc) for sc in favourable if sc in held)}" if held else "at none"


def _noise_counts(noisy: list[dict], cells: dict, holm: dict) -> str:
    """' With noise (σ a-b): concat ahead in i, cross in j, neither in k[, untested (...) in u] of n
    comparisons (table2.md)[; in w of them a head does not beat the majority-class baseline ...].', or ''
    without noisy comparisons. cells: summary entries keyed (backbone, method, scale, level); holm:
    `tables.holm_index`."""
    if not noisy:
        return ""
    sigmas = sorted({tables.level(c) for c in noisy})
    sides = [tables.favoured(c["concat_minus_cross"], c["p_value"], c["n_seeds"]) for c in noisy]
    untested = sum(tables.untested(c["concat_minus_cross"], c["p_value"], c["n_seeds"]) for c in noisy)
    n_concat, n_cross = sides.count("concat"), sides.count("cross")
    q = [holm[(c["backbone"], c["scale"], tables.level(c))] for c in noisy]
    tests = sum(p is not None for p in q)
    held = {m: [f"{c['scale']} at σ {tables.level(c):g}" for c, s, p in zip(noisy, sides, q) if s == m and p < tables.ALPHA]
            for m in ("concat", "cross")}
    return (f" With noise (σ {sigmas[0]:g}" + (f"-{sigmas[-1]:g}" if len(sigmas) > 1 else "")
            + f"): concat ahead in {n_concat}, cross in {n_cross}, neither in {len(noisy) - n_concat - n_cross - untested}"
            + (f", untested (one seed, the same gap on every seed, or not a number) in {untested}" if untested else "")
            + f" of {len(noisy)} comparisons (table2.md)"
            + (f"; in {weak} of them a head does not beat the majority-class baseline, where a verdict says little."
               if (weak := sum(bool(_at_baseline(cells, c)) for c in noisy)) else ".")
            + (f" After Holm's correction for the {tests} tests with noise: "
               + ", ".join(f"{m} {'ahead ' if m == 'concat' else ''}in {len(held[m])}"
                           + (f" ({', '.join(held[m])})" if held[m] else "") for m in ("concat", "cross")) + "."
               if n_concat + n_cross and tests > 1 else ""))


def _cell_key(comparison: dict, method: str) -> tuple:
    """The summary cell of `method` in a comparison: cells are keyed (backbone, method, scale, level)."""
    return comparison["backbone"], method, comparison["scale"], tables.level(comparison)


def _one_at_baseline_text(cells: dict, comparison: dict, method: str) -> str:
    """' At 2048 pairs cross does not beat the majority-class baseline (49.6 against 50.1; concat 54.7).': the
    means alone (the other head's being above the baseline is no test that it learned)."""
    s, other = cells[_cell_key(comparison, method)], "cross" if method == "concat" else "concat"
    return (f" At {comparison['scale']} pairs {method} does not beat the majority-class baseline "
            f"({tables.pct(s['accuracy_mean'])} against {tables.pct(s['majority_baseline_mean'])}; {other} "
            f"{tables.pct(cells[_cell_key(comparison, other)]['accuracy_mean'])}).")


def _at_baseline(cells: dict, comparison: dict) -> list[str]:
    """The methods of a comparison's cell whose mean accuracy does not beat the majority-class baseline."""
    return [m for m in ("concat", "cross") if (s := cells.get(_cell_key(comparison, m)))
            and not s["accuracy_mean"] > s["majority_baseline_mean"]]


def _timing_text(results: dict) -> str:
    """', in 224 s by the process that wrote it (4 of 4 groups trained there)' from results["timing"], or '';
    after a rerun that trained nothing, also the last process that trained groups (timing.trained_by)."""
    t = results.get("timing")
    if not t:
        return ""
    text = (f", in {t['seconds']:.0f} s by the process that wrote it ({t['groups_trained']} of {t['groups']} "
            "groups trained there)")
    if before := t.get("trained_by"):
        text += (f"; the last process that trained any, `{before.get('command') or 'fusion_jax.sweep.train_and_evaluate'}`, "
                 f"took {before['seconds']:.0f} s ({before['groups_trained']} of {before['groups']} trained there)")
    return text


def summary_markdown(results: dict) -> str:
    """Human-readable tables of a results dict."""
    cfg = results["config"]
    lines = [f"# {cfg['name']}: fusion sweep summary", "",
             f"Made by `{results.get('command') or 'fusion_jax.sweep.train_and_evaluate'}`{source_text(results)}"
             f"{_timing_text(results)}.", "", *[f"{m}\n" for m in (mixed_sources(results), mixed_devices(results)) if m],
             f"Features: {tables.data_label(tables.data_of(results))} (`config.features = {cfg['features']}`); "
             f"device: {results['device']['platform']} "
             f"({results['device']['device_kind']}); jax {results['versions']['jax']}, "
             f"flax {results['versions']['flax']}; {tables.split_text(results)}. "
             "Validation metrics in percent, mean ± sample std over seeds; "
             "`majority` is the majority-class share of the validation set (the accuracy of always "
             "predicting its larger class).", ""]
    notes = [(b, n) for b, prov in (results.get("backbones") or {}).items() for n in prov.get("notes") or []]
    if notes:
        lines += ["## Notes on the features", "", *[f"- **{b}**: {n}." for b, n in notes], ""]
    if results["comparisons"]:
        lines += ["## Concat or cross?", "",
                  f"What the paired t-tests below favour (p < {tables.ALPHA}), for these features, scales and "
                  "seeds, not beyond them. Each p-value is its own test's, not corrected for multiple "
                  "comparisons; 'after Holm's correction' says which favourable verdicts hold when a backbone's "
                  "tests without noise are taken as one family, and those with noise as another, each at a "
                  f"family-wise error of {tables.ALPHA:g} (not the report as a whole).", "", *answer(results), "",
                  f"The paper's decision rules (its Table 4, from Flickr8k): {paper.decision_rules()}. Where these "
                  "features stand among its kinds is the reader's call: the zero-shot recall@1 above, where "
                  "measured, gives their alignment; the table names no alignment that divides its kinds.", ""]
    lines += ["## Every cell", ""]
    if results["summary"]:
        lines += tables.markdown_table(
            ["backbone", "method", "scale", "degradation", "accuracy", "majority", "F1", "precision", "recall", "seeds"],
            [[r["backbone"], r["method"], r["scale"], f"{r['degradation']['kind']} {r['degradation']['level']:g}",
              tables.pct(r["accuracy_mean"], r["accuracy_std"]), tables.pct(r["majority_baseline_mean"]),
              tables.pct(r["f1_mean"], r["f1_std"]), tables.pct(r["precision_mean"], r["precision_std"]),
              tables.pct(r["recall_mean"], r["recall_std"]), r["n_seeds"]] for r in results["summary"]], "llrlrrrrrr")
    else:
        lines.append("(no run finished" + (": every group failed, below)" if results.get("failed_groups") else ")"))
    if results.get("failed_groups"):
        lines += ["", "## Failed groups (not in the tables above)", ""]
        lines += [f"- `{f['group']}`: {f['error']}" for f in results["failed_groups"]]
    if results["backbones"]:
        rows = []
        for name, prov in results["backbones"].items():
            a = tables.alignment(prov)
            rows.append([name, *(f"{100 * a[k]:.1f}" for k in ("recall@1", "recall@5")),
                         *(f"{100 * a[k]:.2f}" for k in ("chance@1", "chance@5")), a["n_images"]] if a.get("defined")
                        else [name, "–", "–", "–", "–", a.get("reason", "not measured")])
        lines += ["", "## Feature alignment (zero-shot image → text retrieval by cosine)", "",
                  *tables.markdown_table(["backbone", "recall@1", "recall@5", "chance@1", "chance@5", "images"], rows,
                                         "lrrrrr")]
        lines += ["", tables.TOKEN_ALIGNMENT] if tables.token_backbones(results) else []
    overlaps = {b: prov["split_overlap"] for b, prov in results["backbones"].items() if prov.get("split_overlap")}
    if overlaps:
        share = lambda x: "–" if x is None else f"{100 * x:.1f}"
        lines += ["", f"## What validation shares with training ({tables.split_text(results, short=True)})", "",
                  "Two separate shares of the validation pairs, in percent: those whose image, or whose caption's "
                  "image, a training pair also shows (as its image or its caption's image); and those whose "
                  "caption a training pair has.", "",
                  *tables.markdown_table(["backbone", "scale", "pairs with a training image",
                                          "pairs with a training caption"],
                                         [[b, s, share(o["val_pairs_with_a_training_image"]),
                                           share(o["val_pairs_with_a_training_caption"])]
                                          for b, by_scale in overlaps.items() for s, o in by_scale.items()], "lrrr")]
    if results["comparisons"]:
        rows = [[c["backbone"], c["scale"], f"{c['degradation']['kind']} {c['degradation']['level']:g}",
                 tables.points_text(c["concat_minus_cross"], c["p_value"], c["n_seeds"]), tables.p_text(c["p_value"]),
                 tables.verdict(c["concat_minus_cross"], c["p_value"], c["n_seeds"])] for c in results["comparisons"]]
        lines += ["", "## concat minus cross (accuracy points, paired t-test over seeds)", "",
                  *tables.markdown_table(["backbone", "scale", "degradation", "concat − cross", "p", "verdict"], rows,
                                         "lrlrrl")]
    return "\n".join(lines) + "\n"
