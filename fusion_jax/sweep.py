"""Sweeps: train every group of the plan (fusion_jax.groups) as one vmapped program, resume, report.

The host loop only moves between epochs: progress, checkpoints, resume. The groups' programs are
compiled ahead, in worker threads, while earlier groups train. Finished groups are kept in
`<workdir>/groups/<group>.json`; an unfinished group resumes from its last Orbax checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from fusion_jax import distributed
from fusion_jax.distributed import Stopped  # noqa: F401 - the sweep's, where its callers look for it
from fusion_jax import metrics as metrics_lib
from fusion_jax.checkpoint import GroupCheckpoints
from fusion_jax.data import FeatureSet
from fusion_jax.data.featureset import feature_identity
from fusion_jax.data.pairs import pair_identity
from fusion_jax.data.sources import IMAGE_SOURCES, cache_root, load_dataset, load_features
from fusion_jax.feature_report import feature_notes, split_overlap, tsne_samples
from fusion_jax.files import atomic_write_json, made_folder
from fusion_jax.fusion import count_params
from fusion_jax.groups import (CompiledAhead, FeaturesTooLarge, Group, GroupProgram, NonFinite, compile_workers,
                               own_failure, plan)
from fusion_jax.report import run_device, source, write_results
from fusion_jax.train import steps_per_epoch
from fusion_jax.validate import ConfigError, validate, validate_scales
from fusion_jax.workdir import check_workdir, prepare_workdir, read_state, refuse_while_in_use, sweep_lock
from fusion_jax.xla_cache import cache_events, persistent_cache

log = logging.getLogger("fusion_jax")


def _restore_latest_good(ckpt: GroupCheckpoints, abstract: dict, group: Group, aside: str):
    """(epoch, tree) of the newest checkpoint that restores. A damaged or incomplete one is reported and moved
    into `aside`, so that it is neither read again nor lost. A read the machine failed (ConfigError: an I/O or
    permission error; MemoryError, which fails the group alone) leaves every checkpoint in place for a rerun."""
    epochs = sorted(ckpt.all_epochs(), reverse=True)
    for i, epoch in enumerate(epochs):
        try:
            return epoch, ckpt.restore(epoch, abstract)
        except (ConfigError, MemoryError):
            raise
        except Exception as e:  # Orbax raises many types for a damaged checkpoint
            where = ckpt.move_aside(epoch, aside)
            then = (f"falling back to the one after epoch {epochs[i + 1]}" if i + 1 < len(epochs) else
                    "training the group from its start (no other checkpoint is left)")
            log.error("group %s: the checkpoint after epoch %d is corrupt or incomplete (%s: %s); moved to %s, %s",
                      group.name, epoch, type(e).__name__, str(e)[:200], where, then)
    return None, None


def _report_set_aside(aside: str) -> None:
    """A warning at the sweep's end for checkpoints moved aside as corrupt (kept for inspection, never read)."""
    if not os.path.isdir(aside):
        return
    sizes = [os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(aside) for f in files]
    groups = [os.path.join(aside, g) for g in os.listdir(aside) if os.path.isdir(os.path.join(aside, g))]
    epochs = [e for g in groups for e in os.listdir(g)]
    log.warning("%d corrupt checkpoint(s) kept in %s (%.1f MiB), set aside during this or an earlier attempt; "
                "the results do not use them: remove the folder once inspected", len(epochs), aside,
                sum(sizes) / 2**20)


def train_group(config: ml_collections.ConfigDict, program: GroupProgram, data: dict, workdir: str,
                progress: tqdm, on_epoch: Callable[[Group, int], None] | None, stop: threading.Event) -> list[dict]:
    """Train and evaluate every run of a compiled group (`groups.build_program`); return the run records.

    `data` is the group's feature arrays on the devices (`groups.group_data`, replicated). Checkpoints hold
    the runs' state in the group's order, whatever the slots, so a sweep resumes on other devices.
    """
    group, index = program.group, program.index
    n_train = program.runs["n_train"][index]
    run_steps = np.asarray([steps_per_epoch(int(n), config.train.batch_size) for n in n_train])
    runs = jax.device_put(program.runs, program.by_run)
    ckpt = GroupCheckpoints(os.path.join(workdir, "checkpoints", group.name), config.checkpoint.keep)
    try:
        state, seconds, curves = _train_epochs(config, program, data, runs, run_steps, ckpt, progress, on_epoch, stop,
                                               os.path.join(workdir, "checkpoints-corrupt", group.name))
    except BaseException:
        try:  # also when training stops (a NaN loss, an interrupt), before its folder is removed
            ckpt.close()
        except ConfigError as e:  # a write that failed (a full disk): the training error says it, or its cause
            log.warning("group %s: closing its checkpoints failed too: %s", group.name, e)
        except Exception:  # noqa: BLE001 - the training error is the one to raise
            log.exception("group %s: closing its checkpoints failed", group.name)
        raise
    ckpt.close()
    counts = np.asarray(program.evaluate(state, runs, data))[index]
    # A step's loss comes before its update: the last update can diverge with every loss finite.
    _stop_unless_finite(group, counts[:, 4] == 0, "validation logits after training")
    params = count_params(jax.tree_util.tree_map(lambda x: x[0], state["params"]))

    records, code, where = [], source(), run_device()
    for spec, c, curve, n, k in zip(group.runs, counts, curves.T, n_train, run_steps):
        loss = curve[-1]
        m = metrics_lib.binary_metrics(*c[:4])
        records.append({
            "backbone": spec.backbone, "method": spec.method, "scale": spec.scale, "seed": spec.seed,
            "degradation": {"kind": spec.kind, "level": spec.level},
            "metrics": {k: m[k] for k in metrics_lib.METRICS}, "majority_baseline": m["majority_baseline"],
            # The group's training time, shared among its runs in proportion to their steps.
            "params": params, "train_seconds": seconds * k / run_steps.sum(),
            "final_train_loss": float(loss) if np.isfinite(loss) else None,
            "train_loss_by_epoch": [float(x) if np.isfinite(x) else None for x in curve],
            "n_train": int(n), "n_val": spec.scale - int(n), "source": code, "device": where,
        })
    n_bad, worst = metrics_lib.unconverged_runs([r["final_train_loss"] for r in records])
    if n_bad:
        log.warning("group %s: %d of its %d runs end with a mean training loss above %.2f (2 ln 2; a 50/50 guess "
                    "scores ln 2), %s: their training diverged (a lower learning rate, or features nearer unit "
                    "norm?)", group.name, n_bad, len(records), metrics_lib.UNCONVERGED_LOSS, worst)
    return records


def _train_epochs(config: ml_collections.ConfigDict, program: GroupProgram, data: dict, runs: dict,
                  run_steps: np.ndarray, ckpt: GroupCheckpoints, progress: tqdm,
                  on_epoch: Callable[[Group, int], None] | None, stop: threading.Event,
                  aside: str) -> tuple[dict, float, np.ndarray]:
    """The group's epochs from its newest good checkpoint (or from init), each checkpointed:
    (state [slots, ...], training seconds, each epoch's mean loss per run [epochs, runs]; the last epoch's
    from the checkpoint, an earlier one NaN where a resumed workdir lacks it)."""
    group, by_run, index, n_runs = program.group, program.by_run, program.index, len(program.group.runs)
    abstract = {"state": jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((n_runs, *x.shape[1:]), x.dtype),
                                                program.state),
                "seconds": jax.ShapeDtypeStruct((), jnp.float32),
                "last_loss": jax.ShapeDtypeStruct((n_runs,), jnp.float32)}
    start, tree = _restore_latest_good(ckpt, abstract, group, aside)
    curves = np.full((config.train.epochs, n_runs), np.nan)
    if start is None:
        state, seconds = program.init(runs, data), 0.0
    else:
        log.info("group %s: resuming from the checkpoint after epoch %d of %d", group.name, start,
                 config.train.epochs)
        progress.update(start)
        in_slots = jax.tree_util.tree_map(lambda x: x[np.maximum(program.slots, 0)], tree["state"])
        state, seconds = jax.device_put(in_slots, by_run), float(tree["seconds"])
        curves[:start] = ckpt.losses(start, n_runs)
        curves[start - 1] = tree["last_loss"]

    for epoch in range(start or 0, config.train.epochs):
        if stop.is_set():
            raise Stopped(f"group {group.name}: stopped " + (f"after epoch {epoch}" if epoch else "before its first epoch"))
        t0 = time.perf_counter()
        with _redrawn(progress):
            state, losses = program.train_epoch(state, runs, data)
            losses = np.asarray(losses)[index]
        seconds += time.perf_counter() - t0
        _stop_unless_finite(group, np.isfinite(losses).all(axis=1), f"training loss in epoch {epoch + 1}")
        last_loss = np.asarray([row[:k].mean() for row, k in zip(losses, run_steps)], np.float32)
        by_group = jax.tree_util.tree_map(lambda x: x[index], jax.device_get(state))
        ckpt.save(epoch + 1, {"state": by_group, "seconds": np.float32(seconds), "last_loss": last_loss})
        ckpt.save_losses(epoch + 1, last_loss)
        curves[epoch] = last_loss
        progress.set_postfix(loss=f"{np.mean(last_loss):.4f}")
        progress.update(1)
        if on_epoch is not None:
            ckpt.wait()
            on_epoch(group, epoch + 1)
    return state, seconds, curves


@contextlib.contextmanager
def _redrawn(progress: tqdm, every: float = 1.0):
    """Redraw the bar every `every` seconds while the block runs: through a long epoch (token features on a
    CPU, say) its elapsed time moves, where the bar stood still until the epoch ended."""
    if progress.disable:
        yield
        return
    done = threading.Event()

    def redraw():
        while not done.wait(every):
            progress.refresh()

    thread = threading.Thread(target=redraw, name="fusion_jax-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _group_records(path: str, group: Group) -> list[dict]:
    """The run records of a finished group (groups/<name>.json), or ConfigError naming the file when it
    cannot be read or holds other runs than `group`'s."""
    fix = f"remove it to train group {group.name} again"
    records = read_state(path, list, fix)
    try:
        have = sorted((r["backbone"], r["method"], r["scale"], r["seed"], float(r["degradation"]["level"]))
                      for r in records)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError("workdir", f"{path!r} does not hold a finished group's runs ({type(e).__name__}: {e}); "
                          f"{fix}") from None
    if have != sorted((r.backbone, r.method, r.scale, r.seed, r.level) for r in group.runs):
        raise ConfigError("workdir", f"{path!r} holds other runs than group {group.name} has in this config; use a "
                          "new workdir, or remove the file to train the group again")
    return records


def _record_paths(workdir: str) -> tuple[Callable[[Group], str], Callable[[Group], str]]:
    """(the path of a group's record once finished, of its record once failed) in `workdir`."""
    return (lambda g: os.path.join(workdir, "groups", f"{g.name}.json"),
            lambda g: os.path.join(workdir, "groups", f"{g.name}.failed.json"))


def _finished_groups(workdir: str, groups: list[Group]) -> list[str]:
    """The names of the groups whose records a start finds (checked against the config: a workdir of
    another config is refused, not mixed in). Clears what an earlier attempt left of the others: a
    failure it recorded (so that this attempt never counts it as its own) and, of the finished groups,
    checkpoints left by a stop between a group's record and their removal."""
    done, failed = _record_paths(workdir)
    finished = [g for g in groups if os.path.exists(done(g))]
    for g in finished:
        _group_records(done(g), g)
    for g in groups:
        if g in finished:
            shutil.rmtree(os.path.join(workdir, "checkpoints", g.name), ignore_errors=True)
        elif os.path.exists(failed(g)):
            log.info("training group %s again, which failed in an earlier attempt: %s", g.name,
                     _recorded_error(failed(g)))
            os.unlink(failed(g))
    return [g.name for g in finished]


def _stop_unless_finite(group: Group, finite: np.ndarray, what: str) -> None:
    """Raise NonFinite naming the runs of `group` where `finite` [runs] is False."""
    bad = [r for r, ok in zip(group.runs, finite) if not ok]
    if bad:
        raise NonFinite(f"group {group.name}: non-finite {what} of runs "
                        + ", ".join(f"(scale {r.scale}, seed {r.seed}, level {r.level:g})" for r in bad))


def _stop_if_set(stop: threading.Event, backbone: str) -> None:
    """Stop feature extraction once asked to, or once another process failed its start-up (called after
    each cached shard)."""
    if stop.is_set():
        raise Stopped(f"stopped while extracting {backbone}'s features (the shards done are cached)")
    distributed.raise_if_a_peer_failed_to_start()


def _recorded_error(path: str) -> str:
    """The error a failed group's record holds, shortened to one line."""
    try:
        with open(path) as f:
            error = " ".join(str(json.load(f).get("error", "?")).split())
    except (OSError, ValueError, AttributeError):
        return "its record is unreadable"
    return error if len(error) <= 200 else error[:200] + "..."


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       on_epoch: Callable[[Group, int], None] | None = None, command: str | None = None,
                       stop: threading.Event | None = None) -> dict | None:
    """Run (or resume) the whole sweep of `config` in `workdir`; write and return the results.

    With several processes, each trains its share of the groups; process 0 gathers every group,
    writes and returns the results, the others return None (or raise GroupsFailed where groups of
    theirs failed).

    A group that fails on its own (NaN/Inf, or XLA out of memory compiling or running it: `own_failure`)
    is recorded in the results' failed_groups while the others train. Raises ConfigError, before anything
    is written, for an invalid config or workdir; with several processes, the others then raise
    distributed.PeerFailed instead of waiting for the failed one. ConfigError also stops a sweep whose
    checkpoints the machine cannot write or read (a full disk, an I/O or permission error), every
    checkpoint kept for the rerun. A process failing otherwise while
    training (a checkpoint it cannot write, an error of `on_epoch`) raises its error, and the others
    PeerFailed, once every process has finished what it could (`distributed.failures_shared`).
    `on_epoch(group, epochs_done)` is called after each epoch's checkpoint is on disk; once `stop` is set,
    the sweep raises Stopped before its next epoch, or after the current shard of features it extracts (what
    was written so far is complete); `command`
    (the command line that started the sweep) is recorded in the results.
    """
    start, stop = time.perf_counter(), stop or threading.Event()
    validate(config)
    if not workdir.strip():
        raise ConfigError("workdir", f"{workdir!r} is blank: give a folder")
    workdir = os.path.expanduser(workdir)  # as a shell does not in --workdir=~/...
    refuse_while_in_use(workdir)  # before jax.distributed: a second start would stop a running sweep's processes
    index, count = distributed.initialize(config)
    with contextlib.ExitStack() as held:
        results, own_failed = _sweep(config, workdir, index, count, held, start, on_epoch, stop, command)
    failures = distributed.wait_for_all(index, count, config.distributed.wait_seconds, stop)
    if index != 0 and (stop.is_set() or distributed.peers_stopped(index)):  # all came: they leave together
        distributed.leaving_in_step()
        raise Stopped("stopped (Ctrl-C) before process 0 wrote results.json (this process finished its groups)")
    if failures and index != 0:
        raise distributed.PeerFailed(f"{len(failures)} of {count} processes failed, so results.json is not written "
                                     f"(this process finished its groups): {'; '.join(failures)}")
    if failures:  # after their groups were written: the results are whole
        log.warning("other processes failed after finishing their groups: %s", "; ".join(failures))
    if own_failed and index != 0:  # process 0's results list them; this process says so in its exit too
        raise GroupsFailed(own_failed)
    return results


class GroupsFailed(RuntimeError):
    """In a process other than 0: groups of its own failed (`failed_groups` of process 0's results)."""

    def __init__(self, errors: list[str]):
        super().__init__(f"{len(errors)} of this process's groups failed (results.json lists them): "
                         + "; ".join(errors))


def _sweep(config: ml_collections.ConfigDict, workdir: str, index: int, count: int, held: contextlib.ExitStack,
           start: float, on_epoch: Callable[[Group, int], None] | None, stop: threading.Event,
           command: str | None) -> tuple[dict | None, list[str]]:
    """train_and_evaluate after validation, in process `index` of `count`, holding the workdir in `held`:
    (the results in process 0, else None; the errors of the groups this process failed)."""
    groups = plan(config)
    features, drawn, notes, finished = _start_up(config, workdir, groups, index, count, held, stop)
    # Process 0's view of the workdir, in every process (their file systems' caches may differ): the
    # unfinished groups are dealt alike, so a resume shares them evenly, whichever process had trained which.
    todo = distributed.mine([g for g in groups if g.name not in finished], index, count)
    held.enter_context(distributed.failures_shared(index, count, config.distributed.wait_seconds, stop))
    if index == 0:
        tsne_samples(workdir, features, config.tsne_pairs)
    n = lambda k, what: f"{k} {what}{'' if k == 1 else 's'}"
    log.info("sweep %s: %s, %s; %s to train%s%s", config.name, n(len(groups), "group"),
             n(sum(len(g.runs) for g in groups), "run"), n(len(todo), "group"),
             f" in process {index} of {count}" if count > 1 else "",
             f" ({len(finished)} finished, kept)" if finished else "")
    if stop.is_set():
        raise Stopped("stopped before training")
    own_failed = _train_own(config, workdir, todo, features, on_epoch, stop)
    if index != 0:
        return None, own_failed
    records, failures = _gather(workdir, groups, index, count, config.distributed.wait_seconds, stop)
    timing = {"seconds": round(time.perf_counter() - start, 1), "groups_trained": len(todo) - len(own_failed),
              "groups": len(groups)}
    if count == 1 and not todo and (trained := _last_training(workdir)):  # a rerun that trains nothing
        timing["trained_by"] = trained
    return write_results(workdir, config.to_dict(), records, command,
                         {b: {**fs.provenance, **drawn[b], "split_overlap": split_overlap(config, fs),
                              **({"notes": notes[b]} if b in notes else {})} for b, fs in features.items()},
                         failures, timing), own_failed


def _start_up(config: ml_collections.ConfigDict, workdir: str, groups: list[Group], index: int, count: int,
              held: contextlib.ExitStack, stop: threading.Event
              ) -> tuple[dict[str, FeatureSet], dict[str, dict], dict[str, list[str]], list[str]]:
    """Check the workdir, load (or extract) every backbone's features, claim the workdir and hold it in `held`,
    all processes in step: (features, each backbone's pair_identity, feature notes (process 0's), the names of
    the groups already finished)."""
    config_dict = config.to_dict()
    with distributed.checked_start(index, count, config.distributed.wait_seconds, stop):
        check_workdir(workdir, config_dict)  # before minutes of feature extraction
        _check_caches(config, make=False)  # before the data loads (a download, perhaps)
        dataset = load_dataset(config) if config.features in IMAGE_SOURCES else None
        if dataset is not None:  # before any feature is extracted
            validate_scales(config, {f"dataset {dataset.name!r}": dataset})
        _check_caches(config, make=True)
        features = {b: load_features(config, b, dataset, after_shard=functools.partial(_stop_if_set, stop, b))
                    for b in config.backbones}
        validate_scales(config, {f"backbone {b!r}": fs for b, fs in features.items()})
        notes = feature_notes(config, groups, features) if index == 0 else {}
        drawn = {b: pair_identity(fs.caption_image, fs.n_images, **config.pairs) for b, fs in features.items()}
        identities = {b: {**feature_identity(fs.provenance), **drawn[b]} for b, fs in features.items()}
        if index == 0:  # process 0 claims a new workdir; the others then check their config and features
            prepare_workdir(workdir, config_dict, identities)
    with distributed.checked_start(index, count, config.distributed.wait_seconds, stop) as shared:
        if index != 0:
            prepare_workdir(workdir, config_dict, identities)
        held.enter_context(sweep_lock(workdir, index, count))
        if index == 0:
            shared["finished"] = _finished_groups(workdir, groups)
    return features, drawn, notes, shared["finished"]


def _check_caches(config: ml_collections.ConfigDict, make: bool) -> None:
    """Check (and with `make`, make) the feature cache's folder, for features from images, and the compilation
    cache's: ConfigError where one cannot be (made, a read-only or special file system too, which the look at
    the permissions does not see)."""
    if config.features in IMAGE_SOURCES:
        cache_root(config, make)
    if make and config.compilation_cache and (problem := made_folder(config.compilation_cache)):
        raise ConfigError("compilation_cache", f"{config.compilation_cache!r} {problem}: give a folder jax can "
                          "write its programs into (empty: none)")


def _train_own(config: ml_collections.ConfigDict, workdir: str, todo: list[Group], features: dict[str, FeatureSet],
               on_epoch: Callable[[Group, int], None] | None, stop: threading.Event) -> list[str]:
    """Train this process's groups in turn, each program compiled ahead, each finished one recorded in
    groups/; return the errors of those that failed on their own (each recorded as failed; the others train)."""
    done, failed = _record_paths(workdir)
    cache = persistent_cache(config.compilation_cache) if config.compilation_cache else contextlib.nullcontext()
    own_failed: list[str] = []
    with cache, cache_events() as events, CompiledAhead(config, todo, features, compile_workers(config)) as ahead, \
            tqdm(total=len(todo) * config.train.epochs, unit="epoch", dynamic_ncols=True, disable=not todo) as progress:
        for i, g in enumerate(todo):
            if stop.is_set():
                raise Stopped(f"stopped before group {g.name}")
            name = f"group {i + 1}/{len(todo)} {g.name}"
            progress.set_description(name if ahead.ready(i) else f"{name} (compiling)")  # else a still bar, unsaid
            try:
                try:
                    program = ahead.program(i)
                finally:  # built, or failed to build: no longer compiling
                    progress.set_description(name)
                if stop.is_set():  # asked while the program compiled
                    raise Stopped(f"stopped before group {g.name}")
                atomic_write_json(done(g), train_group(config, program, ahead.data(program), workdir, progress,
                                                       on_epoch, stop))
            except Exception as e:
                diverged, said = isinstance(e, NonFinite), isinstance(e, (NonFinite, FeaturesTooLarge))
                if not (diverged or own_failure(e)):  # the workdir, a callback, a bug: every group would fail alike
                    raise
                if said:  # its message says what and where: no traceback
                    log.error("%s", e)
                else:
                    log.exception("group %s failed; the sweep goes on with the other groups, and a rerun of the "
                                  "same command trains it again (from its last checkpoint, where it saved one)", g.name)
                error = str(e) if said else f"group {g.name}: {type(e).__name__}: {e}".replace("\n", " ")[:2000]
                atomic_write_json(failed(g), {"group": g.name, "backbone": g.backbone, "error": error})
                own_failed.append(error)
                if not diverged:  # out of memory, say: a rerun resumes from its checkpoints (diverged ones would not)
                    continue
            shutil.rmtree(os.path.join(workdir, "checkpoints", g.name), ignore_errors=True)
    if todo:
        log.info("%d programs built, %d more shared by groups of the same shapes", ahead.programs.compiled,
                 ahead.programs.shared)
    if config.compilation_cache:
        log.info("compilation cache %s: %d XLA compilations loaded, %d compiled (each program is several: init, "
                 "train, evaluate, and with lanes their split and join)", config.compilation_cache,
                 events["hits"], events["misses"])
    return own_failed


def _gather(workdir: str, groups: list[Group], index: int, count: int, wait_seconds: float,
            stop: threading.Event) -> tuple[list[dict], list[dict]]:
    """In process 0: (every finished group's run records, every failed group's record), once each group has one,
    waiting up to `wait_seconds` for the other processes' groups; then tidies the workdir's leftovers."""
    done, failed = _record_paths(workdir)
    recorded = lambda g: os.path.exists(done(g)) or os.path.exists(failed(g))
    deadline = time.monotonic() + wait_seconds
    while not all(recorded(g) for g in groups):
        if time.monotonic() >= deadline:  # the looks themselves take time on a shared file system
            raise distributed.WaitedOut(f"groups {[g.name for g in groups if not recorded(g)]} not finished by the "
                                        f"other processes after {wait_seconds:.0f} s (one may have ended without "
                                        "telling: killed, or a second Ctrl-C)")
        if stop.is_set():
            raise Stopped("stopped while waiting for the other processes' groups")
        if failures := distributed.peer_failures(index, count):
            raise distributed.PeerFailed(
                f"{len(failures)} of {count} processes failed while training, so results.json is not written: "
                f"{'; '.join(failures)} (the finished groups and each unfinished group's last epoch are kept for "
                "the resume)")
        time.sleep(1.0)
    records, failures = [], []
    for g in groups:
        if os.path.exists(done(g)):
            records.extend(_group_records(done(g), g))
        else:
            failures.append(read_state(failed(g)))
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and not os.listdir(os.path.join(workdir, "checkpoints")):
        os.rmdir(os.path.join(workdir, "checkpoints"))
    _report_set_aside(os.path.join(workdir, "checkpoints-corrupt"))
    return records, failures


def _last_training(workdir: str) -> dict | None:
    """{command, seconds, groups_trained, groups} of the last process that trained groups of the results in
    `workdir` (a rerun that trains nothing passes it on), or None where results.json does not say."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            earlier = json.load(f)
        timing = earlier["timing"]
        return timing.get("trained_by") or ({"command": earlier["command"], **timing} if timing["groups_trained"] else None)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
