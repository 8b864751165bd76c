"""Re-sampling: each class's share of a training batch, and the batches drawn with it.

A sampler gives class j the share ``s_j`` of every batch (DESIGN.md):

- ``instance``: ``s_j ∝ n_j``, every example equally likely (the default; the
  in-memory path keeps its epoch permutation, every example once an epoch);
- ``class_balanced``: ``s_j = 1 / C``;
- ``square_root``: ``s_j ∝ n_j**(1/2)``;
- ``progressive``: ``(1 - p) * instance + p * class_balanced`` at training
  progress ``p`` in ``[0, 1]`` (Kang et al. 2020);
- ``effective_number``: LDAM-DRW's re-sampling, example weights
  ``(1 - beta) / (1 - beta**n_j)``, so ``s_j ∝ n_j (1 - beta) / (1 - beta**n_j)``.

Examples are drawn with replacement, and an epoch stays ``N // B`` steps. A
start epoch gives deferred re-sampling (DRS): instance sampling before it.

In memory the batch of step ``s`` is a pure function of ``(seed, s)``
(:func:`resampled_indices`, a JAX function the train step runs), so a resumed
run and a run on any number of devices see the same batches. Streaming sets
repeat each example a random number of times with the mean its class needs
(``har_jax.data.streaming``), seeded by ``(seed, epoch)``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from har_jax.data import pipeline

Array = jax.Array
Progress = Union[float, Array]

# Folded into the data seed's key, so that the draws of re-sampling never
# coincide with the epoch permutations of pipeline.train_indices (keyed by epoch).
_RESAMPLING_STREAM = 0x7E5A


def _instance(counts: np.ndarray, progress: Progress, beta: float) -> Array:
  del progress, beta
  return jnp.asarray(counts / counts.sum(), jnp.float32)


def _class_balanced(counts: np.ndarray, progress: Progress, beta: float) -> Array:
  del progress, beta
  return jnp.full(counts.shape, 1.0 / counts.size, jnp.float32)


def _square_root(counts: np.ndarray, progress: Progress, beta: float) -> Array:
  del progress, beta
  root = np.sqrt(counts)
  return jnp.asarray(root / root.sum(), jnp.float32)


def _progressive(counts: np.ndarray, progress: Progress, beta: float) -> Array:
  progress = jnp.asarray(progress, jnp.float32)
  return ((1.0 - progress) * _instance(counts, progress, beta)
          + progress * _class_balanced(counts, progress, beta))


def _effective_number(counts: np.ndarray, progress: Progress, beta: float) -> Array:
  del progress
  mass = counts * (1.0 - beta) / (1.0 - np.power(beta, counts))
  return jnp.asarray(mass / mass.sum(), jnp.float32)


# Every member: (class counts [C] float64, progress, beta) -> shares [C].
_SHARES: dict[str, Callable[[np.ndarray, Progress, float], Array]] = {
    "instance": _instance,
    "class_balanced": _class_balanced,
    "square_root": _square_root,
    "progressive": _progressive,
    "effective_number": _effective_number,
}
SAMPLERS = tuple(_SHARES)


def class_sampling_shares(class_counts: Sequence[int], sampler: str,
                          progress: Progress = 0.0, *, beta: float = 0.9999) -> Array:
  """Each class's share of a training batch.

  Args:
    class_counts: ``[C]`` training examples per class (host values); every
      class needs one, except for ``instance`` sampling.
    sampler: one of :data:`SAMPLERS`.
    progress: fraction of training done, in ``[0, 1]``, for ``progressive``
      (may be traced).
    beta: ``effective_number``'s beta, in ``[0, 1)``.

  Returns:
    ``[C]`` float32 shares that sum to 1.
  """
  if sampler not in _SHARES:
    raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}.")
  counts = np.asarray(class_counts, np.float64)
  if counts.ndim != 1 or counts.size == 0 or np.any(counts < 0) or counts.sum() == 0:
    raise ValueError(f"class_sampling_shares: class_counts must be a [C] vector of "
                     f"counts with some examples, got {class_counts}.")
  empty = np.flatnonzero(counts == 0)
  if sampler != "instance" and empty.size:
    raise ValueError(f"class_sampling_shares: class {int(empty[0])} has no training "
                     f"examples; the {sampler} sampler would have to draw from it.")
  if isinstance(progress, (int, float)) and not 0.0 <= progress <= 1.0:
    raise ValueError(f"class_sampling_shares: progress must be in [0, 1], got "
                     f"{progress}.")
  if not 0.0 <= beta < 1.0:
    raise ValueError(f"class_sampling_shares: beta must be in [0, 1), got {beta}.")
  return _SHARES[sampler](counts, progress, beta)


def class_order(labels: np.ndarray) -> np.ndarray:
  """``[N]`` int32 indices of the examples sorted by class (stable): the table
  :func:`resampled_indices` draws from."""
  return np.argsort(labels, kind="stable").astype(np.int32)


def resampled_indices(order: Array, class_counts: Sequence[int], shares: Array, *,
                      step, seed, global_batch_size: int) -> Array:
  """Indices of global batch ``step``, drawn with replacement with class shares.

  Each row draws its class from ``shares``, then an example of that class
  uniformly. The key is the data seed's, folded with the step: a pure JAX
  function of ``(seed, step)``, computed on the device inside the train step.

  Args:
    order: ``[N]`` int32 examples sorted by class (:func:`class_order`).
    class_counts: ``[C]`` examples per class (host values), matching ``order``.
    shares: ``[C]`` class shares (may be traced, e.g. progressive ones).
    step: 0-based global step, an int or a traced int32 scalar.
    seed: data seed, an int or a traced int32 scalar.
    global_batch_size: B.

  Returns:
    ``[B]`` int32 indices into the training split.
  """
  counts = np.asarray(class_counts, np.int64)
  starts = jnp.asarray(np.cumsum(counts) - counts, jnp.int32)
  key = jax.random.fold_in(
      jax.random.fold_in(jax.random.PRNGKey(seed), _RESAMPLING_STREAM), step)
  class_key, example_key = jax.random.split(key)
  classes = jax.random.categorical(class_key, jnp.log(shares), shape=(global_batch_size,))
  offsets = jax.random.randint(example_key, (global_batch_size,), 0,
                               jnp.asarray(counts, jnp.int32)[classes])
  return jnp.asarray(order)[starts[classes] + offsets]


@dataclasses.dataclass(frozen=True)
class Resampling:
  """A run's re-sampling: the sampler, from which epoch, and its progress.

  Progress (for ``progressive``) is the fraction of the re-sampled part of
  the run done at the start of an epoch, ``(epoch - start) * steps_per_epoch
  / (total_steps - start * steps_per_epoch)`` with ``start`` the start epoch
  (0 when negative), so the shares move from instance to class-balanced over
  the epochs that re-sample. Methods take the epoch as an int or a traced
  scalar.
  """

  sampler: str
  class_counts: tuple
  steps_per_epoch: int
  total_steps: int
  start_epoch: int = -1   # negative: re-sample from the first step
  beta: float = 0.9999

  def __post_init__(self):
    class_sampling_shares(self.class_counts, self.sampler, beta=self.beta)  # validates

  def active(self, epoch):
    """Whether ``epoch`` re-samples (instance sampling before ``start_epoch``)."""
    return epoch >= max(self.start_epoch, 0)

  def progress(self, epoch) -> Array:
    start = max(self.start_epoch, 0)
    span = max(self.total_steps - start * self.steps_per_epoch, 1)
    return jnp.clip((epoch - start) * self.steps_per_epoch / span, 0.0, 1.0)

  def shares(self, epoch) -> Array:
    """``[C]`` class shares of the batches of ``epoch`` once it re-samples."""
    return class_sampling_shares(self.class_counts, self.sampler, self.progress(epoch),
                                 beta=self.beta)

  def train_indices(self, order: Array, *, step, seed, global_batch_size: int) -> Array:
    """``[B]`` indices of global batch ``step`` (see :func:`resampled_indices`);
    before the start epoch, the epoch permutation of ``pipeline.train_indices``."""
    epoch = step // self.steps_per_epoch
    drawn = resampled_indices(order, self.class_counts, self.shares(epoch), step=step,
                              seed=seed, global_batch_size=global_batch_size)
    if self.start_epoch <= 0:
      return drawn
    permuted = pipeline.train_indices(len(order), step=step,
                                      global_batch_size=global_batch_size, seed=seed)
    return jnp.where(self.active(epoch), drawn, permuted)

  def example_multiplicity(self, epoch: int) -> np.ndarray:
    """``[C]`` float64 mean copies of each example of class j in an epoch that
    re-samples, ``N s_j / n_j``, so that the epoch keeps about N examples."""
    counts = np.asarray(self.class_counts, np.float64)
    shares = np.asarray(self.shares(epoch), np.float64)
    return np.where(counts > 0, counts.sum() * shares / np.maximum(counts, 1), 0.0)
