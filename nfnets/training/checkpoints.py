"""Orbax checkpoints of the training state plus a small JSON record, no pickle.

A checkpoint is a step directory holding two items:

- ``state``: the host (un-replicated) training state pytree, saved with orbax's
  ``StandardSave`` (tensorstore/OCDBT arrays);
- ``meta``: a JSON dict (config, wall time spent so far, counters) saved with
  ``JsonSave``.

Restoring needs a target pytree with the same structure (the freshly initialised
state); arrays come back as numpy arrays with the target's dtypes. Which steps get
a periodic checkpoint is orbax's own ``FixedIntervalPolicy`` (``should_save``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _to_numpy(tree: Any) -> Any:
    """Host copy of ``tree`` with every leaf a numpy array (orbax rejects numpy scalars)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


class Checkpointer:
    """Periodic / final / on-signal checkpoints of one training run in ``directory``.

    Args:
      directory: folder for the step directories (created when missing).
      max_to_keep: how many most recent checkpoints to keep (older ones deleted).
      save_every_steps: ``should_save`` is True at multiples of this (0: never); the
        decision is orbax's ``FixedIntervalPolicy``.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, save_every_steps: int = 0):
        if max_to_keep < 1:
            raise ValueError(
                f"max_to_keep={max_to_keep}: keep at least 1 checkpoint "
                "(set config.keep_checkpoints >= 1)"
            )
        if save_every_steps < 0:
            raise ValueError(
                f"save_every_steps={save_every_steps} must be >= 0 (0 saves only at the end)"
            )
        self.directory = os.path.abspath(directory)
        self.save_every_steps = save_every_steps
        policy = None
        if save_every_steps:
            policy = ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, save_decision_policy=policy
            ),
        )

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every kept checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves ``state`` (host pytree or device arrays) and the JSON ``meta`` at ``step``.

        Blocks until the checkpoint is on disk, so a run killed right after still
        has it. Saving a step that already exists is a no-op.
        """
        if step in self._manager.all_steps():
            return
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_numpy(state)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def should_save(self, step: int) -> bool:
        """True at the multiples of ``save_every_steps`` not saved yet (never when it is 0)."""
        return bool(self.save_every_steps) and self._manager.should_save(int(step))

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores ``(state, meta)`` at ``step`` (default: latest) into ``target``'s structure."""
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory} to restore")
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_to_numpy(target)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, dict(restored.meta)

    def read_meta(self, step: int | None = None) -> dict | None:
        """The JSON ``meta`` of the checkpoint at ``step`` (default: latest) without the
        state, or None when there is no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self._manager.restore(
            int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return dict(restored.meta)

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
