"""Table 3, efficiency: exact parameter counts, forward FLOPs per sample from XLA's cost analysis of each head
as it was trained (cost.py, compiled for the host CPU), and measured training time per run, beside the
paper's Table 3. `table3(results)` returns (markdown, csv rows) as tables.table1 and table2 do."""

from __future__ import annotations

import itertools

import numpy as np

from fusion_jax import paper
from fusion_jax.tables import PAPER_REFERENCE, markdown_table


def feature_dims(results: dict, backbone: str) -> tuple[int, int] | None:
    """(d_v, d_t) of a backbone from the results' provenance, or None when not recorded."""
    prov = (results.get("backbones") or {}).get(backbone, {})
    if "dim_image" in prov and "dim_text" in prov:
        return int(prov["dim_image"]), int(prov["dim_text"])
    return None


def token_counts(results: dict, backbone: str) -> tuple[int, int] | None:
    """(image, text) token slots of a backbone's features as trained (0: pooled), or None for token features
    whose count results.json does not record (sweeps from before it did, except synthetic ones: their
    `tokens` is the count of both sides)."""
    prov = (results.get("backbones") or {}).get(backbone, {})
    if "tokens_image" in prov or "tokens_text" in prov:
        return int(prov.get("tokens_image", 0)), int(prov.get("tokens_text", 0))
    if type(prov.get("tokens")) is int:  # not bool: npz and extracted features say only whether
        return prov["tokens"], prov["tokens"]
    return None if prov.get("tokens") else (0, 0)


def forward_flops(results: dict) -> tuple[dict[tuple[str, str], float | None], str]:
    """FLOPs per sample per (backbone, method) from XLA's cost analysis, and a note on how (or why not):
    on each backbone's inputs as trained, pooled or [batch, tokens, d] (every slot, padding included)."""
    backbones = sorted({r["backbone"] for r in results["runs"]})
    counts = {b: token_counts(results, b) for b in backbones}
    known = {b: c for b, c in counts.items() if c is not None and any(c)}
    inputs = "pooled [batch, d] inputs"
    if known:
        pooled = any(c is None or not all(c) for c in counts.values())  # a pooled side, or counts not recorded
        inputs = ("the inputs each backbone was trained on, [batch, tokens, d] for token features (every slot "
                  "counted, padding included: " + "; ".join(
                      f"{b} " + ", ".join(f"{side} {n or 'pooled'}" for side, n in zip(("image", "text"), c))
                      for b, c in known.items()) + ")" + (" and [batch, d] for pooled ones" if pooled else ""))
    try:
        from fusion_jax.cost import counting_platform, forward_flops_per_sample
        platform, missing = counting_platform(), None
    except ImportError as e:
        platform, missing = "cpu", e
    where = ("the host CPU" if platform == "cpu" else f"{platform} (jax has no CPU backend here; its cost analysis may "
             "leave out library matmuls, so these may read low)")
    how = (f"XLA's cost analysis ('flops') of the head's eval-mode forward pass compiled for {where}, on {inputs}, "
           "divided by the batch size (`fusion_jax.cost.forward_flops_per_sample`), not counted by hand; on pooled "
           "inputs XLA drops `cross`'s query and key projections, which attention over a single key does not read")
    if unknown := [b for b, c in counts.items() if c is None]:
        how += (f" ({', '.join(unknown)}: trained on token features, but this results.json does not record their "
                "token counts, so the FLOPs are for pooled inputs)")
    if missing:
        return {}, f"{how}; n/a here: fusion_jax.cost is not available ({missing})"
    out, errors, shapes = {}, {}, {}  # shapes: one compilation per (method, dims, token counts)
    for b, m in sorted({(r["backbone"], r["method"]) for r in results["runs"]}):
        dims = feature_dims(results, b)
        if dims is None:
            out[(b, m)] = None
            errors[b] = "feature dims not recorded in results.backbones"
            continue
        try:
            key = (m, *dims, *(counts[b] or (0, 0)))
            if key not in shapes:
                shapes[key] = float(forward_flops_per_sample(m, *dims, results["config"], image_tokens=key[3],
                                                             text_tokens=key[4]))
            out[(b, m)] = shapes[key]
        except Exception as e:  # a broken cost model must not lose the rest of the report
            out[(b, m)] = None
            errors[f"{b}/{m}"] = f"{type(e).__name__}: {e}"
    return out, how + ("" if not errors else "; n/a for " + "; ".join(f"{k} ({v})" for k, v in errors.items()))


def _count(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def table3(results: dict) -> tuple[str, list[dict]]:
    """Table 3, efficiency: exact parameters, FLOPs per sample and measured training time per run."""
    flops, flops_note = forward_flops(results)
    dev = results.get("device", {})
    key = lambda r: (r["backbone"], r["method"], r["scale"])
    md_rows, csv_rows = [], []
    for (b, m, sc), group in itertools.groupby(sorted(results["runs"], key=key), key):
        group = list(group)
        params = sorted({r["params"] for r in group})
        base = [r["params"] for r in results["runs"] if r["backbone"] == b and r["method"] == "concat"]
        f, f_base = flops.get((b, m)), flops.get((b, "concat"))
        rel_p = params[0] / base[0] if base and len(params) == 1 else None
        rel_f = f / f_base if f is not None and f_base else None
        seconds = float(np.mean([r["train_seconds"] for r in group]))
        dims = feature_dims(results, b)
        dims_text = "n/a" if dims is None else f"{dims[0]} / {dims[1]}"
        md_rows.append(["ours", b, dims_text, m, sc, " / ".join(f"{p:,}" for p in params),
                        "–" if rel_p is None else f"{rel_p:.2f}", _count(f), "–" if rel_f is None else f"{rel_f:.2f}",
                        f"{seconds:.3g}", len(group)])
        csv_rows.append({"block": "ours", "source": "ours", "backbone": b, "dim_image": dims and dims[0],
                         "dim_text": dims and dims[1], "method": m, "scale": sc,
                         "params": params[0] if len(params) == 1 else " / ".join(map(str, params)),
                         "rel_params": None if rel_p is None else round(rel_p, 4),
                         "flops_per_sample": f,
                         "rel_flops": None if rel_f is None else round(rel_f, 4),
                         "train_seconds_per_run": round(seconds, 6), "runs": len(group)})
    lines = ["# Table 3: efficiency", "",
             f"**Ours**: exact parameter counts of the trained heads (from the runs; they depend on the feature "
             f"dims d_v / d_t). FLOPs per sample: {flops_note}. Training time: mean `train_seconds` per run, i.e. "
             "the training wall time of a group (all its scales × seeds × noise levels trained at once in one "
             "vmapped program, compilation excluded) shared among its runs in proportion to their steps, on "
             f"{dev.get('platform', '?')} "
             f"({dev.get('device_kind', '?')}); not comparable with one run trained alone. A group trains while the "
             "sweep compiles its later groups in worker threads, which on a CPU share its cores: compare a group's "
             "time with the same group in another sweep rather than with the other groups of this one.", ""]
    lines += markdown_table(["source", "backbone", "d_v / d_t", "method", "scale", "params", "params ÷ concat",
                             "FLOPs / sample", "FLOPs ÷ concat", "train s / run", "runs"], md_rows, "llllrrrrrrr")
    block = f"{PAPER_REFERENCE}, Table 3"
    lines += ["", f"## {block}", "",
              "The paper's figures (rounded as printed; 512 + 512 input dims; how FLOPs were counted is not stated). "
              "The paper reports no training time.", "",
              *markdown_table(["source", "method", "params", "params ÷ concat", "FLOPs / sample", "FLOPs ÷ concat"],
                              [[PAPER_REFERENCE, r["method"], f"{r['params']:,}", str(r["rel_params"]),
                                f"{r['flops_per_sample']:,}", str(r["rel_flops"])] for r in paper.table3()],
                              "llrrrr"),
              "", f"Paper: {paper.CITATION}."]
    csv_rows += [{"block": block, "source": "paper", "backbone": "CLIP ViT-B/32", "dim_image": 512, "dim_text": 512,
                  "method": r["method"], "scale": None, "params": r["params"], "rel_params": r["rel_params"],
                  "flops_per_sample": r["flops_per_sample"], "rel_flops": r["rel_flops"],
                  "train_seconds_per_run": None, "runs": None} for r in paper.table3()]
    return "\n".join(lines) + "\n", csv_rows
