"""Run a sweep: python -m fusion_jax.main --config=FILE[:variant] [--config.FIELD=VALUE ...] [--workdir=DIR]

Trains every (backbone, method) group of the config, each group's scales, seeds and noise levels in one
compiled program, evaluates them, and writes DIR/results.json, runs.csv, summary.md, tables 1-3 and the
figures (DIR: --workdir, else config.workdir, else results/<config.name>). The same command again
resumes: finished groups are kept, an unfinished one continues from its last checkpoint.

Examples:
  python -m fusion_jax.main --config=configs/synthetic.py:smoke --workdir=smoke_out
  python -m fusion_jax.main --config=configs/synthetic.py "--config.seeds=(42,)" --config.train.epochs=3 \\
      --workdir=one_seed
  python -m fusion_jax.report --workdir=DIR      (the report again, from DIR/results.json)

Ctrl-C stops before the next epoch (a second press ends at once). Exit status: 0 done, 1 a group
failed (or an unexpected error, with its traceback; or features too large for the host's memory), 2 a usage,
config or data error (or a file that cannot be written: a full disk, a quota, a read-only mount), 130 interrupted.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
import os
import re
import shlex
import signal
import sys
import threading
import traceback
from typing import Any

# Until main() takes Ctrl-C over, a KeyboardInterrupt could land anywhere in the imports below and the config's
# loading (about 2 s): a traceback, or inside a garbage-collection callback of jax's, which swallows it (and
# the sweep trained on). Until then a first Ctrl-C is noted and ends the start (in main), a second the process.
_CTRL_C_AT_START = threading.Event()


def _ctrl_c_at_start(signum: int, frame) -> None:
    # SIG_DFL first: a second press inside this handler would otherwise run it again, nested, and wait forever
    # on the lock that the Event's set() holds.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.write(2, b"fusion_jax: stopping as soon as the command has started (Ctrl-C again to end at once)\n")
    _CTRL_C_AT_START.set()


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _ctrl_c_at_start)

from absl import app, flags  # noqa: E402  (after the handler, as are the imports below)
from absl import logging as absl_logging  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from fusion_jax import distributed  # noqa: E402
from fusion_jax.cli import command_line, flag_error, parse_absl_flags  # noqa: E402
from fusion_jax.data.dataset import DataUnavailableError  # noqa: E402
from fusion_jax.data.sources import IMAGE_SOURCES  # noqa: E402
from fusion_jax.distributed import PeerFailed  # noqa: E402
from fusion_jax.files import NO_ROOM_ERRNOS  # noqa: E402
from fusion_jax.sweep import GroupsFailed, train_and_evaluate  # noqa: E402
from fusion_jax.validate import ConfigError, validate_fields  # noqa: E402
from fusion_jax.workdir import finished_group_names  # noqa: E402

try:
    _CONFIG = config_flags.DEFINE_config_file("config", None,
                                              "Required: the sweep's config file (configs/*.py[:variant]).",
                                              lock_config=True)
except flags.Error as e:  # ml_collections reads the command line's --flagfile files here, defining the flag
    if __name__ != "__main__":
        raise
    print(f"fusion_jax: error: {flag_error(e)}", file=sys.stderr)
    sys.exit(2)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; default: config.workdir, else results/<config.name>.")
flags.mark_flags_as_required(["config"])


def _override_field(argv: list[str], message: str) -> str | None:
    """The --config.FIELD override whose path holds the field a KeyError/AttributeError names, if any."""
    missing = re.match(r"""['"\\]*([A-Za-z_][\w]*)""", message)
    overrides = [a.split("=", 1)[0][2:] for a in argv if a.startswith("--config.")]
    return next((o for o in overrides if missing and missing.group(1) in o.split(".")[1:]), None)


def _config_alone(argv: list[str]) -> Any:
    """The --config file's get_config(variant), without the overrides (one of which failed), or None."""
    try:
        args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
        path = next(a.split("=", 1)[1] for a in args if re.match(r"--?config=", a))
        path, _, variant = path.partition(":")
        spec = importlib.util.spec_from_file_location("fusion_jax_config_alone", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
    except Exception:  # noqa: BLE001 - only a hint is lost
        return None


def _fields_named_like(config: Any, override: str) -> list[str]:
    """The config's field paths whose last name is (nearly) the override's: `epochs` for --config.epochs is
    train.epochs; none where the config did not load."""
    def paths(node: Any, prefix: str = "") -> list[str]:
        if not isinstance(node, ml_collections.ConfigDict):
            return [prefix[:-1]]
        return [p for key, value in node.items() for p in paths(value, f"{prefix}{key}.")]

    if not isinstance(config, ml_collections.ConfigDict):
        return []
    fields = paths(config)
    leaf = override.rsplit(".", 1)[-1]
    near = set(difflib.get_close_matches(leaf, [f.rsplit(".", 1)[-1] for f in fields], n=3, cutoff=0.8))
    return [f for f in fields if f.rsplit(".", 1)[-1] in near and f"config.{f}" != override][:3]


def _given_flags(argv: list[str]) -> list[str]:
    """Names of the flags given, --flagfile contents included (-x and --x alike), up to a bare `--`."""
    names = []
    for arg in flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False):
        if arg == "--":
            break
        if arg.startswith("-"):
            names.append(arg.lstrip("-").split("=", 1)[0])
    return names


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a failure (a config file that raises, an unknown flag, an override of a
    field the config does not have, a flag given twice) said in one line."""
    try:
        given = _given_flags(argv)
    except flags.Error:  # an unreadable --flagfile: the parse below says so
        given = []
    repeated = sorted({n for n in given if given.count(n) > 1 and n != "flagfile"})
    if repeated:  # ml_collections appends a repeated tuple override to the first instead of replacing it
        print(f"fusion_jax: error: {', '.join('--' + n for n in repeated)} given more than once; give each flag "
              "once", file=sys.stderr)
        sys.exit(2)
    try:
        return parse_absl_flags(argv)
    except flags.Error as e:
        if "config" not in given and "--config" in str(e):  # absl: "Flag --config must have a value other than None"
            print("fusion_jax: error: --config=FILE is required: the sweep's config file (configs/*.py[:variant]); "
                  "--help for the usage", file=sys.stderr)
            sys.exit(2)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = next((line for line in reversed(lines) if re.match(r"[A-Za-z_.]*(Error|Exception): ", line)), None)
        print(f"fusion_jax: error: {cause or (lines[0] if lines else e)}", file=sys.stderr)
    except (AttributeError, KeyError) as e:
        message = str(e.args[0] if e.args else e)
        hint = re.search(r'Did you mean "[\w]+" instead of "[\w]+"\?', message)
        field = _override_field(argv, message)
        if field is None:  # raised by the config file itself
            print(f"fusion_jax: error: cannot load --config: {type(e).__name__}: {message}", file=sys.stderr)
        else:
            near = "" if hint else ", ".join(f"--config.{f}" for f in _fields_named_like(_config_alone(argv), field))
            print(f"fusion_jax: error: --{field}: the config has no such field"
                  + (f"; {hint.group(0)}" if hint else f"; did you mean {near}?" if near else ""), file=sys.stderr)
    except OSError as e:  # an override applied to a config file that did not load: say why it did not
        print(f"fusion_jax: error: cannot load --config: {_load_failure(e)}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - anything else the config file raised (an import, its syntax)
        print(f"fusion_jax: error: cannot load --config: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)


def _load_failure(e: BaseException) -> str:
    """The last line of the first failure in e's chain (ml_collections wraps a missing file twice), with
    where a relative config path was looked for."""
    while e.__context__ is not None and isinstance(e.__context__, OSError):
        e = e.__context__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = lines[-1] if lines else repr(e)
    missing = re.search(r"No such file or directory: '([^']+)'", reason)
    if missing and not os.path.isabs(missing[1]):
        reason += f" (a relative path is read from the current folder, {os.getcwd()})"
    return reason


class _TqdmHandler(logging.StreamHandler):
    """Log lines above the progress bars (tqdm.write) instead of after a bar's text on its line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


def _stopping_message(extracts: bool) -> str:
    """What the first Ctrl-C says; extracts: whether the sweep extracts features (an image source). In a
    wait for the other processes the stop is passed to them at once, and this one leaves with them; a
    compilation in progress is finished first (XLA's cannot be cut short), seconds for these heads."""
    where, lost = (", feature extraction after its current shard", "epoch or shard") if extracts else ("", "epoch")
    return (f"fusion_jax: stopping (training stops before its next epoch{where}; Ctrl-C again to end at once, "
            f"losing the {lost} in progress)")


def _interrupted_message(workdir: str, extracts: bool) -> str:
    """What an interrupted sweep says on its way out: what its workdir keeps (counted there, so a stop
    during start-up names no checkpoint), and how to resume."""
    plural = lambda k, what: f"{k} {what}{'' if k == 1 else 's'}"
    groups, checkpoints = os.path.join(workdir, "groups"), os.path.join(workdir, "checkpoints")
    finished = finished_group_names(workdir)
    started = [d for d in _listed(checkpoints) if d not in finished  # a saved step: a folder named by its epoch
               and any(step.isdigit() for step in _listed(os.path.join(checkpoints, d)))]
    kept = [f"{plural(len(finished), 'finished group')} ({groups}/)"] if finished else []
    kept += [f"the last epoch of {plural(len(started), 'unfinished group')} ({checkpoints}/)"] if started else []
    kept += ["any features extracted so far (cached)"] if extracts else []
    if not kept:
        return "fusion_jax: interrupted before any group trained an epoch: run the same command to start again."
    listed = f"{', '.join(kept[:-1])} and {kept[-1]}" if len(kept) > 1 else kept[0]
    return f"fusion_jax: interrupted. Kept: {listed}: run the same command to resume."


def _listed(folder: str) -> list[str]:
    """The names in `folder`, none where it is missing or unreadable."""
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _first_ctrl_c(stop: threading.Event, extracts: bool, signum: int, frame) -> None:
    """Ctrl-C: the first stops the sweep before its next epoch (the running epoch's checkpoint is then
    complete), or extraction after its current shard; a second ends the process (SIGINT's default
    action: like a kill, which a resume survives)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once, even inside an epoch
    stop.set()  # after: a second press inside set() would have run this handler again, nested, on set()'s lock
    tqdm.write(_stopping_message(extracts), file=sys.stderr)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"fusion_jax: error: unexpected arguments: {shlex.join(argv[1:])} (it takes flags "
              "only: --config=FILE, --config.FIELD=VALUE, --workdir=DIR)", file=sys.stderr)
        sys.exit(2)
    if _WORKDIR.value is not None and not _WORKDIR.value.strip():
        print("fusion_jax: error: --workdir is empty (an unset variable?): give a folder, or leave the flag out for "
              "config.workdir, else results/<config.name>", file=sys.stderr)
        sys.exit(2)
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    log = logging.getLogger("fusion_jax")
    log.setLevel(logging.INFO)
    log.addHandler(_TqdmHandler())
    log.propagate = False
    try:
        config = _CONFIG.value
        config.name  # noqa: B018  (a config file that failed to load raises on first use)
    except OSError as e:
        print(f"fusion_jax: error: cannot load --config: {_load_failure(e)}", file=sys.stderr)
        sys.exit(2)
    except AttributeError:  # not a ConfigDict: validate names what get_config returned
        pass
    try:
        validate_fields(config)  # before config.workdir is read (train_and_evaluate validates the rest)
    except ConfigError as e:
        print(f"fusion_jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    workdir = os.path.expanduser(_WORKDIR.value or config.workdir or os.path.join("results", config.name))
    extracts = config.features in IMAGE_SOURCES
    stop = threading.Event()
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _ctrl_c_at_start):
        signal.signal(signal.SIGINT, functools.partial(_first_ctrl_c, stop, extracts))
    if _CTRL_C_AT_START.is_set():  # checked after the handover: a Ctrl-C in between set `stop` instead
        print("fusion_jax: interrupted while starting, before the sweep began: nothing was written; run the same "
              "command to start it", file=sys.stderr)
        sys.exit(130)
    try:
        results = train_and_evaluate(config, workdir, stop=stop,
                                     command=command_line("fusion_jax.main", sys.argv[1:]))
    except (ConfigError, DataUnavailableError, PeerFailed, distributed.WaitedOut) as e:
        message = str(e)
        if _WORKDIR.value:  # the workdir came from the flag (the other processes' errors too: same command)
            message = message.replace("config.workdir:", "--workdir:")
        elif not config.workdir:
            message = message.replace("config.workdir:", "workdir results/<config.name> (the default; --workdir=DIR "
                                      "gives another):")
        print(f"fusion_jax: error: {message}", file=sys.stderr)
        distributed.leave(2)
    except GroupsFailed as e:  # in a process other than 0, after the others: process 0 names them too
        print(f"fusion_jax: failed: {e}", file=sys.stderr)
        distributed.leave(1)
    except KeyboardInterrupt:
        print(_interrupted_message(workdir, extracts), file=sys.stderr, flush=True)
        distributed.leave(130, interrupted=True)
    except MemoryError as e:  # the host's, loading features (a group's own fails that group alone)
        print(f"fusion_jax: error: out of memory: {e or 'MemoryError'} (launch/README.md, 'Memory', says what a "
              "sweep holds)", file=sys.stderr)
        distributed.leave(1)
    except OSError as e:
        if e.errno not in NO_ROOM_ERRNOS:
            traceback.print_exc()
            distributed.leave(1)
        print(f"fusion_jax: error: cannot write {e.filename or 'a file'}: {e.strerror}; free space (or mend that), then "
              "rerun the same command to resume", file=sys.stderr)
        distributed.leave(2)
    except Exception:  # noqa: BLE001 - an unexpected error: its traceback, then out as the others need
        traceback.print_exc()
        distributed.leave(1)
    if results is None:
        print(f"this process's groups are done, and process 0 has written {workdir}/results.json")
        distributed.leave(0)
    # What this sweep's report wrote, after results.json (times of one filesystem's clock): a report draws no
    # figure that its results cannot fill, keeps an earlier t-SNE when the sweep's sample files are gone, and
    # leaves summary.md and the tables as they were where it failed (the log says why).
    written_at = os.path.getmtime(os.path.join(workdir, "results.json"))
    fresh = lambda f: os.path.exists(os.path.join(workdir, f)) and os.path.getmtime(os.path.join(workdir, f)) >= written_at
    figures = sorted(f for f in os.listdir(workdir) if f.startswith("fig_") and f.endswith(".png") and fresh(f))
    texts = ", summary.md, table1-3 (.md, .csv)" if fresh("summary.md") else ""
    print(f"results in {workdir}/: results.json, runs.csv{texts}" + "".join(f", {f}" for f in figures))
    for failure in results["failed_groups"]:
        print(f"fusion_jax: failed: {failure['error']}", file=sys.stderr)
    distributed.leave(1 if results["failed_groups"] else 0)

if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
