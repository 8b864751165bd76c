"""Checkpoints of a train state: orbax, asynchronous, bounded, resumable.

``Checkpointer`` wraps an ``orbax.checkpoint.CheckpointManager``. Every process
of a multi-process run makes the same calls in the same order; orbax decides
which process writes what, and the barriers between them.

Layout: ``DIRECTORY/<step>/state/...``. The train state is saved as the named
item ``state`` rather than orbax's unnamed default item, because orbax decides
once per manager, from the first step directory it looks at, whether items are
named; a checkpoint whose item directory was lost would otherwise lock that
decision wrongly and make every older checkpoint unreadable as well.

A save that is interrupted leaves only a ``<step>.orbax-checkpoint-tmp-*``
directory, which orbax never lists as a step; ``Checkpointer`` removes such
leftovers when it starts.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple, Union

from absl import logging
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

_ITEM = "state"


class Checkpointer:
  """Orbax CheckpointManager for a train state.

  Saves are asynchronous, a bounded number of checkpoints is kept, and restore
  falls back past checkpoints that cannot be read.

  Example::

    checkpointer = Checkpointer(workdir / "checkpoints")
    state, step = checkpointer.restore_latest(abstract_state)
    ...
    checkpointer.save(step, state)
    ...
    checkpointer.close()
  """

  def __init__(self,
               directory: Union[str, os.PathLike],
               *,
               max_to_keep: int = 3,
               async_save: bool = True):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where the step directories live.
      max_to_keep: the newest this many checkpoints are kept, older ones are
        deleted once a newer save is complete.
      async_save: write checkpoints in a background thread. ``save`` then
        returns once the arrays are copied to host memory, so the caller may
        donate or overwrite the device buffers right away.
    """
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
    self._directory = os.fspath(directory)
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        ))
    # Steps that `restore_latest` skipped; see `save`.
    self._unreadable_steps = []

  def save(self, step: int, state: PyTree, *, wait: bool = False) -> None:
    """Saves ``state`` as the checkpoint of ``step``.

    Does nothing when a checkpoint of ``step`` or of a later step already
    exists (orbax's rule), so saving again after a resume is harmless.

    Args:
      step: the training step the state belongs to.
      state: any pytree of ``jax.Array`` (sharded or not), NumPy arrays and
        scalars, e.g. a ``flax.struct`` train state.
      wait: block until the checkpoint is complete on disk, as needed at the
        end of a run or before a preempted process exits.
    """
    # The run resumed from a checkpoint older than these and will write their
    # steps again; orbax refuses to save at or below an existing step.
    for unreadable in self._unreadable_steps:
      logging.warning("Deleting unreadable checkpoint of step %d in %s.",
                      unreadable, self._directory)
      self._manager.delete(unreadable)
    self._unreadable_steps = []
    self._manager.save(
        step, args=ocp.args.Composite(**{_ITEM: ocp.args.StandardSave(state)}))
    if wait:
      self.wait()

  def restore_latest(
      self, abstract_state: PyTree) -> Tuple[Optional[PyTree], Optional[int]]:
    """Restores the newest checkpoint that can be read.

    A checkpoint that cannot be read (missing, truncated or corrupted files, or
    a structure that does not match ``abstract_state``) is logged as a warning
    and the next older one is tried. In a multi-process run a checkpoint counts
    as readable only if every process read it, so all resume from one step.

    Args:
      abstract_state: the state's pytree with ``jax.ShapeDtypeStruct`` leaves
        whose ``sharding`` is set (``jax.eval_shape`` plus the shardings);
        arrays are read directly into these shardings.

    Returns:
      ``(state, step)``, or ``(None, None)`` when the directory has no
      checkpoint.

    Raises:
      RuntimeError: checkpoints exist but none of them can be read.
    """
    # Orbax lists a step as soon as its save starts; reading it before the save
    # completes would fail and wrongly mark it unreadable.
    self.wait()
    steps = sorted(self._manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{_ITEM: ocp.args.StandardRestore(abstract_state)}))
        error = None
      # Orbax and TensorStore report damaged files as ValueError, KeyError,
      # OSError or JSONDecodeError, depending on which file is damaged.
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if _succeeded_on_every_process(error is None):
        self._unreadable_steps = [failed for failed, _ in errors]
        return restored[_ITEM], step
      error = error or "it could not be read on another process"
      logging.warning("Cannot read the checkpoint of step %d in %s (%s); "
                      "trying an older one.", step, self._directory, error)
      errors.append((step, error))
    if errors:
      details = "; ".join(f"step {step}: {error}" for step, error in errors)
      raise RuntimeError(f"None of the checkpoints in {self._directory} can "
                         f"be read. Tried steps {steps}: {details}")
    return None, None

  def latest_step(self) -> Optional[int]:
    """The newest saved step, readable or not, or None when there is none."""
    return self._manager.latest_step()

  def wait(self) -> None:
    """Blocks until every pending save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases orbax's threads."""
    self._manager.close()

  def reached_preemption(self, step: int) -> bool:
    """Whether all processes agreed that ``step`` is the one to save at.

    When one process of a ``jax.distributed`` run receives a preemption notice
    (SIGTERM), JAX agrees on a step at which every process saves and stops.
    Without ``jax.distributed`` this is always False.
    """
    return self._manager.reached_preemption(step)


def _succeeded_on_every_process(succeeded: bool) -> bool:
  """All-reduces a success flag over the processes of the run."""
  return bool(multihost_utils.process_allgather(np.asarray(succeeded)).all())
