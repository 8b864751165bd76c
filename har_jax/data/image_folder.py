"""``dataset="image_folder"``: a user's own data set, read from class folders.

The layout, the class names (the folders of ``ROOT/train``, sorted) and which
files a run uses are :mod:`folder_index`'s. The files decode with TensorFlow's
image decoder (:func:`streaming.decode_rgb`: JPEG, PNG, GIF, BMP, WebP;
grayscale and colour alike become RGB). What happens next depends on the size
of the decoded training split at ``image_size`` square, against a budget:

- **within it**, every split is decoded once, its shorter side resized to
  ``image_size`` and the centre square kept (the resize of the streaming sets,
  without their 0.875 crop), and the whole is an ``InMemoryData``: the
  training split lives on the devices and the train step pads, crops and flips
  it there, as for CIFAR; channel statistics are the training images'.
- **beyond it**, a ``StreamingData`` reads the files as ImageNet-LT's tfds
  records are read: random-resized crops and flips for training, the shorter
  side to ``image_size / 0.875`` and a centre crop for evaluation, ImageNet's
  channel statistics. Each epoch reads the training files in an order seeded by
  the seed and the epoch (a shuffle of the whole list, so no shuffle buffer is
  needed), each process its contiguous share of that order. Before training,
  every file is decoded once to find the unreadable ones; with a workdir the
  result is kept in ``WORKDIR/image_folder_check.json`` for as long as the list
  of files stays the same, so a resumed run skips the pass.

A file that does not decode stops the load with one line naming it, or, with
``skip_unreadable``, is left out and counted in the log.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

from absl import logging
import numpy as np
import tensorflow as tf

from har_jax import sharding
from har_jax import workdir as workdir_lib
from har_jax.data import folder_index
from har_jax.data import streaming
from har_jax.data.folder_index import FolderError
from har_jax.data.folder_index import FolderSplit
from har_jax.data.pipeline import ArrayDataset
from har_jax.data.pipeline import InMemoryData
from har_jax.data.pipeline import channel_mean_std

NAME = "image_folder"
CHECK_FILE = "image_folder_check.json"
# The classes and training counts a workdir's run was started on.
CLASSES_FILE = "image_folder_classes.json"
_DECODE_BATCH = 256


def load_image_folder(root: str, *, image_size: int, memory_budget_mb: float,
                      imbalance_factor: float = 1.0, validation_per_class: int = 0,
                      seed: int = 0, skip_unreadable: bool = False,
                      process_index: int = 0, process_count: int = 1,
                      check_cache: Optional[str] = None
                      ) -> Union[InMemoryData, streaming.StreamingData]:
  """The folder ``root`` as an ``InMemoryData`` or a ``StreamingData``.

  Args:
    root: ROOT of ``ROOT/train/<class>/*``, ``ROOT/test/<class>/*`` and
      optionally ``ROOT/validation/<class>/*``.
    image_size: S; images become ``[S, S, 3]``.
    memory_budget_mb: the most MiB the decoded training split may take to be
      kept in memory; a larger one streams.
    imbalance_factor, validation_per_class, seed: the choice of files
      (:func:`folder_index.select`); 1 and 0 use the folder as it is.
    skip_unreadable: leave out (and count) files that do not decode, instead
      of stopping.
    process_index, process_count: this process and how many read the data.
    check_cache: where the streaming path keeps its check of the files.

  Raises:
    FolderError: the folder cannot be used; the message names the path.
  """
  index = folder_index.scan(root)
  _log_index(index)
  splits = folder_index.select(index, validation_per_class=validation_per_class,
                               imbalance_factor=imbalance_factor, seed=seed)
  _log_selection(index, splits, imbalance_factor=imbalance_factor,
                 held_out=validation_per_class)
  train_mib = len(splits["train"]) * image_size * image_size * 3 / 2**20
  choice = (f"image_folder: the {len(splits['train'])} training images decode to "
            f"{train_mib:.1f} MiB at {image_size}x{image_size}")
  if train_mib <= memory_budget_mb:
    logging.info("%s, within image_folder_memory_mb=%g: kept in memory and "
                 "augmented on the devices.", choice, memory_budget_mb)
    return _in_memory(index, splits, image_size, skip_unreadable)
  logging.info("%s, over image_folder_memory_mb=%g: streamed from the files with "
               "random-resized crops.", choice, memory_budget_mb)
  return _streaming(index, splits, image_size, skip_unreadable, process_index,
                    process_count, check_cache)


def load_from_config(config, *, workdir: Optional[str] = None
                     ) -> Union[InMemoryData, streaming.StreamingData]:
  """:func:`load_image_folder` with the fields of a run's config.

  With ``workdir``, the classes and training counts are recorded in
  ``WORKDIR/image_folder_classes.json`` on the first load and must match it on
  later ones: ``data_dir`` may change between a run's starts (a folder moved),
  the data set may not.
  """
  import jax  # pylint: disable=g-import-not-at-top
  data = load_image_folder(
      config.data_dir, image_size=config.image_size,
      memory_budget_mb=config.image_folder_memory_mb,
      imbalance_factor=config.imbalance_factor,
      validation_per_class=config.validation_per_class, seed=config.seed,
      skip_unreadable=config.image_folder_skip_unreadable,
      process_index=jax.process_index(), process_count=jax.process_count(),
      check_cache=os.path.join(workdir, CHECK_FILE) if workdir else None)
  if workdir:
    _check_same_classes(os.path.join(workdir, CLASSES_FILE), config.data_dir, data,
                        write=jax.process_index() == 0)
  return data


def _check_same_classes(path: str, root: str, data, *, write: bool) -> None:
  now = list(zip(data.class_names, data.class_counts))
  recorded = workdir_lib.read_json(path)
  if recorded is None:
    if write:
      workdir_lib.write_json(path, {"classes": now})
    return
  then = [tuple(pair) for pair in recorded["classes"]]
  if then == now:
    return
  first = next((i for i, (a, b) in enumerate(zip(then, now)) if a != b),
               min(len(then), len(now)))

  def shown(classes):
    text = f"{len(classes)} classes"
    if first < len(classes):
      text += (f", class {first} {classes[first][0]!r} with {classes[first][1]} "
               f"training images")
    return text

  raise FolderError(
      f"the run in {os.path.dirname(path)} was started on another folder "
      f"({shown(then)}) than {root} gives now ({shown(now)}); resume it on the "
      f"folder it was trained on, or give this folder a new workdir.")


def _log_index(index: folder_index.FolderIndex) -> None:
  sizes = ", ".join(f"{which} {len(split)}" for which, split in index.splits.items())
  names = list(index.class_names)
  shown = names if len(names) <= 12 else names[:6] + ["..."] + names[-6:]
  logging.info("image_folder %s: %d classes %s; images: %s.", index.root,
               index.num_classes, shown, sizes)
  if index.ignored:
    logging.warning("image_folder: %d file(s) under the class folders are not read: "
                    "their extension is not one of %s (e.g. %s).", len(index.ignored),
                    " ".join(folder_index.IMAGE_EXTENSIONS), index.ignored[0])
  for folder in index.other_folders:
    logging.warning("image_folder: %s is not a split folder (%s) and is not read.",
                    folder, ", ".join(folder_index.SPLITS))


def _log_selection(index, splits, *, imbalance_factor, held_out) -> None:
  if "validation" not in index.splits and held_out:
    logging.info("image_folder: %d images of each class held out of train/ as the "
                 "validation split (validation_per_class).", held_out)
  if imbalance_factor > 1:
    before = len(index.splits["train"]) - held_out * index.num_classes
    counts = splits["train"].counts(index.num_classes)
    logging.info("image_folder: imbalance_factor %g subsamples the training split by "
                 "the LDAM-DRW rule: %d of %d images kept, class counts %s "
                 "(imbalance_factor=1 trains on the folder's split as it is).",
                 imbalance_factor, len(splits["train"]), before, list(counts))


def _decode_each(paths: np.ndarray, transform: Callable[[tf.Tensor], tf.Tensor]
                 ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """``(positions [K], transform(file bytes) [K, ...])`` in batches, for every
  file of ``paths`` that decodes; the others are missing from ``positions``."""
  dataset = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
  dataset = dataset.map(lambda position, path: (position, transform(tf.io.read_file(path))),
                        num_parallel_calls=tf.data.AUTOTUNE)
  # A file that fails to read or decode drops out, which names it.
  dataset = dataset.ignore_errors().batch(_DECODE_BATCH).prefetch(tf.data.AUTOTUNE)
  yield from dataset.as_numpy_iterator()


def _keep_readable(index, split: FolderSplit, readable: np.ndarray, which: str,
                   skip_unreadable: bool) -> np.ndarray:
  """Positions of the readable files of ``split``; FolderError naming the first
  unreadable one unless ``skip_unreadable``."""
  unreadable = np.sort(split.paths[~readable])
  if unreadable.size and not skip_unreadable:
    raise FolderError(
        f"{unreadable[0]} is not a readable image ({unreadable.size} unreadable "
        f"file(s) in the {which} split); replace or remove it, or set "
        f"--config.image_folder_skip_unreadable=True to leave such files out.")
  if unreadable.size:
    logging.warning("image_folder: %d unreadable file(s) of the %s split left out "
                    "(image_folder_skip_unreadable): %s%s", unreadable.size, which,
                    ", ".join(unreadable[:5]), " ..." if unreadable.size > 5 else "")
  kept = np.flatnonzero(readable)
  if which == "train":
    counts = np.bincount(split.labels[kept], minlength=index.num_classes)
    if (counts == 0).any():
      name = index.class_names[int(np.flatnonzero(counts == 0)[0])]
      raise FolderError(f"class {name!r} has no readable training image left; add "
                        f"images to {os.path.join(index.root, 'train', name)}.")
  return kept


def _in_memory(index, splits: Dict[str, FolderSplit], image_size: int,
               skip_unreadable: bool) -> InMemoryData:
  def resize(encoded):
    return streaming.resize_centre_crop(encoded, image_size, crop_fraction=1.0)

  arrays = {}
  for which, split in splits.items():
    images = np.zeros((len(split), image_size, image_size, 3), np.uint8)
    readable = np.zeros(len(split), bool)
    for positions, batch in _decode_each(split.paths, resize):
      images[positions] = batch
      readable[positions] = True
    kept = _keep_readable(index, split, readable, which, skip_unreadable)
    arrays[which] = ArrayDataset(images=images[kept], labels=split.labels[kept])
  mean, std = channel_mean_std(arrays["train"].images)
  return InMemoryData(train=arrays["train"], validation=arrays.get("validation"),
                      test=arrays["test"], num_classes=index.num_classes, mean=mean,
                      std=std, class_names=index.class_names)


def _readable(paths: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """``[N]`` whether each file decodes; each process decodes its shard."""
  start, end = streaming.shard_range(len(paths), process_index, process_count)
  readable = np.zeros(len(paths), np.int32)
  for positions, _ in _decode_each(paths[start:end],
                                   lambda encoded: tf.shape(streaming.decode_rgb(encoded))):
    readable[start + positions] = 1
  if process_count > 1:
    readable = sharding.allgather_sum(readable)
  return readable.astype(bool)


def _unreadable_files(splits: Dict[str, FolderSplit], process_index: int,
                      process_count: int, check_cache: Optional[str]) -> set:
  """Every file of ``splits`` that does not decode, from the cache when it was
  made for the same list of files."""
  digest = hashlib.sha256()
  for which in sorted(splits):
    digest.update("\0".join([which, *splits[which].paths]).encode())
  fingerprint = digest.hexdigest()
  cached = workdir_lib.read_json(check_cache) if check_cache else None
  if cached is not None:
    if cached.get("fingerprint") == fingerprint:
      return set(cached["unreadable"])
    logging.warning("image_folder: the folder's files changed since %s was written; "
                    "checking them again.", check_cache)
  total = sum(len(split) for split in splits.values())
  logging.info("image_folder: decoding each of the %d files once to check it.", total)
  unreadable = set()
  for split in splits.values():
    readable = _readable(split.paths, process_index, process_count)
    unreadable.update(split.paths[~readable].tolist())
  if check_cache and process_index == 0:
    workdir_lib.write_json(check_cache, {"fingerprint": fingerprint,
                                         "unreadable": sorted(unreadable)})
  return unreadable


class FolderReader:
  """A :data:`streaming.SplitReader` of image files.

  With a seed, the whole split's files in that seed's order, each process
  reading the contiguous part :func:`streaming.shard_range` gives it; without,
  the files in the index's order.
  """

  def __init__(self, splits: Dict[str, FolderSplit]):
    self.splits = splits

  def __call__(self, which: str, process_index: int, process_count: int,
               shuffle_seed: Optional[int] = None) -> tf.data.Dataset:
    split = self.splits[which]
    order = (np.arange(len(split)) if shuffle_seed is None
             else np.random.RandomState(shuffle_seed).permutation(len(split)))
    start, end = streaming.shard_range(len(split), process_index, process_count)
    part = split.take(order[start:end])
    return tf.data.Dataset.from_tensor_slices(
        {"path": part.paths, "label": part.labels}).map(
            lambda example: {"image": tf.io.read_file(example["path"]),
                             "label": example["label"]},
            num_parallel_calls=tf.data.AUTOTUNE)


def _streaming(index, splits: Dict[str, FolderSplit], image_size: int,
               skip_unreadable: bool, process_index: int, process_count: int,
               check_cache: Optional[str]) -> streaming.StreamingData:
  unreadable = _unreadable_files(splits, process_index, process_count, check_cache)
  readable_splits = {}
  for which, split in splits.items():
    readable = np.array([path not in unreadable for path in split.paths], bool)
    readable_splits[which] = split.take(
        _keep_readable(index, split, readable, which, skip_unreadable))
  return streaming.StreamingData(
      name=NAME, read=FolderReader(readable_splits),
      class_counts=readable_splits["train"].counts(index.num_classes),
      split_sizes={which: len(split) for which, split in readable_splits.items()},
      # The reader shuffles the whole file list every epoch.
      image_size=image_size, shuffle_buffer=1, class_names=index.class_names)
