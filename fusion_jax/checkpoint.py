"""Orbax checkpoints of a group's stacked train state, saved at epoch boundaries."""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class GroupCheckpoints:
    """A CheckpointManager over `directory`; the step number is the count of finished epochs."""

    def __init__(self, directory: str, keep: int):
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_epoch(self) -> int | None:
        return self._manager.latest_step()

    def all_epochs(self) -> list[int]:
        return list(self._manager.all_steps())

    def delete(self, epoch: int) -> None:
        self._manager.delete(epoch)

    def save(self, epoch: int, tree: Any) -> None:
        self._manager.save(epoch, args=ocp.args.StandardSave(tree))

    def restore(self, epoch: int, abstract_tree: Any) -> Any:
        """Restore onto `abstract_tree` (from jax.eval_shape), so shapes and dtypes are checked."""
        return self._manager.restore(epoch, args=ocp.args.StandardRestore(abstract_tree))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
