"""Evaluation metrics: per-class and shot-group accuracy, masks, FLOPs saving."""

import jax.numpy as jnp
import numpy as np
import pytest

from har_jax import data
from har_jax import metrics


def test_eval_metrics_and_summary_against_hand_counts():
  labels = np.array([0, 0, 1, 1, 2, 2, 2, 0])
  predictions = np.array([0, 1, 1, 1, 0, 2, 2, 0])
  exit_index = np.array([0, 1, 2, 0, 0, 1, 2, 2])
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)  # the last row is padding
  exit_correct = np.array([[1, 0, 1, 1, 0, 1, 0, 1],
                           [1, 1, 1, 1, 0, 1, 1, 1],
                           [1, 1, 1, 1, 1, 1, 1, 1]], bool).T
  collected = metrics.EvalMetrics.single_from_model_output(
      correct=jnp.asarray(predictions == labels), mask=jnp.asarray(mask),
      labels_onehot=jnp.eye(3)[labels], exit_correct=jnp.asarray(exit_correct),
      exit_onehot=jnp.eye(3)[exit_index])
  # Merging two halves equals one batch.
  half = metrics.EvalMetrics.single_from_model_output(
      correct=jnp.asarray(predictions == labels)[:4], mask=jnp.asarray(mask)[:4],
      labels_onehot=jnp.eye(3)[labels[:4]], exit_correct=jnp.asarray(exit_correct)[:4],
      exit_onehot=jnp.eye(3)[exit_index[:4]])
  other = metrics.EvalMetrics.single_from_model_output(
      correct=jnp.asarray(predictions == labels)[4:], mask=jnp.asarray(mask)[4:],
      labels_onehot=jnp.eye(3)[labels[4:]], exit_correct=jnp.asarray(exit_correct)[4:],
      exit_onehot=jnp.eye(3)[exit_index[4:]])
  computed = collected.compute()
  merged = half.merge(other).compute()
  for name in computed:
    np.testing.assert_allclose(merged[name], computed[name], err_msg=name)

  # Class 0: 1 of 2 valid right; class 1: 2 of 2; class 2: 2 of 3.
  np.testing.assert_allclose(computed["class_accuracy"], [0.5, 1.0, 2 / 3], rtol=1e-6)
  np.testing.assert_allclose(computed["accuracy"], 5 / 7, rtol=1e-6)
  np.testing.assert_allclose(computed["per_exit_accuracy"], [4 / 7, 6 / 7, 1.0], rtol=1e-6)
  np.testing.assert_allclose(computed["exit_fraction"], [3 / 7, 2 / 7, 2 / 7], rtol=1e-6)

  groups = [data.MANY, data.FEW, data.FEW]
  summary = metrics.evaluation_summary(computed, groups, exit_flops=[10, 30, 60],
                                       backbone_flops=50)
  assert summary["many"] == 0.5
  assert summary["medium"] is None
  np.testing.assert_allclose(summary["few"], (1.0 + 2 / 3) / 2, rtol=1e-6)
  spent = (3 * 10 + 2 * 30 + 2 * 60) / 7
  np.testing.assert_allclose(summary["flops_saving"], 1 - spent / 50, rtol=1e-6)


@pytest.mark.parametrize("per_exit_accuracy,starved", [
    ([0.944, 0.708, 0.632], (2, 0, 31.2)),   # HAR(LDAM) with confidences at s=30
    ([0.80, 0.95, 0.85], (2, 1, 10.0)),      # the shallower exit need not be the first
    ([0.90, 0.93, 0.95], None),              # deeper exits better: healthy
    ([0.96, 0.93, 0.955], None),             # 3 points: within the tolerance
    ([0.95], None),                          # one exit: nothing to compare
])
def test_starved_exits_warning_names_the_worst_deeper_exit(per_exit_accuracy, starved):
  warning = metrics.starved_exits_warning(per_exit_accuracy, drop=0.05, advice="Do X.")
  if starved is None:
    assert warning is None
    return
  deeper, shallower, points = starved
  assert "\n" not in warning and warning.endswith("Do X.")
  assert f"exit {deeper} alone is {per_exit_accuracy[deeper]:.3f}" in warning
  assert f"{points:.1f} points below exit {shallower}" in warning


def test_starved_exits_warning_default_tolerates_a_specialised_last_exit():
  # HAR(CE) at imbalance 100: the last exit, trained on hard examples, trails by 8.
  assert metrics.starved_exits_warning([0.738, 0.836, 0.758]) is None
  assert metrics.starved_exits_warning([0.828, 0.576, 0.398]) is not None
