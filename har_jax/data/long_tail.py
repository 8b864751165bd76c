"""Long-tailed class counts (the LDAM-DRW rule), seeded long-tailed subsets and
many/medium/few shot groups."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

MANY, MEDIUM, FEW = 0, 1, 2
SHOT_GROUP_NAMES = ("many", "medium", "few")


def long_tail_counts(n_max: int, num_classes: int,
                     imbalance_factor: float) -> List[int]:
  """Exponentially decaying class sizes, ``n_i = int(n_max * (1/rho)**(i/(C-1)))``.

  This is the LDAM-DRW construction of CIFAR-10/100-LT: class 0 keeps
  ``n_max`` examples and class ``C-1`` keeps ``n_max / rho``.

  Args:
    n_max: size of the largest (first) class.
    num_classes: C.
    imbalance_factor: rho = n_max / n_min, at least 1.

  Returns:
    C integers, non-increasing.
  """
  if num_classes < 1 or n_max < 1:
    raise ValueError(f"long_tail_counts: need n_max >= 1 and num_classes >= 1, "
                     f"got n_max={n_max}, num_classes={num_classes}.")
  if not imbalance_factor >= 1:
    raise ValueError(f"imbalance_factor must be >= 1 (n_max / n_min), got "
                     f"{imbalance_factor}.")
  if num_classes == 1:
    return [int(n_max)]
  counts = [int(n_max * (1.0 / imbalance_factor) ** (i / (num_classes - 1.0)))
            for i in range(num_classes)]
  if counts[-1] < 1:
    empty = next(i for i, n in enumerate(counts) if n < 1)
    raise ValueError(
        f"imbalance_factor {imbalance_factor} leaves class {empty} empty "
        f"(n_max={n_max}, {num_classes} classes); use an imbalance factor of at "
        f"most {n_max}.")
  return counts


def subsample_counts(class_counts: Sequence[int],
                     imbalance_factor: float) -> List[int]:
  """What each class of a collected split keeps under the LDAM-DRW rule.

  Classes are ranked by size, largest first (ties by index); the class of rank
  r keeps ``long_tail_counts(n_max, C, rho)[r]`` examples, ``n_max`` the largest
  class, or all it has when that is fewer. On a balanced split this is
  CIFAR-LT's construction; rho = 1 keeps every class whole.

  Args:
    class_counts: ``[C]`` examples per class, each at least 1.
    imbalance_factor: rho, at least 1.

  Returns:
    C integers, each at most the class's count.
  """
  counts = np.asarray(class_counts, np.int64)
  targets = long_tail_counts(int(counts.max()), len(counts), imbalance_factor)
  by_size = np.argsort(-counts, kind="stable")
  kept = np.empty_like(counts)
  kept[by_size] = np.minimum(counts[by_size], targets)
  return [int(n) for n in kept]


def long_tail_subset(labels: np.ndarray, counts: Sequence[int], seed: int,
                     held_out_per_class: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """The LDAM-DRW long-tailed subset of a balanced training split.

  For each class in order, its indices are shuffled by one
  ``np.random.RandomState(seed)``; the first ``held_out_per_class`` go to the
  held-out (validation) split and the next ``counts[class]`` to training.

  Args:
    labels: ``[N]`` labels of the balanced split.
    counts: ``[C]`` training examples to keep per class.
    seed: the subset's seed (LDAM-DRW uses 0).
    held_out_per_class: validation examples per class, taken first.

  Returns:
    ``(train_indices, held_out_indices)``, each ordered by class.

  Raises:
    ValueError: naming a class that has too few examples.
  """
  rng = np.random.RandomState(seed)
  train, held_out = [], []
  for label, count in enumerate(counts):
    indices = np.flatnonzero(labels == label)
    needed = held_out_per_class + count
    if len(indices) < needed:
      raise ValueError(f"class {label} has {len(indices)} training examples; "
                       f"the long tail needs {needed} ({held_out_per_class} "
                       f"held out + {count}).")
    rng.shuffle(indices)
    held_out.append(indices[:held_out_per_class])
    train.append(indices[held_out_per_class:needed])
  return np.concatenate(train), np.concatenate(held_out)


def shot_groups(class_counts: Sequence[int], many: int = 100,
                few: int = 20) -> np.ndarray:
  """Shot group of each class: many (> ``many``), medium, few (< ``few``).

  Args:
    class_counts: ``[C]`` training examples per class.
    many: classes with more than this many examples are "many-shot".
    few: classes with fewer than this many examples are "few-shot".

  Returns:
    ``[C]`` int32 array with values MANY (0), MEDIUM (1) or FEW (2).
  """
  if few > many:
    raise ValueError(f"shot_groups: the few-shot bound ({few}) must not exceed "
                     f"the many-shot bound ({many}).")
  counts = np.asarray(class_counts)
  groups = np.full(counts.shape, MEDIUM, dtype=np.int32)
  groups[counts > many] = MANY
  groups[counts < few] = FEW
  return groups
