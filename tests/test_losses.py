"""har_jax.losses against straightforward NumPy references written here."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from har_jax import config as config_lib
from har_jax import losses

import runs

RTOL = 1e-5
ATOL = 1e-5


# ---------------------------------------------------------------- references
def ref_log_softmax(z):
  z = np.asarray(z, np.float64)
  shifted = z - z.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def ref_ce(z, y):
  lp = ref_log_softmax(z)
  return np.array([-lp[b, y[b]] for b in range(len(y))])


def ref_focal(z, y, gamma):
  ce = ref_ce(z, y)
  p = np.exp(-ce)
  return (1 - p) ** gamma * ce


def ref_ldam(z, y, margins, scale):
  z = np.array(z, np.float64)
  for b in range(len(y)):
    z[b, y[b]] -= margins[y[b]]
  return ref_ce(scale * z, y)


def ref_confidence(z, y, scale=1.0, margins=None):
  """softmax(s * (z - m_y onehot(y)))[y] of each row, from the definition."""
  z = np.array(z, np.float64)
  for b in range(len(y)):
    if margins is not None:
      z[b, y[b]] -= margins[y[b]]
  p = np.exp(ref_log_softmax(scale * z))
  return np.array([p[b, y[b]] for b in range(len(y))])


def ref_cdt(z, y, counts, gamma):
  counts = np.asarray(counts, np.float64)
  return ref_ce(np.asarray(z, np.float64) / (counts.max() / counts) ** gamma, y)


def ref_balanced_softmax(z, y, counts):
  """Ren et al.'s form: -log(n_y e^{z_y} / sum_j n_j e^{z_j})."""
  z = np.asarray(z, np.float64)
  weighted = np.asarray(counts, np.float64) * np.exp(z - z.max(axis=-1, keepdims=True))
  return np.array([-np.log(weighted[b, y[b]] / weighted[b].sum()) for b in range(len(y))])


def ref_logit_adjusted(z, y, counts, tau):
  counts = np.asarray(counts, np.float64)
  return ref_ce(np.asarray(z, np.float64) + tau * np.log(counts / counts.sum()), y)


def numeric_grad(f, z, step=1e-6):
  """Central differences of the scalar f at every entry of z (float64)."""
  z = np.asarray(z, np.float64)
  grad = np.zeros_like(z)
  for index in np.ndindex(z.shape):
    up, down = z.copy(), z.copy()
    up[index] += step
    down[index] -= step
    grad[index] = (f(up) - f(down)) / (2 * step)
  return grad


def ref_exit_index(exit_logits, y, threshold, scale=1.0, margins=None):
  """y: [B], or [E, B] for a label per exit."""
  num_exits, batch, _ = exit_logits.shape
  y = np.broadcast_to(y, (num_exits, batch))
  index = []
  for b in range(batch):
    chosen = num_exits - 1
    for i in range(num_exits):
      p = ref_confidence(exit_logits[i, b][None], y[i, b:b + 1], scale, margins)[0]
      if np.argmax(exit_logits[i, b]) == y[i, b] and p > threshold:
        chosen = i
        break
    index.append(chosen)
  return np.array(index)


def ref_mixed_har_loss(exit_logits, y, y2, lam, threshold, weights=None, scale=1.0,
                       margins=None):
  """Each exit's target: y with weight lam[i, b], y2 with 1 - lam[i, b]; the
  exit judged by the heavier label; each label's term a weighted mean."""
  num_exits, batch, num_classes = exit_logits.shape
  weights = np.ones(num_classes) if weights is None else np.asarray(weights)
  lam = np.broadcast_to(np.asarray(lam, np.float64), (num_exits, batch))
  dominant = np.where(lam >= 0.5, y[None], y2[None])
  k = ref_exit_index(exit_logits, dominant, threshold, scale, margins)
  total = 0.0
  for labels, share in ((y, lam), (y2, 1 - lam)):
    numerator = 0.0
    for b in range(batch):
      for i in range(k[b] + 1):
        numerator += weights[labels[b]] * share[i, b] * ref_ce(
            exit_logits[i, b][None], labels[b:b + 1])[0]
    total += numerator / sum(weights[labels[b]] for b in range(batch))
  return total


def ref_har_loss(exit_logits, y, threshold, base=ref_ce, weights=None,
                 valid=None, scale=1.0, margins=None):
  num_exits, batch, num_classes = exit_logits.shape
  weights = np.ones(num_classes) if weights is None else np.asarray(weights)
  valid = np.ones(batch) if valid is None else np.asarray(valid, np.float64)
  k = ref_exit_index(exit_logits, y, threshold, scale, margins)
  per_exit = np.stack([base(exit_logits[i], y) for i in range(num_exits)])
  numerator = denominator = 0.0
  for b in range(batch):
    w = valid[b] * weights[y[b]]
    numerator += w * sum(per_exit[i, b] for i in range(k[b] + 1))
    denominator += w
  return numerator / denominator


def ref_har_ce_grad(exit_logits, y, threshold, weights):
  """d L / d z for CE with the masks held fixed."""
  num_exits, batch, num_classes = exit_logits.shape
  k = ref_exit_index(exit_logits, y, threshold)
  total = sum(weights[y[b]] for b in range(batch))
  grad = np.zeros_like(exit_logits, dtype=np.float64)
  for i in range(num_exits):
    p = np.exp(ref_log_softmax(exit_logits[i]))
    for b in range(batch):
      if i <= k[b]:
        onehot = np.eye(num_classes)[y[b]]
        grad[i, b] = weights[y[b]] * (p[b] - onehot) / total
  return grad


def random_problem(seed, num_exits=3, batch=16, num_classes=5, spread=3.0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(num_exits, batch, num_classes)).astype(np.float32) * spread
  y = rng.integers(0, num_classes, size=batch).astype(np.int32)
  return z, y


def constructed_exits(num_exits=4, num_classes=6, per_target=3):
  """Examples built to exit at each exit in turn, plus ones that never qualify."""
  rng = np.random.default_rng(0)
  rows_z, rows_y, targets = [], [], []
  for target in list(range(num_exits)) + [None]:
    for _ in range(per_target):
      label = int(rng.integers(num_classes))
      wrong = (label + 1) % num_classes
      z = rng.normal(size=(num_exits, num_classes)) * 0.1
      for i in range(num_exits):
        if target is None or i < target:
          # Either wrong, or right but unconfident: neither qualifies.
          if i % 2 == 0:
            z[i, wrong] += 5.0
          else:
            z[i, label] += 0.3
        else:
          z[i, label] += 8.0  # right and confident: exit here (or later)
      rows_z.append(z)
      rows_y.append(label)
      targets.append(num_exits - 1 if target is None else target)
  exit_logits = np.stack(rows_z, axis=1).astype(np.float32)
  return exit_logits, np.array(rows_y, np.int32), np.array(targets)


# ---------------------------------------------------------------- base losses
@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropy_matches_reference(seed):
  z, y = random_problem(seed, num_exits=1)
  np.testing.assert_allclose(losses.cross_entropy(z[0], y), ref_ce(z[0], y),
                             rtol=RTOL, atol=ATOL)


def test_cross_entropy_handles_leading_axes_and_bfloat16():
  z, y = random_problem(3)
  labels = np.broadcast_to(y, z.shape[:2])
  got = losses.cross_entropy(jnp.asarray(z, jnp.bfloat16), labels)
  assert got.dtype == jnp.float32
  want = np.stack([ref_ce(np.asarray(jnp.asarray(z[i], jnp.bfloat16), np.float32), y)
                   for i in range(z.shape[0])])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_matches_reference(gamma):
  z, y = random_problem(4, num_exits=1)
  np.testing.assert_allclose(losses.focal(z[0], y, gamma=gamma),
                             ref_focal(z[0], y, gamma), rtol=RTOL, atol=ATOL)


def test_focal_gradient_matches_finite_differences_of_reference():
  z, y = random_problem(5, num_exits=1, batch=4, num_classes=3)
  grad = jax.grad(lambda logits: jnp.sum(losses.focal(logits, y, gamma=2.0)))(z[0])
  numeric = numeric_grad(lambda zz: ref_focal(zz, y, 2.0).sum(), z[0])
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


def test_focal_rejects_negative_gamma():
  z, y = random_problem(0, num_exits=1)
  with pytest.raises(ValueError, match="gamma"):
    losses.focal(z[0], y, gamma=-1.0)


def test_ldam_matches_reference():
  z, y = random_problem(6, num_exits=1)
  z = np.tanh(z)  # cosine-like logits
  counts = [500, 300, 120, 40, 7]
  margins = losses.ldam_margins(counts)
  np.testing.assert_allclose(
      losses.ldam(z[0], y, margins=margins, scale=30.0),
      ref_ldam(z[0], y, np.asarray(margins), 30.0), rtol=1e-4, atol=1e-4)


def test_ldam_margins_formula():
  counts = [1000, 100, 10, 1]
  want = np.array([1000 ** -0.25, 100 ** -0.25, 10 ** -0.25, 1.0]) * 0.5
  np.testing.assert_allclose(losses.ldam_margins(counts), want, rtol=1e-6)
  np.testing.assert_allclose(losses.ldam_margins(counts, max_margin=1.0), 2 * want,
                             rtol=1e-6)


def test_class_balanced_weights_formula():
  counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
  beta = 0.9999
  raw = [(1 - beta) / (1 - beta ** n) for n in counts]
  want = np.array(raw) / sum(raw) * len(counts)
  got = losses.class_balanced_weights(counts, beta=beta)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(float(got.sum()) - 10.0) < 1e-4
  assert np.all(np.diff(np.asarray(got)) > 0), "rarer classes must weigh more"


COUNTS = [500, 300, 120, 40, 7]


def test_cdt_temperatures_formula():
  counts = [1000, 100, 10, 1]
  np.testing.assert_allclose(losses.cdt_temperatures(counts, 0.2),
                             [1.0, 10 ** 0.2, 100 ** 0.2, 1000 ** 0.2], rtol=1e-6)
  np.testing.assert_array_equal(losses.cdt_temperatures(counts, 0.0), np.ones(4))
  with pytest.raises(ValueError, match="gamma must be >= 0"):
    losses.cdt_temperatures(counts, -0.1)


def test_log_prior_formula():
  np.testing.assert_allclose(losses.log_prior([6, 3, 1]), np.log([0.6, 0.3, 0.1]),
                             rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.2, 0.5])
def test_cdt_matches_reference_and_its_gradient(gamma):
  z, y = random_problem(17, num_exits=1, batch=6)
  temperatures = losses.cdt_temperatures(COUNTS, gamma)
  np.testing.assert_allclose(losses.cdt(z[0], y, temperatures=temperatures),
                             ref_cdt(z[0], y, COUNTS, gamma), rtol=RTOL, atol=ATOL)
  grad = jax.grad(lambda logits: jnp.sum(
      losses.cdt(logits, y, temperatures=temperatures)))(z[0])
  numeric = numeric_grad(lambda zz: ref_cdt(zz, y, COUNTS, gamma).sum(), z[0])
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_logit_adjusted_matches_reference_and_its_gradient(tau):
  z, y = random_problem(18, num_exits=1, batch=6)
  log_prior = losses.log_prior(COUNTS)
  np.testing.assert_allclose(losses.logit_adjusted(z[0], y, log_prior=log_prior, tau=tau),
                             ref_logit_adjusted(z[0], y, COUNTS, tau), rtol=RTOL, atol=ATOL)
  grad = jax.grad(lambda logits: jnp.sum(
      losses.logit_adjusted(logits, y, log_prior=log_prior, tau=tau)))(z[0])
  numeric = numeric_grad(lambda zz: ref_logit_adjusted(zz, y, COUNTS, tau).sum(), z[0])
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


def test_logit_adjusted_is_ce_at_tau_0_and_the_balanced_softmax_at_tau_1():
  z, y = random_problem(19, num_exits=1, batch=32)
  log_prior = losses.log_prior(COUNTS)
  np.testing.assert_allclose(losses.logit_adjusted(z[0], y, log_prior=log_prior, tau=0.0),
                             ref_ce(z[0], y), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(losses.logit_adjusted(z[0], y, log_prior=log_prior),
                             ref_balanced_softmax(z[0], y, COUNTS), rtol=RTOL, atol=ATOL)


def test_one_compilation_serves_every_logit_adjustment_tau():
  z, y = random_problem(20, num_exits=1)
  traces = []

  @jax.jit
  def loss(tau):
    traces.append(1)
    return losses.logit_adjusted(z[0], y, log_prior=losses.log_prior(COUNTS), tau=tau)

  for tau in (0.0, 1.0, 1.5):
    np.testing.assert_allclose(loss(jnp.float32(tau)), ref_logit_adjusted(z[0], y, COUNTS, tau),
                               rtol=RTOL, atol=ATOL)
  assert len(traces) == 1


@pytest.mark.parametrize("fn, kwarg", [(losses.cdt, "temperatures"),
                                       (losses.logit_adjusted, "log_prior")])
def test_class_vector_of_wrong_length_is_rejected(fn, kwarg):
  z, y = random_problem(0, num_exits=1)
  with pytest.raises(ValueError, match=rf"{kwarg} must have shape \[C\] = \(5,\)"):
    fn(z[0], y, **{kwarg: np.ones(4)})


@pytest.mark.parametrize("fn", [losses.ldam_margins, losses.class_balanced_weights,
                                losses.log_prior,
                                functools.partial(losses.cdt_temperatures, gamma=0.2)])
def test_counts_with_an_empty_class_are_rejected(fn):
  with pytest.raises(ValueError, match="class 2"):
    fn([10, 5, 0])


# ---------------------------------------------------------------- exit masks
def test_exit_masks_on_constructed_cases():
  z, y, targets = constructed_exits()
  masks, index = losses.exit_masks(z, y, threshold=0.9)
  np.testing.assert_array_equal(index, targets)
  assert set(targets.tolist()) == set(range(z.shape[0])), "every exit is exercised"
  want = (np.arange(z.shape[0])[:, None] <= targets[None, :]).astype(np.float32)
  np.testing.assert_array_equal(masks, want)
  assert masks.dtype == jnp.float32 and index.dtype == jnp.int32


@pytest.mark.parametrize("threshold,scale", [(0.3, 1.0), (0.6, 1.0), (0.95, 30.0)])
def test_exit_masks_match_reference_on_random_logits(threshold, scale):
  z, y = random_problem(7, num_exits=4, batch=64)
  z = z / 3.0 if scale > 1 else z
  _, index = losses.exit_masks(z, y, threshold=threshold, logit_scale=scale)
  np.testing.assert_array_equal(index, ref_exit_index(z, y, threshold, scale))


@pytest.mark.parametrize("scale", [1.0, 10.0, 30.0])
def test_class_confidence_matches_reference(scale):
  z, y = random_problem(13, num_exits=1, batch=64, num_classes=6)
  z = np.tanh(z[0])  # cosine-like logits
  margins = np.asarray(losses.ldam_margins([600, 300, 100, 40, 10, 3]))
  for m in (None, margins):
    np.testing.assert_allclose(
        losses.class_confidence(z, y, logit_scale=scale, margins=m),
        ref_confidence(z, y, scale, m), rtol=1e-5, atol=1e-7)
  # With margins it is the probability of the LDAM loss: exp(-ldam).
  np.testing.assert_allclose(
      losses.class_confidence(z, y, logit_scale=scale, margins=margins),
      np.exp(-ref_ldam(z, y, margins, scale)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("threshold,scale", [(0.5, 10.0), (0.9, 30.0), (0.99, 30.0)])
def test_exit_masks_with_margins_match_reference(threshold, scale):
  z, y = random_problem(14, num_exits=4, batch=96, num_classes=6)
  z = np.tanh(z / 2.0)
  margins = np.asarray(losses.ldam_margins([600, 300, 100, 40, 10, 3]))
  _, index = losses.exit_masks(z, y, threshold=threshold, logit_scale=scale,
                               margins=margins)
  want = ref_exit_index(z, y, threshold, scale, margins)
  np.testing.assert_array_equal(index, want)
  # The margin makes exits stricter: no example leaves earlier than without it.
  _, without = losses.exit_masks(z, y, threshold=threshold, logit_scale=scale)
  assert np.all(np.asarray(index) >= np.asarray(without))
  assert np.any(np.asarray(index) > np.asarray(without)), "margins must matter here"


def test_default_ldam_exit_confidence_is_exp_of_minus_the_ldam_loss():
  """The definition chosen in issue 19, pinned: with loss=ldam an exit takes an
  example when it is right and exp(-LDAM loss) > t, the loss at LDAM's scale 30
  with the class margins 0.5 * (n_j / n_min)**(-1/4); at inference the same with
  the predicted class in place of the label. Linear heads keep softmax(z)."""
  from har_jax import early_exit  # pylint: disable=g-import-not-at-top
  config = runs.default_config()
  config.loss = "ldam"
  counts = np.array([114, 70, 43, 26, 16, 10])
  confidence = config_lib.exit_confidence(config, counts)
  margins = 0.5 * (counts / counts.min()) ** -0.25
  z, y = random_problem(15, num_exits=3, batch=128, num_classes=6)
  z = np.tanh(z / 2.0)
  threshold = config.har_threshold
  want = np.full(len(y), 2)
  for b in range(len(y)):
    for i in range(3):
      loss = ref_ldam(z[i, b][None], y[b:b + 1], margins, 30.0)[0]
      if np.argmax(z[i, b]) == y[b] and np.exp(-loss) > threshold:
        want[b] = i
        break
  _, index = losses.exit_masks(z, y, threshold=threshold, **confidence)
  np.testing.assert_array_equal(index, want)
  assert len(set(want.tolist())) == 3, "the problem should use every exit"
  # Inference: exp(-LDAM loss) of the predicted class.
  want_exits = np.full(len(y), 2)
  for b in range(len(y)):
    for i in range(2):
      c = np.argmax(z[i, b])
      if np.exp(-ref_ldam(z[i, b][None], [c], margins, 30.0)[0]) > threshold:
        want_exits[b] = i
        break
  _, exits = early_exit.predict(z, threshold=threshold, **confidence)
  np.testing.assert_array_equal(exits, want_exits)
  # Linear heads judge the raw logits, whatever their loss does to them.
  for loss in ("ce", "focal", "cdt", "logit_adjusted"):
    config.loss = loss
    assert config_lib.exit_confidence(config, counts) == {"logit_scale": 1.0,
                                                          "margins": None}, loss
def test_exit_masks_take_a_label_per_exit():
  z, y = random_problem(21, num_exits=3, batch=64)
  other = np.random.default_rng(21).integers(0, z.shape[-1], size=y.shape).astype(np.int32)
  per_exit = np.stack([y, other, y])
  _, index = losses.exit_masks(z, per_exit, threshold=0.4)
  np.testing.assert_array_equal(index, ref_exit_index(z, per_exit, 0.4))
  assert not np.array_equal(index, ref_exit_index(z, y, 0.4)), "the labels matter"
  with pytest.raises(ValueError, match=r"or \[E, B\]"):
    losses.exit_masks(z, per_exit[:2], threshold=0.4)


def test_threshold_of_one_trains_every_exit_on_every_example():
  z, y, _ = constructed_exits()
  masks, index = losses.exit_masks(z, y, threshold=1.0)
  assert np.all(np.asarray(masks) == 1.0)
  assert np.all(np.asarray(index) == z.shape[0] - 1)


# ---------------------------------------------------------------- har_loss
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_har_loss_matches_reference(seed):
  z, y = random_problem(seed, num_exits=3, batch=32)
  weights = np.random.default_rng(seed).uniform(0.2, 3.0, size=z.shape[-1])
  valid = np.random.default_rng(seed + 10).integers(0, 2, size=len(y))
  got = losses.har_loss(z, y, threshold=0.5, class_weights=weights, where=valid)
  want = ref_har_loss(z, y, 0.5, weights=weights, valid=valid)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_har_loss_on_constructed_exits_with_ldam_and_focal():
  z, y, _ = constructed_exits()
  z = np.tanh(z / 4.0)
  counts = [50, 40, 30, 20, 10, 5]
  margins = np.asarray(losses.ldam_margins(counts))
  ldam = functools.partial(losses.ldam, margins=margins)
  for m in (None, margins):
    got = losses.har_loss(z, y, threshold=0.8, logit_scale=30.0, margins=m,
                          loss_fn=ldam)
    want = ref_har_loss(z, y, 0.8, scale=30.0, margins=m,
                        base=lambda zz, yy: ref_ldam(zz, yy, margins, 30.0))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  got = losses.har_loss(z, y, threshold=0.3,
                        loss_fn=functools.partial(losses.focal, gamma=2.0))
  want = ref_har_loss(z, y, 0.3, base=lambda zz, yy: ref_focal(zz, yy, 2.0))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["cdt", "logit_adjusted"])
def test_har_with_cdt_and_logit_adjustment_judges_exits_by_the_raw_logits(loss):
  z, y = random_problem(22, num_exits=3, batch=64)
  counts = [1000, 300, 80, 20, 2]
  if loss == "cdt":
    loss_fn = functools.partial(losses.cdt, temperatures=losses.cdt_temperatures(counts, 1.0))
    base = lambda zz, yy: ref_cdt(zz, yy, counts, 1.0)
    seen_by_loss = z / (np.max(counts) / np.asarray(counts)) ** 1.0
  else:
    loss_fn = functools.partial(losses.logit_adjusted, log_prior=losses.log_prior(counts))
    base = lambda zz, yy: ref_logit_adjusted(zz, yy, counts, 1.0)
    seen_by_loss = z + np.log(np.asarray(counts) / np.sum(counts))
  weights = np.asarray(losses.class_balanced_weights(counts))
  got = losses.har_loss(z, y, threshold=0.5, loss_fn=loss_fn, class_weights=weights)
  np.testing.assert_allclose(got, ref_har_loss(z, y, 0.5, base=base, weights=weights),
                             rtol=RTOL, atol=ATOL)
  # The test can tell: judged by the logits the loss sees, other examples exit.
  assert not np.array_equal(ref_exit_index(z, y, 0.5), ref_exit_index(seen_by_loss, y, 0.5))


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_mixed_har_loss_matches_reference(lam):
  z, y = random_problem(23, num_exits=3, batch=32)
  y2 = y[np.random.default_rng(23).permutation(len(y))]
  weights = np.random.default_rng(24).uniform(0.2, 3.0, size=z.shape[-1])
  # Manifold mixup after stage 1: exit 0 saw clean features.
  label_weights = np.array([[1.0], [lam], [lam]]) * np.ones((3, len(y)))
  got = losses.mixed_har_loss(z, y, y2, label_weights, threshold=0.5, class_weights=weights)
  want = ref_mixed_har_loss(z, y, y2, label_weights, 0.5, weights)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_mixed_har_loss_judges_the_dominant_label_with_ldam_margins():
  z, y = random_problem(27, num_exits=3, batch=48, num_classes=6)
  z = np.tanh(z / 2.0)
  y2 = y[np.random.default_rng(27).permutation(len(y))]
  margins = np.asarray(losses.ldam_margins([600, 300, 100, 40, 10, 3]))
  label_weights = np.array([[1.0], [0.3], [0.3]]) * np.ones((3, len(y)))
  got = losses.mixed_har_loss(z, y, y2, label_weights, threshold=0.5, logit_scale=10.0,
                              margins=margins)
  want = ref_mixed_har_loss(z, y, y2, label_weights, 0.5, scale=10.0, margins=margins)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  without = ref_mixed_har_loss(z, y, y2, label_weights, 0.5, scale=10.0)
  assert abs(want - without) > 1e-3, "the margins should move some exits here"


def test_mixed_har_loss_with_own_labels_only_is_har_loss():
  z, y = random_problem(25, num_exits=3, batch=32)
  y2 = np.roll(y, 1)
  weights = np.random.default_rng(25).uniform(0.2, 3.0, size=z.shape[-1])
  np.testing.assert_allclose(
      losses.mixed_har_loss(z, y, y2, 1.0, threshold=0.6, class_weights=weights),
      ref_har_loss(z, y, 0.6, weights=weights), rtol=RTOL, atol=ATOL)


def test_mixed_har_loss_gradient_matches_finite_differences_of_reference():
  z, y = random_problem(26, num_exits=2, batch=4, num_classes=3)
  y2 = y[::-1].copy()
  # Masks fixed by a threshold no exit reaches: the reference is smooth there.
  grad = jax.grad(lambda logits: losses.mixed_har_loss(logits, y, y2, 0.3, threshold=1.0))(z)
  numeric = numeric_grad(lambda zz: ref_mixed_har_loss(zz, y, y2, 0.3, 1.0), z)
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


def test_single_exit_is_pytorch_weighted_mean_cross_entropy():
  z, y = random_problem(8, num_exits=1, batch=40, num_classes=10)
  weights = np.asarray(losses.class_balanced_weights(
      [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]))
  # torch.nn.functional.cross_entropy(z, y, weight=w): sum_b w_yb ce_b / sum_b w_yb.
  ce = ref_ce(z[0], y)
  want = np.sum(weights[y] * ce) / np.sum(weights[y])
  for threshold in (0.0, 0.5, 1.0):  # one exit: the threshold cannot matter
    got = losses.har_loss(z, y, threshold=threshold, class_weights=weights)
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_single_exit_is_ldam_drw_loss():
  z, y = random_problem(9, num_exits=1, batch=40, num_classes=10)
  z = np.tanh(z)
  counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
  margins = np.asarray(losses.ldam_margins(counts))
  weights = np.asarray(losses.class_balanced_weights(counts))
  per_example = ref_ldam(z[0], y, margins, 30.0)
  want = np.sum(weights[y] * per_example) / np.sum(weights[y])
  got = losses.har_loss(z, y, threshold=0.9, class_weights=weights, logit_scale=30.0,
                        loss_fn=functools.partial(losses.ldam, margins=margins))
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_threshold_of_one_is_deep_supervision():
  z, y = random_problem(10, num_exits=3)
  want = sum(ref_ce(z[i], y).mean() for i in range(3))
  np.testing.assert_allclose(losses.har_loss(z, y, threshold=1.0), want, rtol=RTOL)


def test_no_valid_example_gives_zero_loss_and_finite_gradient():
  z, y = random_problem(11)
  valid = np.zeros(len(y), bool)
  loss, grad = jax.value_and_grad(
      lambda logits: losses.har_loss(logits, y, threshold=0.5, where=valid))(z)
  assert float(loss) == 0.0
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0.0)


def test_gradient_matches_analytic_and_flows_not_through_masks():
  z, y = random_problem(12, num_exits=3, batch=24)
  weights = np.random.default_rng(0).uniform(0.5, 2.0, size=z.shape[-1])
  grad = jax.grad(lambda logits: losses.har_loss(
      logits, y, threshold=0.4, class_weights=weights))(z)
  np.testing.assert_allclose(grad, ref_har_ce_grad(z, y, 0.4, weights),
                             rtol=1e-4, atol=1e-6)


def test_masks_carry_no_gradient():
  z, y = random_problem(13)
  jacobian = jax.jacobian(lambda logits: losses.exit_masks(
      logits, y, threshold=0.5)[0])(z)
  assert np.all(np.asarray(jacobian) == 0.0)


def test_one_compilation_serves_every_threshold_and_weight_vector():
  z, y = random_problem(14, num_exits=3, batch=32)
  traces = []

  @jax.jit
  def step(logits, threshold, weights):
    traces.append(1)
    return losses.har_loss(logits, y, threshold=threshold, class_weights=weights)

  ones = np.ones(z.shape[-1], np.float32)
  drw = np.asarray(losses.class_balanced_weights([100, 50, 20, 10, 3]))
  for threshold, weights in [(0.2, ones), (0.7, ones), (0.7, drw), (1.0, drw)]:
    got = step(z, jnp.float32(threshold), weights)
    np.testing.assert_allclose(got, ref_har_loss(z, y, threshold, weights=weights),
                               rtol=RTOL, atol=ATOL)
  assert len(traces) == 1, f"traced {len(traces)} times"


def test_vmap_over_independent_batches():
  z, y = random_problem(15, num_exits=3, batch=8)
  z2, y2 = random_problem(16, num_exits=3, batch=8)
  stacked = jax.vmap(lambda zz, yy: losses.har_loss(zz, yy, threshold=0.5))(
      np.stack([z, z2]), np.stack([y, y2]))
  want = [ref_har_loss(z, y, 0.5), ref_har_loss(z2, y2, 0.5)]
  np.testing.assert_allclose(stacked, want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- bad input
def test_rank_two_logits_are_rejected_at_trace_time():
  z, y = random_problem(0)
  with pytest.raises(ValueError, match="rank 3"):
    jax.jit(lambda logits: losses.har_loss(logits, y, threshold=0.5))(z[0])


def test_label_batch_mismatch_is_rejected():
  z, y = random_problem(0)
  with pytest.raises(ValueError, match=r"labels must have shape \[B\] = \(16,\)"):
    losses.har_loss(z, y[:-1], threshold=0.5)
  with pytest.raises(ValueError, match="labels"):
    losses.exit_masks(z, y[:-1], threshold=0.5)


def test_class_weights_of_wrong_length_are_rejected():
  z, y = random_problem(0)
  with pytest.raises(ValueError, match=r"class_weights must have shape \[C\] = \(5,\)"):
    losses.har_loss(z, y, threshold=0.5, class_weights=np.ones(4))


def test_float_labels_are_rejected():
  z, y = random_problem(0)
  with pytest.raises(ValueError, match="integer"):
    losses.har_loss(z, y.astype(np.float32), threshold=0.5)
