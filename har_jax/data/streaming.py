"""ImageNet-scale data streamed from tfds or from image files: decoding and
augmentation on the host.

A :data:`SplitReader` gives each process only its shard of a split (for tfds
sets the contiguous examples ``[p * N // P, (p + 1) * N // P)`` of
:func:`shard_range`). Training examples are decoded with a random-resized crop
to ``image_size`` and a horizontal flip, evaluation ones resized to
``image_size / 0.875`` on the shorter side and centre cropped; JPEG, PNG, GIF,
BMP and WebP, grayscale or colour, all decode to RGB. Batches leave the host as
uint8; the train step normalises them.

The training order is a pure function of ``(seed, step)`` for a given process
count: epoch ``e`` reads the shard in the order seeded by ``(seed, e)`` (file
order and shuffle buffer), and every example's crop and flip are seeded by
``(seed, e)`` and its position in the epoch. A run resumed at step ``s`` skips
the first ``s % steps_per_epoch`` batches of its epoch before decoding them, so
it sees exactly the batches an uninterrupted run sees. Re-sampling repeats each
example of the shard a random number of times (:func:`resample`), seeded by
``(seed, e)`` as well, before the shuffle buffer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax import sharding
from har_jax.data import sampling
from har_jax.data import tfds_sources
from har_jax.data.pipeline import num_eval_batches
from har_jax.data.pipeline import steps_per_epoch

# The evaluation resize: 224 / 0.875 = 256, the usual ImageNet protocol.
CENTRE_CROP_FRACTION = 0.875


def shard_range(num_examples: int, process_index: int,
                process_count: int) -> Tuple[int, int]:
  """``[start, end)`` of process ``p``'s contiguous shard of N examples.

  Shards differ in size by at most one and together cover every example once.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got "
                     f"{process_index}.")
  return (process_index * num_examples // process_count,
          (process_index + 1) * num_examples // process_count)


def _epoch_seed(seed: int, epoch: int) -> int:
  return (seed * 1_000_003 + epoch) % (2**31 - 1)


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Any JPEG, PNG, GIF (its first frame), BMP or WebP as uint8 ``[H, W, 3]``;
  grayscale is repeated over the three channels and alpha dropped."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def random_resized_crop(encoded: tf.Tensor, seed: tf.Tensor, image_size: int,
                        area_range=(0.08, 1.0),
                        aspect_ratio_range=(3 / 4, 4 / 3)) -> tf.Tensor:
  """The crop of a random area and aspect ratio, resized to ``image_size``
  square (torchvision's RandomResizedCrop), uint8 ``[S, S, 3]``.

  A JPEG decodes only its crop; other formats (:func:`decode_rgb`) decode whole
  and are cropped after, at the same window for the same seed. Falls back to
  the whole image when no crop fits, as torchvision does.
  """
  def window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed, min_object_covered=0.0, aspect_ratio_range=aspect_ratio_range,
        area_range=area_range, max_attempts=10, use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], size[0], size[1]])

  def jpeg():
    return tf.image.decode_and_crop_jpeg(
        encoded, window(tf.image.extract_jpeg_shape(encoded)), channels=3)

  def other_format():
    image = decode_rgb(encoded)
    top, left, height, width = tf.unstack(window(tf.shape(image)))
    return image[top:top + height, left:left + width]

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other_format)
  return _resize_uint8(image, [image_size, image_size])


def resize_centre_crop(encoded: tf.Tensor, image_size: int,
                       crop_fraction: float = CENTRE_CROP_FRACTION) -> tf.Tensor:
  """Decodes (:func:`decode_rgb`), resizes the shorter side to ``image_size /
  crop_fraction`` and takes the centre ``image_size`` square, uint8 ``[S, S, 3]``.
  ``crop_fraction`` 1 keeps the whole shorter side."""
  image = decode_rgb(encoded)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (image_size / crop_fraction) / tf.reduce_min(shape)
  # Rounded, not ceiled: the shorter side lands on image_size / crop_fraction
  # exactly (a ceil of 224.00002 would be 225), the longer one is no shorter.
  resized = tf.cast(tf.math.round(shape * scale), tf.int32)
  image = _resize_uint8(image, resized)
  top = (resized[0] - image_size) // 2
  left = (resized[1] - image_size) // 2
  return image[top:top + image_size, left:left + image_size]


def _resize_uint8(image: tf.Tensor, size) -> tf.Tensor:
  image = tf.image.resize(image, size, method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


# (which split, process index, process count, shuffle seed or None) -> that
# process's shard of the split as {"image": encoded bytes, "label": int}; with
# a seed, in the order of that seed (the epoch's), else in the stored order.
SplitReader = Callable[[str, int, int, Optional[int]], tf.data.Dataset]


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsReader:
  """A :data:`SplitReader` of a prepared tfds builder: process ``p`` reads the
  contiguous examples :func:`shard_range` gives it; a seed shuffles the order
  of the files and of their reads."""
  tfds_builder: tfds.core.DatasetBuilder
  source: tfds_sources.Source
  split_sizes: dict

  def __call__(self, which: str, process_index: int, process_count: int,
               shuffle_seed: Optional[int] = None) -> tf.data.Dataset:
    start, end = shard_range(self.split_sizes[which], process_index, process_count)
    split = {"train": self.source.train_split, "test": self.source.test_split,
             "validation": self.source.validation_split}[which]
    return self.tfds_builder.as_dataset(
        split=f"{split}[{start}:{end}]", shuffle_files=shuffle_seed is not None,
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
        decoders={"image": tfds.decode.SkipDecoding()})


@dataclasses.dataclass(frozen=True, eq=False)
class StreamingData:
  """A data set read in shards, with the statistics training needs.

  Attributes:
    name: the data set's name in configs.
    read: reads a process's shard of a split (:data:`SplitReader`).
    class_counts: ``[C]`` training examples per class, counted from the data.
    split_sizes: examples of ``"train"``, ``"test"`` and (when present)
      ``"validation"``.
    image_size: S of the network input ``[S, S, 3]``.
    shuffle_buffer: examples in the training shuffle buffer of each process.
    mean, std: per-channel statistics the train step normalises with.
    class_names: ``[C]`` names of the classes, or None where they are indices.
  """
  name: str
  read: SplitReader
  class_counts: Tuple[int, ...]
  split_sizes: dict
  image_size: int
  shuffle_buffer: int = 10_000
  mean: Tuple[float, ...] = tfds_sources.IMAGENET_MEAN
  std: Tuple[float, ...] = tfds_sources.IMAGENET_STD
  class_names: Optional[Tuple[str, ...]] = None

  @property
  def num_classes(self) -> int:
    return len(self.class_counts)

  @property
  def num_train(self) -> int:
    return self.split_sizes["train"]

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  @property
  def has_validation(self) -> bool:
    return "validation" in self.split_sizes

  def train_batches(self, *, start_step: int, global_batch_size: int, seed: int,
                    process_index: int = 0, process_count: int = 1,
                    resampling: Optional[sampling.Resampling] = None) -> Iterator[dict]:
    """This process's share of the global training batches from ``start_step`` on.

    Args:
      resampling: the class shares of the batches from its start epoch on
        (:func:`resample` before the shuffle buffer); None: each example once
        an epoch.

    Yields:
      ``{'images': [B/P, S, S, 3] uint8, 'labels': [B/P] int32}`` for steps
      ``start_step, start_step + 1, ...`` without end.
    """
    if global_batch_size % process_count:
      raise ValueError(f"global batch size {global_batch_size} is not divisible "
                       f"by the process count {process_count}.")
    local = global_batch_size // process_count
    per_epoch = steps_per_epoch(self.num_train, global_batch_size)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
      epoch_seed = _epoch_seed(seed, epoch)
      dataset = self.read("train", process_index, process_count, epoch_seed)
      if resampling is not None and resampling.active(epoch):
        dataset = resample(dataset, resampling.example_multiplicity(epoch), epoch_seed)
      dataset = dataset.shuffle(self.shuffle_buffer, seed=epoch_seed,
                                reshuffle_each_iteration=False)
      # Skip before decoding: resuming costs reads, not decodes.
      dataset = dataset.skip(skip * local).enumerate(start=skip * local)
      image_size = self.image_size
      stream = np.int64(process_index) << 32

      def decode(index, example, epoch_seed=epoch_seed):
        crop_seed = tf.stack([tf.constant(epoch_seed, tf.int64), stream + index])
        flip_seed = tf.stack([tf.constant(epoch_seed, tf.int64) + 1, stream + index])
        image = random_resized_crop(example["image"], crop_seed, image_size)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return {"images": image, "labels": tf.cast(example["label"], tf.int32)}

      dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
      dataset = dataset.batch(local, drop_remainder=True).take(per_epoch - skip)
      for batch in tfds.as_numpy(dataset.prefetch(tf.data.AUTOTUNE)):
        yield batch
      epoch, skip = epoch + 1, 0

  def eval_batches(self, which: str, *, global_batch_size: int,
                   process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """This process's share of every evaluation batch of split ``which``.

    Every process yields ``ceil(ceil(N / P) / (B / P))`` batches, so all take
    part in every global batch; rows past the end of a shard are padding with
    ``mask`` False. Together the processes cover each example exactly once.

    Yields:
      ``{'images': [B/P, S, S, 3] uint8, 'labels': [B/P] int32,
      'mask': [B/P] bool}``.
    """
    if global_batch_size % process_count:
      raise ValueError(f"global batch size {global_batch_size} is not divisible "
                       f"by the process count {process_count}.")
    local = global_batch_size // process_count
    largest_shard = -(-self.split_sizes[which] // process_count)
    batches = num_eval_batches(largest_shard, local)
    image_size = self.image_size
    dataset = self.read(which, process_index, process_count, None).map(
        lambda ex: {"images": resize_centre_crop(ex["image"], image_size),
                    "labels": tf.cast(ex["label"], tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(local).prefetch(tf.data.AUTOTUNE)
    yielded = 0
    for batch in tfds.as_numpy(dataset):
      yield _pad(batch, local)
      yielded += 1
    empty = {"images": np.zeros((0, image_size, image_size, 3), np.uint8),
             "labels": np.zeros((0,), np.int32)}
    for _ in range(batches - yielded):
      yield _pad(empty, local)


def resample(dataset: tf.data.Dataset, multiplicity: np.ndarray,
             seed: int) -> tf.data.Dataset:
  """Each example repeated ``floor(m + u)`` times, ``u ~ U[0, 1)``, with ``m``
  the mean copies of its class (``Resampling.example_multiplicity``), before
  decoding; then the shard again, without end, so an epoch never runs short.

  Copies per example have mean ``m`` (``floor(m)`` or ``floor(m) + 1``), so the
  classes' shares of the stream are the sampler's. Each ``u`` is seeded by
  ``(seed, position in the shard's read order)``: the stream is a function of
  the seed, and a resumed run can skip into it.
  """
  table = tf.constant(multiplicity, tf.float32)

  def copies(position, example):
    fraction = tf.random.stateless_uniform(
        [], seed=tf.stack([tf.constant(seed, tf.int64), position]))
    count = tf.cast(tf.floor(tf.gather(table, example["label"]) + fraction), tf.int64)
    return tf.data.Dataset.from_tensors(example).repeat(count)

  return dataset.enumerate().flat_map(copies).repeat()


def _pad(batch: dict, size: int) -> dict:
  count = len(batch["labels"])
  padding = size - count
  return {"images": np.pad(batch["images"], [(0, padding), (0, 0), (0, 0), (0, 0)]),
          "labels": np.pad(batch["labels"], (0, padding)),
          "mask": np.arange(size) < count}


def _split_size(tfds_builder: tfds.core.DatasetBuilder, split: str) -> int:
  splits = tfds_builder.info.splits
  if split in splits:
    return splits[split].num_examples
  # Builders without recorded split sizes (tfds's mock data): count.
  dataset = tfds_builder.as_dataset(split=split, decoders={
      "image": tfds.decode.SkipDecoding()})
  return int(dataset.reduce(np.int64(0), lambda count, _: count + 1).numpy())


def count_labels(tfds_builder: tfds.core.DatasetBuilder, split: str,
                 num_classes: int, *, start: int = 0,
                 end: Optional[int] = None) -> np.ndarray:
  """``[C]`` examples per class in ``split[start:end]``; labels are checked."""
  suffix = f"[{start}:{'' if end is None else end}]"
  dataset = tfds_builder.as_dataset(
      split=split + suffix, decoders={"image": tfds.decode.SkipDecoding()})
  dataset = dataset.map(lambda ex: ex["label"],
                        num_parallel_calls=tf.data.AUTOTUNE).batch(8192)
  counts = np.zeros(num_classes, np.int64)
  offset = start
  for labels in tfds.as_numpy(dataset):
    tfds_sources.check_labels(labels, num_classes,
                              f"{tfds_builder.name} {split} (from example {offset})")
    counts += np.bincount(labels, minlength=num_classes)
    offset += len(labels)
  return counts


def load_streaming(name: str, *, image_size: int = 224, shuffle_buffer: int = 10_000,
                   data_dir: Optional[str] = None, download: bool = True,
                   process_index: int = 0, process_count: int = 1,
                   class_counts: Optional[Tuple[int, ...]] = None) -> StreamingData:
  """ImageNet-LT or iNaturalist 2018 as a :class:`StreamingData`.

  Args:
    name: ``"imagenet_lt"`` or ``"i_naturalist2018"``.
    image_size: S of the network input.
    shuffle_buffer: per-process training shuffle buffer, in examples.
    data_dir, download: see :func:`tfds_sources.builder`.
    process_index, process_count: this process and how many read the data.
    class_counts: the training class counts when already known (a cache);
      otherwise every process counts the labels of its shard and the counts
      are summed over the processes.
  """
  source = tfds_sources.SOURCES[name]
  if source.in_memory:
    raise ValueError(f"{name} is an in-memory data set, not a streaming one.")
  tfds_builder = tfds_sources.builder(name, data_dir=data_dir, download=download)
  split_sizes = {"train": _split_size(tfds_builder, source.train_split),
                 "test": _split_size(tfds_builder, source.test_split)}
  if source.validation_split:
    split_sizes["validation"] = _split_size(tfds_builder, source.validation_split)
  if class_counts is None:
    start, end = shard_range(split_sizes["train"], process_index, process_count)
    counts = count_labels(tfds_builder, source.train_split, source.num_classes,
                          start=start, end=end)
    if process_count > 1:
      counts = sharding.allgather_sum(counts)
    class_counts = tuple(int(n) for n in counts)
  empty = [c for c, n in enumerate(class_counts) if n == 0]
  if empty:
    raise ValueError(f"{name}: class {empty[0]} has no training examples "
                     f"({len(empty)} empty classes in all).")
  return StreamingData(name=name, read=TfdsReader(tfds_builder, source, split_sizes),
                       class_counts=tuple(class_counts), split_sizes=split_sizes,
                       image_size=image_size, shuffle_buffer=shuffle_buffer)
