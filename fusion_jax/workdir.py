"""The workdir of a sweep: checked before any data loads, claimed for one config and its features, locked
while a sweep trains in it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Iterator

from fusion_jax.config_base import ADDED, SAVED_LATER, differing, flatten, not_result, results_fields
from fusion_jax.distributed import in_cluster
from fusion_jax.files import atomic_create_json, blocked_at, fcntl
from fusion_jax.validate import ConfigError

log = logging.getLogger("fusion_jax")

_MIN_FREE_BYTES = 64 * 2**20
# Where the data, models and caches are: once features.json records what the features are made of
# (the dataset's content fingerprint, a model's id and commit or its files' hash, an npz file's hash),
# a resume may find them in other places.
# (Not data.flickr8k_dir: a Flickr8k folder's fingerprint hashes its captions and its images' names and
# sizes, not their bytes, so its path stays part of what a resume must match.)
# The report's files (report.py): in a folder without a sweep they are someone else's, which a sweep would overwrite.
_REPORT_FILE = re.compile(r"runs\.csv|summary\.md|table[123]\.(md|csv)|fig_\w+\.png|against_.+\.md")
_LOCATIONS = ("cache_dir", "npz.dir", "backbone.clip.model", "backbone.resnet.model", "backbone.resnet.text_model")


def read_state(path: str, kind: type = dict, fix: str = "remove the workdir, or restore the file") -> Any:
    """A JSON `kind` the sweep wrote (sweep.json, features.json, results.json, a group's record), or
    ConfigError naming the file and `fix` when it cannot be read as one: the sweep writes each atomically,
    so only damage from outside gets here."""
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError("workdir", f"{path!r} cannot be read ({type(e).__name__}: {e}); the sweep did not write "
                          f"it so: {fix}") from None
    if not isinstance(state, kind):
        raise ConfigError("workdir", f"{path!r} holds a JSON {type(state).__name__}, not what the sweep wrote; {fix}")
    return state


def _claim_features(workdir: str, features: dict[str, dict]) -> None:
    """Record each backbone's feature identity in features.json, or refuse a workdir whose sweep
    began on other features (a regenerated npz file, another model commit or dataset)."""
    path = os.path.join(workdir, "features.json")
    if atomic_create_json(path, features):
        return
    previous = read_state(path)  # an earlier start's, or one that started at the same moment
    changed = differing(flatten({b: previous[b] for b in features if b in previous}),
                        flatten({b: features[b] for b in features if b in previous}))
    if changed:
        builder = ("; its pairs were drawn by an earlier pair builder, whose negatives gave the label away where "
                   "images have different numbers of captions (README: What is trained, Pairs)"
                   if any(k.endswith(".pairs") for k in changed) else "")
        raise ConfigError("workdir", f"{workdir!r} holds a sweep begun on other features (differs in "
                          f"{', '.join(changed)}){builder}; use a new workdir or remove that one")


def _refuse_other_sweep(workdir: str, config_dict: dict, skip_locations: bool) -> None:
    """Raise ConfigError for a workdir that holds a sweep of another config (its sweep.json, or a finished
    results.json). skip_locations: leave the data and model folders uncompared."""
    path, results = os.path.join(workdir, "sweep.json"), os.path.join(workdir, "results.json")
    compared = lambda d: {k: v for k, v in {**ADDED, **flatten(d)}.items() if not not_result(k)}
    if os.path.exists(path):
        previous = read_state(path)
    elif os.path.exists(results):  # finished results without the sweep's state (committed ones, say)
        previous = read_state(results).get("config")
        if not isinstance(previous, dict):
            raise ConfigError("workdir", f"{results!r} is not a fusion_jax sweep's results.json (it names no "
                              "config): use a new or empty folder")
    elif _holds_training(workdir):
        raise ConfigError("workdir", f"{workdir!r} holds a sweep's groups or checkpoints but no sweep.json, which "
                          "names its config: use a new workdir or remove that one")
    elif reported := _report_files(workdir):
        raise ConfigError("workdir", f"{workdir!r} holds files named as a sweep's report ({', '.join(reported[:3])}"
                          f"{', ...' if len(reported) > 3 else ''}) but no sweep (no results.json or sweep.json): "
                          "use a new or empty folder, rather than overwrite them")
    else:
        return
    previous = compared(previous)
    skip = {k for k in SAVED_LATER if k not in previous} | (set(_LOCATIONS) if skip_locations else set())
    changed = differing(previous, compared(config_dict), skip)
    if changed:
        several = (config_dict.get("distributed") or {}).get("num_processes", 0) > 1 or in_cluster()
        raise ConfigError("workdir", f"{workdir!r} holds a sweep of another config (differs in "
                          f"{', '.join(changed)}); use a new workdir or remove that one"
                          + ("; or, if another process of this run made it, give every process the same config"
                             if several else ""))


def _report_files(workdir: str) -> list[str]:
    """The files in `workdir` named as the report's, sorted; none where it is missing or cannot be listed."""
    try:
        return sorted(n for n in os.listdir(workdir) if _REPORT_FILE.fullmatch(n))
    except OSError:
        return []


def _holds_training(workdir: str) -> bool:
    """Whether `workdir` holds what training writes (finished or failed groups, checkpoints, features.json)."""
    nonempty = lambda name: os.path.isdir(os.path.join(workdir, name)) and bool(os.listdir(os.path.join(workdir, name)))
    return nonempty("groups") or nonempty("checkpoints") or os.path.exists(os.path.join(workdir, "features.json"))


def check_workdir(workdir: str, config_dict: dict) -> None:
    """Before any data is loaded: refuse, without writing anything, a workdir that holds another config's
    sweep (the data and model folders are compared once the features are known, by `prepare_workdir`), or
    that cannot be written."""
    _refuse_other_sweep(workdir, config_dict, skip_locations=True)
    if (folder := blocked_at(workdir)) is not None:
        raise ConfigError("workdir", f"cannot write to {workdir!r}: {folder!r} is "
                          + ("not writable" if os.path.isdir(folder) else "not a folder"))


def refuse_while_in_use(workdir: str) -> None:
    """ConfigError while a process of another start trains in `workdir` (holds one of its `.lock-<i>`).
    Checked before jax.distributed starts: a process other than 0 of a second start would reach the running
    sweep's coordinator (where both use one address), which then stops the running sweep's processes."""
    if (running := sweeping_in(workdir)) is not None:
        raise _in_use(workdir, f"process {running[0]}", running[1])


def finished_group_names(workdir: str) -> set[str]:
    """The groups whose records `<workdir>/groups/` holds (not failed ones, not a write's temporary file);
    none where the folder is missing or unreadable. Without the config: what a message may count."""
    try:
        names = os.listdir(os.path.join(workdir, "groups"))
    except OSError:
        return set()
    return {f[:-len(".json")] for f in names if f.endswith(".json") and not f.endswith(".failed.json")
            and not f.startswith(".")}


def sweeping_in(workdir: str) -> tuple[int, str] | None:
    """(process index, pid) of a process of another start that holds one of `workdir`'s `.lock-<i>`, else None."""
    if fcntl is None or not os.path.isdir(workdir):
        return None
    return next(_held_locks(workdir), None)


def _held_locks(workdir: str, first: int = 0) -> Iterator[tuple[int, str]]:
    """(process index, pid) of each `.lock-<index>` in `workdir`, index >= first, that another open file
    holds (only those are probed: on NFS, flock is a POSIX lock, which a probe of this process's own lock
    file would release)."""
    for name in sorted(os.listdir(workdir)):
        lock = re.fullmatch(r"\.lock-(\d+)", name)
        if lock and int(lock[1]) >= first and (pid := _held_by(os.path.join(workdir, name))):
            yield int(lock[1]), pid


def prepare_workdir(workdir: str, config_dict: dict, features: dict[str, dict] | None = None) -> None:
    """Create the workdir and claim it for this config (and these backbones' feature identities,
    `feature_identity`); refuse one that holds a different sweep, or features files and no sweep."""
    path, results = os.path.join(workdir, "sweep.json"), os.path.join(workdir, "results.json")
    if os.path.isdir(workdir) and not (os.path.exists(path) or os.path.exists(results)):
        # Features files (an npz.dir, say): the sweep's own tsne_*.npz would join them as backbones.
        foreign = sorted(n for n in os.listdir(workdir) if n.endswith(".npz") and not n.startswith("tsne_"))
        if foreign:
            raise ConfigError("workdir", f"{workdir!r} holds features files ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}) and no sweep: use a new or empty folder")
    try:
        os.makedirs(os.path.join(workdir, "groups"), exist_ok=True)
        # A probe of this process's own: the processes of a multi-process sweep probe at once.
        fd, probe = tempfile.mkstemp(dir=workdir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError("workdir", f"cannot write to {workdir!r}: {e.strerror or e}") from None
    free = shutil.disk_usage(workdir).free
    if free < _MIN_FREE_BYTES:
        raise ConfigError("workdir", f"{workdir!r} has {free / 2**20:.0f} MiB free; checkpoints and results need "
                          f"at least {_MIN_FREE_BYTES / 2**20:.0f} MiB")
    refuse_other = lambda: _refuse_other_sweep(workdir, config_dict, skip_locations=features is not None
                                               and os.path.exists(os.path.join(workdir, "features.json")))
    existed = os.path.exists(path)
    refuse_other()
    # First: what training writes never stands without it. Checked again where this start found none and did not
    # create it: a start of another config did, since (then this one is refused; or that one, later).
    if not existed and not atomic_create_json(path, results_fields(config_dict)):
        refuse_other()
    if features is not None:
        _claim_features(workdir, features)


def _held_by(path: str) -> str | None:
    """The pid written in the lock file `path` if another open file holds its flock, else None."""
    try:
        f = open(path)
    except OSError:
        return None
    with f:
        try:  # shared: an exclusive lock needs a file open for writing on NFS (flock(2)), and this one is not
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid(f)
        except OSError:
            return None
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _pid(lock_file) -> str:
    """The pid that the holder of a lock file wrote into it ('?' before it has)."""
    lock_file.seek(0)
    return lock_file.read().strip() or "?"


def _in_use(workdir: str, who: str, pid: str) -> ConfigError:
    """The error of a start refused because `who` (pid) sweeps in `workdir`."""
    return ConfigError("workdir", f"{workdir!r} is in use: another sweep ({who}, pid {pid}) is training in it; "
                                  "wait for it or use another workdir")


@contextlib.contextmanager
def sweep_lock(workdir: str, index: int, count: int = 1) -> Iterator[None]:
    """Hold `<workdir>/.lock-<index>` (flock) while process `index` of `count` sweeps: the same command
    started twice is refused rather than training the same groups into the same checkpoints at once.
    Process 0 also refuses while a process beyond `count` of an earlier start (one with more processes)
    still holds its lock."""
    if fcntl is None:  # no flock (Windows): unguarded
        yield
        return
    with open(os.path.join(workdir, f".lock-{index}"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise _in_use(workdir, f"process {index}", _pid(f)) from None
        except OSError as e:  # a filesystem without flock (some NFS or Lustre mounts)
            log.warning("cannot lock %s (%s): a second start of this sweep would not be refused", f.name, e)
            locked = False
        if locked:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        try:
            if locked and index == 0:
                for other, pid in _held_locks(workdir, first=count):
                    raise _in_use(workdir, f"process {other} of an earlier start", pid)
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)
