"""The offline default data set: long-tailed handwritten digits.

scikit-learn ships the UCI optical-recognition digits (1797 grayscale 8x8
images, about 180 per class) inside its wheel, so this data set needs neither a
download nor TensorFlow. It stands in for CIFAR-LT in smoke tests and examples.
"""

from __future__ import annotations

import numpy as np

from har_jax.data.long_tail import long_tail_counts
from har_jax.data.pipeline import ArrayDataset
from har_jax.data.pipeline import InMemoryData
from har_jax.data.pipeline import channel_mean_std

NUM_CLASSES = 10
# The digits' pixel values are counts of set bits in 4x4 blocks, 0..16.
_MAX_PIXEL = 16


def load_digits(*, imbalance_factor: float, seed: int, test_per_class: int = 50,
                validation_per_class: int = 10) -> InMemoryData:
  """Long-tailed digits with balanced validation and test splits.

  Each class is shuffled with a generator seeded by ``seed``; its first
  ``test_per_class`` examples go to the test split, the next
  ``validation_per_class`` to the validation split, and the rest form the
  training pool. Class i keeps the first ``long_tail_counts(n_max, 10,
  imbalance_factor)[i]`` examples of its shuffled pool (the LDAM-DRW
  convention), where ``n_max`` is the smallest pool so that every class can
  supply its count.

  Args:
    imbalance_factor: rho = n_max / n_min of the training split, at least 1.
    seed: selects the split and the long-tailed subset.
    test_per_class: test examples of every class.
    validation_per_class: validation examples of every class; 0 gives no
      validation split.

  Returns:
    Images uint8 ``[N, 8, 8, 1]`` with pixel values scaled from 0..16 to
    0..255, int32 labels; splits ordered by class.
  """
  if test_per_class < 1 or validation_per_class < 0:
    raise ValueError(f"load_digits: need test_per_class >= 1 and "
                     f"validation_per_class >= 0, got {test_per_class} and "
                     f"{validation_per_class}.")
  # Imported here: the trainer needs scikit-learn ([train]); the train step and
  # the library do not.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / _MAX_PIXEL)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)

  held_out = test_per_class + validation_per_class
  smallest_class = int(np.bincount(labels, minlength=NUM_CLASSES).min())
  if held_out >= smallest_class:
    raise ValueError(f"load_digits: {test_per_class} test and "
                     f"{validation_per_class} validation examples per class leave "
                     f"no training examples in the smallest class "
                     f"({smallest_class} examples).")
  counts = long_tail_counts(smallest_class - held_out, NUM_CLASSES,
                            imbalance_factor)

  rng = np.random.default_rng(seed)
  test, validation, train = [], [], []
  for label in range(NUM_CLASSES):
    order = rng.permutation(np.flatnonzero(labels == label))
    test.append(order[:test_per_class])
    validation.append(order[test_per_class:held_out])
    train.append(order[held_out:held_out + counts[label]])

  def split(indices):
    indices = np.concatenate(indices)
    return ArrayDataset(images=images[indices], labels=labels[indices])

  train_split = split(train)
  mean, std = channel_mean_std(train_split.images)
  return InMemoryData(
      train=train_split,
      validation=split(validation) if validation_per_class else None,
      test=split(test),
      num_classes=NUM_CLASSES,
      mean=mean, std=std)
