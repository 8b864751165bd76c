"""Offline stand-ins for the tfds sources: ``tfds.testing.mock_data`` with
balanced, traceable examples, for tests and ``experiments/reproduce.py --smoke``.

tfds's own mock draws labels at random, so a long-tailed subset can run out of
examples in some class. Here every split is balanced: example ``i`` has label
``i % C``, and its identity is written into its pixels (in-memory sets: pixel
``(0, 0)`` holds ``i % 256`` and ``i // 256`` in its first two channels) so that
a test can trace any batch row back to the example it came from. Streaming sets
get JPEG-encoded images of varying sizes, as tfds stores them.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Optional
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax.data import tfds_sources

_SPLIT = re.compile(r"^(\w+)(?:\[(\d*):(\d*)\])?$")


def example_ids(images: np.ndarray) -> np.ndarray:
  """The example index written into in-memory mock images ``[N, H, W, C]``."""
  return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


def _parse_split(split: str):
  match = _SPLIT.match(str(split))
  if not match:
    raise ValueError(f"mock data: unsupported split {split!r}.")
  name, start, end = match.groups()
  return name, int(start) if start else None, int(end) if end else None


def _pixels(ids: np.ndarray, size, split_code: int) -> np.ndarray:
  """uint8 ``[N, H, W, 3]`` images of the examples ``ids``: a pattern that
  varies with the example, its id in pixel (0, 0)."""
  height, width = size
  pattern = (np.arange(height * width * 3) * 7)[None] + 31 * ids[:, None]
  images = (pattern % 256).astype(np.uint8).reshape(len(ids), height, width, 3)
  images[:, 0, 0] = np.stack([ids % 256, ids // 256,
                              np.full_like(ids, split_code)], axis=1).astype(np.uint8)
  return images


@contextlib.contextmanager
def mock_tfds(*, train_per_class: int = 20, test_per_class: int = 4,
              num_examples: Optional[int] = None,
              eval_examples: Optional[int] = None,
              jpeg_size: Optional[tuple] = None) -> Iterator[None]:
  """Within the context every tfds source yields balanced mock examples.

  Args:
    train_per_class: examples per class of the ``train`` split.
    test_per_class: examples per class of every other split.
    num_examples: when set, every split has this many examples instead (labels
      still ``i % C``), e.g. fewer than C so that each label is unique.
    eval_examples: when set, every split but ``train`` has this many examples
      (labels ``i % C``): a few test images of a set with thousands of classes.
    jpeg_size: ``(H, W)`` of every streaming image (ImageNet's are about
      375 x 500); None: small images of varying sizes.
  """
  by_tfds_name = {s.tfds_name: s for s in tfds_sources.SOURCES.values()}

  def as_dataset(builder, split, decoders=None, read_config=None,
                 shuffle_files=False, **unused_kwargs):
    del read_config, shuffle_files  # a mock split is in order
    source = by_tfds_name[builder.name]
    name, start, end = _parse_split(split)
    per_class = train_per_class if name == "train" else test_per_class
    total = num_examples if num_examples else per_class * source.num_classes
    if eval_examples and name != "train":
      total = eval_examples
    ids = np.arange(total, dtype=np.int64)[start:end]
    split_code = 0 if name == "train" else 1
    encoded = bool(decoders and "image" in decoders)

    if source.in_memory and not encoded:
      images = _pixels(ids, source.image_shape[:2], split_code)
      return tf.data.Dataset.from_tensor_slices(
          {"image": images, "label": ids % source.num_classes})

    if jpeg_size and encoded:
      # Encoding is not the pipeline's work: encode a few images once and reuse them.
      pool = tf.constant([tf.io.encode_jpeg(_pixels(np.array([i]), jpeg_size, 0)[0],
                                            quality=90).numpy() for i in range(16)])
      return tf.data.Dataset.from_tensor_slices(ids).map(
          lambda index: {"image": tf.gather(pool, index % 16),
                         "label": index % source.num_classes})

    def example(index):
      height, width = jpeg_size or (40 + index % 23, 48 + index % 17)
      pattern = (tf.range(height * width * 3, dtype=tf.int64) * 7 + index * 31) % 256
      image = tf.reshape(tf.cast(pattern, tf.uint8), [height, width, 3])
      corner = tf.cast(tf.stack([index % 256, index // 256, split_code]), tf.uint8)
      image = tf.tensor_scatter_nd_update(image, [[0, 0]], corner[None])
      if encoded:
        image = tf.io.encode_jpeg(image, quality=95)
      return {"image": image, "label": index % source.num_classes}

    return tf.data.Dataset.from_tensor_slices(ids).map(example)

  # Mock sets count as prepared, so no manual-download check stops them.
  with tfds.testing.mock_data(as_dataset_fn=as_dataset), mock.patch.object(
      tfds.core.DatasetBuilder, "is_prepared", lambda self: True):
    yield
