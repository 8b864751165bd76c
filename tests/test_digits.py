"""har_jax.data.load_digits: the offline long-tailed default data set."""

import numpy as np
import pytest

from har_jax import data

# The smallest digits class (8) has 174 examples; 60 are held out per class.
_N_MAX = 174 - 50 - 10


@pytest.fixture(scope="module")
def digits_lt():
  return data.load_digits(imbalance_factor=10, seed=0)


def test_splits_are_balanced_and_the_right_size(digits_lt):
  assert digits_lt.num_classes == 10
  assert len(digits_lt.test) == 500 and len(digits_lt.validation) == 100
  np.testing.assert_array_equal(np.bincount(digits_lt.test.labels), [50] * 10)
  np.testing.assert_array_equal(np.bincount(digits_lt.validation.labels),
                                [10] * 10)


@pytest.mark.parametrize("imbalance_factor", [10, 1])
def test_train_counts_follow_the_long_tail_rule(imbalance_factor):
  digits = data.load_digits(imbalance_factor=imbalance_factor, seed=1)
  want = tuple(data.long_tail_counts(_N_MAX, 10, imbalance_factor))
  assert digits.class_counts == want
  assert len(digits.train) == sum(want)


def test_no_image_is_shared_between_splits(digits_lt):
  # The digits contain no duplicate images, so equal bytes mean a leaked example.
  def image_bytes(split):
    return {image.tobytes() for image in split.images}
  train = image_bytes(digits_lt.train)
  validation = image_bytes(digits_lt.validation)
  test = image_bytes(digits_lt.test)
  assert len(train) == len(digits_lt.train)
  assert not train & validation and not train & test and not validation & test


def test_images_are_uint8_scaled_to_255(digits_lt):
  for split in (digits_lt.train, digits_lt.validation, digits_lt.test):
    assert split.images.dtype == np.uint8 and split.images.shape[1:] == (8, 8, 1)
    assert split.labels.dtype == np.int32
  assert digits_lt.train.images.max() == 255
  # 0..16 scaled by 255/16 and rounded: 17 distinct levels.
  assert len(np.unique(digits_lt.test.images)) <= 17


def test_mean_and_std_come_from_the_train_split(digits_lt):
  scaled = digits_lt.train.images / 255.0
  np.testing.assert_allclose(digits_lt.mean, [scaled.mean()], rtol=1e-6)
  np.testing.assert_allclose(digits_lt.std, [scaled.std()], rtol=1e-6)


def test_deterministic_in_the_seed(digits_lt):
  again = data.load_digits(imbalance_factor=10, seed=0)
  other = data.load_digits(imbalance_factor=10, seed=1)
  np.testing.assert_array_equal(again.train.images, digits_lt.train.images)
  np.testing.assert_array_equal(again.test.images, digits_lt.test.images)
  assert again.mean == digits_lt.mean
  assert not np.array_equal(other.train.images, digits_lt.train.images)
  assert not np.array_equal(other.test.images, digits_lt.test.images)


def test_no_validation_split_when_none_is_asked_for():
  digits = data.load_digits(imbalance_factor=1, seed=0, validation_per_class=0)
  assert digits.validation is None
  assert digits.class_counts == (124,) * 10


def test_invalid_arguments_are_rejected():
  with pytest.raises(ValueError, match="imbalance_factor must be >= 1"):
    data.load_digits(imbalance_factor=0.5, seed=0)
  with pytest.raises(ValueError, match="no training examples"):
    data.load_digits(imbalance_factor=1, seed=0, test_per_class=170)
