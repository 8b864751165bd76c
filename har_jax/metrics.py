"""Metrics of training and evaluation, and the evaluation summary.

A metric is a pytree of sums (so it can leave a jitted step and be merged over
batches and steps on the device); ``compute()`` turns it into numbers. Written
here rather than taken from clu so that the train step needs only JAX and Flax
(experiments/gpu_benchmark.py runs it where clu is not installed). Per-exit and
per-class quantities are vectors: :class:`Mean` of values laid out ``[B, K]``
(batch first) is kept apart for each index k.
"""

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax
import jax.numpy as jnp
import numpy as np

from har_jax import early_exit
from har_jax.data.long_tail import SHOT_GROUP_NAMES


@flax.struct.dataclass
class Mean:
  """Mean over examples (the leading axis) of ``values``: ``[]``, ``[B]`` or
  ``[B, K]`` (then one mean per index k).

  ``mask`` is ``[B]`` (padding) or ``[B, K]`` (e.g. "example is of class k").
  An index with no example computes to NaN.
  """

  total: jnp.ndarray   # [] or [K]
  count: jnp.ndarray

  @classmethod
  def of(cls, values, mask: Optional[jnp.ndarray] = None) -> "Mean":
    values = jnp.asarray(values, jnp.float32)
    if values.ndim == 0:  # one value, e.g. a step's loss
      values = values[None]
    mask = jnp.ones(values.shape, jnp.float32) if mask is None else jnp.asarray(
        mask, jnp.float32)
    mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim)),
                            values.shape)
    return cls(total=jnp.sum(values * mask, axis=0), count=jnp.sum(mask, axis=0))

  def merge(self, other: "Mean") -> "Mean":
    return type(self)(total=self.total + other.total, count=self.count + other.count)

  def compute(self) -> jnp.ndarray:
    return jnp.where(self.count > 0, self.total / jnp.maximum(self.count, 1), jnp.nan)


@flax.struct.dataclass
class Last:
  """The value of the latest step merged in (e.g. the learning rate)."""

  value: jnp.ndarray

  def merge(self, other: "Last") -> "Last":
    return other

  def compute(self) -> jnp.ndarray:
    return self.value


class Metrics:
  """A dataclass of metrics, merged and computed field by field."""

  def merge(self, other):
    return type(self)(**{field.name: getattr(self, field.name).merge(getattr(other, field.name))
                         for field in dataclasses.fields(self)})

  def compute(self) -> dict:
    return {field.name: getattr(self, field.name).compute()
            for field in dataclasses.fields(self)}


@flax.struct.dataclass
class TrainMetrics(Metrics):
  loss: Mean
  finite: Mean           # loss and new parameters
  learning_rate: Last
  exit_fraction: Mean    # [E]
  exit_accuracy: Mean    # [E]
  # [G * E]: entry g * E + e is the fraction of shot group g's training
  # examples that exited at exit e.
  exit_fraction_by_group: Mean

  @classmethod
  def single_from_model_output(cls, *, loss, finite, learning_rate, exit_onehot,
                               exit_correct, group_onehot) -> "TrainMetrics":
    """One step's metrics; ``exit_onehot`` and ``exit_correct`` are ``[B, E]``,
    ``group_onehot`` ``[B, G]`` the shot group of each example's class."""
    groups, exits = group_onehot.shape[-1], exit_onehot.shape[-1]
    return cls(loss=Mean.of(loss), finite=Mean.of(finite),
               learning_rate=Last(jnp.asarray(learning_rate, jnp.float32)),
               exit_fraction=Mean.of(exit_onehot), exit_accuracy=Mean.of(exit_correct),
               exit_fraction_by_group=Mean.of(jnp.tile(exit_onehot, (1, groups)),
                                              jnp.repeat(group_onehot, exits, axis=-1)))


@flax.struct.dataclass
class EvalMetrics(Metrics):
  accuracy: Mean             # []
  class_accuracy: Mean       # [C]
  per_exit_accuracy: Mean    # [E]
  exit_fraction: Mean        # [E]

  @classmethod
  def single_from_model_output(cls, *, correct, mask, labels_onehot, exit_correct,
                               exit_onehot) -> "EvalMetrics":
    """One batch's metrics: ``correct`` and ``mask`` (padding) ``[B]``,
    ``labels_onehot`` ``[B, C]``, ``exit_correct`` and ``exit_onehot`` ``[B, E]``."""
    # Each example counts toward its own class only.
    class_mask = jnp.asarray(labels_onehot, jnp.float32) * jnp.asarray(
        mask, jnp.float32)[:, None]
    return cls(accuracy=Mean.of(correct, mask),
               class_accuracy=Mean.of(jnp.broadcast_to(correct[:, None],
                                                       labels_onehot.shape), class_mask),
               per_exit_accuracy=Mean.of(exit_correct, mask),
               exit_fraction=Mean.of(exit_onehot, mask))


def per_exit_accuracy(exit_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """``[E]`` accuracy of each exit's own prediction on every example, from its
  logits ``[E, N, C]`` and the labels ``[N]``."""
  return (np.argmax(exit_logits, axis=-1) == np.asarray(labels)[None]).mean(axis=1)


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray,
                       num_classes: int) -> np.ndarray:
  """``[C]`` accuracy on the examples of each class (NaN for a class without any)."""
  correct = np.bincount(labels, weights=predictions == labels, minlength=num_classes)
  total = np.bincount(labels, minlength=num_classes)
  with np.errstate(invalid="ignore"):
    return correct / total


def shot_group_accuracy(class_accuracy, shot_groups: Sequence[int]) -> dict:
  """Mean per-class accuracy of each shot group (``many``, ``medium``, ``few``);
  None for a group with no class that has test examples (NaN accuracy)."""
  class_accuracy = np.asarray(class_accuracy, np.float64)
  groups = np.asarray(shot_groups)
  accuracy = {}
  for group, name in enumerate(SHOT_GROUP_NAMES):
    members = class_accuracy[(groups == group) & ~np.isnan(class_accuracy)]
    accuracy[name] = float(members.mean()) if members.size else None
  return accuracy


def evaluation_summary(computed: Mapping[str, Any], shot_groups: Sequence[int],
                       exit_flops: Sequence[float], backbone_flops: float) -> dict:
  """Turns computed EvalMetrics into the numbers a run reports.

  Args:
    computed: ``EvalMetrics.compute()`` fetched to the host.
    shot_groups: ``[C]`` MANY / MEDIUM / FEW of each class (``data.shot_groups``).
    exit_flops: ``[E]`` cumulative MACs per image to reach each exit.
    backbone_flops: MACs of the plain backbone.

  Returns:
    ``accuracy``, ``many``, ``medium``, ``few`` (mean per-class accuracy in the
    group, None for an empty group), ``per_exit_accuracy``, ``exit_fraction``,
    ``flops_saving``.
  """
  summary = {"accuracy": float(computed["accuracy"]),
             **shot_group_accuracy(computed["class_accuracy"], shot_groups)}
  exit_fraction = np.asarray(computed["exit_fraction"], np.float64)
  summary["per_exit_accuracy"] = [float(a) for a in computed["per_exit_accuracy"]]
  summary["exit_fraction"] = [float(f) for f in exit_fraction]
  spent = float(np.dot(exit_fraction, np.asarray(exit_flops, np.float64)))
  summary["flops_saving"] = 1.0 - spent / float(backbone_flops)
  return summary


def logits_summary(exit_logits: np.ndarray, labels: np.ndarray, *, threshold: float,
                   shot_groups: Sequence[int], exit_flops: Sequence[float],
                   backbone_flops: float, **confidence) -> dict:
  """:func:`evaluation_summary` of early-exit inference on a split's logits.

  Args:
    exit_logits: ``[E, N, C]`` every exit's logits of the split.
    labels: ``[N]``.
    threshold: of ``early_exit.predict``.
    shot_groups, exit_flops, backbone_flops: as in :func:`evaluation_summary`.
    **confidence: ``logit_scale`` and ``margins`` of ``early_exit.predict``
      (``config.exit_confidence``).
  """
  exit_logits = np.asarray(exit_logits)
  labels = np.asarray(labels)
  num_exits, _, num_classes = exit_logits.shape
  predictions, exit_index = (np.asarray(a) for a in early_exit.predict(
      exit_logits, threshold=threshold, **confidence))
  computed = {
      "accuracy": np.mean(predictions == labels),
      "class_accuracy": per_class_accuracy(predictions, labels, num_classes),
      "per_exit_accuracy": per_exit_accuracy(exit_logits, labels),
      "exit_fraction": np.bincount(exit_index, minlength=num_exits) / labels.size}
  return evaluation_summary(computed, shot_groups, exit_flops, backbone_flops)


# A deeper exit alone this much (a fraction) below a shallower one is starved.
# Measured (experiments/har_ldam_study.py): starved runs fall 29-50 points; a
# healthy HAR run's last exit, which trains on the hard examples only, may
# trail an earlier one by a few points (8 in one HAR(CE) run at imbalance 100).
STARVED_EXIT_DROP = 0.10


def starved_exits_warning(per_exit_accuracy: Sequence[float], *,
                          drop: float = STARVED_EXIT_DROP,
                          advice: str = "Make the training exits stricter (a higher "
                                        "har_threshold) or set har=False."
                          ) -> Optional[str]:
  """One line when a deeper exit alone is much less accurate than a shallower one.

  With HAR a deeper exit trains only on the examples that earlier exits did not
  take; when nearly all of them leave early, the deep exits starve. The last
  exit is the full network, so it should be the most accurate one.

  Args:
    per_exit_accuracy: ``[E]`` test accuracy of each exit alone, shallow to deep.
    drop: how far (a fraction) below the best shallower exit counts as starved.
    advice: what to change, the end of the line.

  Returns:
    The warning, naming the worst deeper exit and what to change, or None.
  """
  accuracy = np.asarray(per_exit_accuracy, np.float64)
  worst = None  # (shortfall, deeper exit, shallower exit)
  for deeper in range(1, accuracy.size):
    shallower = int(np.argmax(accuracy[:deeper]))
    shortfall = accuracy[shallower] - accuracy[deeper]
    if shortfall > drop and (worst is None or shortfall > worst[0]):
      worst = (shortfall, deeper, shallower)
  if worst is None:
    return None
  shortfall, deeper, shallower = worst
  return (f"starved deep exits: exit {deeper} alone is {accuracy[deeper]:.3f}, "
          f"{100 * shortfall:.1f} points below exit {shallower} "
          f"({accuracy[shallower]:.3f}): too many training examples leave early. "
          f"{advice}")
