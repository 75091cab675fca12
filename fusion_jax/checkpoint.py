"""Orbax checkpoints of a group's stacked train state, saved at epoch boundaries."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class GroupCheckpoints:
    """A CheckpointManager over `directory`; the step number is the count of finished epochs."""

    def __init__(self, directory: str, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        if jax.process_count() > 1:
            # Each process checkpoints its own groups: no barrier with the other processes.
            me = jax.process_index()
            os.makedirs(directory, exist_ok=True)
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=me, active_processes={me},
                    barrier_sync_key_prefix=os.path.basename(os.path.normpath(directory))))
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

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

    def save(self, epoch: int, tree: Any) -> None:
        """Save `tree` as host arrays: a group lives on one process's devices, which Orbax's
        multi-process mode would refuse as host-local jax.Arrays."""
        self._manager.save(epoch, args=ocp.args.StandardSave(jax.device_get(tree)))

    def restore(self, epoch: int, abstract_tree: Any) -> Any:
        """Restore onto `abstract_tree` (from jax.eval_shape) as host arrays; shapes and dtypes are checked."""
        target = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), abstract_tree)
        return self._manager.restore(epoch, args=ocp.args.StandardRestore(target))

    def wait(self) -> None:
        """Block until every save has reached the disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
