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
import jax
import orbax.checkpoint as ocp

from har_jax import sharding

PyTree = Any

_ITEM = "state"
# Paths shown of each kind of difference in an IncompatibleCheckpointError.
_SHOWN = 3


class IncompatibleCheckpointError(RuntimeError):
  """A checkpoint holds arrays of another structure or shape than the state asked
  for (another model, exits or number of classes); no checkpoint was read."""


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
        # Named, so that item_metadata can read a step's structure.
        item_handlers={_ITEM: ocp.StandardCheckpointHandler()},
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

    A checkpoint that cannot be read (missing, truncated or corrupted files) is
    logged as a warning and the next older one is tried. In a multi-process run
    a checkpoint counts as readable only if every process read it, so all
    resume from one step. A checkpoint whose arrays have other paths or shapes
    than ``abstract_state`` is not damaged but another state's, and stops the
    restore before any array is read.

    Args:
      abstract_state: the state's pytree with ``jax.ShapeDtypeStruct`` leaves
        whose ``sharding`` is set (``jax.eval_shape`` plus the shardings);
        arrays are read directly into these shardings.

    Returns:
      ``(state, step)``, or ``(None, None)`` when the directory has no
      checkpoint.

    Raises:
      IncompatibleCheckpointError: the newest checkpoint whose structure can be
        read does not fit ``abstract_state``; the message says how.
      RuntimeError: checkpoints exist but none of them can be read.
    """
    # Orbax lists a step as soon as its save starts; reading it before the save
    # completes would fail and wrongly mark it unreadable.
    self.wait()
    steps = sorted(self._manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
      mismatch = self._mismatch(step, abstract_state)
      error = None
      if mismatch is None:
        try:
          restored = self._manager.restore(
              step,
              args=ocp.args.Composite(
                  **{_ITEM: ocp.args.StandardRestore(abstract_state)}))
        # Orbax and TensorStore report damaged files as ValueError, KeyError,
        # OSError or JSONDecodeError, depending on which file is damaged.
        except Exception as e:  # pylint: disable=broad-except
          error = e
      read, compatible = sharding.on_every_process(
          [mismatch is None and error is None, mismatch is None])
      if not compatible:
        raise IncompatibleCheckpointError(
            f"the checkpoint of step {step} in {self._directory} does not fit the "
            f"state asked for: {mismatch or 'another process says so'}")
      if read:
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

  def _mismatch(self, step: int, abstract_state: PyTree) -> Optional[str]:
    """How the arrays saved at ``step`` differ from ``abstract_state``'s, or None
    when they fit or their structure cannot be read (the restore then says why)."""
    try:
      saved = self._manager.item_metadata(step)[_ITEM]
    except Exception:  # pylint: disable=broad-except
      return None
    if saved is None:
      return None
    return structure_mismatch(_shapes(saved), _shapes(abstract_state))

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


def structure_mismatch(saved: dict, wanted: dict) -> Optional[str]:
  """How two trees of arrays differ, in one line, or None when they fit.

  Args:
    saved, wanted: ``{"params/stem/conv/kernel": shape}`` of the checkpoint and
      of the state asked for, the latter in its tree's order. Paths are shown
      shallow ones first, and by the order of their top-level field in
      ``wanted`` (a train state's parameters before its optimizer state).
  """
  ranks = {}
  for path in wanted:
    ranks.setdefault(path.split("/")[0], len(ranks))

  def order(path):
    return (path.count("/"), ranks.get(path.split("/")[0], len(ranks)), path)

  reshaped = [path for path in sorted(saved.keys() & wanted.keys(), key=order)
              if saved[path] != wanted[path]]
  parts = []
  if reshaped:
    parts.append("other shapes: " + _listed(
        [f"{path} {list(saved[path])} there, {list(wanted[path])} here"
         for path in reshaped]))
  for name, ours, theirs in (("checkpoint", saved, wanted),
                             ("state asked for", wanted, saved)):
    only = sorted(_unshared_subtrees(ours.keys() - theirs.keys(), theirs.keys()),
                  key=order)
    if only:
      parts.append(f"only in the {name}: {_listed(only)}")
  return "; ".join(parts) or None


def _listed(items: list) -> str:
  shown = ", ".join(items[:_SHOWN])
  return shown if len(items) <= _SHOWN else f"{shown} and {len(items) - _SHOWN} more"


def _shapes(tree: PyTree) -> dict:
  """``{path: shape}`` of a tree of arrays, abstract arrays or orbax metadata,
  as saved: typed PRNG keys as their key data."""
  def saved_shape(leaf):
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      leaf = jax.eval_shape(jax.random.key_data, leaf)
    return tuple(getattr(leaf, "shape", ()))

  return {"/".join(_key_name(key) for key in path): saved_shape(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _key_name(key) -> str:
  # Orbax saves attributes and tuple positions as dictionary keys.
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _unshared_subtrees(paths, other_paths) -> set:
  """The shortest prefixes of ``paths`` that no path of ``other_paths`` shares."""
  def shared(prefix):
    return any(other == prefix or other.startswith(prefix + "/") for other in other_paths)

  subtrees = set()
  for path in paths:
    parts = path.split("/")
    subtrees.add(next("/".join(parts[:length]) for length in range(1, len(parts) + 1)
                      if not shared("/".join(parts[:length]))))
  return subtrees
