"""In-memory data sets and deterministic, resumable, per-process batching.

Every training batch is a pure function of ``(seed, step)``: the examples of
step ``s`` are a slice of a permutation seeded by ``(seed, epoch)``. A run
resumed from a checkpoint at step ``s`` therefore sees exactly the batches an
uninterrupted run sees, with no iterator state to save. The trainer keeps an
in-memory training split on the devices and gathers each batch inside the
compiled step (:func:`train_indices` is a JAX function); :func:`train_batch` is
the same batch gathered on the host.

Batches are global: B is the batch size summed over all processes. With P
processes, process ``p`` loads only rows ``[p * B/P, (p+1) * B/P)`` of each
global batch, which is the shard ``jax.make_array_from_process_local_data``
expects for a batch sharded over the ``data`` axis.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


# eq=False: the generated __eq__ would compare arrays element-wise and fail on
# their ambiguous truth value; data sets compare by identity.
@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """One labelled split in host memory.

  Attributes:
    images: ``[N, H, W, C]`` uint8.
    labels: ``[N]`` int32 class indices.
  """
  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.dtype != np.uint8:
      raise ValueError(f"ArrayDataset: images must be uint8 [N, H, W, C], got "
                       f"{self.images.dtype} {self.images.shape}.")
    if self.labels.ndim != 1 or self.labels.dtype != np.int32:
      raise ValueError(f"ArrayDataset: labels must be int32 [N], got "
                       f"{self.labels.dtype} {self.labels.shape}.")
    if len(self.images) != len(self.labels):
      raise ValueError(f"ArrayDataset: {len(self.images)} images but "
                       f"{len(self.labels)} labels.")

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True, eq=False)
class InMemoryData:
  """A data set with its splits and the statistics training needs.

  Attributes:
    train: the (long-tailed) training split.
    validation: a balanced split held out from the training data, or None when
      the data set has none.
    test: the balanced evaluation split.
    num_classes: C.
    mean: per-channel mean of the training images scaled to ``[0, 1]``.
    std: per-channel standard deviation of the same.
    class_names: ``[C]`` names of the classes, or None where they are indices.
  """
  train: ArrayDataset
  validation: Optional[ArrayDataset]
  test: ArrayDataset
  num_classes: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  class_names: Optional[Tuple[str, ...]] = None

  @property
  def class_counts(self) -> Tuple[int, ...]:
    """``[C]`` training examples per class, zero for a class with none."""
    counts = np.bincount(self.train.labels, minlength=self.num_classes)
    return tuple(int(n) for n in counts)

  @property
  def num_train(self) -> int:
    return len(self.train)

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return tuple(self.train.images.shape[1:])

  @property
  def has_validation(self) -> bool:
    return self.validation is not None


def channel_mean_std(images: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
  """Per-channel mean and standard deviation of uint8 ``[N, H, W, C]`` images
  scaled to ``[0, 1]``, accumulated in float64 without a float copy of the set."""
  channels = images.shape[-1]
  total = np.zeros(channels)
  squares = np.zeros(channels)
  for start in range(0, len(images), 1024):
    chunk = images[start:start + 1024].reshape(-1, channels).astype(np.float64) / 255
    total += chunk.sum(axis=0)
    squares += np.square(chunk).sum(axis=0)
  count = images.size // channels
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Training steps in one epoch, ``N // B``.

  The incomplete last batch is dropped (PyTorch's ``drop_last=True``; the
  LDAM-DRW reference keeps it) so that every step has the same shape and the
  train step compiles once. Each epoch is a fresh permutation, so the
  ``N % B`` examples left out change from epoch to epoch.

  Args:
    num_examples: N, the size of the training split.
    global_batch_size: B, summed over all processes.

  Returns:
    The number of full global batches in one pass over the data.
  """
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
  steps = num_examples // global_batch_size
  if steps == 0:
    raise ValueError(f"global batch size {global_batch_size} exceeds the "
                     f"{num_examples} training examples: an epoch has no full "
                     f"batch.")
  return steps


def train_indices(num_examples: int, *, step, global_batch_size: int,
                  seed: int) -> jax.Array:
  """Indices of the examples in global training batch ``step``.

  ``epoch = step // steps_per_epoch``; the epoch's order is
  ``jax.random.permutation(fold_in(PRNGKey(seed), epoch), N)`` and the batch is
  the ``step % steps_per_epoch``-th block of B entries of it. A pure JAX
  function, so the train step computes its own batch from ``state.step`` on the
  device (``step`` may be traced) and the host computes the same indices.

  Args:
    num_examples: N.
    step: 0-based global step, an int or a traced int32 scalar.
    global_batch_size: B.
    seed: non-negative data seed, an int or a traced int32 scalar.

  Returns:
    ``[B]`` int32 distinct indices into the training split.
  """
  if any(isinstance(v, (int, np.integer)) and v < 0 for v in (step, seed)):
    raise ValueError(f"train_indices: step and seed must be >= 0, got "
                     f"step={step}, seed={seed}.")
  per_epoch = steps_per_epoch(num_examples, global_batch_size)
  epoch, position = jnp.divmod(jnp.asarray(step, jnp.int32), per_epoch)
  order = jax.random.permutation(
      jax.random.fold_in(jax.random.PRNGKey(seed), epoch), num_examples)
  return jax.lax.dynamic_slice_in_dim(
      order.astype(jnp.int32), position * global_batch_size, global_batch_size)


def _local_batch_size(global_batch_size: int, process_index: int,
                      process_count: int) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got "
                     f"{process_index}.")
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible "
                     f"by the process count {process_count}: every process "
                     f"must load the same number of examples.")
  return global_batch_size // process_count


def train_batch(dataset: ArrayDataset, *, step: int, global_batch_size: int,
                seed: int, process_index: int = 0,
                process_count: int = 1) -> dict:
  """This process's share of global training batch ``step``.

  Args:
    dataset: the training split, N examples.
    step: 0-based global step.
    global_batch_size: B, summed over all processes.
    seed: data seed, the same on every process.
    process_index: p, this process (``jax.process_index()``).
    process_count: P (``jax.process_count()``), must divide B.

  Returns:
    ``{'images': [B/P, H, W, C] uint8, 'labels': [B/P] int32}``, rows
    ``[p * B/P, (p+1) * B/P)`` of the global batch; only these rows are read.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  indices = np.asarray(train_indices(len(dataset), step=step,
                                    global_batch_size=global_batch_size, seed=seed))
  indices = indices[process_index * local:(process_index + 1) * local]
  return {"images": dataset.images[indices], "labels": dataset.labels[indices]}


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  """Global batches :func:`eval_batches` yields, ``ceil(N / B)``."""
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
  return -(-num_examples // global_batch_size)


def eval_batches(dataset: ArrayDataset, *, global_batch_size: int,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """This process's share of every evaluation batch, covering each example once.

  The N examples are taken in order in ``ceil(N / B)`` global batches. The last
  one is padded to B rows with copies of example 0, so every batch has the
  shape the compiled eval step expects; ``mask`` is False on the padding.

  Args:
    dataset: the split to evaluate, N examples.
    global_batch_size: B, summed over all processes.
    process_index: p, this process.
    process_count: P, must divide B.

  Yields:
    ``{'images': [B/P, H, W, C] uint8, 'labels': [B/P] int32,
    'mask': [B/P] bool}``, rows ``[p * B/P, (p+1) * B/P)`` of each global batch.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  num_examples = len(dataset)
  for batch in range(num_eval_batches(num_examples, global_batch_size)):
    start = batch * global_batch_size + process_index * local
    positions = np.arange(start, start + local)
    mask = positions < num_examples
    indices = np.where(mask, positions, 0)
    yield {"images": dataset.images[indices],
           "labels": dataset.labels[indices],
           "mask": mask}
