"""The paper's data sets through tensorflow-datasets.

CIFAR-10/100-LT are built in memory by the LDAM-DRW rule; ImageNet-LT and
iNaturalist 2018 stream from tfds with their own long-tailed splits (see
:mod:`har_jax.data.streaming`). Nothing here downloads unless the caller allows
it, and a data set that is not prepared is one :class:`DataNotPreparedError`
that says how to prepare it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from typing import Optional, Tuple
import urllib.error

import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax.data import specs
from har_jax.data.long_tail import long_tail_counts
from har_jax.data.long_tail import long_tail_subset
from har_jax.data.pipeline import ArrayDataset
from har_jax.data.pipeline import InMemoryData
from har_jax.data.pipeline import channel_mean_std

# TensorFlow only reads files here; the accelerators belong to JAX.
tf.config.set_visible_devices([], "GPU")

# torchvision's ImageNet statistics, the usual choice for both streaming sets.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Source:
  """A tfds data set and how the paper uses its splits.

  Attributes:
    tfds_name: the tfds builder name, also the data set's name in configs.
    in_memory: True: loaded whole and kept on the devices; False: streamed.
    train_split, validation_split, test_split: tfds split names; validation
      None when the data set has none (CIFAR can hold one out of train).
    manual_files: files a manual download must place in the manual folder.
  """
  tfds_name: str
  in_memory: bool
  train_split: str = "train"
  validation_split: Optional[str] = None
  test_split: str = "test"
  manual_files: Tuple[str, ...] = ()

  @property
  def num_classes(self) -> int:
    return specs.dataset_spec(self.tfds_name).num_classes

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    """``(H, W, C)`` of the stored images (in memory) or the default input."""
    return specs.dataset_spec(self.tfds_name).image_shape


SOURCES = {
    "cifar10": Source("cifar10", in_memory=True),
    "cifar100": Source("cifar100", in_memory=True),
    "imagenet_lt": Source("imagenet_lt", in_memory=False,
                          validation_split="validation",
                          manual_files=("ILSVRC2012_img_train.tar",
                                        "ILSVRC2012_img_val.tar")),
    # iNaturalist's test labels are withheld: the literature reports the
    # validation split, which is therefore the test split here.
    "i_naturalist2018": Source("i_naturalist2018", in_memory=False,
                               test_split="validation"),
}


class DataNotPreparedError(ValueError):
  """The data set is not in the tfds data directory; the message says how to
  prepare it."""


def manual_dir(data_dir: Optional[str]) -> str:
  """tfds's manual-download folder for ``data_dir`` (None: tfds's default)."""
  root = data_dir or os.path.expanduser(
      os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  return os.path.join(root, "downloads", "manual")


def builder(name: str, *, data_dir: Optional[str] = None,
            download: bool = True) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder of ``name``, preparing it first when allowed.

  Args:
    name: a key of :data:`SOURCES`.
    data_dir: tfds data directory; None for tfds's default.
    download: whether a set that is not prepared may be downloaded and
      prepared now (tfds then reaches the internet).

  Raises:
    DataNotPreparedError: it is not prepared and cannot be prepared now; the
      message names the tfds command or the manual-download folder, and for
      a failed preparation tells a module missing from the installation, a
      network failure and any other cause apart.
  """
  source = SOURCES[name]
  tfds_builder = tfds.builder(source.tfds_name, data_dir=data_dir)
  if tfds_builder.is_prepared():
    return tfds_builder
  build = (f"tfds build {source.tfds_name}" +
           (f" --data_dir={data_dir}" if data_dir else ""))
  manual = manual_dir(data_dir)
  missing = [f for f in source.manual_files
             if not os.path.exists(os.path.join(manual, f))]
  if missing:
    raise DataNotPreparedError(
        f"{name} is not prepared in {tfds_builder.data_dir} and needs a manual "
        f"download: place {' and '.join(source.manual_files)} in {manual} "
        f"(missing: {', '.join(missing)}), then run `{build} "
        f"--manual_dir={manual}` or rerun this command.")
  if not download:
    raise DataNotPreparedError(
        f"{name} is not prepared in {tfds_builder.data_dir}: run `{build}` "
        f"(it downloads the data), or allow the download with "
        f"--config.tfds_download=True.")
  try:
    tfds_builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
  except Exception as error:  # tfds raises many kinds; sorted out below
    raise _preparation_error(name, tfds_builder.data_dir, build, error) from error
  return tfds_builder


def _causes(error: BaseException):
  """``error`` and the exceptions it was raised from or during."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _missing_module(error: BaseException) -> Optional[str]:
  """The module whose import failed in ``error``'s chain, or None."""
  for cause in _causes(error):
    if isinstance(cause, ModuleNotFoundError):
      # Re-raised import errors (tfds's lazy imports) lose `name`; the message
      # keeps Python's "No module named 'x'".
      match = re.search(r"No module named '([\w.]+)'", str(cause))
      return cause.name or (match.group(1) if match else None)
  return None


def _is_network_error(error: BaseException) -> bool:
  """Whether ``error`` came from reaching a server: no connection, a time-out,
  an HTTP error status."""
  network = (requests.exceptions.RequestException, ConnectionError, TimeoutError,
             socket.gaierror, urllib.error.URLError, tfds.download.DownloadError)
  return any(isinstance(cause, network) for cause in _causes(error))


def _preparation_error(name: str, where: str, build: str,
                      error: BaseException) -> DataNotPreparedError:
  """What a failed ``download_and_prepare`` of ``name`` tells the user.

  A module missing from the installation, a network failure and anything else
  (a checksum mismatch, a corrupt manual download, a full disk) each say what
  to do about themselves.
  """
  module = _missing_module(error)
  if module:
    return DataNotPreparedError(
        f"{name} cannot be prepared: tensorflow-datasets needs the Python module "
        f"'{module}', which is not installed. This is an installation problem, "
        f"not a network one: install it (`pip install {module.split('.')[0]}`, "
        f"or reinstall har_jax, which declares what tfds needs) and rerun.")
  reason = " ".join(f"{type(error).__name__}: {error}".split())  # one line
  if _is_network_error(error):
    return DataNotPreparedError(
        f"{name} could not be prepared in {where}: its download failed on the "
        f"network ({reason}). Check this machine's internet access (and HTTPS_PROXY, if "
        f"it needs a proxy) and rerun, or prepare it with `{build}` on a machine "
        f"with internet access and copy the data directory here.")
  return DataNotPreparedError(
      f"{name} could not be prepared in {where} ({reason}). Fix the cause and "
      f"rerun, or prepare it with `{build}` elsewhere and copy the data "
      f"directory here.")


def check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
  """Raises ValueError naming the first label outside ``[0, num_classes)``."""
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    first = int(np.flatnonzero(bad)[0])
    raise ValueError(f"{what}: example {first} has label {int(labels[first])}, "
                     f"outside [0, {num_classes}).")


def _read_split(tfds_builder: tfds.core.DatasetBuilder, split: str,
                num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
  """A whole split as uint8 images ``[N, H, W, C]`` and int32 labels ``[N]``."""
  dataset = tfds_builder.as_dataset(split=split, shuffle_files=False)
  dataset = dataset.map(lambda ex: (ex["image"], ex["label"])).batch(4096)
  images, labels = [], []
  for image_batch, label_batch in tfds.as_numpy(dataset):
    images.append(image_batch)
    labels.append(label_batch)
  if not labels:
    raise ValueError(f"{tfds_builder.name}: split {split!r} is empty.")
  labels = np.concatenate(labels)
  check_labels(labels, num_classes, f"{tfds_builder.name} {split}")
  return np.concatenate(images).astype(np.uint8), labels.astype(np.int32)


def load_cifar_lt(name: str, *, imbalance_factor: float, seed: int,
                  validation_per_class: int = 0, data_dir: Optional[str] = None,
                  download: bool = True) -> InMemoryData:
  """CIFAR-10-LT or CIFAR-100-LT in memory, by the LDAM-DRW convention.

  Class i keeps ``int(n_max * (1/rho)**(i/(C-1)))`` training images with
  ``n_max = N_train / C - validation_per_class`` (5000 with no validation), a
  seeded random subset of its images (:func:`long_tail_subset`); the test
  split is the full balanced test set.

  Args:
    name: ``"cifar10"`` or ``"cifar100"``.
    imbalance_factor: rho, e.g. 100, 50 or 10.
    seed: selects the subset (and the validation examples).
    validation_per_class: balanced validation examples held out of the
      training images per class, before the long tail is drawn; 0 (the paper's
      setting) gives no validation split.
    data_dir, download: see :func:`builder`.
  """
  source = SOURCES[name]
  if not source.in_memory:
    raise ValueError(f"{name} is a streaming data set, not an in-memory one.")
  if validation_per_class < 0:
    raise ValueError(f"validation_per_class must be >= 0, got "
                     f"{validation_per_class}.")
  tfds_builder = builder(name, data_dir=data_dir, download=download)
  images, labels = _read_split(tfds_builder, source.train_split, source.num_classes)
  test_images, test_labels = _read_split(tfds_builder, source.test_split,
                                         source.num_classes)
  n_max = len(labels) // source.num_classes - validation_per_class
  if n_max < 1:
    raise ValueError(f"{name}: {validation_per_class} validation examples per "
                     f"class leave no training examples.")
  counts = long_tail_counts(n_max, source.num_classes, imbalance_factor)
  train, held_out = long_tail_subset(labels, counts, seed, validation_per_class)
  mean, std = channel_mean_std(images[train])
  return InMemoryData(
      train=ArrayDataset(images=images[train], labels=labels[train]),
      validation=(ArrayDataset(images=images[held_out], labels=labels[held_out])
                  if validation_per_class else None),
      test=ArrayDataset(images=test_images, labels=test_labels),
      num_classes=source.num_classes,
      mean=mean, std=std)

