"""The benchmark's Markdown report (`python -m fusion_jax.bench` writes it beside its JSON): the grid, the
totals of both sides, a per-group table and what the FLOP counts mean."""

from __future__ import annotations

import numpy as np

from fusion_jax.summary import source_text


def _precision_note(precision: dict | None) -> str:
    """The sides' float32 matmul precisions, for the report's first paragraph."""
    if not precision:
        return ""
    return (f" Float32 matmul precision: jax {precision['jax']} (the peak's and the training's), "
            f"torch {precision['torch']} (both columns' % of peak are against this jax peak).")


def markdown(r: dict) -> str:
    """The benchmark's Markdown report: the totals and a per-group table."""
    j, t, g = r["jax"], r["torch"], r["grid"]
    est = " (est.)" if t.get("estimated") else ""
    # With an estimated reference, both columns average the runs the reference trained (fewer seeds and levels).
    same = t.get("estimated") and all("trained_index" in x and "accuracy_per_run" in y for x, y in zip(t["groups"],
                                                                                                 j["groups"]))
    jax_acc = lambda x, y: (np.mean([x["accuracy_per_run"][i] for i in y["trained_index"]]) if same
                            else x["accuracy_mean"])
    acc = lambda m: (np.mean([jax_acc(x, y) for x, y in zip(j["groups"], t["groups"]) if f"-{m}" in x["group"]]),
                     np.mean([y["accuracy_mean"] for y in t["groups"] if f"-{m}" in y["group"]]))
    peak_devices = r["matmul_peak"].get("jax_devices", 1)
    peak_of = f" (fusion_jax: against {peak_devices} devices' peak)" if peak_devices > 1 else ""
    env = r.get("env", {})
    devices_env = f" (JAX_NUM_CPU_DEVICES={env['JAX_NUM_CPU_DEVICES']})" if "JAX_NUM_CPU_DEVICES" in env else ""
    lines = [f"# Benchmark `{r['grid_name']}` on {r['device']['name']} ({r['device']['device_kind']})", "",
             f"Made by `{r['command']}`{source_text(r)}; jax {r['versions']['jax']}, torch {r['versions']['torch']} "
             f"(on {t['device']}). {g['runs']} runs in {len(g['groups'])} groups: backbones "
             f"{', '.join(g['backbones'])}, scales {', '.join(map(str, g['scales']))}, seeds "
             f"{', '.join(map(str, g['seeds']))}, noise levels {', '.join(f'{x:g}' for x in g['noise_levels'])} "
             f"on {g['noise_backbone']} at scale {g['noise_scale']}, {g['epochs']} epochs, batch {g['batch_size']}; "
             f"features {g['n_images']} images x {g['captions_per_image']} captions, {g['dim']}-d (synthetic, "
             f"Flickr8k's shape for full/quick). Matmul peak ({g['matmul_size']}² float32, jax): "
             f"{r['matmul_peak']['gflops']:.1f} GFLOP/s." + _precision_note(r.get("matmul_precision")) + " Load average (1, 5, 15 min) at start "
             f"{', '.join(f'{x:.2f}' for x in r['load_average']['start'])}, at end "
             f"{', '.join(f'{x:.2f}' for x in r['load_average']['end'])}. Order: {r.get('order', 'jax, then torch')}."
             + _cache_note(j.get("compilation_cache", {})), "",
             "| | fusion_jax (vmapped groups) | PyTorch reference (sequential) |", "|---|---:|---:|",
             f"| wall time (s) | {j['wall_s']:.1f} | {t['wall_s']:.1f}"
             + (f" (estimated; {t['measured_wall_s']:.1f} s measured for {sum(x['trained_runs'] for x in t['groups'])}"
                f" of {t['runs']} runs: {t['runs_per_scale']} per group and scale, the rest at their seconds per step)"
                if t.get("estimated") else "") + " |",
             f"| compilation, in {j['workers']} worker thread(s) (s) | {j['compile_s']:.1f} | – |",
             f"| of the wall time, waiting for compilation (s) | {j['wait_s']:.1f} | – |",
             f"| of the wall time, training epochs (s) | {j['train_s']:.1f} | – |",
             f"| runs per second | {j['runs_per_s']:.3f} | {t['runs_per_s']:.3f}{est} |",
             f"| achieved GFLOP/s (wall) | {j['achieved_gflops']:.1f} | {t['achieved_gflops']:.1f}{est} |",
             f"| % of matmul peak (wall){peak_of} | {100 * j['fraction_of_peak']:.1f} | "
             f"{100 * t['fraction_of_peak']:.1f}{est} |",
             f"| achieved GFLOP/s, % of peak (training epochs only){peak_of} | {j['achieved_gflops_steady']:.1f}, "
             f"{100 * j['fraction_of_peak_steady']:.1f} | – |",
             f"| devices, threads | {r['device']['count']} jax {r['device']['platform']} device(s){devices_env}, "
             f"XLA's threads, chunks of {'/'.join(sorted({str(x.get('runs_per_chunk', '-')) for x in j['groups']}))} "
             f"runs, lanes {'/'.join(sorted({str(x.get('lanes', 1)) for x in j['groups']}))} | "
             f"{t['threads'] if t['device'] == 'cpu' else '– (GPU)'} |",
             "| torch ms per concat step, 1 thread / all | – | "
             + " / ".join(f"{v:.2f}" for v in t["thread_check"].values()) + " |"]
    over = ("the runs the reference trained" if same else
            "fusion_jax: all runs; the reference: the runs it trained" if t.get("estimated") else "all runs")
    lines += [f"| mean val. accuracy (mean of the groups' means, {over}), {m} | {acc(m)[0]:.3f} | {acc(m)[1]:.3f} |"
              for m in g["methods"]]
    lines += ["", f"**Speed-up: {r['speedup']['wall']:.2f}x**{' (against the estimated reference time)' if t.get('estimated') else ''} wall time, compilation included "
              f"({r['speedup']['excluding_compile']:.2f}x without the time spent waiting for it)."
              + _repeats_note(r.get("repeats", {})), "",
              "| group | runs | scales | steps, all runs | jax compile (s) | jax waited (s) | jax train (s) "
              "| torch wall (s) |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for a, b in zip(j["groups"], t["groups"]):
        lines.append(f"| {a['group']} | {a['runs']} | {', '.join(map(str, a['scales']))} | {sum(a['steps_per_run'])} | "
                     f"{a['compile_s']:.2f} | {a['wait_s']:.2f} | {a['train_s']:.2f} | {b['wall_s']:.2f}"
                     f"{' (est.)' if b.get('estimated') else ''} |")
    executed = sum(x["executed_flops"] for x in j["groups"]) / j["train_flops"]
    counted = r["flops"].get("platform", "cpu")
    counted = ("the host CPU" if counted == "cpu" else f"{counted} (jax had no CPU backend; its cost analysis may "
               "leave out library matmuls, so the counts may read low)")
    lines += ["", f"FLOPs: XLA's cost analysis of one training step compiled for {counted}, per run "
              + ", ".join(f"{m} {f / 1e6:.1f} M" for m, f in r["flops"]["train_step_per_run"].items())
              + " (forward, backward, AdamW, gather, and the noise draw where a group has a nonzero level), times "
              "each run's steps; the same count for both "
              "columns, though on pooled features the reference also computes cross's attention query and key "
              "projections, which one key leaves unused and XLA drops (a third more FLOPs per cross step). "
              f"fusion_jax executed {executed:.2f}x that work: a chunk of runs steps until its longest run "
              "is done (on a GPU, through its group's longest run), and empty slots fill chunks (groups.layout).",
              "", "Each side initialises as its framework does by default (torch's Linear init is about 1.7x "
              "smaller than flax's lecun-normal), which moves the accuracies at lr 1e-4 and few epochs; each "
              "step computes the same function (tests/test_reference_parity.py: same init, same trajectory).",
              "", "Outside both timed walls: jax's start-up (the first matmul-peak measurement) and torch's warm-up "
              "(the thread check)."
              + (f" fusion_jax trains on {r['device']['count']} jax devices; the reference on one GPU or on the CPU's "
                 "threads." if r['device'].get('count', 1) > 1 else "")]
    return "\n".join(lines) + "\n"


def _repeats_note(rep: dict) -> str:
    """The Markdown's sentence on repeated rounds ("" for one round)."""
    if rep.get("rounds", 1) == 1:
        return ""
    secs = lambda xs: ", ".join(f"{x:.1f}" for x in xs)
    ratios = rep["speedup_per_round"]
    return (f" Both sides ran {rep['rounds']} times, in turn; the tables show each side's median run. Wall "
            f"times: fusion_jax {secs(rep['jax_wall_s'])} s, the reference {secs(rep['torch_wall_s'])} s; "
            f"per round {', '.join(f'{x:.2f}x' for x in ratios)} (from {min(ratios):.2f}x to {max(ratios):.2f}x).")


def _cache_note(cache: dict) -> str:
    """The Markdown's sentence on the persistent compilation cache ("" without one)."""
    if not cache.get("dir"):
        return ""
    hits, misses = cache["hits"], cache["misses"]
    state = ("none of its programs went through it" if not hits and not misses else
             "warm: its programs were loaded, not compiled, so the compilation rows below are mostly loading"
             if not misses else "cold: its programs were compiled" if not hits else
             "partly warm: some programs were loaded, the others compiled")
    return (f" fusion_jax's programs went through JAX's persistent compilation cache ({hits} hits, {misses} "
            f"misses: {state}).")
