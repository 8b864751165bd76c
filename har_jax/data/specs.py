"""The input shape and class count of each data set, known without loading it.

The benchmark builds synthetic batches from this table; a trainer can check a
loaded data set against it.
"""

from typing import NamedTuple


class DatasetSpec(NamedTuple):
  image_shape: tuple[int, int, int]  # (H, W, C) of one image as the model sees it
  num_classes: int


DATASET_SPECS = {
    "digits": DatasetSpec((8, 8, 1), 10),
    "cifar10": DatasetSpec((32, 32, 3), 10),
    "cifar100": DatasetSpec((32, 32, 3), 100),
    "imagenet_lt": DatasetSpec((224, 224, 3), 1000),
    "i_naturalist2018": DatasetSpec((224, 224, 3), 8142),
}


def dataset_spec(name: str) -> DatasetSpec:
  """The spec of data set ``name``; ValueError naming the known ones otherwise."""
  if name not in DATASET_SPECS:
    raise ValueError(f"unknown data set {name!r}; known are {sorted(DATASET_SPECS)}")
  return DATASET_SPECS[name]
