"""The report's figures (PNG, matplotlib Agg): accuracy vs scale, concat advantage vs noise, training loss
per epoch, t-SNE."""

from __future__ import annotations

import glob
import os
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fusion_jax import metrics as metrics_lib  # noqa: E402
from fusion_jax import paper, tables  # noqa: E402
from fusion_jax.files import atomic_write, safe_name  # noqa: E402

COLORS = {"concat": "tab:blue", "cross": "tab:red"}
MARKERS = {"concat": "o", "cross": "^"}  # the methods apart in greyscale too
MODALITY_COLORS = {"image": "tab:blue", "text": "tab:orange"}
TSNE_LINKED_PAIRS = 40


def backbones(results: dict) -> list[str]:
    """Backbones in the results, in config order."""
    present = {s["backbone"] for s in results["summary"]}
    order = [b for b in results["config"].get("backbones", []) if b in present]
    return order + sorted(present - set(order))


def _save(fig: plt.Figure, path: str) -> str:
    """Save a figure atomically as PNG and close it."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), binary=True)
    finally:
        plt.close(fig)
    return path


def _panels(n: int, width: float = 5.6, height: float = 4.4, sharey: bool = False) -> tuple[plt.Figure, list]:
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False, layout="constrained", sharey=sharey)
    return fig, list(axes[0])


def _apart(n: int, step: float) -> list[float]:
    """Offsets that set n series side by side around their x values, `step` apart (their error bars
    would hide each other otherwise)."""
    return [step * (i - (n - 1) / 2) for i in range(n)]


def _short(name: str) -> str:
    """A model's name for a title: a local folder's last part, a hub id whole."""
    name = str(name).rstrip("/")
    return os.path.basename(name) if name.startswith(("<cache>", "/", ".", "~")) else name


def panel_title(results: dict, backbone: str) -> str:
    """'backbone clip (pooled, d_v 512, d_t 512)' and its models' names below: what a panel's features
    are, so that two sweeps' figures (or a tiny model and the paper's) are not taken for each other."""
    prov = results.get("backbones", {}).get(backbone, {})
    what = ["token states" if prov.get("tokens") else "pooled"]
    if "dim_image" in prov:
        what.append(f"d_v {prov['dim_image']}, d_t {prov.get('dim_text', '?')}")
    names = " + ".join(_short(prov[k]) for k in ("model", "text_model", "file") if prov.get(k))
    return f"backbone {backbone} ({', '.join(what)})" + (f"\n{names}" if names else "")


def _legend_below(fig: plt.Figure, axes: list, extra: list = ()) -> None:
    """One legend for all panels, below them: each label once, in the order first drawn."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    for handle in extra:
        seen.setdefault(handle.get_label(), handle)
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=min(3, len(seen)), fontsize=8)


def accuracy_vs_scale(results: dict, path: str) -> str | None:
    """Accuracy (level 0) against scale per method, one panel per backbone, with the majority baseline;
    None when no run finished."""
    summ = [s for s in results["summary"] if tables.level(s) == 0.0]
    names = [b for b in backbones(results) if any(s["backbone"] == b for s in summ)]
    if not names:
        return None
    fig, axes = _panels(len(names), sharey=True)
    for ax, b in zip(axes, names):
        rows = [s for s in summ if s["backbone"] == b]
        scales = sorted({s["scale"] for s in rows})
        methods = sorted({s["method"] for s in rows} | ({"concat", "cross"} if tables.is_paper_setting(results, b)
                                                         else set()))
        shift = dict(zip(methods, _apart(len(methods), 0.05)))  # in octaves, on the log₂ axis
        for m in sorted({s["method"] for s in rows}):
            pts = sorted((s for s in rows if s["method"] == m), key=lambda s: s["scale"])
            ax.errorbar([s["scale"] * 2 ** shift[m] for s in pts], [100 * s["accuracy_mean"] for s in pts],
                        yerr=[100 * (s["accuracy_std"] or 0.0) for s in pts], color=COLORS.get(m),
                        marker=MARKERS.get(m, "o"), capsize=4, label=f"{m} (ours)")
        base = [100 * np.mean([s["majority_baseline_mean"] for s in rows if s["scale"] == sc]) for sc in scales]
        ax.plot(scales, base, "k--", lw=1.2, label="majority-class baseline (ours)")
        if tables.is_paper_setting(results, b):
            for m in ("concat", "cross"):
                pts = [r for r in paper.table1() if r["method"] == m]
                ax.errorbar([r["scale"] * 2 ** shift[m] for r in pts], [r["acc_mean"] for r in pts],
                            yerr=[r["acc_std"] for r in pts], color=COLORS[m], ls=":", marker=MARKERS[m], mfc="none",
                            capsize=3,
                            label=f"{m}: paper, Flickr8k CLIP (hollow, dotted)")
                scales = sorted(set(scales) | {r["scale"] for r in pts})
        ax.set_xscale("log", base=2)
        ax.set_xticks(scales, [str(s) for s in scales])
        ax.minorticks_off()
        ax.set_xlabel("pairs per run (scale; log₂ axis)")
        ax.set_title(panel_title(results, b), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    _legend_below(fig, axes)
    fig.suptitle(f"Accuracy vs data scale, no noise: {tables.data_label(tables.data_of(results))}, "
                 f"{tables.split_text(results, short=True)}\n"
                 + ("mean of 1 seed (no std)" if all(s["n_seeds"] == 1 for s in summ)
                    else f"mean ± std over {tables.seeds_text(summ)}"), fontsize=11)
    return _save(fig, path)


def noise_advantage(results: dict, path: str) -> str | None:
    """Concat − cross accuracy (points) against noise sigma per backbone and scale, the paper's Table 2 beside
    ours only in its setting (`tables.is_paper_noise`); None without a noise study."""
    settings = tables.noise_settings(results)
    if not settings:
        return None
    cfg = results["config"]
    comps, holm = tables.comparison_index(results), tables.holm_index(results)
    cells = [comps[(b, sc, lv)] for b, sc, levels in settings for lv in levels if (b, sc, lv) in comps]
    one_seed = all(c["n_seeds"] < 2 for c in cells)
    untested = any(tables.untested(c["concat_minus_cross"], c["p_value"], c["n_seeds"]) for c in cells)
    scales = sorted({sc for _, sc, _ in settings})  # one colour per scale in every panel
    color = {sc: plt.cm.viridis(i / max(1, len(scales) - 1) * 0.85) for i, sc in enumerate(scales)}
    levels_all = sorted({lv for _, _, levels in settings for lv in levels})
    step = 0.12 * (min(np.diff(levels_all)) if len(levels_all) > 1 else max(0.1, levels_all[0]))
    names = [b for b in backbones(results) if any(s[0] == b for s in settings)]
    fig, axes = _panels(len(names), sharey=True)
    p_sig = paper.table2()
    for ax, b in zip(axes, names):
        mine = sorted(s for s in settings if s[0] == b)
        for i, (_, sc, levels) in enumerate(mine):
            diffs = [tables.paired_differences(results, b, sc, lv) for lv in levels]
            mean, err = zip(*[(100 * m, 100 * (s or 0.0)) for m, s in map(metrics_lib.mean_std, diffs)])
            x = [lv + _apart(len(mine), step)[i] for lv in levels]
            ax.errorbar(x, mean, yerr=err if any(len(d) > 1 for d in diffs) else None, color=color[sc],
                        marker="o", mfc="none", capsize=4, label=f"ours, scale {sc}")
            sig = [(xi, y) for xi, lv, y in zip(x, levels, mean)
                   if (c := comps.get((b, sc, lv))) and tables.favoured(c["concat_minus_cross"], c["p_value"],
                                                                        c["n_seeds"])]
            if sig:
                ax.plot(*zip(*sig), "o", color=color[sc], ls="none")
            held = [(xi, y) for xi, lv, y in zip(x, levels, mean) if (xi, y) in sig and holm[(b, sc, lv)] < tables.ALPHA]
            if held:
                ax.plot(*zip(*held), "o", ms=12, mfc="none", mew=1.5, color=color[sc], ls="none")
        if tables.is_paper_noise(results, b):
            ax.plot([r["sigma"] for r in p_sig], [r["advantage_pp"] for r in p_sig], "k--", marker="s",
                    label=f"paper ({paper.SETTING}), Table 2 (scale not stated)")
        ax.axhline(0.0, color="gray", lw=1)
        ax.set_xlabel(f"noise σ on {cfg.get('degradation', {}).get('modality', 'image')} features (std, before re-normalizing)")
        ax.set_title(panel_title(results, b), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("concat − cross accuracy (percentage points)\n> 0: concat better, < 0: cross better")
    marks = [] if one_seed else [plt.Line2D([], [], marker="o", color="gray", ls="none",
                                            label=f"ours, filled: p < {tables.ALPHA} (paired t-test)"),
                                 plt.Line2D([], [], marker="o", ms=12, mfc="none", mew=1.5, color="gray", ls="none",
                                            label="ringed: also after Holm's correction (summary.md)")]
    marks.append(plt.Line2D([], [], marker="o", color="gray", mfc="none", ls="none",
                            label="ours, hollow: untested (1 seed)" if one_seed else
                            "ours, hollow: not significant" + (" or untested" if untested else "")))
    _legend_below(fig, axes, marks)
    fig.suptitle(f"Concat advantage under Gaussian noise: {tables.data_label(tables.data_of(results))}, "
                 f"{tables.split_text(results, short=True)}\n"
                 + ("1 seed: the differences of single runs, no error bars" if one_seed else
                    f"error bars: std of the per-seed paired differences ({tables.seeds_text(cells)})"), fontsize=11)
    return _save(fig, path)


def training_loss(results: dict, path: str) -> str | None:
    """Each epoch's mean training loss (mean over seeds) per method and scale without noise, one panel per
    backbone, beside ln 2 (a 50/50 guess); None where no run without noise records its losses (results of
    older code, or a sweep with noise levels above 0 alone)."""
    clean = [r for r in results.get("runs") or [] if tables.level(r) == 0.0]
    runs = [r for r in clean if r.get("train_loss_by_epoch")]
    names = [b for b in backbones(results) if any(r["backbone"] == b for r in runs)]
    if not names:
        return None
    epochs = max(len(r["train_loss_by_epoch"]) for r in runs)
    cells = {}  # (backbone, method, scale) -> its runs' curves, NaN where not recorded (padded to `epochs`)
    for r in runs:
        curve = [np.nan if x is None else x for x in r["train_loss_by_epoch"]]
        cells.setdefault((r["backbone"], r["method"], r["scale"]), []).append(curve + [np.nan] * (epochs - len(curve)))
    scales = sorted({r["scale"] for r in runs})
    color = {sc: plt.cm.viridis(i / max(1, len(scales) - 1) * 0.85) for i, sc in enumerate(scales)}
    fig, axes = _panels(len(names), sharey=True)
    seeds = set()
    for ax, b in zip(axes, names):
        for m in ("concat", "cross"):
            for sc in scales:
                cell = cells.get((b, m, sc))
                if not cell:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # an epoch no seed recorded: a gap
                    mean = np.nanmean(cell, axis=0)
                seeds.add(len(cell))
                ax.plot(np.arange(1, epochs + 1), mean, color=color[sc], ls="-" if m == "concat" else "--",
                        marker=MARKERS.get(m, "o"), ms=4, label=f"{m}, scale {sc}")
        ax.axhline(np.log(2), color="gray", lw=1, ls=":", label="ln 2: a 50/50 guess")
        ax.set_xlabel("epoch")
        ax.set_title(panel_title(results, b), fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if np.nanmax([c for cell in cells.values() for c in cell], initial=0.0) > 4 * np.log(2):
        axes[0].set_yscale("log")  # a diverged run would flatten every other curve on a linear axis
    axes[0].set_ylabel("mean training loss in the epoch\n(cross-entropy, dropout on)")
    _legend_below(fig, axes)
    n = sorted(seeds)
    missing = len(clean) - len(runs)
    notes = ([f"{missing} run{'s' if missing > 1 else ''} without noise recorded no losses (older code): not drawn"]
             if missing else [])
    notes += (["an epoch a run did not record (a resume of older checkpoints) is left out of its mean"]
              if any(None in r["train_loss_by_epoch"] for r in runs) else [])
    fig.suptitle(f"Training loss per epoch, no noise: {tables.data_label(tables.data_of(results))}, "
                 f"{tables.split_text(results, short=True)}\n"
                 f"each method and scale the mean over {n[0] if len(n) == 1 else f'{n[0]}-{n[-1]}'} "
                 f"seed{'s' if n[-1] != 1 else ''}; solid concat, dashed cross"
                 + "".join(f"\n{note}" for note in notes), fontsize=11)
    return _save(fig, path)


def tsne_files(workdir: str, names: list[str]) -> list[tuple[str, str]]:
    """(backbone, path) of each `tsne_<backbone>.npz` in workdir, backbones of the results first."""
    found = {os.path.basename(p)[len("tsne_"):-len(".npz")]: p for p in glob.glob(os.path.join(workdir, "tsne_*.npz"))}
    safe = {safe_name(b): b for b in names}
    order = [s for s in safe if s in found] + sorted(set(found) - set(safe))
    return [(safe.get(s, s), found[s]) for s in order]


def tsne_embedding(image: np.ndarray, text: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, bool]:
    """2-d t-SNE of image and text rows; joint when d_v == d_t, else after separate PCA to a common dim."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(image)
    joint = image.shape[1] == text.shape[1]
    if joint:
        x = np.concatenate([image, text]).astype(np.float64)
        if x.shape[1] > 50:  # to at most 50 dims, and no more than the rows
            x = PCA(min(50, len(x)), random_state=seed).fit_transform(x)
    else:
        k = min(image.shape[1], text.shape[1], 50, n)
        x = np.concatenate([PCA(k, random_state=seed).fit_transform(image.astype(np.float64)),
                            PCA(k, random_state=seed).fit_transform(text.astype(np.float64))])
    perplexity = float(min(30.0, (len(x) - 1) / 3.0))
    with threadpool_limits(1):  # OpenMP threads of the Barnes-Hut step slow it ~10x on a busy small machine
        y = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return y[:n], y[n:], joint


def tsne(workdir: str, results: dict, path: str) -> str | None:
    """t-SNE of matched image-text pairs, one panel per `tsne_<backbone>.npz`; None when there is none."""
    files = tsne_files(workdir, backbones(results))
    if not files:
        return None
    fig, axes = _panels(len(files), 5.6, 5.4)
    for ax, (b, f) in zip(axes, files):
        with np.load(f) as z:
            image, text = z["image"], z["text"]
        n = min(len(image), len(text))
        finite = np.isfinite(image[:n]).all(axis=1) & np.isfinite(text[:n]).all(axis=1)
        image, text, dropped, n = image[:n][finite], text[:n][finite], n - int(finite.sum()), int(finite.sum())
        note = f"\n{dropped} pairs with NaN or Inf features left out" if dropped else ""
        # the sample holds a token sweep's masked means (`feature_report.tsne_sample`)
        what = "means of token states" if results.get("backbones", {}).get(b, {}).get("tokens") else "pooled"
        same = [m for m, x in (("image", image), ("text", text)) if n and not np.ptp(x, axis=0).any()]
        if n < 4 or same:  # scikit-learn's t-SNE crashed the process on features that are all alike
            why = f"too few pairs with finite features ({n})" if n < 4 else \
                f"all {n} pairs have the same {' and '.join(same)} features: no t-SNE"
            ax.set_title(f"backbone {b}: {why}{note}", fontsize=9)
            ax.set_axis_off()
            continue
        img, txt, joint = tsne_embedding(image, text)
        if joint:  # apart, a pair's two positions are in two unrelated maps: no line between them
            linked = np.random.default_rng(0).choice(n, min(TSNE_LINKED_PAIRS, n), replace=False)
            for j, i in enumerate(linked):
                ax.plot([img[i, 0], txt[i, 0]], [img[i, 1], txt[i, 1]], color="black", lw=0.8, alpha=0.6, marker=".",
                        ms=5, zorder=3, label=f"matched pair ({len(linked)} of {n} marked)" if j == 0 else None)
        ax.scatter(img[:, 0], img[:, 1], s=6, color=MODALITY_COLORS["image"], alpha=0.6, label="image features")
        ax.scatter(txt[:, 0], txt[:, 1], s=6, color=MODALITY_COLORS["text"], alpha=0.6, label="text features")
        if joint:
            title = f"backbone {b}: joint t-SNE of {n} pairs ({what}, d = {image.shape[1]})"
        else:
            title = (f"backbone {b}: {n} pairs ({what}), d_v = {image.shape[1]}, d_t = {text.shape[1]}\n"
                     f"each modality PCA'd to {min(image.shape[1], text.shape[1], 50, n)}-d separately\n"
                     "separate spaces: positions are not comparable across modalities")
        ax.set_title(title + note, fontsize=9)
        ax.set_xlabel("t-SNE 1 (no units)")
        ax.set_ylabel("t-SNE 2 (no units)")
        ax.legend(fontsize=8, markerscale=2)
    fig.suptitle("t-SNE of image and text features of matched pairs, coloured by modality: "
                 f"{tables.data_label(tables.data_of(results))}", fontsize=11)
    return _save(fig, path)
