"""tfds's own preparation of the paper's data sets, offline, then har_jax on them.

Every data set here is prepared by its real tfds builder (``download_and_prepare``,
reached through the trainer's loader with the download allowed, as a paper
config's first run does) from small archives that ``tfds_archives`` writes in the
real formats. Only the network is replaced, and the registered checksums of the
real archives by those of the test's (see ``tfds_archives``; a test below shows
that an archive with the wrong checksum is still refused). Each data set is
prepared once per module and shared by its tests, which read it back through
har_jax's loaders with the download forbidden. The paper config's first run
(shrunk to ResNet-8, a few steps) trains on one set of each path: CIFAR-10 in
memory, ImageNet-LT streamed.

What the builders leave to drive offline: all four build entirely from the
served or manual files. ImageNet-LT reads the two ImageNet-2012 archives from
``downloads/manual/`` (written here) and downloads OLTR's two split lists from
Google Drive (served here, one through Drive's confirmation page). iNaturalist
2018 downloads its five archives (served here); its ``test`` split, whose labels
are withheld (-1), is prepared too but never read by har_jax, which evaluates on
the validation split.

The other optional imports of a fresh install run for real too: clu's
TensorBoard writer (its events read back here), tfds's ImageFolder (a user's
class folders, here) and matplotlib (experiments/analyze.py's plots, in
test_analyze).
"""

import dataclasses
import os
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax import config as config_lib
from har_jax import train
from har_jax import workdir as workdir_lib
from har_jax.data import streaming
from har_jax.data import tfds_sources
import runs
import tfds_archives


@dataclasses.dataclass
class Prepared:
  """A data set prepared by tfds from served archives."""
  config: object  # the paper config, shrunk, that prepared it
  requested: list  # the URLs tfds asked the network for
  reference: dict  # what the archives hold, as the test wrote it


def _prepare(config_name, data_dir, served, reference, **overrides) -> Prepared:
  """Prepares a data set as the first run of a paper config does: the
  trainer's loader with the download allowed, ``served`` on the network."""
  config = runs.paper_config(config_name)
  config.update(data_dir=data_dir, tfds_download=True, model="resnet8",
                exits="CBEBEBE", num_train_steps=2, batch_size=8, eval_batch_size=16,
                warmup_epochs=0, log_every_steps=1, checkpoint_every_steps=2,
                **overrides)
  with tfds_archives.serve(served) as requested:
    train.load_data(config)
  return Prepared(config, list(requested), reference)


def _first_run(prepared, workdir, **overrides):
  """The prepared set's first run, the download now forbidden."""
  config = prepared.config.copy_and_resolve_references()
  config.update(tfds_download=False, **overrides)
  return train.train_and_evaluate(config, str(workdir))


# ----------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100: the binary archive tfds downloads.

_CIFAR = {"cifar10": dict(classes=10, train_per_class=5, test_per_class=2, rho=5),
          "cifar100": dict(classes=100, train_per_class=3, test_per_class=1, rho=3)}


@pytest.fixture(scope="module", params=sorted(_CIFAR))
def cifar(request, tmp_path_factory):
  name, spec = request.param, _CIFAR[request.param]
  train_split = tfds_archives.cifar_split(spec["classes"], spec["train_per_class"], seed=0)
  test_split = tfds_archives.cifar_split(spec["classes"], spec["test_per_class"], seed=1)
  archive = tfds_archives.cifar_archive(name, train_split, test_split)
  return _prepare(f"{name}_lt", str(tmp_path_factory.mktemp(name)),
                  {tfds_archives.CIFAR_URLS[name]: archive},
                  dict(spec, train=train_split, test=test_split),
                  imbalance_factor=spec["rho"])


def _by_pixels(images, labels):
  return {image.tobytes(): int(label) for image, label in zip(images, labels)}


def test_cifar_prepared_by_tfds_holds_the_archives_images(cifar):
  name, spec = cifar.config.dataset, cifar.reference
  assert cifar.requested == [tfds_archives.CIFAR_URLS[name]]
  # Prepared on disk: read again without the network, the download forbidden.
  loaded = tfds_sources.load_cifar_lt(name, imbalance_factor=spec["rho"], seed=0,
                                      data_dir=cifar.config.data_dir, download=False)
  # The test split is the archive's, every image once with its label.
  written = _by_pixels(*spec["test"])
  read = _by_pixels(loaded.test.images, loaded.test.labels)
  assert len(read) == len(loaded.test.labels) == len(written)
  assert read == written
  # Training images are distinct archive images of their own class, in
  # LDAM-DRW counts.
  written = _by_pixels(*spec["train"])
  read = _by_pixels(loaded.train.images, loaded.train.labels)
  assert len(read) == len(loaded.train.labels)
  assert all(written[image] == label for image, label in read.items())
  n, classes = spec["train_per_class"], spec["classes"]
  expected = [int(n * (1 / spec["rho"]) ** (i / (classes - 1))) for i in range(classes)]
  assert loaded.class_counts == tuple(expected)


# Two steps on one CIFAR set show the in-memory path (each run costs about 20 s
# of CPU time, mostly compiling; CIFAR-100 takes the same path with 100 classes).
@pytest.mark.parametrize("cifar", ["cifar10"], indirect=True)
def test_cifar_first_paper_run_trains_and_logs_to_tensorboard(cifar, tmp_path):
  summary = _first_run(cifar, tmp_path)
  assert summary["steps"] == 2 and summary["train_step_compiles"] == 1
  assert np.isfinite(summary["train_loss"])
  assert len(summary["per_exit_accuracy"]) == 3
  np.testing.assert_allclose(sum(summary["exit_fraction"]), 1.0, rtol=1e-6)
  # clu's writer, for real: its events read back with TensorBoard's reader.
  assert runs.logged_scalars(tmp_path, "test/accuracy") == {
      2: pytest.approx(summary["accuracy"])}


# ----------------------------------------------------------------------------
# ImageNet-LT (the manual download and OLTR's split lists) and iNaturalist 2018
# (its five archives), both streamed.


@pytest.fixture(scope="module")
def imagenet_lt(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("imagenet_lt"))
  # A long tail over the 1000 classes: 3 images for the first 10, 1 for the rest.
  reference = dict(counts=1 + 2 * (np.arange(1000) < 10), validation_classes=12,
                   test_images=20)
  served = tfds_archives.imagenet_lt(
      tfds_sources.manual_dir(data_dir), reference["counts"],
      reference["validation_classes"], reference["test_images"])
  return _prepare("imagenet_lt", data_dir, served, reference, image_size=32,
                  shuffle_buffer=64)


@pytest.fixture(scope="module")
def inat18(tmp_path_factory):
  reference = dict(counts=1 + 2 * (np.arange(8142) < 10), validation_classes=12)
  served = tfds_archives.inat18(reference["counts"], reference["validation_classes"],
                                test_images=4)
  return _prepare("inat18", str(tmp_path_factory.mktemp("inat18")), served,
                  dict(reference, urls=sorted(served)), image_size=32, shuffle_buffer=64)


def _load_streaming(prepared):
  """The prepared set through har_jax's reader, without the network."""
  return streaming.load_streaming(prepared.config.dataset, image_size=32,
                                  data_dir=prepared.config.data_dir, download=False)


def _eval_examples(loaded, which):
  """Every (label, centre pixel) of split ``which`` through har_jax's reader."""
  batches = list(loaded.eval_batches(which, global_batch_size=16))
  labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
  pixels = np.concatenate([b["images"][b["mask"]][:, 16, 16] for b in batches])
  return labels, pixels.astype(int)


def _assert_colours_name_the_classes(labels, pixels):
  colours = np.stack([tfds_archives.class_colour(label) for label in labels]).astype(int)
  np.testing.assert_allclose(pixels, colours, atol=6)  # JPEG's error on flat colour


def test_imagenet_lt_prepared_by_tfds_from_the_manual_download(imagenet_lt):
  reference = imagenet_lt.reference
  # Both lists were downloaded, the validation list through Drive's page.
  confirmed = [url for url in imagenet_lt.requested
               if url.startswith("https://drive.usercontent.google.com/download?")]
  assert len(confirmed) == 1 and "confirm=t" in confirmed[0]
  assert sorted(set(imagenet_lt.requested) - set(confirmed)) == sorted(
      tfds_archives.IMAGENET_LT_LIST_URLS.values())
  loaded = _load_streaming(imagenet_lt)
  # Only the listed images: each synset's archive also holds one image that
  # neither list names.
  assert loaded.class_counts == tuple(reference["counts"])
  assert loaded.split_sizes == {"train": int(reference["counts"].sum()),
                                "validation": reference["validation_classes"],
                                "test": reference["test_images"]}
  labels, pixels = _eval_examples(loaded, "validation")
  assert sorted(labels) == list(range(reference["validation_classes"]))
  _assert_colours_name_the_classes(labels, pixels)
  # The test split is ImageNet's validation set, labelled by tfds's list of
  # ImageNet's validation labels (image 1 is a sea snake, n01751748, class 65).
  labels, _ = _eval_examples(loaded, "test")
  synsets = tfds_archives.tfds_labels("datasets/imagenet2012/labels.txt")
  truth = tfds_archives.tfds_labels("datasets/imagenet2012/validation_labels.txt")
  assert synsets.index(truth[0]) == 65
  assert sorted(labels) == sorted(synsets.index(s) for s in truth[:reference["test_images"]])


def test_inat18_prepared_by_tfds_from_its_archives(inat18):
  reference = inat18.reference
  assert sorted(inat18.requested) == reference["urls"]
  loaded = _load_streaming(inat18)
  # Only the annotated images: the archive also holds one that neither names.
  assert loaded.class_counts == tuple(reference["counts"])
  # iNaturalist's validation split is har_jax's test split.
  assert loaded.split_sizes == {"train": int(reference["counts"].sum()),
                                "test": reference["validation_classes"]}
  labels, pixels = _eval_examples(loaded, "test")
  assert sorted(labels) == list(range(reference["validation_classes"]))
  _assert_colours_name_the_classes(labels, pixels)


def test_imagenet_lt_first_paper_run_trains_validates_and_caches_the_counts(
    imagenet_lt, tmp_path):
  # The streaming path, once (iNaturalist takes the same with 8142 classes):
  # 1020 examples, 5 steps of 200 make an epoch, validated at its end.
  summary = _first_run(imagenet_lt, tmp_path, batch_size=200, eval_batch_size=400,
                       num_train_steps=5, drw_start_epoch=0, eval_every_epochs=1,
                       checkpoint_every_steps=5)
  assert summary["steps"] == 5 and summary["train_step_compiles"] == 1
  assert np.isfinite(summary["train_loss"])
  counts = imagenet_lt.reference["counts"].tolist()
  assert summary["class_counts"] == counts
  assert len(summary["per_exit_accuracy"]) == 3
  np.testing.assert_allclose(sum(summary["exit_fraction"]), 1.0, rtol=1e-6)
  cached = workdir_lib.read_json(str(tmp_path / "class_counts.json"))
  assert cached == {"dataset": "imagenet_lt", "class_counts": counts}
  # The validation split (ImageNet-LT has one) was evaluated on the way.
  assert summary["validation"]["best_step"] == 5


# ----------------------------------------------------------------------------
# What a failed preparation says.


def test_offline_first_run_reaches_the_download_and_says_the_network_failed(tmp_path):
  config = runs.paper_config("cifar10_lt")
  config.update(data_dir=str(tmp_path / "tfds"))
  with tfds_archives.serve({}) as requested:  # every URL fails, as offline
    with pytest.raises(config_lib.ConfigError) as error:
      train.train_and_evaluate(config, str(tmp_path / "run"))
  assert requested == [tfds_archives.CIFAR_URLS["cifar10"]]
  message = str(error.value)
  assert "cifar10 could not be prepared" in message
  assert "its download failed on the network" in message
  assert "ConnectionError" in message and "cifar-10-binary.tar.gz" in message
  assert "not installed" not in message and "\n" not in message


def test_a_module_missing_from_the_install_is_named(tmp_path, monkeypatch):
  # A fresh install without importlib_resources failed inside tfds's
  # download_and_prepare like this: the import of a module that is not there.
  monkeypatch.setitem(sys.modules, "importlib_resources", None)

  def prepare(builder, **unused_kwargs):
    del builder
    import importlib_resources  # pylint: disable=g-import-not-at-top,unused-import

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)
  with pytest.raises(tfds_sources.DataNotPreparedError) as error:
    tfds_sources.builder("cifar10", data_dir=str(tmp_path))
  message = str(error.value)
  assert "needs the Python module 'importlib_resources', which is not installed" in message
  assert "installation problem, not a network one" in message
  assert "`pip install importlib_resources`" in message and "internet" not in message


def test_an_archive_without_the_registered_checksum_is_refused(tmp_path):
  train_split = tfds_archives.cifar_split(10, 1, seed=0)
  archive = tfds_archives.cifar_archive("cifar10", train_split, train_split)
  url = tfds_archives.CIFAR_URLS["cifar10"]
  with tfds_archives.serve({url: archive}, register_checksums=False):
    with pytest.raises(tfds_sources.DataNotPreparedError) as error:
      tfds_sources.builder("cifar10", data_dir=str(tmp_path))
  message = str(error.value)
  assert "cifar10 could not be prepared" in message
  assert "NonMatchingChecksumError" in message and "has wrong checksum" in message
  assert "network" not in message
  assert not tfds.builder("cifar10", data_dir=str(tmp_path)).is_prepared()


def test_an_archive_in_the_manual_folder_is_prepared_without_the_network(tmp_path):
  # README's route for a machine without internet.
  split = tfds_archives.cifar_split(10, 1, seed=2)
  archive = tfds_archives.cifar_archive("cifar10", split, split)
  manual = tfds_sources.manual_dir(str(tmp_path))
  os.makedirs(manual)
  with open(os.path.join(manual, "cifar-10-binary.tar.gz"), "wb") as f:
    f.write(archive.body)
  with tfds_archives.serve({tfds_archives.CIFAR_URLS["cifar10"]: archive},
                           offline=True) as requested:
    loaded = tfds_sources.load_cifar_lt("cifar10", imbalance_factor=1, seed=0,
                                        data_dir=str(tmp_path))
  assert requested == []
  assert _by_pixels(loaded.test.images, loaded.test.labels) == _by_pixels(*split)


# ----------------------------------------------------------------------------
# tfds's ImageFolder on a user's class folders.


def test_tfds_image_folder_reads_a_users_class_folders(tmp_path):
  written = {}
  for split, counts in (("train", {"cat": 3, "dog": 1}), ("test", {"cat": 1, "dog": 1})):
    for label, (name, count) in enumerate(sorted(counts.items())):
      os.makedirs(tmp_path / split / name)
      for k in range(count):
        colour = tfds_archives.class_colour(label)
        image = np.broadcast_to(colour, (10 + k, 12, 3)).copy()
        encoded = (tf.io.encode_png(image) if k % 2 else tf.io.encode_jpeg(image)).numpy()
        path = tmp_path / split / name / f"{k}.{'png' if k % 2 else 'jpg'}"
        path.write_bytes(encoded)
        written[str(path)] = (label, image)
  builder = tfds.ImageFolder(str(tmp_path))
  assert builder.info.features["label"].names == ["cat", "dog"]
  assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {
      "train": 4, "test": 2}
  read = 0
  for split in ("train", "test"):
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
      label, image = written[example["image/filename"].decode()]
      assert example["label"] == label
      np.testing.assert_allclose(example["image"].astype(int), image, atol=4)
      read += 1
  assert read == 6
