"""Orbax checkpoints of a group's stacked train state, saved at epoch boundaries, each with a CRC-32
of every array beside it (`digests/<epoch>.json`): Orbax stores none, and a flipped bit that still
decompresses would restore silently."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import traceback
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
# Orbax's own serialization internals, for the one method _OwnProcessNumpyHandler rewrites (the
# package's versions are pinned below 0.13; tests/test_scale_out.py restores what both processes wrote).
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from fusion_jax.files import NO_ROOM_ERRNOS, atomic_write_json
from fusion_jax.validate import ConfigError


if not hasattr(ocp.type_handlers.NumpyHandler, "_background_serialize"):  # what the handler below replaces
    raise ImportError(f"fusion_jax's checkpoints need orbax-checkpoint 0.12 (installed: {ocp.__version__})")


class _OwnProcessNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's NumpyHandler, writing from the process that saves. Orbax takes host arrays for copies
    that every process holds and writes them from process 0 alone, so a group that process 1 trained
    was saved without its arrays. Here a manager is only ever called by the process whose group it
    checkpoints (GroupCheckpoints), and that process writes."""

    async def _background_serialize(self, values, infos, args=None):
        writes = []
        for value, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info=info, arg=arg, global_shape=value.shape, local_shape=value.shape, dtype=value.dtype,
                use_ocdbt=info.is_ocdbt_checkpoint, metadata_key=self._metadata_key,
                process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint))
            writes.append(self._open_and_write(value, spec.json, info.ts_context))
        await asyncio.gather(*writes)


DIGESTS = "digests"  # beside the epochs' folders, which Orbax's step listing ignores
LOSSES = "losses"  # each epoch's mean training loss per run, <epoch>.json: the run's loss curve


def digest(tree: Any) -> dict[str, str]:
    """CRC-32 of each leaf's bytes (host arrays), by its path in the tree."""
    return {jax.tree_util.keystr(path): f"{zlib.crc32(np.ascontiguousarray(leaf)):08x}"
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _os_error(e: Exception) -> tuple[int | None, str] | None:
    """(errno, or None where it has none; why) of an OSError (a full disk, a file where a folder goes), or of
    tensorstore's ValueError for one (`... [os_error_code='28']`, from Orbax's reads and writes); None for any
    other error."""
    if isinstance(e, OSError):
        return e.errno, f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    code = re.search(r"os_error_code='?(\d+)", str(e)) if isinstance(e, ValueError) else None
    return (int(code[1]), f"{os.strerror(int(code[1]))} (tensorstore: {str(e)[:300]})") if code else None


# Read errors of the machine, not of the checkpoint's bytes: a checkpoint that gave one is read again later.
_MACHINE_READ_ERRNOS = {errno.EIO, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.EINTR,
                        errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY, errno.ENOLCK, errno.ENOTCONN, errno.EHOSTDOWN,
                        errno.EHOSTUNREACH, errno.ECONNRESET, errno.ECONNREFUSED}
_FULL_TEXT = re.compile("|".join([re.escape(os.strerror(c)) for c in NO_ROOM_ERRNOS]
                                 + [rf"os_error_code='?({'|'.join(map(str, NO_ROOM_ERRNOS))})\b"]))
_open: set[str] = set()  # the folders of this process's GroupCheckpoints not yet closed
_failed_save_at = -math.inf  # when a save of one of them last met a full disk (a quota, a read-only file system)
_AFTERMATH_SECONDS = 60.0  # how long after that Orbax's threads may still report it


def _full_disk_met() -> None:
    global _failed_save_at
    _failed_save_at = time.monotonic()


def _saving() -> bool:
    """Whether Orbax's errors now are those of this process's group checkpoints: one is open, or one's save met a
    full disk in the last minute."""
    return bool(_open) or time.monotonic() - _failed_save_at < _AFTERMATH_SECONDS


class _QuietOnAFullDisk(logging.Filter):
    """Drops Orbax's own error records (absl's logger) of a full disk while this process's group checkpoints are
    open: Orbax's background threads log that error, tracebacks and all, several times over, before the sweep
    stops with it in one line (`_writes`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname or not _saving():
            return True
        try:
            text = record.getMessage() + ("".join(traceback.format_exception(*record.exc_info))
                                          if record.exc_info else "")
        except Exception:  # noqa: BLE001 - a record that does not format is the handler's to report
            return True
        if _FULL_TEXT.search(text) is None:
            return True
        _full_disk_met()
        return False


def _quiet_closed_loop(previous):
    """sys.unraisablehook that drops asyncio's 'Event loop is closed' raised in asyncio alone (called from native
    code) while group checkpoints save or just after (`_saving`): tensorstore's writes still in flight that end
    after a failed save closed Orbax's loop (after a save that succeeds, none is in flight). Anything else goes
    to `previous`."""
    def hook(unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback)
        if not (_saving() and isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"
                and frames and all(f"{os.sep}asyncio{os.sep}" in f.filename for f in frames)):
            previous(unraisable)
    return hook


@functools.cache
def _quiet_orbax() -> None:
    """Install _QuietOnAFullDisk and _quiet_closed_loop, once per process (by the first GroupCheckpoints)."""
    logging.getLogger("absl").addFilter(_QuietOnAFullDisk())
    sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)


def _writes(method):
    """A GroupCheckpoints method whose failed write (`_os_error`) becomes one line."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (OSError, ValueError) as e:
            if (error := _os_error(e)) is None:
                raise
            if error[0] in NO_ROOM_ERRNOS:
                _full_disk_met()
            raise ConfigError("workdir", f"cannot write checkpoints in {self.directory!r}: {error[1]}; "
                              "mend that, then rerun the same command to resume") from e
    return wrapped


class GroupCheckpoints:
    """A CheckpointManager over `directory`; the step number is the count of finished epochs."""

    @_writes
    def __init__(self, directory: str, keep: int):
        _quiet_orbax()
        self.directory = directory
        me = jax.process_index()
        # Each process checkpoints its own groups: no barrier with the other processes.
        processes = ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me},
            barrier_sync_key_prefix=os.path.basename(os.path.normpath(directory)))
        # Directories made in the background signal through keys: one that cannot be made (a full disk) left
        # Orbax's threads, and the process, waiting for its signal; and those keys carry a per-process
        # operation count, the same in every process, so two processes saving at once read each other's.
        now = ocp.options.AsyncOptions(create_directories_asynchronously=False)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, async_options=now)
        if jax.process_count() > 1:
            os.makedirs(directory, exist_ok=True)
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False, multiprocessing_options=processes,
                                                   async_options=now)
        handler = ocp.PyTreeCheckpointHandler(
            multiprocessing_options=processes,
            type_handler_registry=ocp.type_handlers.create_type_handler_registry(
                # jax.Array's too, though save() gives host arrays: without one Orbax warns on every save.
                (np.ndarray, _OwnProcessNumpyHandler()), (jax.Array, ocp.type_handlers.ArrayHandler())))
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handler)
        _open.add(os.path.abspath(directory))

    def latest_epoch(self) -> int | None:
        return self._manager.latest_step()

    def all_epochs(self) -> list[int]:
        return list(self._manager.all_steps())

    def move_aside(self, epoch: int, folder: str) -> str:
        """Move the checkpoint after `epoch` out of the manager's directory into `folder` (kept for
        a look, never read again); return where it went."""
        self._manager.wait_until_finished()
        target = os.path.join(folder, f"{epoch}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9}")
        os.makedirs(folder, exist_ok=True)
        shutil.move(os.path.join(str(self._manager.directory), str(epoch)), target)
        self._manager.reload()
        return target

    def _digest_path(self, epoch: int) -> str:
        return os.path.join(self.directory, DIGESTS, f"{epoch}.json")

    @_writes
    def save(self, epoch: int, tree: Any) -> None:
        """Save `tree` as host arrays (numpy scalars too): a group lives on one process's devices, which
        Orbax's multi-process mode would refuse as host-local jax.Arrays. Its digest goes first, so
        that a checkpoint never lacks one; digests of epochs no longer kept go."""
        tree = jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
        folder = os.path.join(self.directory, DIGESTS)
        os.makedirs(folder, exist_ok=True)
        atomic_write_json(self._digest_path(epoch), digest(tree))
        for name in set(os.listdir(folder)) - {f"{e}.json" for e in (*self.all_epochs(), epoch)}:
            os.remove(os.path.join(folder, name))
        self._manager.save(epoch, args=ocp.args.PyTreeSave(tree))

    def restore(self, epoch: int, abstract_tree: Any) -> Any:
        """Restore onto `abstract_tree` (from jax.eval_shape) as host arrays. A damaged or incomplete checkpoint
        (a leaf of another shape or dtype than the tree's, arrays that differ from those saved) raises
        ValueError or Orbax's error; a read the machine failed (an I/O or permission error, no file handles)
        raises ConfigError, and one without the memory MemoryError, the checkpoint being good for a later try."""
        try:
            return self._restore(epoch, abstract_tree)
        except (OSError, ValueError) as e:
            if (error := _os_error(e)) is not None and error[0] == errno.ENOMEM:
                raise MemoryError(f"restoring the checkpoint after epoch {epoch} in {self.directory!r}: "
                                  f"{error[1]}") from e
            if error is None or error[0] not in _MACHINE_READ_ERRNOS:
                raise
            raise ConfigError("workdir", f"cannot read the checkpoint after epoch {epoch} in {self.directory!r}: "
                              f"{error[1]}; it is kept: mend that, then rerun the same command to resume "
                              "from it") from e

    def _restore(self, epoch: int, abstract_tree: Any) -> Any:
        target = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), abstract_tree)
        # Read as stored (Orbax would cast to a dtype given here), then compared.
        as_stored = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        tree = self._manager.restore(epoch, args=ocp.args.PyTreeRestore(target, restore_args=as_stored))
        for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(target), jax.tree_util.tree_leaves(tree)):
            got = np.asarray(got)
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(f"{jax.tree_util.keystr(path)}: {got.dtype}{list(got.shape)} in the checkpoint, "
                                 f"{want.dtype}{list(want.shape)} expected")
        if os.path.exists(self._digest_path(epoch)):  # checkpoints saved before digests have none
            with open(self._digest_path(epoch)) as f:
                saved = json.load(f)
            read = digest(tree)
            changed = sorted(k for k in {**saved, **read} if read.get(k) != saved.get(k))
            if changed:
                raise ValueError(f"{len(changed)} arrays differ from those saved (CRC-32), such as {changed[0]}")
        return tree

    @_writes
    def save_losses(self, epoch: int, losses: np.ndarray) -> None:
        """Epoch `epoch`'s mean training loss per run [runs], kept for the results' loss curves (a resume
        takes the last epoch's from the checkpoint itself). Every epoch's file stays until the group is done."""
        os.makedirs(os.path.join(self.directory, LOSSES), exist_ok=True)
        atomic_write_json(os.path.join(self.directory, LOSSES, f"{epoch}.json"),
                          [float(x) if np.isfinite(x) else None for x in np.asarray(losses, np.float64)])

    def losses(self, epochs: int, n_runs: int) -> np.ndarray:
        """Epochs 1..epochs' saved losses [epochs, runs]; NaN where an epoch's file is missing or unreadable
        (a checkpoint of older code): a curve with a gap, never a reason to train again."""
        out = np.full((epochs, n_runs), np.nan)
        for epoch in range(1, epochs + 1):
            try:
                with open(os.path.join(self.directory, LOSSES, f"{epoch}.json")) as f:
                    row = np.asarray(json.load(f), np.float64)  # None reads as NaN
            except (OSError, ValueError, TypeError):
                continue
            if row.shape == (n_runs,):
                out[epoch - 1] = row
        return out

    @_writes
    def wait(self) -> None:
        """Block until every save has reached the disk."""
        self._manager.wait_until_finished()

    @_writes
    def close(self) -> None:
        try:
            self._manager.wait_until_finished()
        finally:  # a failed background save raises here: the manager's threads close all the same
            try:
                self._manager.close()
            finally:
                _open.discard(os.path.abspath(self.directory))
