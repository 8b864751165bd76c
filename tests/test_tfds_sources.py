"""The tfds sources on mock data: CIFAR-LT in memory, ImageNet-LT and iNat18 streaming."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from har_jax import config as config_lib
from har_jax import data
from har_jax import train
from har_jax.data import mock
from har_jax.data import streaming
from har_jax.data import tfds_sources
import runs


@pytest.mark.parametrize("name, num_classes, rho", [("cifar10", 10, 10),
                                                     ("cifar100", 100, 5)])
def test_cifar_lt_follows_the_ldam_drw_rule(name, num_classes, rho):
  with mock.mock_tfds(train_per_class=20, test_per_class=3):
    loaded = tfds_sources.load_cifar_lt(name, imbalance_factor=rho, seed=0)
  # Reference: n_i = int(20 * (1/rho)^(i/(C-1))), written out here.
  expected = [int(20 * (1 / rho) ** (i / (num_classes - 1))) for i in range(num_classes)]
  assert loaded.class_counts == tuple(expected)
  assert loaded.num_classes == num_classes and loaded.validation is None
  assert loaded.train.images.shape == (sum(expected), 32, 32, 3)
  assert loaded.train.images.dtype == np.uint8 and loaded.train.labels.dtype == np.int32
  # The full balanced test set, every mock test example once.
  assert loaded.test.images.shape == (3 * num_classes, 32, 32, 3)
  np.testing.assert_array_equal(np.sort(mock.example_ids(loaded.test.images)),
                                np.arange(3 * num_classes))
  # Each kept image is an example of its own class (mock label = id % C), no repeats.
  ids = mock.example_ids(loaded.train.images)
  np.testing.assert_array_equal(ids % num_classes, loaded.train.labels)
  assert len(np.unique(ids)) == len(ids)
  scaled = loaded.train.images / 255.0
  np.testing.assert_allclose(loaded.mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(loaded.std, scaled.std(axis=(0, 1, 2)), rtol=1e-6)


def test_cifar_lt_subset_is_seeded_and_the_validation_split_is_disjoint():
  with mock.mock_tfds(train_per_class=20, test_per_class=2):
    first = tfds_sources.load_cifar_lt("cifar10", imbalance_factor=10, seed=1)
    again = tfds_sources.load_cifar_lt("cifar10", imbalance_factor=10, seed=1)
    other = tfds_sources.load_cifar_lt("cifar10", imbalance_factor=10, seed=2)
    held = tfds_sources.load_cifar_lt("cifar10", imbalance_factor=10, seed=1,
                                      validation_per_class=5)
  np.testing.assert_array_equal(first.train.images, again.train.images)
  assert not np.array_equal(mock.example_ids(first.train.images),
                            mock.example_ids(other.train.images))
  # n_max drops by the held-out examples, which are balanced and never trained on.
  assert held.class_counts == tuple(data.long_tail_counts(15, 10, 10))
  assert np.bincount(held.validation.labels).tolist() == [5] * 10
  assert not set(mock.example_ids(held.validation.images)) & set(
      mock.example_ids(held.train.images))


def test_a_class_without_enough_examples_is_named():
  labels = np.array([0] * 5 + [1] * 2, np.int64)
  with pytest.raises(ValueError, match="class 1 has 2 training examples; the long "
                     r"tail needs 3 \(0 held out \+ 3\)"):
    tfds_sources.long_tail_subset(labels, [5, 3], seed=0)
  with pytest.raises(ValueError, match="leaves class 8 empty"):
    with mock.mock_tfds(train_per_class=20):
      tfds_sources.load_cifar_lt("cifar10", imbalance_factor=40, seed=0)


def test_labels_outside_the_classes_are_named():
  with pytest.raises(ValueError, match=r"example 2 has label 10, outside \[0, 10\)"):
    tfds_sources.check_labels(np.array([3, 9, 10, -1]), 10, "cifar10 train")


def test_unprepared_sets_say_how_to_prepare_them(tmp_path):
  with pytest.raises(tfds_sources.DataNotPreparedError) as error:
    tfds_sources.builder("imagenet_lt", data_dir=str(tmp_path))
  message = str(error.value)
  assert "ILSVRC2012_img_train.tar" in message and str(tmp_path / "downloads" / "manual") in message
  assert "tfds build imagenet_lt" in message
  with pytest.raises(tfds_sources.DataNotPreparedError, match="tfds build cifar10"):
    tfds_sources.builder("cifar10", data_dir=str(tmp_path), download=False)


def test_trainer_reports_an_unprepared_set_as_a_config_error(tmp_path):
  config = config_lib.base_config()
  config.update(dataset="cifar10", data_dir=str(tmp_path / "tfds"), tfds_download=False,
                num_train_steps=1, batch_size=8, eval_batch_size=8)
  with pytest.raises(config_lib.ConfigError, match="cifar10: cifar10 is not prepared"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_shard_ranges_cover_every_example_once():
  for num_examples in (0, 1, 7, 100, 101):
    for process_count in (1, 2, 3, 8):
      ranges = [streaming.shard_range(num_examples, p, process_count)
                for p in range(process_count)]
      covered = np.concatenate([np.arange(a, b) for a, b in ranges])
      np.testing.assert_array_equal(covered, np.arange(num_examples))
      sizes = [b - a for a, b in ranges]
      assert max(sizes) - min(sizes) <= 1


def _streaming(name, process_index=0, process_count=1, **kwargs):
  return streaming.load_streaming(name, image_size=32, shuffle_buffer=64,
                                  process_index=process_index,
                                  process_count=process_count, **kwargs)


@pytest.mark.parametrize("name, num_classes, splits", [
    ("imagenet_lt", 1000, {"train", "validation", "test"}),
    ("i_naturalist2018", 8142, {"train", "test"})])
def test_streaming_shapes_dtypes_and_counts(name, num_classes, splits):
  per_class = 2 if name == "imagenet_lt" else 1
  with mock.mock_tfds(train_per_class=per_class, test_per_class=1):
    loaded = _streaming(name)
    batch = next(loaded.train_batches(start_step=0, global_batch_size=16, seed=0))
    test = next(loaded.eval_batches("test", global_batch_size=16))
  assert set(loaded.split_sizes) == splits
  assert loaded.num_train == per_class * num_classes
  assert loaded.class_counts == (per_class,) * num_classes
  assert batch["images"].shape == (16, 32, 32, 3) and batch["images"].dtype == np.uint8
  assert batch["labels"].dtype == np.int32
  assert test["images"].shape == (16, 32, 32, 3) and test["mask"].all()
  np.testing.assert_array_equal(test["labels"], np.arange(16))


def _collect(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_streaming_order_is_a_pure_function_of_seed_and_step():
  # 200 examples with distinct labels: a label names its example.
  with mock.mock_tfds(num_examples=200):
    loaded = _streaming("imagenet_lt", class_counts=(1,) * 1000)
    per_epoch = data.steps_per_epoch(200, 32)  # 6
    run = _collect(loaded.train_batches(start_step=0, global_batch_size=32, seed=3), 14)
    resumed = _collect(loaded.train_batches(start_step=8, global_batch_size=32, seed=3), 6)
    other = next(loaded.train_batches(start_step=0, global_batch_size=32, seed=4))
  for offset, batch in enumerate(resumed):
    np.testing.assert_array_equal(batch["labels"], run[8 + offset]["labels"])
    np.testing.assert_array_equal(batch["images"], run[8 + offset]["images"],
                                  err_msg=f"crop of resumed step {8 + offset}")
  epochs = [np.concatenate([b["labels"] for b in run[e * per_epoch:(e + 1) * per_epoch]])
            for e in range(2)]
  for labels in epochs:
    assert len(np.unique(labels)) == per_epoch * 32, "an epoch repeats an example"
  assert not np.array_equal(epochs[0], epochs[1]), "each epoch is reshuffled"
  assert not np.array_equal(run[0]["labels"], other["labels"])


def test_resampled_stream_has_the_sampler_shares():
  counts = [300, 90, 30, 8]
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), counts))
  resampling = data.Resampling("class_balanced", tuple(counts), steps_per_epoch=10,
                               total_steps=100)
  stream = streaming.resample(tf.data.Dataset.from_tensor_slices({"label": labels}),
                              resampling.example_multiplicity(0), seed=5)
  total = 4 * len(labels)
  drawn = np.bincount([example["label"] for example in
                       tfds.as_numpy(stream.take(total))], minlength=4)
  expected = total * np.asarray(data.class_sampling_shares(counts, "class_balanced"))
  tolerance = 4.5 * np.sqrt(expected * (1 - expected / total)) + 1
  assert np.all(np.abs(drawn - expected) <= tolerance), (drawn, expected)


def test_resampled_streaming_order_resumes_exactly():
  # 200 examples with distinct labels; pretend counts make the classes' copies differ.
  counts = tuple(1 + 3 * (label % 4) for label in range(1000))
  with mock.mock_tfds(num_examples=200):
    loaded = _streaming("imagenet_lt", class_counts=counts)
    resampling = data.Resampling("class_balanced", counts, steps_per_epoch=6,
                                 total_steps=60, start_epoch=1)
    kwargs = dict(global_batch_size=32, seed=3, resampling=resampling)
    run = _collect(loaded.train_batches(start_step=0, **kwargs), 14)
    resumed = _collect(loaded.train_batches(start_step=8, **kwargs), 6)
  for offset, batch in enumerate(resumed):
    np.testing.assert_array_equal(batch["labels"], run[8 + offset]["labels"])
    np.testing.assert_array_equal(batch["images"], run[8 + offset]["images"])
  first, second = (np.concatenate([b["labels"] for b in run[e * 6:(e + 1) * 6]])
                   for e in (0, 1))
  assert len(np.unique(first)) == len(first), "epoch 0 precedes the start epoch"
  assert len(np.unique(second)) < len(second), "epoch 1 draws copies"
  # Class-balanced over N = 5500 pretended examples: an example of a class of 1
  # (label % 4 == 0) comes 5.5 times on average, one of a class of 10 0.55 times,
  # so the first kind is about 2/3 of epoch 1 against 1/4 of epoch 0.
  assert np.mean(second % 4 == 0) > 0.5 > np.mean(first % 4 == 0)


def test_each_process_reads_only_its_shard_and_evaluation_covers_all_once():
  with mock.mock_tfds(num_examples=203):
    shards = [_streaming("imagenet_lt", p, 3, class_counts=(1,) * 1000)
              for p in range(3)]
    for p, loaded in enumerate(shards):
      start, end = streaming.shard_range(203, p, 3)
      seen = np.concatenate([b["labels"] for b in _collect(
          loaded.train_batches(start_step=0, global_batch_size=30, seed=0,
                               process_index=p, process_count=3), 6)])
      assert seen.min() >= start and seen.max() < end, f"process {p} left its shard"
    parts = [list(loaded.eval_batches("validation", global_batch_size=30,
                                      process_index=p, process_count=3))
             for p, loaded in enumerate(shards)]
  assert len({len(part) for part in parts}) == 1, "every process joins every batch"
  labels = np.concatenate([b["labels"][b["mask"]] for part in parts for b in part])
  np.testing.assert_array_equal(np.sort(labels), np.arange(203))
  for part in parts:
    assert all(b["images"].shape == (10, 32, 32, 3) for b in part)


@pytest.mark.parametrize("name, dataset, model", [
    ("cifar10_lt", "cifar10", "resnet32"), ("cifar100_lt", "cifar100", "resnet32"),
    ("imagenet_lt", "imagenet_lt", "resnext50_32x4d"),
    ("inat18", "i_naturalist2018", "resnet50")])
def test_paper_configs_are_valid(name, dataset, model):
  config = runs.paper_config(name)
  config_lib.validate(config, num_devices=8)
  assert (config.dataset, config.model) == (dataset, model)
  assert config.loss == "ldam" and config.har and config.drw_start_epoch > 0
