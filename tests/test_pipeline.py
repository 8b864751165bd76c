"""har_jax.data.pipeline: deterministic, resumable, per-process batching."""

import numpy as np
import pytest

from har_jax import data


def _dataset(num_examples, num_classes=10):
  # Example i carries i in its first pixel and as its label (mod C), so a batch
  # row can be traced back to the example it came from.
  images = np.zeros((num_examples, 4, 4, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(num_examples) % 256
  images[:, 0, 0, 1] = np.arange(num_examples) // 256
  labels = (np.arange(num_examples) % num_classes).astype(np.int32)
  return data.ArrayDataset(images=images, labels=labels)


def _example_ids(batch):
  return (batch["images"][:, 0, 0, 0].astype(np.int64) +
          256 * batch["images"][:, 0, 0, 1].astype(np.int64))


def test_steps_per_epoch_drops_the_incomplete_batch():
  assert data.steps_per_epoch(100, 32) == 3
  assert data.steps_per_epoch(96, 32) == 3
  assert data.steps_per_epoch(32, 32) == 1
  with pytest.raises(ValueError, match="exceeds the 31 training examples"):
    data.steps_per_epoch(31, 32)
  with pytest.raises(ValueError, match="global_batch_size must be >= 1"):
    data.steps_per_epoch(31, 0)


def test_train_indices_are_a_pure_function_of_seed_and_step():
  kwargs = dict(global_batch_size=16, seed=3)
  for step in (0, 5, 17):
    np.testing.assert_array_equal(
        data.train_indices(100, step=step, **kwargs),
        data.train_indices(100, step=step, **kwargs))
  assert not np.array_equal(data.train_indices(100, step=0, **kwargs),
                            data.train_indices(100, step=0, global_batch_size=16,
                                               seed=4))


def test_each_epoch_is_a_new_permutation_split_into_disjoint_batches():
  num_examples, batch = 100, 16
  steps = data.steps_per_epoch(num_examples, batch)
  epochs = []
  for epoch in range(3):
    indices = np.stack([
        data.train_indices(num_examples, step=epoch * steps + position,
                           global_batch_size=batch, seed=0)
        for position in range(steps)])
    assert indices.shape == (steps, batch)
    assert len(np.unique(indices)) == steps * batch, f"epoch {epoch} repeats"
    assert indices.min() >= 0 and indices.max() < num_examples
    epochs.append(indices.ravel())
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


def test_train_indices_rejects_a_negative_step():
  with pytest.raises(ValueError, match="step and seed must be >= 0"):
    data.train_indices(100, step=-1, global_batch_size=10, seed=0)


def test_train_batch_gathers_the_indexed_examples():
  dataset = _dataset(100)
  batch = data.train_batch(dataset, step=7, global_batch_size=16, seed=1)
  indices = data.train_indices(100, step=7, global_batch_size=16, seed=1)
  assert batch["images"].shape == (16, 4, 4, 3)
  assert batch["images"].dtype == np.uint8 and batch["labels"].dtype == np.int32
  np.testing.assert_array_equal(_example_ids(batch), indices)
  np.testing.assert_array_equal(batch["labels"], indices % 10)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
  dataset = _dataset(300)
  kwargs = dict(step=11, global_batch_size=32, seed=5)
  whole = data.train_batch(dataset, **kwargs)
  parts = [data.train_batch(dataset, process_index=p,
                            process_count=process_count, **kwargs)
           for p in range(process_count)]
  for key in ("images", "labels"):
    assert parts[0][key].shape[0] == 32 // process_count
    np.testing.assert_array_equal(
        np.concatenate([part[key] for part in parts]), whole[key],
        err_msg=f"{key} of {process_count} processes")


def test_process_count_must_divide_the_batch():
  dataset = _dataset(100)
  with pytest.raises(ValueError, match="32 is not divisible by the process count 3"):
    data.train_batch(dataset, step=0, global_batch_size=32, seed=0,
                     process_index=0, process_count=3)
  with pytest.raises(ValueError, match="not divisible"):
    next(data.eval_batches(dataset, global_batch_size=32, process_count=3))
  with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\)"):
    data.train_batch(dataset, step=0, global_batch_size=32, seed=0,
                     process_index=2, process_count=2)


@pytest.mark.parametrize("num_examples", [100, 96, 5])
def test_eval_batches_cover_every_example_once(num_examples):
  dataset = _dataset(num_examples)
  batches = list(data.eval_batches(dataset, global_batch_size=32))
  assert len(batches) == data.num_eval_batches(num_examples, 32)
  assert len(batches) == -(-num_examples // 32)
  for batch in batches:
    assert batch["images"].shape == (32, 4, 4, 3)
    assert batch["labels"].shape == batch["mask"].shape == (32,)
    assert batch["mask"].dtype == bool
  ids = np.concatenate([_example_ids(b)[b["mask"]] for b in batches])
  np.testing.assert_array_equal(ids, np.arange(num_examples))
  labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, dataset.labels)
  # Only the tail of the last batch is padding.
  padding = np.concatenate([~b["mask"] for b in batches])
  assert padding.sum() == len(batches) * 32 - num_examples
  assert not padding[:num_examples].any()


def test_eval_batches_of_two_processes_concatenate_to_one():
  dataset = _dataset(70)
  whole = list(data.eval_batches(dataset, global_batch_size=32))
  parts = [list(data.eval_batches(dataset, global_batch_size=32,
                                  process_index=p, process_count=2))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole) == 3
  for i, batch in enumerate(whole):
    for key in ("images", "labels", "mask"):
      assert parts[0][i][key].shape[0] == 16
      np.testing.assert_array_equal(
          np.concatenate([parts[0][i][key], parts[1][i][key]]), batch[key],
          err_msg=f"{key} of eval batch {i}")
  # The last global batch holds examples 64..69; process 1's half is all padding.
  assert parts[0][2]["mask"].sum() == 6 and not parts[1][2]["mask"].any()


def test_class_counts_include_empty_classes():
  labels = np.array([0, 0, 2], np.int32)
  split = data.ArrayDataset(images=np.zeros((3, 2, 2, 1), np.uint8),
                            labels=labels)
  in_memory = data.InMemoryData(train=split, validation=None, test=split,
                                num_classes=4, mean=(0.5,), std=(0.25,))
  assert in_memory.class_counts == (2, 0, 1, 0)


def test_array_dataset_validates_shapes_and_dtypes():
  with pytest.raises(ValueError, match="images must be uint8"):
    data.ArrayDataset(images=np.zeros((3, 2, 2, 1), np.float32),
                      labels=np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="labels must be int32"):
    data.ArrayDataset(images=np.zeros((3, 2, 2, 1), np.uint8),
                      labels=np.zeros(3, np.int64))
  with pytest.raises(ValueError, match="3 images but 2 labels"):
    data.ArrayDataset(images=np.zeros((3, 2, 2, 1), np.uint8),
                      labels=np.zeros(2, np.int32))
