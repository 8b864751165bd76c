"""Confidence-based early-exit inference, its FLOPs saving, and threshold calibration.

At inference an example leaves at the first exit whose confidence in its own
prediction exceeds the threshold, else at the last exit. The confidence is the
training criterion's (:func:`har_jax.losses.class_confidence`) with the
predicted class in place of the label: the largest softmax probability for CE
and focal, and for a cosine (LDAM) head with margins the probability left
once the predicted class's logit is lowered by its margin.

- :func:`predict` decides from every exit's logits (the whole network has run).
- :class:`Cascade` runs the network segment by segment and continues only with
  the examples not yet confident, so the compute saved is really saved; its
  predictions are those of :func:`predict`.
- :func:`threshold_curve` and :func:`calibrate_threshold` pick the threshold on a
  held-out split for an accuracy or FLOPs target.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from har_jax import losses

Array = jax.Array
Margins = Optional[Union[np.ndarray, Array, Sequence[float]]]


def _confidence(logits: Array, logit_scale: Union[float, Array],
                margins: Margins) -> Array:
  """Confidence of each row in its own prediction; one definition for every path.

  ``softmax(s * (z - m[c] * onehot(c)))[c]`` with ``c = argmax z``: without
  margins, ``max softmax(s * z)``.
  """
  predictions = jnp.argmax(logits, axis=-1)
  return losses.class_confidence(logits, predictions, logit_scale=logit_scale,
                                 margins=margins)


def predict(exit_logits: Array, *, threshold: Union[float, Array],
            logit_scale: Union[float, Array] = 1.0,
            margins: Margins = None) -> Tuple[Array, Array]:
  """Prediction of each example at its first confident exit.

  Args:
    exit_logits: ``[E, B, C]`` logits of every exit, shallow to deep.
    threshold: scalar; exit ``i`` is confident on example ``b`` when
      ``softmax(s * (z - m[c] * onehot(c)))[c] > threshold`` for its
      prediction ``c = argmax z[i, b]`` (``max softmax(s * z[i, b])`` without
      margins). May be traced.
    logit_scale: ``s``, the confidence scale of training (1 for CE/focal,
      see ``har_jax.config.exit_confidence`` for cosine heads).
    margins: optional ``[C]`` class margins of the confidence (LDAM's, where
      training used them); None: no margin.

  Returns:
    ``(predictions [B] int32, exit_index [B] int32)``.
  """
  if jnp.ndim(exit_logits) != 3:
    raise ValueError("exit_logits must have rank 3, [E, B, C]; got shape "
                     f"{jnp.shape(exit_logits)}.")
  logits = exit_logits.astype(jnp.promote_types(exit_logits.dtype, jnp.float32))
  confident = (_confidence(logits, logit_scale, margins) > threshold).at[-1].set(True)
  exit_index = jnp.argmax(confident, axis=0).astype(jnp.int32)  # first True
  per_exit_prediction = jnp.argmax(logits, axis=-1)  # [E, B]
  predictions = jnp.take_along_axis(per_exit_prediction, exit_index[None], axis=0)[0]
  return predictions.astype(jnp.int32), exit_index


def flops_saving(exit_index: Union[Array, np.ndarray],
                 exit_flops: Sequence[float], backbone_flops: float) -> float:
  """``1 - mean_b exit_flops[exit_index[b]] / backbone_flops``.

  Args:
    exit_index: ``[B]`` exit of each example (from :func:`predict`).
    exit_flops: ``[E]`` cumulative cost of reaching and evaluating each exit,
      the heads of earlier exits included (``models.exit_flops(...).per_exit``).
    backbone_flops: cost of the plain backbone with only its final classifier.

  Returns:
    The fraction of the plain backbone's compute saved; negative when the exit
    heads cost more than early exits save.
  """
  spent = np.asarray(exit_flops, dtype=np.float64)[np.asarray(exit_index)]
  return float(1.0 - spent.mean() / backbone_flops)


def power_of_two_bucket(count: int, min_bucket: int) -> int:
  """Padded batch of ``count`` rows: the next power of two, at least ``min_bucket``."""
  return max(min_bucket, 1 << max(count - 1, 0).bit_length())


class Cascade:
  """Cascaded early-exit inference: each segment runs only on the unsure examples.

  Segment 0 runs on the whole batch and exit 0 classifies it; the examples whose
  confidence exceeds the threshold leave with that prediction, and only the rest
  are gathered and carried through segment 1, and so on; the last exit takes
  whoever is left. Predictions and exit indices equal those of :func:`predict` on
  the full network's logits.

  Shapes stay static: the survivors are padded to a bucket size (a power of two,
  at least ``min_bucket``), so every segment compiles once per (rows in, rows
  out) pair of buckets it meets, at most ``E * K * (K + 1) / 2`` programs for K
  bucket sizes; :attr:`compiles` reports how many were built. The threshold is
  an argument of the programs: changing it compiles nothing.

  Which examples go on is decided on the host (it picks the next bucket), so each
  segment waits for the previous one; the cascade runs on one device. To use
  several, give each its own ``Cascade`` and its share of the batch.

  Example::

    cascade = early_exit.Cascade(model, variables, logit_scale=1.0)
    predictions, exit_index = cascade(images, threshold=0.9)  # NumPy [B] int32
    cascade.compiles

  Args:
    model: a multi-exit network with ``segment``, ``exit_head`` and ``num_exits``
      (``models.ResNet``).
    variables: its ``{"params": ..., "batch_stats": ...}``; moved to ``device``.
    logit_scale: the softmax scale of confidences (see :func:`predict`).
    margins: the class margins of confidences (see :func:`predict`).
    min_bucket: the smallest padded batch: smaller ones would hardly run faster
      on most hardware, and fewer sizes mean fewer programs.
    device: where to run; default the first local device.
  """

  def __init__(self, model: nn.Module, variables: Any, *,
               logit_scale: float = 1.0, margins: Margins = None,
               min_bucket: int = 8,
               device: Optional[jax.Device] = None):
    if min_bucket < 1:
      raise ValueError(f"min_bucket must be at least 1, got {min_bucket}.")
    self._model = model
    self._num_exits = model.num_exits
    self._min_bucket = min_bucket
    self._device = jax.local_devices()[0] if device is None else device
    self._variables = jax.device_put(variables, self._device)
    self._logit_scale = logit_scale
    self._margins = None if margins is None else jnp.asarray(margins, jnp.float32)
    self._traces = []  # one entry per program built: (segment, rows in, rows out)
    self._step = jax.jit(self._segment_step, static_argnames="index")

  @property
  def compiles(self) -> int:
    """How many segment programs were compiled so far."""
    return len(self._traces)

  @property
  def compiled_shapes(self) -> list[tuple[int, int, int]]:
    """``(segment, rows of its input, rows it computes)`` of every program built."""
    return list(self._traces)

  def _segment_step(self, variables, x, rows, threshold, *, index):
    """Segment ``index`` and its exit on rows ``rows`` of ``x``.

    Args:
      x: ``[N, ...]`` images (segment 0) or the previous segment's features.
      rows: ``[b]`` int32 rows of ``x`` to continue with, or None for all of them.
      threshold: float32 scalar.

    Returns:
      ``(features [b, ...], confident [b] bool, predictions [b] int32)``; the
      last segment returns None for the first two.
    """
    rows_out = x.shape[0] if rows is None else rows.shape[0]
    self._traces.append((index, x.shape[0], rows_out))
    if rows is not None:
      # The gather runs in the segment's program: no separate dispatch, and XLA
      # can fuse it into the first convolution's input.
      x = jnp.take(x, rows, axis=0)
    model = self._model
    features = model.apply(variables, x, index, train=False, method=model.segment)
    logits = model.apply(variables, features, index, train=False,
                         method=model.exit_head)
    predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if index == self._num_exits - 1:
      return None, None, predictions
    confident = _confidence(logits, self._logit_scale, self._margins) > threshold
    return features, confident, predictions

  def __call__(self, images: Union[np.ndarray, Array], *,
               threshold: float) -> Tuple[np.ndarray, np.ndarray]:
    """Predictions of a batch, leaving at the first confident exit.

    Args:
      images: ``[B, H, W, C]`` preprocessed (normalised) float images.
      threshold: exit ``i`` takes example ``b`` when its confidence in its
        prediction exceeds this (see :func:`predict`).

    Returns:
      ``(predictions [B] int32, exit_index [B] int32)`` as NumPy arrays.
    """
    batch = images.shape[0]
    predictions = np.zeros(batch, np.int32)
    exit_index = np.zeros(batch, np.int32)
    if batch == 0:
      return predictions, exit_index
    x = jax.device_put(images, self._device)
    threshold = np.float32(threshold)  # a scalar argument: no transfer of its own
    live = np.arange(batch)  # which example each row of x belongs to
    rows = None if self._bucket(batch) == batch else self._padded(live)
    for index in range(self._num_exits):
      features, confident, predicted = self._step(self._variables, x, rows, threshold,
                                                  index=index)
      count = live.size
      # Reading the decisions waits for this segment; the next one needs them.
      leaving = (np.ones(count, bool) if confident is None
                 else np.asarray(confident)[:count])
      predicted = np.asarray(predicted)[:count]
      predictions[live[leaving]] = predicted[leaving]
      exit_index[live[leaving]] = index
      staying = np.flatnonzero(~leaving)
      if staying.size == 0:
        break
      live = live[staying]
      x, rows = features, self._padded(staying)
    return predictions, exit_index

  def _bucket(self, count: int) -> int:
    return power_of_two_bucket(count, self._min_bucket)

  def _padded(self, rows: np.ndarray) -> np.ndarray:
    """``rows`` padded with row 0 to a bucket size; the padding rows are ignored."""
    padded = np.zeros(self._bucket(rows.size), np.int32)
    padded[:rows.size] = rows
    return padded


class ThresholdCurve(NamedTuple):
  """Accuracy and compute of early-exit inference at each of T thresholds.

  Attributes:
    thresholds: ``[T]`` ascending.
    accuracy: ``[T]`` fraction of correct predictions.
    flops_saving: ``[T]`` see :func:`flops_saving`.
    exit_fraction: ``[T, E]`` fraction of the examples leaving at each exit.
    final_exit_accuracy: accuracy of the last exit alone (the full network), the
      reference of an accuracy drop.
  """
  thresholds: np.ndarray
  accuracy: np.ndarray
  flops_saving: np.ndarray
  exit_fraction: np.ndarray
  final_exit_accuracy: float


# predict at each of T thresholds: ([E, N, C], [T], scale, margins [C] or None)
# -> ([T, N], [T, N]). Module level, so every curve of the same shapes reuses
# one compiled program.
_decide_per_threshold = jax.jit(jax.vmap(
    lambda z, t, s, m: predict(z, threshold=t, logit_scale=s, margins=m),
    in_axes=(None, 0, None, None)))


def threshold_curve(exit_logits: Union[np.ndarray, Array],
                    labels: Union[np.ndarray, Array], thresholds: Sequence[float],
                    exit_flops: Sequence[float], backbone_flops: float, *,
                    logit_scale: float = 1.0,
                    margins: Margins = None) -> ThresholdCurve:
  """Accuracy against FLOPs saving over thresholds, from every exit's logits.

  Decisions are made by :func:`predict` itself, so a threshold picked on this
  curve behaves at inference as it did here.

  Args:
    exit_logits: ``[E, N, C]`` logits of a held-out split.
    labels: ``[N]`` its labels.
    thresholds: ``[T]`` confidences to try (sorted here).
    exit_flops: ``[E]`` cumulative MACs to leave at each exit.
    backbone_flops: MACs of the plain backbone.
    logit_scale: the softmax scale of confidences.
    margins: the class margins of confidences (see :func:`predict`).
  """
  exit_logits = jnp.asarray(exit_logits)
  labels = np.asarray(labels)
  thresholds = np.sort(np.asarray(thresholds, np.float64))
  if exit_logits.ndim != 3 or exit_logits.shape[1] != labels.shape[0]:
    raise ValueError(f"exit_logits [E, N, C] and labels [N] disagree: shapes "
                     f"{exit_logits.shape} and {labels.shape}.")
  num_exits = exit_logits.shape[0]
  if len(exit_flops) != num_exits:
    raise ValueError(f"exit_flops has {len(exit_flops)} entries for {num_exits} exits.")
  predictions, exit_index = jax.device_get(_decide_per_threshold(
      exit_logits, thresholds.astype(np.float32), np.float32(logit_scale),
      None if margins is None else np.asarray(margins, np.float32)))
  spent = np.asarray(exit_flops, np.float64)[exit_index].mean(axis=1)  # [T]
  exit_fraction = np.stack([(exit_index == i).mean(axis=1) for i in range(num_exits)],
                           axis=1)
  final_predictions = np.asarray(jnp.argmax(exit_logits[-1], axis=-1))
  return ThresholdCurve(
      thresholds=thresholds,
      accuracy=(predictions == labels[None]).mean(axis=1),
      flops_saving=1.0 - spent / float(backbone_flops),
      exit_fraction=exit_fraction,
      final_exit_accuracy=float((final_predictions == labels).mean()))


# Thresholds of the accuracy-FLOPs curves a threshold is calibrated on: a uniform
# grid, and finer steps near 1, where a well-trained network's confidences crowd.
CALIBRATION_THRESHOLDS = np.unique(np.concatenate(
    [np.linspace(0.0, 1.0, 101), 1.0 - np.logspace(-6, -2, 9)]))
# The accuracy the calibrated threshold may lose against the last exit alone
# (experiments/analyze.py's default; the second stage's, har_jax/decouple.py).
DEFAULT_MAX_ACCURACY_DROP = 0.01


class Calibration(NamedTuple):
  """The threshold chosen on a curve and what it achieved there."""
  threshold: float
  accuracy: float
  flops_saving: float


def calibrate_threshold(curve: ThresholdCurve, *,
                        max_accuracy_drop: Optional[float] = None,
                        flops_budget: Optional[float] = None) -> Calibration:
  """Picks a threshold on a (held-out) curve for one target.

  Args:
    curve: from :func:`threshold_curve` on a split other than the test set.
    max_accuracy_drop: the most accuracy (a fraction, 0.01 = one point) to lose
      against the last exit alone; the threshold saving the most FLOPs within it
      is chosen.
    flops_budget: the most compute to spend per example, as a fraction of the
      plain backbone's (``1 - flops_saving <= budget``); the most accurate
      threshold within it is chosen.

  Give exactly one target. Ties go to the other quantity (accuracy, resp.
  FLOPs saving) and then to the higher, more cautious threshold.

  Raises:
    ValueError: no target, both, or no threshold of the curve meets it.
  """
  if (max_accuracy_drop is None) == (flops_budget is None):
    raise ValueError("give exactly one of max_accuracy_drop and flops_budget.")
  accuracy, saving = curve.accuracy, curve.flops_saving
  if max_accuracy_drop is not None:
    feasible = accuracy >= curve.final_exit_accuracy - max_accuracy_drop
    # lexsort's last key is the primary one.
    keys = (curve.thresholds, accuracy, saving)
    target = (f"an accuracy drop of at most {max_accuracy_drop} from "
              f"{curve.final_exit_accuracy:.4f}")
  else:
    feasible = 1.0 - saving <= flops_budget
    keys = (curve.thresholds, saving, accuracy)
    target = f"a FLOPs budget of {flops_budget} of the backbone"
  if not feasible.any():
    raise ValueError(f"no threshold among {curve.thresholds.size} meets {target}; "
                     f"the curve spans accuracy {accuracy.min():.4f}-"
                     f"{accuracy.max():.4f} and FLOPs saving {saving.min():.4f}-"
                     f"{saving.max():.4f}.")
  candidates = np.flatnonzero(feasible)
  best = candidates[np.lexsort(tuple(k[candidates] for k in keys))[-1]]
  return Calibration(threshold=float(curve.thresholds[best]),
                     accuracy=float(accuracy[best]),
                     flops_saving=float(saving[best]))
