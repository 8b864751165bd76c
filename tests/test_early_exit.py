"""har_jax.early_exit against loop references: predict, flops_saving, the
cascade, the threshold curve and its calibration."""

import jax
import numpy as np
import pytest

from har_jax import early_exit
from har_jax import models


# LDAM margins of 7 classes (0.5 * n_j**-0.25 / max), written out.
MARGINS = 0.5 * np.array([400, 200, 90, 40, 20, 9, 4]) ** -0.25 / 4 ** -0.25


def ref_confidence(logits, scale=1.0, margins=None):
  """Confidence of one row in its prediction c: softmax(s (z - m_c e_c))[c]."""
  z = np.array(logits, np.float64)
  c = int(np.argmax(z))
  if margins is not None:
    z[c] -= margins[c]
  z = scale * z
  p = np.exp(z - z.max())
  return p[c] / p.sum()


def ref_predict(exit_logits, threshold, scale=1.0, margins=None):
  num_exits, batch, _ = exit_logits.shape
  predictions, exits = [], []
  for b in range(batch):
    for i in range(num_exits):
      confidence = ref_confidence(exit_logits[i, b], scale, margins)
      if confidence > threshold or i == num_exits - 1:
        predictions.append(int(np.argmax(exit_logits[i, b])))
        exits.append(i)
        break
  return np.array(predictions), np.array(exits)


@pytest.mark.parametrize("threshold,scale,margins", [
    (0.0, 1.0, None), (0.5, 1.0, None), (0.9, 1.0, None), (1.0, 1.0, None),
    (0.8, 30.0, None), (0.8, 30.0, MARGINS), (0.5, 10.0, MARGINS)])
def test_predict_matches_reference(threshold, scale, margins):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(4, 200, 7)).astype(np.float32) * (2.0 if scale == 1 else 0.1)
  predictions, exits = early_exit.predict(z, threshold=threshold, logit_scale=scale,
                                          margins=margins)
  want_predictions, want_exits = ref_predict(z, threshold, scale, margins)
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


def test_power_of_two_bucket():
  got = [early_exit.power_of_two_bucket(n, 4) for n in (0, 1, 4, 5, 8, 9, 100, 128, 129)]
  assert got == [4, 4, 4, 8, 8, 16, 128, 128, 256]


# Cascaded inference on random networks: confidences are spread out, so
# thresholds at their quantiles send examples to every exit.
_CASCADE_MODELS = {
    "linear": (dict(exits="CEBEBEBE", head="linear"), dict(logit_scale=1.0)),
    # Cosine logits in [-1, 1]; at the LDAM scale (30) a random network is
    # certain everywhere, so a smaller scale keeps the thresholds informative.
    # With LDAM's margins, as a cosine head's confidences have by default.
    "normed": (dict(exits="CBEBEBE", head="normed"),
               dict(logit_scale=5.0, margins=MARGINS)),
}


def _random_variables(model, images, seed):
  """Random weights and BatchNorm statistics of the model's shapes, drawn with NumPy.

  Cheaper than compiling ``model.init`` and less degenerate than its BatchNorm
  statistics (mean 0, variance 1).
  """
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          images[:1])
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    name = jax.tree_util.keystr(path)
    if len(shape.shape) >= 2:  # kernels: He-normal on the fan-in
      scale = np.sqrt(2.0 / np.prod(shape.shape[:-1]))
      value = rng.normal(0.0, scale, shape.shape)
    elif "scale" in name or "var" in name:
      value = rng.uniform(0.5, 1.5, shape.shape)
    else:  # biases and running means
      value = rng.normal(0.0, 0.1, shape.shape)
    return value.astype(shape.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module", params=sorted(_CASCADE_MODELS))
def cascade_setup(request):
  kwargs, confidence = _CASCADE_MODELS[request.param]
  model = models.resnet8(7, **kwargs)
  images = np.random.default_rng(1).normal(size=(32, 8, 8, 1)).astype(np.float32)
  variables = _random_variables(model, images, seed=2)
  exit_logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, images))
  # A large smallest bucket keeps the number of programs (about a second each to
  # compile) small; batches 1 and 13 are still padded.
  cascade = early_exit.Cascade(model, variables, **confidence, min_bucket=16)
  return model, variables, images, exit_logits, confidence, cascade


def _quantile_thresholds(exit_logits, confidence):
  confidence = np.unique([
      ref_confidence(row, confidence["logit_scale"], confidence.get("margins"))
      for row in exit_logits[:-1].reshape(-1, exit_logits.shape[-1])])
  # Midway between two confidences, so that rounding cannot decide an exit.
  middles = [(confidence[k] + confidence[k + 1]) / 2
             for k in (int(q * (confidence.size - 1)) for q in (0.2, 0.5, 0.8))]
  return [0.0, 1.0] + middles


@pytest.mark.parametrize("batch", [1, 13, 32])
def test_cascade_matches_predict(cascade_setup, batch):
  model, _, images, exit_logits, confidence, cascade = cascade_setup
  num_exits = model.num_exits
  used_exits = set()
  for threshold in _quantile_thresholds(exit_logits, confidence):
    predictions, exits = cascade(images[:batch], threshold=threshold)
    want_predictions, want_exits = early_exit.predict(
        exit_logits[:, :batch], threshold=threshold, **confidence)
    ref_predictions, ref_exits = ref_predict(
        exit_logits[:, :batch], threshold, confidence["logit_scale"],
        confidence.get("margins"))
    np.testing.assert_array_equal(exits, want_exits, err_msg=f"threshold {threshold}")
    np.testing.assert_array_equal(predictions, want_predictions,
                                  err_msg=f"threshold {threshold}")
    np.testing.assert_array_equal(exits, ref_exits, err_msg=f"threshold {threshold}")
    np.testing.assert_array_equal(predictions, ref_predictions)
    if threshold == 0.0:
      assert np.all(exits == 0)
    if threshold == 1.0:
      assert np.all(exits == num_exits - 1)
    used_exits.update(exits.tolist())
  if batch == 32:
    assert used_exits == set(range(num_exits)), "the thresholds should use every exit"


def test_cascade_compiles_each_shape_once(cascade_setup):
  model, _, images, exit_logits, confidence, cascade = cascade_setup
  for threshold in _quantile_thresholds(exit_logits, confidence):
    for batch in (3, 32):
      cascade(images[:batch], threshold=threshold)
  shapes = cascade.compiled_shapes
  assert len(shapes) == cascade.compiles
  # A new threshold is an argument, not a new program.
  assert len(set(shapes)) == len(shapes), shapes
  buckets = (16, 32)
  for segment, rows_in, rows_out in shapes:
    assert 0 <= segment < model.num_exits
    assert rows_out in buckets and rows_out < 2 * max(rows_in, 16), shapes
  bound = model.num_exits * len(buckets) * (len(buckets) + 1) // 2
  assert cascade.compiles <= bound
  before = cascade.compiles
  cascade(images[:32], threshold=0.5)
  cascade(images[:32], threshold=0.5)
  assert cascade.compiles - before <= model.num_exits


def test_cascade_empty_batch(cascade_setup):
  *_, cascade = cascade_setup
  predictions, exits = cascade(np.zeros((0, 8, 8, 1), np.float32), threshold=0.5)
  assert predictions.shape == exits.shape == (0,)


def ref_curve(exit_logits, labels, thresholds, exit_flops, backbone, scale,
              margins=None):
  rows = []
  for threshold in sorted(thresholds):
    predictions, exits = ref_predict(exit_logits, threshold, scale, margins)
    spent = np.mean([exit_flops[i] for i in exits])
    rows.append((np.mean(predictions == labels), 1 - spent / backbone,
                 [np.mean(exits == i) for i in range(len(exit_flops))]))
  return rows


@pytest.mark.parametrize("scale,margins", [(1.0, None), (30.0, None),
                                           (30.0, MARGINS[:5])])
def test_threshold_curve_matches_brute_force(scale, margins):
  rng = np.random.default_rng(4)
  z = rng.normal(size=(3, 300, 5)).astype(np.float32) * (2.0 if scale == 1 else 0.1)
  labels = rng.integers(0, 5, 300).astype(np.int32)
  # Exit 2 is the most often right, as a deeper exit should be.
  z[2, np.arange(300), labels] += 1.0 if scale == 1 else 0.05
  thresholds = [0.9, 0.0, 0.5, 0.7, 0.95, 1.0, 0.3]
  exit_flops, backbone = [30.0, 70.0, 110.0], 100.0
  curve = early_exit.threshold_curve(z, labels, thresholds, exit_flops, backbone,
                                     logit_scale=scale, margins=margins)
  want = ref_curve(z, labels, thresholds, exit_flops, backbone, scale, margins)
  np.testing.assert_array_equal(curve.thresholds, sorted(thresholds))
  np.testing.assert_allclose(curve.accuracy, [w[0] for w in want], atol=1e-12)
  np.testing.assert_allclose(curve.flops_saving, [w[1] for w in want], atol=1e-12)
  np.testing.assert_allclose(curve.exit_fraction, [w[2] for w in want], atol=1e-12)
  assert curve.final_exit_accuracy == pytest.approx(np.mean(z[2].argmax(-1) == labels))
  assert curve.flops_saving[0] == pytest.approx(0.7)  # threshold 0: all at exit 0
  assert curve.flops_saving[-1] == pytest.approx(-0.1)  # threshold 1: all at the end


def _random_curve(rng, size):
  # Few distinct values, so ties happen.
  return early_exit.ThresholdCurve(
      thresholds=np.sort(rng.choice(np.linspace(0, 1, 51), size, replace=False)),
      accuracy=rng.choice([0.7, 0.75, 0.8, 0.85, 0.9], size),
      flops_saving=rng.choice([-0.1, 0.0, 0.2, 0.4, 0.6], size),
      exit_fraction=np.zeros((size, 2)),
      final_exit_accuracy=0.88)


def ref_calibrate(curve, max_accuracy_drop=None, flops_budget=None):
  best = None
  for t, a, s in zip(curve.thresholds, curve.accuracy, curve.flops_saving):
    if max_accuracy_drop is not None:
      if a < curve.final_exit_accuracy - max_accuracy_drop:
        continue
      key = (s, a, t)
    else:
      if 1 - s > flops_budget:
        continue
      key = (a, s, t)
    if best is None or key > best[0]:
      best = (key, (t, a, s))
  return best and best[1]


def test_calibrate_threshold_matches_brute_force():
  rng = np.random.default_rng(5)
  checked = 0
  for _ in range(200):
    curve = _random_curve(rng, rng.integers(1, 12))
    for target in (dict(max_accuracy_drop=rng.choice([0.0, 0.05, 0.1, 0.2])),
                   dict(flops_budget=rng.choice([0.4, 0.6, 0.8, 1.0, 1.1]))):
      want = ref_calibrate(curve, **target)
      if want is None:
        with pytest.raises(ValueError, match="no threshold"):
          early_exit.calibrate_threshold(curve, **target)
        continue
      got = early_exit.calibrate_threshold(curve, **target)
      assert (got.threshold, got.accuracy, got.flops_saving) == pytest.approx(want), (
          curve, target)
      checked += 1
  assert checked > 200


def test_calibrate_threshold_needs_one_target():
  curve = _random_curve(np.random.default_rng(6), 5)
  with pytest.raises(ValueError, match="exactly one"):
    early_exit.calibrate_threshold(curve)
  with pytest.raises(ValueError, match="exactly one"):
    early_exit.calibrate_threshold(curve, max_accuracy_drop=0.1, flops_budget=0.5)


def test_cascade_single_exit_network():
  model = models.resnet8(5, exits="CBBBE")
  images = np.random.default_rng(7).normal(size=(6, 8, 8, 1)).astype(np.float32)
  variables = _random_variables(model, images, seed=8)
  logits = np.asarray(model.apply(variables, images, train=False))
  cascade = early_exit.Cascade(model, variables, min_bucket=8)
  predictions, exits = cascade(images, threshold=0.0)
  np.testing.assert_array_equal(predictions, logits[0].argmax(-1))
  np.testing.assert_array_equal(exits, np.zeros(6))
  assert cascade.compiled_shapes == [(0, 6, 8)]
