"""The exits of training examples per shot group: the train step's metric, the
logged scalars, and experiments/training_exits.py's figure."""

import os
import sys

import jax.numpy as jnp
import numpy as np

from har_jax import metrics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import training_exits  # pylint: disable=g-import-not-at-top,wrong-import-position


def _train_metrics(exit_index, groups, num_exits):
  batch = len(exit_index)
  return metrics.TrainMetrics.single_from_model_output(
      loss=jnp.float32(1.0), finite=jnp.float32(1.0), learning_rate=jnp.float32(0.1),
      exit_onehot=jnp.eye(num_exits)[exit_index],
      exit_correct=jnp.ones((batch, num_exits)), group_onehot=jnp.eye(3)[groups])


def test_exit_fraction_by_group_counts_each_groups_exits():
  rng = np.random.default_rng(0)
  num_exits = 3
  exit_index = rng.integers(0, num_exits, 40)
  groups = rng.integers(0, 2, 40)  # no few-shot example in this window
  first = _train_metrics(exit_index[:25], groups[:25], num_exits)
  second = _train_metrics(exit_index[25:], groups[25:], num_exits)
  computed = np.asarray(first.merge(second).compute()["exit_fraction_by_group"])
  by_group = computed.reshape(3, num_exits)
  for group in range(2):
    members = exit_index[groups == group]
    expected = [np.mean(members == e) for e in range(num_exits)]
    np.testing.assert_allclose(by_group[group], expected, rtol=1e-6, err_msg=str(group))
  assert np.all(np.isnan(by_group[2])), "no few-shot example: NaN, not 0"


def test_the_figure_reads_the_logged_scalars_back(tmp_path):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
  # At step s, exit 0 takes s/10 of the many-shot examples, the last exit the rest.
  for step in (10, 20, 30):
    scalars = {"train/loss": 1.0}
    for group, share in (("many", step / 100), ("medium", 0.0), ("few", float("nan"))):
      scalars[f"train/exit_fraction_{group}_0"] = share
      scalars[f"train/exit_fraction_{group}_1"] = 1 - share
    writer.write_scalars(step, scalars)
  writer.close()

  steps, fractions = training_exits.read_exit_history(str(tmp_path))

  np.testing.assert_array_equal(steps, [10, 20, 30])
  assert fractions.shape == (3, 3, 2)
  np.testing.assert_allclose(fractions[:, 0, 0], [0.1, 0.2, 0.3], rtol=1e-6)
  np.testing.assert_allclose(fractions[:, 1, 1], [1.0, 1.0, 1.0])
  assert np.all(np.isnan(fractions[:, 2]))
  output = training_exits.plot_exit_history(steps, fractions, 10, str(tmp_path / "f.png"))
  assert os.path.getsize(output) > 1000


def test_a_workdir_without_the_scalars_is_one_clear_error(tmp_path):
  try:
    training_exits.read_exit_history(str(tmp_path))
  except training_exits.NoExitHistory as error:
    assert "train/exit_fraction_<group>_<exit>" in str(error)
  else:
    raise AssertionError("no error for a workdir without events")
