"""Mixing: mixup, manifold mixup and major feature weakening (MFW).

Each method is a pure function ``(key, labels [B]) -> Mixing`` (its parameters
bound with ``functools.partial``) that draws how one global batch is mixed; the
multi-exit ResNet applies the mixing to its features at one stage boundary
inside ``model.apply(..., mix=mixing)`` and the loss reads the mixed targets
from it. Boundaries: 0 is the input images, k the features after stage k (so
the exit after stage p sees mixed features exactly when ``p >= boundary``).

- **mixup** (Zhang et al. 2018): one ``lam ~ Beta(alpha, alpha)`` and one
  permutation ``perm`` of the batch, ``x~ = lam x + (1 - lam) x[perm]`` at the
  input, loss ``lam l(z, y) + (1 - lam) l(z, y[perm])``.
- **manifold mixup** (Verma et al. 2019): the same at a boundary drawn
  uniformly per batch from a configured set; exits before it see clean
  features and train on clean labels.
- **MFW**, major feature weakening (Ye et al., ICCV 2021). har_jax's own reading
  of the method as the lecture on class-imbalanced learning describes it (the
  paper's exact schedule is not available here): at a boundary drawn uniformly
  per batch from the configured set, example b is weakened with probability
  ``p_j = max_probability * (n_j / n_max)**power`` of its class j (so the major
  classes are weakened most); a weakened example's features become
  ``w h_b + (1 - w) h_perm(b)`` with its own weight ``w ~ U[1 - strength, 1]``
  (``strength <= 1/2``: its own features always dominate) and its label is
  kept, so the loss is the plain loss.

With HAR, a mixed example's exit is decided by its dominant label (``y`` where
its label weight is at least 1/2, else ``y[perm]``; ``losses.mixed_har_loss``).
Every draw is an array inside the step, so one compiled step serves every
``lam``, permutation and boundary.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def mix_features(features: Array, weights: Array, partners: Array) -> Array:
  """``weights * features + (1 - weights) * features[partners]`` per example.

  Args:
    features: ``[B, ...]`` images or feature maps.
    weights: scalar or ``[B]``, each example's own share (1: unchanged).
    partners: ``[B]`` int32, the example each one is mixed with.

  Returns:
    ``[B, ...]`` in the dtype of ``features``.
  """
  weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), partners.shape)
  weights = weights.reshape(weights.shape + (1,) * (features.ndim - 1))
  weights = weights.astype(features.dtype)
  return weights * features + (1 - weights) * features[partners]


@flax.struct.dataclass
class Mixing:
  """How one batch is mixed: drawn by a mixing method, applied by the model.

  Attributes:
    boundary: int32 scalar, the boundary whose features are mixed (one of
      ``boundaries``).
    feature_weights: ``[B]`` float32, each example's own share of its mixed
      features.
    partners: ``[B]`` int32, the example each one is mixed with.
    label_weights: ``[B]`` float32, the weight of the example's own label in
      its target; ``1 - label_weights`` goes to its partner's label.
    boundaries: the boundaries the method may choose (static), so the model
      mixes only where it can.
  """
  boundary: Array
  feature_weights: Array
  partners: Array
  label_weights: Array
  boundaries: tuple = flax.struct.field(pytree_node=False, default=(0,))

  def __call__(self, features: Array, boundary: int) -> Array:
    """The features at ``boundary`` (a Python int), mixed if it is the drawn one."""
    if boundary not in self.boundaries:
      return features
    mixed = mix_features(features, self.feature_weights, self.partners)
    if len(self.boundaries) == 1:
      return mixed
    return jnp.where(self.boundary == boundary, mixed, features)

  def exit_label_weights(self, exit_positions: Sequence[int]) -> Array:
    """``[E, B]`` weight of each example's own label at each exit: 1 at the
    exits before the boundary (clean features, clean labels)."""
    mixed = jnp.asarray(exit_positions)[:, None] >= self.boundary
    return jnp.where(mixed, self.label_weights[None, :], 1.0)


def _permutation(key: Array, batch_size: int) -> Array:
  return jax.random.permutation(key, batch_size).astype(jnp.int32)


def _boundary(key: Array, boundaries: Sequence[int]) -> Array:
  choice = jax.random.randint(key, (), 0, len(boundaries))
  return jnp.asarray(boundaries, jnp.int32)[choice]


def manifold_mixup(key: Array, labels: Array, *, alpha: float,
                   boundaries: Sequence[int]) -> Mixing:
  """Mixup at a boundary drawn uniformly from ``boundaries``: one
  ``lam ~ Beta(alpha, alpha)`` and one permutation for the whole global batch."""
  lam_key, perm_key, boundary_key = jax.random.split(key, 3)
  batch_size = labels.shape[0]
  lam = jax.random.beta(lam_key, alpha, alpha)
  lam = jnp.full((batch_size,), lam, jnp.float32)
  return Mixing(boundary=_boundary(boundary_key, boundaries), feature_weights=lam,
                partners=_permutation(perm_key, batch_size), label_weights=lam,
                boundaries=tuple(boundaries))


def mixup(key: Array, labels: Array, *, alpha: float) -> Mixing:
  """Input mixup: manifold mixup whose only boundary is the input images."""
  return manifold_mixup(key, labels, alpha=alpha, boundaries=(0,))


def major_feature_weakening(key: Array, labels: Array, *, probabilities: Array,
                            strength: float, boundaries: Sequence[int]) -> Mixing:
  """MFW as har_jax reads it (see the module docstring).

  Args:
    probabilities: ``[C]`` probability that an example of class j is weakened
      (:func:`weakening_probabilities`).
    strength: in ``(0, 1/2]``, the largest share a partner may take.
    boundaries: the boundaries to draw from.
  """
  weaken_key, weight_key, perm_key, boundary_key = jax.random.split(key, 4)
  batch_size = labels.shape[0]
  weakened = jax.random.bernoulli(weaken_key, jnp.asarray(probabilities)[labels])
  own = 1.0 - strength * jax.random.uniform(weight_key, (batch_size,))
  return Mixing(boundary=_boundary(boundary_key, boundaries),
                feature_weights=jnp.where(weakened, own, 1.0).astype(jnp.float32),
                partners=_permutation(perm_key, batch_size),
                label_weights=jnp.ones((batch_size,), jnp.float32),
                boundaries=tuple(boundaries))


def weakening_probabilities(class_counts: Sequence[int], *, max_probability: float,
                            power: float) -> Array:
  """``[C]`` float32 ``max_probability * (n_j / n_max)**power``: MFW weakens the
  largest class with ``max_probability`` and rarer ones less."""
  counts = np.asarray(class_counts, np.float64)
  return jnp.asarray(max_probability * (counts / counts.max()) ** power, jnp.float32)


MIXINGS = ("none", "mixup", "manifold", "mfw")
# The methods whose targets mix two labels; MFW keeps every label.
LABEL_MIXINGS = ("mixup", "manifold")
MixFn = Callable[[Array, Array], Optional[Mixing]]


def mixing_fn(name: str, *, alpha: float, boundaries: Sequence[int],
              class_counts: Sequence[int], mfw_max_probability: float,
              mfw_power: float, mfw_strength: float) -> MixFn:
  """The method ``name`` of :data:`MIXINGS` as ``(key, labels) -> Mixing``
  (None for ``none``)."""
  if name == "none":
    return lambda key, labels: None
  if name == "mixup":
    return functools.partial(mixup, alpha=alpha)
  if name == "manifold":
    return functools.partial(manifold_mixup, alpha=alpha, boundaries=tuple(boundaries))
  if name == "mfw":
    probabilities = weakening_probabilities(
        class_counts, max_probability=mfw_max_probability, power=mfw_power)
    return functools.partial(major_feature_weakening, probabilities=probabilities,
                             strength=mfw_strength, boundaries=tuple(boundaries))
  raise ValueError(f"mixing must be one of {list(MIXINGS)}, got {name!r}.")
