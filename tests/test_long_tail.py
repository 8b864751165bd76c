"""har_jax.data long-tail counts and shot groups."""

import numpy as np
import pytest

from har_jax import data


def test_cifar10_lt_counts_at_imbalance_100():
  counts = data.long_tail_counts(5000, 10, 100)
  assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
  assert sum(counts) == 12406


@pytest.mark.parametrize("num_classes,rho", [(10, 10), (10, 50), (100, 100), (100, 50)])
def test_counts_follow_the_ldam_drw_rule(num_classes, rho):
  n_max = 5000 if num_classes == 10 else 500
  counts = data.long_tail_counts(n_max, num_classes, rho)
  want = [int(n_max * (1 / rho) ** (i / (num_classes - 1))) for i in range(num_classes)]
  assert counts == want
  assert counts[0] == n_max and counts[-1] == int(n_max / rho + 1e-9)


def test_imbalance_factor_one_is_balanced():
  assert data.long_tail_counts(30, 5, 1) == [30] * 5


def test_imbalance_below_one_is_rejected():
  with pytest.raises(ValueError, match="imbalance_factor must be >= 1"):
    data.long_tail_counts(100, 10, 0.5)


def test_imbalance_that_empties_a_class_names_it():
  # 10 * 0.01**(5/9) = 0.77: class 5 is the first to round to zero.
  with pytest.raises(ValueError, match="leaves class 5 empty"):
    data.long_tail_counts(10, 10, 100)


def test_shot_groups_thresholds():
  counts = [500, 101, 100, 20, 19, 1]
  np.testing.assert_array_equal(data.shot_groups(counts),
                                [data.MANY, data.MANY, data.MEDIUM, data.MEDIUM,
                                 data.FEW, data.FEW])
  np.testing.assert_array_equal(data.shot_groups([30, 10, 4], many=20, few=5),
                                [data.MANY, data.MEDIUM, data.FEW])
