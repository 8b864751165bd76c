"""har_jax.early_exit.predict and flops_saving against loop references."""

import numpy as np
import pytest

from har_jax import early_exit


def ref_predict(exit_logits, threshold, scale=1.0):
  num_exits, batch, _ = exit_logits.shape
  predictions, exits = [], []
  for b in range(batch):
    for i in range(num_exits):
      z = scale * exit_logits[i, b].astype(np.float64)
      p = np.exp(z - z.max())
      p /= p.sum()
      if p.max() > threshold or i == num_exits - 1:
        predictions.append(int(np.argmax(exit_logits[i, b])))
        exits.append(i)
        break
  return np.array(predictions), np.array(exits)


@pytest.mark.parametrize("threshold,scale", [(0.0, 1.0), (0.5, 1.0), (0.9, 1.0),
                                             (1.0, 1.0), (0.8, 30.0)])
def test_predict_matches_reference(threshold, scale):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(4, 200, 7)).astype(np.float32) * (2.0 if scale == 1 else 0.1)
  predictions, exits = early_exit.predict(z, threshold=threshold, logit_scale=scale)
  want_predictions, want_exits = ref_predict(z, threshold, scale)
  np.testing.assert_array_equal(exits, want_exits)
  np.testing.assert_array_equal(predictions, want_predictions)
  if threshold == 0.0:
    assert np.all(np.asarray(exits) == 0)
  if threshold == 1.0:
    assert np.all(np.asarray(exits) == 3)


def test_predict_rejects_rank_two_logits():
  with pytest.raises(ValueError, match="rank 3"):
    early_exit.predict(np.zeros((4, 3), np.float32), threshold=0.5)


def test_flops_saving():
  exit_flops = [10.0, 25.0, 60.0]
  backbone = 55.0
  exits = np.array([0, 0, 1, 2])
  want = 1.0 - (10 + 10 + 25 + 60) / 4 / 55.0
  assert early_exit.flops_saving(exits, exit_flops, backbone) == pytest.approx(want)
  # Everyone at the last exit pays for the early heads: a negative saving.
  assert early_exit.flops_saving(np.full(4, 2), exit_flops, backbone) < 0
