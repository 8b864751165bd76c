"""Long-tailed class counts (the LDAM-DRW rule) and many/medium/few shot groups."""

from __future__ import annotations

from typing import List, Sequence

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
