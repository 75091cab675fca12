"""A sweep's report again: python -m fusion_jax.report --workdir=DIR [--against=OTHER]

Rebuilds DIR's summary.md, tables 1-3 (.md, .csv) and figures from DIR/results.json alone (the sweep
writes them at its end too). With --against=OTHER (another finished sweep's folder) it writes
DIR/against_<other>.md instead: the two sweeps' config and feature differences and what they moved.
Exit status: 0 written, 1 a figure could not be drawn (the rest is written), 2 a usage error or a
results.json that cannot be read or drawn (nothing is written).
"""

# The module is the one results writer: results.json (the interface later tools read), runs.csv,
# summary.md (drawn by `summary.summary_markdown`) and the side-by-side report (`render_report`, tables
# 1-3 beside the paper's, figures), which `write_results` runs at the end of every sweep.

from __future__ import annotations

import csv
import functools
import importlib.metadata
import io
import itertools
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback
from typing import Any, NoReturn

import jax

from fusion_jax import efficiency
from fusion_jax import metrics as metrics_lib
from fusion_jax import tables
from fusion_jax.against import against_markdown
from fusion_jax.cli import command_line
from fusion_jax.files import atomic_write_json, atomic_write_text, safe_name
from fusion_jax.summary import summary_markdown
from fusion_jax.workdir import finished_group_names, sweeping_in

log = logging.getLogger("fusion_jax")
_HOST = re.sub(r"[^\w.]", "_", socket.gethostname()) or "host"  # in a draft folder's name
_PACKAGES = {"jax": "jax", "flax": "flax", "optax": "optax", "orbax": "orbax-checkpoint",
             "transformers": "transformers"}


def versions() -> dict[str, str | None]:
    """Python and library versions (None for a library that is not installed)."""
    out = {"python": platform.python_version(), "fusion_jax": None}
    for key, dist in {"fusion_jax": "fusion_jax", **_PACKAGES}.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


def source() -> dict:
    """The code that ran: {"commit", "dirty"} of the git checkout fusion_jax is imported from (dirty: its
    tracked files under fusion_jax/ or configs/ differ from the commit), both None outside one (a wheel).
    Read once per process (per checkout), when first asked: the code a process runs is the code it
    imported, and a later edit to the files does not change it."""
    return dict(_source_of(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@functools.cache
def _source_of(root: str) -> tuple:
    git = lambda *args: subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30,
                                       check=True).stdout.strip()
    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return ("commit", None), ("dirty", None)  # a checkout around an installed copy is not its source
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "fusion_jax", "configs")
        return ("commit", git("rev-parse", "HEAD")), ("dirty", bool(changed))
    except (OSError, subprocess.SubprocessError):
        return ("commit", None), ("dirty", None)


def device() -> dict:
    """The device that ran, with jax's float32 matmul precision ("default": TF32 on NVIDIA GPUs since Ampere)."""
    return {**_kind(jax.devices()[0]), "count": jax.device_count(),
            "processor": platform.processor() or platform.machine()}


def run_device() -> dict:
    """Where this process trains its groups: a run record's `device` (processes of one sweep may run on other
    hardware, and a resume elsewhere: results.json's `device` is its writer's)."""
    return {**_kind(jax.local_devices()[0]), "local_devices": jax.local_device_count()}


def _kind(d: jax.Device) -> dict:
    return {"platform": d.platform, "device_kind": d.device_kind,
            "matmul_precision": jax.config.jax_default_matmul_precision or "default"}


def _cell(run: dict, *fields: str) -> tuple:
    deg = run["degradation"]
    values = {**run, "kind": deg["kind"], "level": deg["level"]}
    return tuple(values[f] for f in fields)


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds per (backbone, method, scale, degradation)."""
    key = lambda r: _cell(r, "backbone", "method", "scale", "kind", "level")
    out = []
    for (backbone, method, scale, kind, level), group in itertools.groupby(sorted(runs, key=key), key):
        group = list(group)
        row = {"backbone": backbone, "method": method, "scale": scale,
               "degradation": {"kind": kind, "level": level}}
        for name in metrics_lib.METRICS:
            row[f"{name}_mean"], row[f"{name}_std"] = metrics_lib.mean_std([r["metrics"][name] for r in group])
        row["majority_baseline_mean"] = metrics_lib.mean_std([r["majority_baseline"] for r in group])[0]
        row["n_seeds"] = len(group)
        out.append(row)
    return out


def compare(runs: list[dict]) -> list[dict]:
    """concat minus cross accuracy per (backbone, scale, degradation), paired over seeds (t-test)."""
    key = lambda r: _cell(r, "backbone", "scale", "kind", "level")
    out = []
    for (backbone, scale, kind, level), group in itertools.groupby(sorted(runs, key=key), key):
        concat, cross = tables.seed_pairs(list(group))
        if not concat:
            continue
        diff, p = metrics_lib.paired_difference(concat, cross)
        out.append({"backbone": backbone, "scale": scale, "degradation": {"kind": kind, "level": level},
                    "concat_minus_cross": diff, "p_value": p, "n_seeds": len(concat)})
    return out


def _writing(workdir: str) -> str:
    """What a report writes, said before it does (a t-SNE, drawn from the sweep's samples, takes seconds of
    silence)."""
    tsne = any(n.startswith("tsne_") and n.endswith(".npz") for n in os.listdir(workdir))
    return "summary.md, tables 1-3, then the figures" + (" (a t-SNE takes seconds per backbone)" if tsne else "")


FIGURES = ("fig_accuracy_vs_scale.png", "fig_noise.png", "fig_training_loss.png", "fig_tsne.png")
_CSV_FIELDS = ("backbone", "method", "scale", "seed", "degradation_kind", "degradation_level", "accuracy", "f1",
               "precision", "recall", "majority_baseline", "params", "train_seconds", "final_train_loss")


def runs_csv(runs: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in runs:
        w.writerow({**{k: r[k] for k in _CSV_FIELDS if k in r}, **r["metrics"],
                    "degradation_kind": r["degradation"]["kind"], "degradation_level": r["degradation"]["level"]})
    return buf.getvalue()


def write_results(workdir: str, config_dict: dict, runs: list[dict], command: str | None = None,
                  backbones: dict | None = None, failures: list[dict] | None = None,
                  timing: dict | None = None) -> dict:
    """Assemble and write results.json and runs.csv (each atomically), then the report (render_report:
    summary.md, tables, figures); return the dict.

    `backbones` maps each backbone to its features' provenance, including the measured alignment;
    `timing`: {"seconds", "groups_trained", "groups"} of the process that wrote the results (and "trained_by").
    """
    results = {"command": command, "source": source(), "config": config_dict, "versions": versions(),
               "device": device(), "timing": timing, "backbones": backbones or {}, "failed_groups": failures or [],
               "runs": runs, "summary": summarize(runs), "comparisons": compare(runs)}
    atomic_write_text(os.path.join(workdir, "runs.csv"), runs_csv(runs))
    atomic_write_json(os.path.join(workdir, "results.json"), results)
    log.info("writing the report (%s)", _writing(workdir))
    try:
        render_report(results, workdir)  # a figure that fails is logged there
    except Exception:  # noqa: BLE001 - results.json is on disk: the report's failure must not fail the sweep
        log.exception("the report's summary.md and tables failed (the earlier ones, if any, stay); results.json is "
                      "written. Retry with `python -m fusion_jax.report --workdir=%s`", workdir)
    return results


def render_report(results: dict, workdir: str, failed: list[str] | None = None) -> list[str]:
    """Write summary.md, tables 1-3 (md + csv, beside the paper's) and the figures into `workdir`; return
    the paths written. Everything here is rebuilt from `results` alone (`python -m fusion_jax.report`).

    The text files all or nothing: drawn in a folder of their own in `workdir`, then moved in, so that a
    report that fails half-way (a results.json edited by hand, say) raises and leaves the earlier one as it
    was. Then each figure on its own: one that cannot be drawn is logged with its error and named in
    `failed`, and the others are drawn."""
    _remove_abandoned_drafts(workdir)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f".report-{_HOST}-{os.getpid()}-") as draft:
        names = _write_texts(results, draft)
        for name in names:
            os.replace(os.path.join(draft, name), os.path.join(workdir, name))
    written = [os.path.join(workdir, name) for name in names]
    for name in FIGURES:
        try:
            drawn = _draw_figure(name, results, workdir)
        except Exception:  # noqa: BLE001 - the tables are written: a figure's failure is its own, and logged
            log.exception("%s cannot be drawn", os.path.join(workdir, name))
            drawn = None
            if failed is not None:
                failed.append(name)
        if drawn is not None:
            written.append(drawn)
    return written


def _draw_figure(name: str, results: dict, workdir: str) -> str | None:
    """Figure `name` drawn into `workdir`: its path, or None where `results` have nothing for it. A figure of the
    results that is not drawn now (nothing to draw, or an error, raised) is removed: it showed earlier results.
    The t-SNE comes from the sweep's sample files, which a rebuilt report may not have: an old one stays."""
    from fusion_jax import figures  # matplotlib and scikit-learn only when a report is drawn

    path, drawn = os.path.join(workdir, name), None
    draw = {"fig_accuracy_vs_scale.png": figures.accuracy_vs_scale, "fig_noise.png": figures.noise_advantage,
            "fig_training_loss.png": figures.training_loss, "fig_tsne.png": functools.partial(figures.tsne, workdir)}[name]
    try:
        drawn = draw(results, path)
    finally:
        if drawn is None and name != "fig_tsne.png" and os.path.exists(path):
            os.remove(path)
    return drawn


def _write_texts(results: dict, out: str) -> list[str]:
    """summary.md and tables 1-3 (.md, .csv), written into `out`; their names."""
    names = ["summary.md"]
    atomic_write_text(os.path.join(out, "summary.md"), summary_markdown(results))
    for name, make in (("table1", tables.table1), ("table2", tables.table2), ("table3", efficiency.table3)):
        md, rows = make(results)
        for ext, text in (("md", md), ("csv", tables.to_csv(rows))):
            atomic_write_text(os.path.join(out, f"{name}.{ext}"), text)
            names.append(f"{name}.{ext}")
    return names


def _remove_abandoned_drafts(workdir: str) -> None:
    """Remove the `.report-<host>-<pid>-*` folders of this host's reports whose process is gone (killed while
    drawing); another host's (a shared filesystem) are left, as this host cannot see its processes."""
    for name in os.listdir(workdir):
        if (m := re.fullmatch(rf"\.report-{re.escape(_HOST)}-(\d+)-\w+", name)) and not _alive(int(m[1])):
            shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a process of another user's counts; a pid out of range
    does not)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    return True


_NUMBER = (int, float)
# What the report reads of results.json (as write_results writes it), checked before anything is written.
_TOP_FIELDS = {"config": dict, "runs": list, "summary": list, "comparisons": list, "backbones": dict, "device": dict,
               "versions": dict}
_TIMING_FIELDS = {"seconds": _NUMBER, "groups_trained": int, "groups": int}
_RUN_FIELDS = {"backbone": str, "method": str, "scale": int, "seed": int, "degradation": dict, "metrics": dict,
               "majority_baseline": _NUMBER, "params": int, "train_seconds": _NUMBER}


def results_problem(results: Any) -> str | None:
    """What keeps a report from being drawn from `results` (a results.json's content, hand-edited or from
    another tool), in a few words; None when it has every field the report reads, of its type."""
    kind = lambda types: " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
    wrong = lambda x, types: not isinstance(x, types) or isinstance(x, bool)
    if not isinstance(results, dict):
        return f"holds a JSON {type(results).__name__}, not an object"
    for name, types in _TOP_FIELDS.items():
        if wrong(results.get(name), types):
            return f"has no {name!r} {kind(types)}"
    for i, run in enumerate(results["runs"]):
        if not isinstance(run, dict):
            return f"run {i} is not an object"
        for name, types in _RUN_FIELDS.items():
            if wrong(run.get(name), types):
                return f"run {i} has no {name!r} {kind(types)}"
        for name in metrics_lib.METRICS:
            if wrong(run["metrics"].get(name), _NUMBER):
                return f"run {i} has no number metrics.{name}"
        if not isinstance(run["degradation"].get("kind"), str) or wrong(run["degradation"].get("level"), _NUMBER):
            return f"run {i} has no degradation kind and level"
    if results.get("command") is not None and not isinstance(results["command"], str):
        return "has a 'command' that is not a string"
    timing = results.get("timing")  # optional, as is timing.trained_by (summary.md's first line)
    for label, t in (("timing", timing), ("timing.trained_by", timing.get("trained_by") if isinstance(timing, dict) else None)):
        if t is not None and (not isinstance(t, dict) or any(wrong(t.get(n), types) for n, types in _TIMING_FIELDS.items())):
            return f"has a {label!r} without numbers seconds, groups_trained and groups"
        if label == "timing.trained_by" and t is not None and wrong(t.get("command"), (str, type(None))):
            return "has a 'timing.trained_by' whose command is not a string"
    return None


def _read_results(folder: str, flag: str = "--workdir") -> dict:
    """FOLDER/results.json, or exit 2 with one line saying why not (results_problem: before anything is
    written)."""
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        why = ("no results.json in" if os.path.isdir(folder) else "not a folder:" if os.path.exists(folder)
               else "no such folder:")
        unfinished = ""
        if os.path.isfile(os.path.join(folder, "sweep.json")):  # a sweep began there: it writes results.json last
            done = len(finished_group_names(folder))
            done = f"{done} group{'' if done == 1 else 's'} done"
            running = sweeping_in(folder)
            unfinished = (f": its sweep is still running ({done}; process {running[0]}, pid {running[1]}), and writes "
                          "results.json and the report when it ends" if running else
                          f": the sweep there has not finished ({done}); run its command again, which resumes it "
                          "and writes results.json and the report")
        print(f"fusion_jax.report: error: {flag}: {why} {folder!r}{unfinished}", file=sys.stderr)
        sys.exit(2)
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        print(f"fusion_jax.report: error: {path} is not valid JSON ({type(e).__name__}: {e})", file=sys.stderr)
        sys.exit(2)
    if problem := results_problem(results):
        print(f"fusion_jax.report: error: {path} {problem}, as a sweep writes it", file=sys.stderr)
        sys.exit(2)
    # The tables and tests come from the runs, as the sweep computed them: an edit of `runs` shows.
    derived = {"summary": summarize(results["runs"]), "comparisons": compare(results["runs"])}
    if any(json.dumps(v, sort_keys=True) != json.dumps(results[k], sort_keys=True) for k, v in derived.items()):
        print(f"fusion_jax.report: note: the summary or comparisons stored in {path} differ from what its runs give "
              "(edited, or written by other code or library versions?); the report follows the runs", file=sys.stderr)
    return {**results, **derived}


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_DRAWING_ERRORS = (OSError, KeyError, TypeError, AttributeError, ValueError, IndexError)


def _cannot_draw(error: Exception, folder: str, read: str) -> NoReturn:
    """Exit 2 with one line: the report of `folder` cannot be drawn from `read` (nothing of it was written). A field the
    report reads but results_problem does not check (a hand-edited results.json) or a folder it cannot write to;
    the line names where the error arose, so that a bug of the report's own can be found."""
    if isinstance(error, OSError):
        named = error.filename2 or error.filename  # os.replace's destination, not its vanished source
        where = f" ({named})" if named else ""
        print(f"fusion_jax.report: error: cannot write the report in {folder!r}: {error.strerror or error}{where}",
              file=sys.stderr)
    else:
        frames = traceback.extract_tb(error.__traceback__)
        own = [f for f in frames if os.path.abspath(f.filename).startswith(_PACKAGE_DIR + os.sep)]
        frame = (own or frames)[-1]  # the report's own line, not the library's below it
        print(f"fusion_jax.report: error: {read} cannot be drawn: a field the "
              f"report reads is missing or of another type ({type(error).__name__}: {error}, at "
              f"{os.path.basename(frame.filename)}:{frame.lineno}); nothing was written", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, a mistake (an unknown flag, say) said in one line with status 2."""
    from absl import flags

    from fusion_jax.cli import flag_error, parse_absl_flags

    try:
        return parse_absl_flags(argv)
    except flags.Error as e:
        print(f"fusion_jax.report: error: {flag_error(e)}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    """CLI body: read DIR/results.json and render its report."""
    from absl import flags
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # jax's backend probing logs at INFO
    if len(argv) > 1:
        print(f"fusion_jax.report: error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        sys.exit(2)
    workdir, against = (os.path.expanduser(f) if f else f for f in (flags.FLAGS.workdir, flags.FLAGS.against))
    if not (workdir or "").strip():
        print("fusion_jax.report: error: --workdir" + (" is empty (an unset variable?)" if workdir is not None else
                                                       "=DIR is required") +
              ": a folder with a results.json (a finished sweep)", file=sys.stderr)
        sys.exit(2)
    if against is not None and not against.strip():
        print("fusion_jax.report: error: --against is empty (an unset variable?): give another sweep's folder, or "
              "leave the flag out for the report", file=sys.stderr)
        sys.exit(2)
    results = _read_results(workdir)
    if against:
        other = _read_results(against, "--against")
        dirs = [os.path.realpath(d) for d in (workdir, against)]
        if dirs[0] == dirs[1]:
            print("fusion_jax.report: error: --against names the --workdir itself", file=sys.stderr)
            sys.exit(2)
        name, other_name = (os.path.basename(d) for d in dirs)
        if name == other_name:  # two sweeps of the same folder name: name them by their paths
            name, other_name = (os.path.relpath(d) for d in dirs)
        out = os.path.join(workdir, f"against_{safe_name(other_name)}.md")
        command = command_line("fusion_jax.report", sys.argv[1:])
        try:
            atomic_write_text(out, against_markdown(results, other, name, other_name, command))
        except _DRAWING_ERRORS as e:
            _cannot_draw(e, workdir, f"{os.path.join(workdir, 'results.json')} against "
                                     f"{os.path.join(against, 'results.json')}")
        print(out)
        return
    failed = []
    print(f"writing the report into {workdir}/ ({_writing(workdir)})", file=sys.stderr, flush=True)
    try:
        written = render_report(results, workdir, failed)
    except _DRAWING_ERRORS as e:
        _cannot_draw(e, workdir, os.path.join(workdir, "results.json"))
    for p in written:
        print(p)
    tsne = os.path.join(workdir, "fig_tsne.png")
    if tsne not in written and "fig_tsne.png" not in failed and os.path.exists(tsne):
        print(f"{tsne} is kept as it was: its samples (tsne_<backbone>.npz, which the sweep writes) are not in "
              f"{workdir}", file=sys.stderr)
    if failed:
        print(f"fusion_jax.report: error: {', '.join(failed)} could not be drawn (the error is above); the rest of the "
              "report is written", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A folder with a results.json (a finished sweep).")
    flags.DEFINE_string("against", None, "Another finished sweep's folder: write <workdir>/against_<its name>.md "
                        "(config differences, accuracy shifts, who is ahead in both) instead of the report.")
    app.run(main, flags_parser=_parse_flags)
