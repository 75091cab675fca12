"""One sweep against another: `python -m fusion_jax.report --workdir=DIR --against=OTHER` writes
DIR/against_<other>.md with what differs between them (config, features) and what that moved
(accuracy shifts, who is ahead in the comparisons both hold, every shared cell)."""

from __future__ import annotations

import json

from fusion_jax import tables
from fusion_jax.config_base import ADDED, SAVED_LATER, differing, flatten, not_result
from fusion_jax.data.featureset import feature_identity


def _changes(before: dict, after: dict) -> str:
    """'`k` before → after; ...' over two flat dicts' differing keys, or 'none'."""
    keys = differing(before, after)
    return "; ".join(f"`{k}` {json.dumps(before.get(k))} → {json.dumps(after.get(k))}" for k in keys) or "none"


def _identity(provenance: dict) -> dict:
    """feature_identity, with synthetic features' token count 0 read as no tokens (False), as the other
    sources record pooled features: `tokens` 0 → false is no difference."""
    out = feature_identity(provenance)
    if out.get("tokens") == 0:
        out["tokens"] = False
    return out


def _noised_shape(results: dict, backbone: str) -> list:
    """What σ is measured against on a backbone's noised features: each degraded side's dims and whether it
    holds token states (the noise, normalize(v + σz), has about σ·√d of length on d dims)."""
    prov = (results.get("backbones") or {}).get(backbone, {})
    modality = (results["config"].get("degradation") or {}).get("modality", "image")
    return [(prov.get(f"dim_{side}"), bool(prov.get("tokens")))
            for side in (("image", "text") if modality == "both" else (modality,))]


def against_markdown(results: dict, other: dict, name: str, other_name: str, command: str) -> str:
    """`results` (sweep `name`) against `other`: their config and feature differences, each backbone's
    accuracy shifts over the cells both hold, who is ahead in each comparison (`tables.favoured`) in both,
    what only one holds or lost to a failed group, and every shared cell."""
    configs = [{**ADDED, **flatten(r["config"])} for r in (other, results)]
    skip = {k for k in set(configs[0]) | set(configs[1]) if not_result(k) or k == "name"
            or (k in SAVED_LATER and not all(k in c for c in configs))}
    configs = [{k: v for k, v in c.items() if k not in skip} for c in configs]
    shared_backbones = [b for b in results.get("backbones", {}) if b in other.get("backbones", {})]
    features = [flatten({b: _identity(r["backbones"][b]) for b in shared_backbones}) for r in (other, results)]
    mine, theirs = tables.summary_index(results), tables.summary_index(other)
    noise = [{k: (r["config"].get("degradation") or {}).get(k, default) for k, default in
              (("kind", "gaussian"), ("modality", "image"))} for r in (other, results)]
    # σ 0.3 on the text is not σ 0.3 on the images, nor on 64 dims what it is on 512.
    same_noise = lambda k: k[-1] == 0 or (noise[0] == noise[1]
                                          and _noised_shape(other, k[0]) == _noised_shape(results, k[0]))
    shared = [k for k in mine if k in theirs and same_noise(k)]
    unlike = sorted({k[0] for k in mine if k in theirs and not same_noise(k)})  # noisy cells both hold, apart
    pct = lambda s: 100 * s["accuracy_mean"]  # rounded only when written: a difference of unrounded values
    lines = [f"# {name} against {other_name}", "", f"Made by `{command}`.", "",
             f"Config differences ({other_name} → {name}): {_changes(*configs)}.", "",
             (f"Feature differences of the backbones both have ({', '.join(shared_backbones)}): {_changes(*features)}."
              if shared_backbones else "The two sweeps share no backbone.")]
    only = [(n, len([k for k in a if k not in b])) for n, a, b in ((other_name, theirs, mine), (name, mine, theirs))]
    for note in ([f"Cells only in {n}: {c}." for n, c in only if c]
                 + ([f"Cells with noise are not compared: the noise differs ({_changes(*noise)})."]
                    if noise[0] != noise[1] else [])
                 + ([f"Cells with noise of {', '.join(unlike)} are not compared: the noised features' dims or "
                     "token states differ, and σ is not the same amount of noise on them."]
                    if unlike and noise[0] == noise[1] else [])
                 + [f"Failed groups in {n}: {', '.join(f['group'] for f in r['failed_groups'])}."
                    for n, r in ((other_name, other), (name, results)) if r.get("failed_groups")]):
        lines += ["", note]
    if not shared:
        return "\n".join(lines + ["", "The two sweeps hold no cell in common: nothing to compare."]) + "\n"
    gaps = {b: [100 * (mine[k]["accuracy_mean"] - theirs[k]["accuracy_mean"]) for k in shared if k[0] == b]
            for b in dict.fromkeys(k[0] for k in shared)}
    lines += ["", f"## Mean validation accuracy, {name} − {other_name} (points), over the cells both hold", "",
              *tables.markdown_table(["backbone", "cells", "mean", "min", "max"],
                                     [[b, len(d), f"{sum(d) / len(d):+z.2f}", f"{min(d):+z.2f}", f"{max(d):+z.2f}"]
                                      for b, d in gaps.items()], "lrrrr")]
    comps = [tables.comparison_index(r) for r in (results, other)]
    both = [k for k in comps[0] if k in comps[1] and same_noise(k)]
    sides = ("concat", "cross", "neither", "untested")
    side = lambda c: ("untested" if tables.untested(c["concat_minus_cross"], c["p_value"], c["n_seeds"]) else
                      tables.favoured(c["concat_minus_cross"], c["p_value"], c["n_seeds"]) or "neither")
    count = lambda cs: " / ".join(str(sum(side(c) == s for c in cs)) for s in sides)
    lines += ["", f"## Who is ahead (p < {tables.ALPHA}), over the comparisons both hold", ""]
    if not both:
        lines.append("No concat − cross comparison is in both sweeps (a comparison needs both methods in a cell).")
    else:
        changed = lambda k: "untested" not in (side(comps[0][k]), side(comps[1][k])) and side(comps[0][k]) != side(comps[1][k])
        by_backbone = {b: [k for k in both if k[0] == b] for b in dict.fromkeys(k[0] for k in both)}
        lines += tables.markdown_table(
            ["backbone", "comparisons", f"{other_name}: {' / '.join(sides)}", f"{name}: {' / '.join(sides)}",
             "changed side (of those tested in both)"],
            [[b, len(keys), count([comps[1][k] for k in keys]), count([comps[0][k] for k in keys]),
              sum(map(changed, keys))] for b, keys in by_backbone.items()], "lrllr")
    lines += ["", "## Every cell (mean validation accuracy, percent)", "",
              *tables.markdown_table(["backbone", "method", "scale", "σ", other_name, name, "difference"],
                                     [[b, m, s, f"{lv:g}", f"{pct(theirs[k]):.1f}", f"{pct(mine[k]):.1f}",
                                       f"{pct(mine[k]) - pct(theirs[k]):+z.1f}"] for k in shared for b, m, s, lv in [k]],
                                     "llrrrrr")]
    return "\n".join(lines) + "\n"
