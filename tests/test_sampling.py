"""har_jax.data.sampling: class shares against their formulas, the batches drawn
with them, and the in-memory gather on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from har_jax import data
from har_jax import sharding
from har_jax import train
from har_jax.data import pipeline
from har_jax.data import sampling

import runs

COUNTS = [400, 150, 60, 20, 6]


def ref_shares(counts, sampler, progress=0.0, beta=0.9999):
  """The shares of DESIGN.md, written out independently of the code."""
  n = np.asarray(counts, np.float64)
  instance = n / n.sum()
  balanced = np.ones_like(n) / len(n)
  if sampler == "instance":
    return instance
  if sampler == "class_balanced":
    return balanced
  if sampler == "square_root":
    return np.sqrt(n) / np.sqrt(n).sum()
  if sampler == "progressive":
    return (1 - progress) * instance + progress * balanced
  # LDAM-DRW's ImbalancedDatasetSampler: per-example weight (1 - beta) / (1 - beta^n_y).
  per_example = np.concatenate([[(1 - beta) / (1 - beta ** c)] * int(c) for c in counts])
  labels = np.repeat(np.arange(len(n)), np.asarray(counts, int))
  return np.bincount(labels, weights=per_example) / per_example.sum()


@pytest.mark.parametrize("sampler", data.SAMPLERS)
def test_shares_follow_their_formulas(sampler):
  for progress in (0.0, 0.3):
    got = data.class_sampling_shares(COUNTS, sampler, progress)
    np.testing.assert_allclose(got, ref_shares(COUNTS, sampler, progress), rtol=1e-5)
    assert abs(float(jnp.sum(got)) - 1) < 1e-6


def test_progressive_runs_from_instance_to_class_balanced():
  np.testing.assert_allclose(data.class_sampling_shares(COUNTS, "progressive", 0.0),
                             data.class_sampling_shares(COUNTS, "instance"), rtol=1e-6)
  np.testing.assert_allclose(data.class_sampling_shares(COUNTS, "progressive", 1.0),
                             data.class_sampling_shares(COUNTS, "class_balanced"), rtol=1e-6)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="sampler must be one of"):
    data.class_sampling_shares(COUNTS, "balanced")
  with pytest.raises(ValueError, match="class 1 has no training examples"):
    data.class_sampling_shares([5, 0, 3], "square_root")
  with pytest.raises(ValueError, match=r"progress must be in \[0, 1\]"):
    data.class_sampling_shares(COUNTS, "progressive", 1.5)


def _labels(counts):
  # Shuffled, so that class order is not the storage order.
  labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  return np.random.default_rng(0).permutation(labels)


@pytest.mark.parametrize("sampler", data.SAMPLERS)
def test_drawn_batches_have_the_shares_within_binomial_tolerance(sampler):
  labels = _labels(COUNTS)
  order = sampling.class_order(labels)
  shares = data.class_sampling_shares(COUNTS, sampler, 0.5)
  steps, batch = 200, 64

  @jax.jit
  def draw(step):
    return sampling.resampled_indices(order, COUNTS, shares, step=step, seed=7,
                                      global_batch_size=batch)

  indices = np.stack([draw(jnp.int32(step)) for step in range(steps)])
  assert indices.min() >= 0 and indices.max() < len(labels)
  drawn = np.bincount(labels[indices.ravel()], minlength=len(COUNTS))
  total = steps * batch
  expected = total * ref_shares(COUNTS, sampler, 0.5)
  tolerance = 4.5 * np.sqrt(expected * (1 - expected / total)) + 1
  assert np.all(np.abs(drawn - expected) <= tolerance), (drawn, expected.round())
  # Within a class, every example is drawn (the rarest has 6, each ~1/6 of its draws).
  rare = np.flatnonzero(labels == len(COUNTS) - 1)
  assert set(indices.ravel()[np.isin(indices.ravel(), rare)]) == set(rare)


def test_draws_are_a_pure_function_of_seed_and_step():
  labels = _labels(COUNTS)
  order = sampling.class_order(labels)
  shares = data.class_sampling_shares(COUNTS, "class_balanced")

  def draw(step, seed):
    return np.asarray(sampling.resampled_indices(order, COUNTS, shares, step=step,
                                                 seed=seed, global_batch_size=32))

  np.testing.assert_array_equal(draw(5, 1), draw(5, 1))
  assert not np.array_equal(draw(5, 1), draw(6, 1))
  assert not np.array_equal(draw(5, 1), draw(5, 2))


def test_deferred_resampling_keeps_the_epoch_permutation_before_its_start():
  labels = _labels(COUNTS)
  order = sampling.class_order(labels)
  resampling = sampling.Resampling("class_balanced", tuple(COUNTS), steps_per_epoch=9,
                                   total_steps=90, start_epoch=2)
  for step in (0, 17, 18, 40):
    got = resampling.train_indices(order, step=step, seed=3, global_batch_size=64)
    if step < 18:
      want = pipeline.train_indices(len(labels), step=step, global_batch_size=64, seed=3)
    else:
      want = sampling.resampled_indices(order, COUNTS, resampling.shares(step // 9),
                                        step=step, seed=3, global_batch_size=64)
    np.testing.assert_array_equal(got, want, err_msg=f"step {step}")


def test_progressive_progress_counts_the_resampled_epochs():
  resampling = sampling.Resampling("progressive", tuple(COUNTS), steps_per_epoch=10,
                                   total_steps=100, start_epoch=2)
  np.testing.assert_allclose([resampling.progress(e) for e in (0, 2, 6, 10)],
                             [0.0, 0.0, 0.5, 1.0])
  np.testing.assert_allclose(resampling.shares(6), ref_shares(COUNTS, "progressive", 0.5),
                             rtol=1e-6)
  np.testing.assert_allclose(resampling.example_multiplicity(6) * COUNTS,
                             sum(COUNTS) * ref_shares(COUNTS, "progressive", 0.5),
                             rtol=1e-6)


def test_the_batch_of_a_step_is_the_same_on_1_and_8_devices():
  assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
  config = runs.small_config(sampler="class_balanced", sampler_start_epoch=1)
  digits = train.load_data(config)
  per_epoch = pipeline.steps_per_epoch(digits.num_train, config.batch_size)
  gather = train.make_gather(config, digits, per_epoch)
  batches = {}
  for devices in (1, 8):
    mesh = sharding.create_mesh(jax.devices()[:devices])
    resident = train.resident_training_split(digits, config, mesh)
    step_batch = jax.jit(gather, out_shardings=sharding.batch_sharding(mesh))
    # Step 3: the epoch permutation; steps 9 and 20: re-sampled.
    batches[devices] = [sharding.to_host(step_batch(resident, jnp.int32(step)))
                        for step in (3, 9, 20)]
  for one, eight in zip(batches[1], batches[8]):
    np.testing.assert_array_equal(one["labels"], eight["labels"])
    np.testing.assert_array_equal(one["images"], eight["images"])
  # Before the start epoch: the host's epoch permutation.
  host = pipeline.train_batch(digits.train, step=3, global_batch_size=config.batch_size,
                              seed=config.seed)
  np.testing.assert_array_equal(batches[1][0]["labels"], host["labels"])
  # After it: the rare half far above its share of the split.
  late = np.concatenate([batch["labels"] for batch in batches[1][1:]])
  counts = np.asarray(digits.class_counts)
  rare = np.flatnonzero(counts < np.median(counts))
  assert np.isin(late, rare).mean() > 1.5 * counts[rare].sum() / counts.sum()
