"""A user's class folders as a data set: the layout's checks, the classes, the files.

  ROOT/train/<class>/...        the classes: these folders' names, sorted
  ROOT/test/<class>/...
  ROOT/validation/<class>/...   optional

Every file under a class folder (its sub-folders included, symbolic links
followed) whose extension names a format TensorFlow's image decoder reads is
an example of that class; hidden files are skipped and other files are counted
in :attr:`FolderIndex.ignored`. Folders and files are listed in sorted order,
so an index is a pure function of the folder's contents. Nothing here decodes
an image or imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Tuple

import numpy as np

from har_jax.data import long_tail
from har_jax.data import specs

# What tf.io.decode_image reads (its JPEG XL support is too recent to rely on).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
SPLITS = ("train", "validation", "test")
LAYOUT = ("ROOT/train/<class>/* and ROOT/test/<class>/*, optionally "
          "ROOT/validation/<class>/*")


class FolderError(ValueError):
  """The folder cannot be read as a data set; the message names the path at
  fault and what to do."""


@dataclasses.dataclass(frozen=True, eq=False)
class FolderSplit:
  """The files of one split.

  Attributes:
    paths: ``[N]`` file paths (str).
    labels: ``[N]`` int32 class indices.
  """
  paths: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: np.ndarray) -> "FolderSplit":
    return FolderSplit(paths=self.paths[indices], labels=self.labels[indices])

  def counts(self, num_classes: int) -> Tuple[int, ...]:
    return tuple(int(n) for n in np.bincount(self.labels, minlength=num_classes))


@dataclasses.dataclass(frozen=True, eq=False)
class FolderIndex:
  """Every image file of a folder, by split and class.

  Attributes:
    root: ROOT.
    class_names: ``[C]`` the class folders of ``ROOT/train``, sorted.
    splits: ``"train"``, ``"test"`` and, when ROOT has one, ``"validation"``.
    ignored: files under the class folders whose extension is not an image's.
    other_folders: folders of ROOT that are not a split (not read).
  """
  root: str
  class_names: Tuple[str, ...]
  splits: Dict[str, FolderSplit]
  ignored: Tuple[str, ...]
  other_folders: Tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _folders(path: str) -> list:
  return sorted(name for name in os.listdir(path)
                if not name.startswith(".") and os.path.isdir(os.path.join(path, name)))


def class_names(root: str) -> Tuple[str, ...]:
  """The sorted class folders of ``ROOT/train``, after checking the layout's
  top level (ROOT, ``train/`` and ``test/`` exist; at least two classes).

  Raises:
    FolderError: naming what is missing.
  """
  if not os.path.isdir(root):
    raise FolderError(f"data_dir {root} is not a directory; image_folder reads "
                      f"{LAYOUT}.")
  for split in ("train", "test"):
    if not os.path.isdir(os.path.join(root, split)):
      raise FolderError(f"{root} has no {split}/ folder; image_folder reads {LAYOUT}.")
  names = tuple(_folders(os.path.join(root, "train")))
  if len(names) < 2:
    raise FolderError(
        f"{os.path.join(root, 'train')} holds {len(names)} class folder(s) "
        f"{list(names)}; a classifier needs at least two (one folder per class).")
  return names


def dataset_spec(root: str, image_size: int) -> specs.DatasetSpec:
  """The input shape ``(S, S, 3)`` and class count of the folder, from its
  ``train/`` class folders alone (no image is read)."""
  return specs.DatasetSpec((image_size, image_size, 3), len(class_names(root)))


def _image_files(class_dir: str) -> Tuple[list, list]:
  """(image files, other files) under ``class_dir``, recursively, sorted."""
  images, others = [], []
  for directory, subfolders, files in os.walk(class_dir, followlinks=True):
    subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
    for name in sorted(files):
      if name.startswith("."):
        continue
      path = os.path.join(directory, name)
      (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(path)
  return images, others


def scan(root: str) -> FolderIndex:
  """Lists the folder and checks its layout.

  Raises:
    FolderError: a missing ``train/`` or ``test/``, fewer than two classes, a
      split folder without class folders, a class folder without images, or a
      test or validation class that ``train/`` lacks.
  """
  names = class_names(root)
  label_of = {name: label for label, name in enumerate(names)}
  splits, ignored = {}, []
  for split in SPLITS:
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      continue
    paths, labels = [], []
    split_classes = _folders(split_dir)
    if not split_classes:
      raise FolderError(f"{split_dir} holds no class folder; image_folder reads "
                        f"{LAYOUT}.")
    for name in split_classes:
      class_dir = os.path.join(split_dir, name)
      if name not in label_of:
        raise FolderError(
            f"{class_dir} is a class that {os.path.join(root, 'train')} lacks; every "
            f"{split} class needs training images (add "
            f"{os.path.join(root, 'train', name)}/ or remove {class_dir}).")
      images, others = _image_files(class_dir)
      if not images:
        found = (f"; its {len(others)} other file(s), e.g. {others[0]}, are not of "
                 f"these types" if others else "")
        raise FolderError(
            f"class folder {class_dir} holds no image ({', '.join(IMAGE_EXTENSIONS)})"
            f"{found}; add images or remove the folder.")
      paths += images
      labels += [label_of[name]] * len(images)
      ignored += others
    splits[split] = FolderSplit(paths=np.array(paths, dtype=str),
                                labels=np.array(labels, np.int32))
  other_folders = tuple(os.path.join(root, name) for name in _folders(root)
                        if name not in SPLITS)
  return FolderIndex(root=root, class_names=names, splits=splits,
                     ignored=tuple(ignored), other_folders=other_folders)


def select(index: FolderIndex, *, validation_per_class: int, imbalance_factor: float,
           seed: int) -> Dict[str, FolderSplit]:
  """The splits a run uses: ``train``, ``test`` and ``validation`` when there is one.

  Without ``ROOT/validation``, ``validation_per_class`` images of each class are
  held out of ``ROOT/train`` as a balanced validation split (as for CIFAR). Then
  ``imbalance_factor`` rho > 1 subsamples the training images by the LDAM-DRW
  rule over the classes ranked by size (``long_tail.subsample_counts``); rho = 1
  keeps them all. Both draws are seeded by ``seed``
  (``long_tail.long_tail_subset``).

  Raises:
    FolderError: a validation folder and ``validation_per_class`` both given,
      a class that holding out would empty, or a rho that would empty one.
  """
  train = index.splits["train"]
  has_folder = "validation" in index.splits
  if has_folder and validation_per_class:
    raise FolderError(
        f"{os.path.join(index.root, 'validation')} exists and validation_per_class "
        f"is {validation_per_class}: use one; set --config.validation_per_class=0 "
        f"to validate on the folder.")
  counts = np.asarray(train.counts(index.num_classes))
  held_out = 0 if has_folder else validation_per_class
  short = np.flatnonzero(counts <= held_out)
  if short.size:
    name = index.class_names[short[0]]
    raise FolderError(
        f"class {name!r} has {counts[short[0]]} training image(s); "
        f"validation_per_class={held_out} holds out {held_out} of each class and "
        f"would leave it none. Lower validation_per_class or add images.")
  remaining = counts - held_out
  if imbalance_factor > remaining.max():
    raise FolderError(
        f"imbalance_factor {imbalance_factor:g} would leave the smallest classes "
        f"empty: the largest class has {remaining.max()} training images, so the "
        f"factor can be at most that (1 keeps the folder's own split).")
  kept = long_tail.subsample_counts(remaining, imbalance_factor)
  train_indices, held_out_indices = long_tail.long_tail_subset(
      train.labels, kept, seed, held_out)
  splits = {"train": train.take(train_indices), "test": index.splits["test"]}
  if has_folder:
    splits["validation"] = index.splits["validation"]
  elif held_out:
    splits["validation"] = train.take(held_out_indices)
  return splits

