"""har_jax.mixing: the mixed features and targets against NumPy, and where the
multi-exit ResNet mixes them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from har_jax import losses
from har_jax import mixing
from har_jax import models
from har_jax import train

import runs


def ref_mix(x, weights, partners):
  x = np.asarray(x, np.float64)
  weights = np.broadcast_to(np.asarray(weights, np.float64), (len(x),))
  return np.stack([weights[b] * x[b] + (1 - weights[b]) * x[partners[b]]
                   for b in range(len(x))])


def test_mix_features_is_lam_x_plus_one_minus_lam_x_perm():
  x = np.random.default_rng(0).normal(size=(6, 4, 4, 3)).astype(np.float32)
  partners = np.array([3, 0, 5, 1, 2, 4], np.int32)
  np.testing.assert_allclose(mixing.mix_features(x, 0.3, partners),
                             ref_mix(x, 0.3, partners), rtol=1e-6, atol=1e-6)
  per_example = np.linspace(0.5, 1.0, 6).astype(np.float32)
  np.testing.assert_allclose(mixing.mix_features(x, per_example, partners),
                             ref_mix(x, per_example, partners), rtol=1e-6, atol=1e-6)
  assert mixing.mix_features(jnp.asarray(x, jnp.bfloat16), 0.3, partners).dtype == jnp.bfloat16


def test_mixup_draws_one_lam_and_a_permutation_per_batch():
  labels = jnp.arange(32) % 5
  draw = jax.jit(functools.partial(mixing.mixup, alpha=1.0))
  lams = []
  for seed in range(20):
    drawn = draw(jax.random.PRNGKey(seed), labels)
    np.testing.assert_array_equal(np.sort(drawn.partners), np.arange(32))
    assert np.all(drawn.feature_weights == drawn.feature_weights[0])
    np.testing.assert_array_equal(drawn.label_weights, drawn.feature_weights)
    assert int(drawn.boundary) == 0 and drawn.boundaries == (0,)
    lams.append(float(drawn.feature_weights[0]))
  # Beta(1, 1) is uniform: 20 draws spread over [0, 1].
  assert 0 <= min(lams) < 0.25 and 0.75 < max(lams) <= 1


def test_manifold_mixup_draws_its_boundary_from_the_set():
  labels = jnp.arange(16) % 4
  draw = jax.jit(functools.partial(mixing.manifold_mixup, alpha=2.0, boundaries=(0, 1, 2)))
  drawn = {int(draw(jax.random.PRNGKey(seed), labels).boundary) for seed in range(30)}
  assert drawn == {0, 1, 2}


def test_mfw_weakens_the_major_classes_and_keeps_every_label():
  counts = [1000, 100, 10]
  probabilities = mixing.weakening_probabilities(counts, max_probability=0.8, power=1.0)
  np.testing.assert_allclose(probabilities, [0.8, 0.08, 0.008], rtol=1e-6)
  labels = jnp.asarray(np.repeat([0, 1, 2], 400), jnp.int32)
  drawn = mixing.major_feature_weakening(jax.random.PRNGKey(0), labels,
                                         probabilities=probabilities, strength=0.4,
                                         boundaries=(1, 2))
  weights = np.asarray(drawn.feature_weights)
  assert np.all((weights >= 0.6) & (weights <= 1.0))
  weakened = [np.mean(weights[np.asarray(labels) == j] < 1) for j in range(3)]
  # 400 examples a class: 0.8 +- 0.1, 0.08 +- 0.05, 0.008 +- 0.02.
  assert abs(weakened[0] - 0.8) < 0.1 and abs(weakened[1] - 0.08) < 0.05
  assert weakened[2] < 0.03
  np.testing.assert_array_equal(drawn.label_weights, np.ones(len(labels)))
  assert int(drawn.boundary) in (1, 2)


@pytest.fixture(scope="module")
def resnet8():
  model = models.resnet8(10, exits="CEBEBEBE")   # exits after the stem and stages 1, 2
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 1))
  # Random values of the initial shapes: compiling the initialisers' random draws
  # would cost this test most of its time.
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.PRNGKey(1), images)
  rng = np.random.default_rng(1)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, leaf: (np.ones(leaf.shape, np.float32) if path[-1].key == "var"
                          else rng.normal(0, 0.3, leaf.shape).astype(np.float32)), shapes)
  apply = jax.jit(lambda images, mix: model.apply(variables, images, train=False, mix=mix))
  return model, images, apply


def _drawn(boundary, boundaries=(0, 1, 2, 3)):
  drawn = mixing.manifold_mixup(jax.random.PRNGKey(3), jnp.arange(8) % 10, alpha=2.0,
                                boundaries=boundaries)
  return drawn.replace(boundary=jnp.int32(boundary))


def test_input_mixup_inside_the_model_is_the_model_of_the_mixed_images(resnet8):
  _, images, apply = resnet8
  drawn = mixing.mixup(jax.random.PRNGKey(4), jnp.arange(8) % 10, alpha=1.0)
  by_hand = ref_mix(images, drawn.feature_weights, drawn.partners).astype(np.float32)
  np.testing.assert_allclose(apply(images, drawn), apply(by_hand, None),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("boundary", [1, 2, 3])
def test_manifold_mixup_at_stage_k_leaves_the_exits_before_it_clean(resnet8, boundary):
  model, images, apply = resnet8
  clean, mixed = apply(images, None), apply(images, _drawn(boundary))
  for index, position in enumerate(model.exit_positions):
    if position < boundary:
      np.testing.assert_array_equal(mixed[index], clean[index], err_msg=f"exit {index}")
    else:
      assert not np.allclose(mixed[index], clean[index]), f"exit {index} was mixed"
  np.testing.assert_array_equal(
      _drawn(boundary).exit_label_weights(model.exit_positions)[:, 0],
      [1.0 if p < boundary else float(_drawn(boundary).label_weights[0])
       for p in model.exit_positions])


def _mixed_loss_piece(har, exit_positions):
  config = runs.small_config(mixing="manifold", har=har, drw_start_epoch=-1)
  counts = [120, 60, 30, 20, 10, 8, 6, 5, 4, 3]
  return train.make_loss(config, counts, steps_per_epoch=7, exit_positions=exit_positions)


def test_the_mixed_loss_is_the_lam_combination_of_the_plain_losses():
  rng = np.random.default_rng(5)
  exit_logits = rng.normal(size=(1, 16, 10)).astype(np.float32) * 2
  labels = rng.integers(0, 10, 16).astype(np.int32)
  drawn = _drawn(0).replace(
      feature_weights=jnp.full(16, 0.35), label_weights=jnp.full(16, 0.35),
      partners=jnp.asarray(rng.permutation(16), jnp.int32))
  loss, _ = _mixed_loss_piece(False, (3,))(exit_logits, labels, drawn, jnp.int32(0))

  def plain(y):
    z = exit_logits[0].astype(np.float64)
    log_probs = z - z.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return -log_probs[np.arange(16), y].mean()

  want = 0.35 * plain(labels) + 0.65 * plain(labels[np.asarray(drawn.partners)])
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_with_har_the_dominant_label_decides_the_exit():
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  partners = jnp.asarray(np.roll(np.arange(16), 1), jnp.int32)
  # Every exit confident on the partner's label: exits at the first mixed exit when
  # the partner dominates (lam < 1/2), never when the example's own label does.
  exit_logits = np.zeros((3, 16, 10), np.float32)
  exit_logits[:, np.arange(16), labels[np.asarray(partners)]] = 20.0
  positions = (1, 2, 3)
  piece = _mixed_loss_piece(True, positions)
  for lam, first_exit in ((0.3, 1), (0.7, 2)):
    drawn = _drawn(2).replace(feature_weights=jnp.full(16, lam),
                              label_weights=jnp.full(16, lam), partners=partners)
    distinct = labels != labels[np.asarray(partners)]
    _, exit_index = piece(exit_logits, labels, drawn, jnp.int32(0))
    # Boundary 2: exit 0 (after stage 1) is judged by the clean label and never
    # qualifies; exit 1 (after stage 2) by the dominant one.
    np.testing.assert_array_equal(np.asarray(exit_index)[distinct], first_exit)
    want_masks, _ = losses.exit_masks(
        exit_logits, np.where(np.arange(3)[:, None] >= 1,
                              np.where(lam >= 0.5, labels, labels[np.asarray(partners)]),
                              labels), threshold=0.9)
    np.testing.assert_array_equal(np.asarray(want_masks).sum(0) - 1, exit_index)
