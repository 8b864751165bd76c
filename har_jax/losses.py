"""Losses of HAR / ELF: per-example base losses, class weights, exit masks, har_loss
and its mixed-target form, mixed_har_loss.

The base losses are cross-entropy, focal, LDAM, CDT and the logit-adjusted
loss; each is ``(logits [..., C], labels [...], **parameters) -> [...]`` and
combines with HAR through ``har_loss(..., loss_fn=partial(base, ...))``.

Every function is a pure function of arrays that works under ``jax.jit``,
``jax.grad`` and ``jax.vmap``. Shapes use E exits (shallow to deep, the last one
being the backbone's own classifier), B examples and C classes.

Arguments that change during a run (``threshold``, ``class_weights``,
``logit_scale``, ``margins``) may be traced arrays, so one compiled train step
serves every threshold and the switch to deferred re-weighting (DRW). Shape
errors are raised at trace time, before anything runs.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = Union[jax.Array, np.ndarray, Sequence[float]]
LossFn = Callable[[Array, Array], Array]


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Softmax cross-entropy per example, ``-log softmax(logits)[label]``.

  Args:
    logits: ``[..., C]`` unnormalised scores (computed in at least float32).
    labels: ``[...]`` integer class indices in ``[0, C)``.

  Returns:
    ``[...]`` float32 loss of each example.
  """
  _check_labels_match(logits, labels)
  log_probs = jax.nn.log_softmax(_at_least_float32(logits), axis=-1)
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def focal(logits: Array, labels: Array, *, gamma: float) -> Array:
  """Focal loss per example, ``(1 - exp(-ce))**gamma * ce`` (Lin et al. 2017).

  This is the form used by the LDAM-DRW reference, where ``exp(-ce)`` is the
  probability of the true class. ``gamma = 0`` is exactly cross-entropy.

  Args:
    logits: ``[..., C]`` unnormalised scores.
    labels: ``[...]`` integer class indices.
    gamma: focusing parameter, ``>= 0``.

  Returns:
    ``[...]`` float32 loss of each example.
  """
  ce = cross_entropy(logits, labels)
  if isinstance(gamma, (int, float)):
    if gamma < 0:
      raise ValueError(f"focal: gamma must be >= 0, got {gamma}.")
    if gamma == 0:
      # (1 - p)**0 has an undefined gradient where p == 1; the loss is plain CE.
      return ce
  # -expm1(-ce) is 1 - p without the cancellation of 1 - exp(-ce) when ce is small.
  return (-jnp.expm1(-ce)) ** gamma * ce


def ldam(logits: Array, labels: Array, *, margins: ArrayLike,
         scale: float = 30.0) -> Array:
  """Label-distribution-aware margin loss per example (Cao et al. 2019).

  ``ce(scale * (logits - margins[label] * onehot(label)), label)``: the true
  class's logit is lowered by its class margin before the scaled softmax.

  Args:
    logits: ``[..., C]`` scores, typically cosine similarities from a normed head.
    labels: ``[...]`` integer class indices.
    margins: ``[C]`` per-class margins, see :func:`ldam_margins`.
    scale: the logit scale ``s`` (30 in LDAM-DRW).

  Returns:
    ``[...]`` float32 loss of each example.
  """
  shifted = _lowered_by_margin(_at_least_float32(logits), labels, margins, "ldam")
  return cross_entropy(scale * shifted, labels)


def cdt(logits: Array, labels: Array, *, temperatures: ArrayLike) -> Array:
  """Class-dependent temperatures loss per example (Ye et al. 2020).

  ``ce(logits / temperatures, label)``: class j's logit is divided by its
  temperature ``a_j`` (:func:`cdt_temperatures`), so the rare classes, whose
  logits are divided least, must reach larger decision values in training.
  Training only: inference, the HAR exit masks (:func:`exit_masks` on the
  logits the model returns) and early exit all use the raw logits.

  Args:
    logits: ``[..., C]`` raw scores of a linear head.
    labels: ``[...]`` integer class indices.
    temperatures: ``[C]`` positive per-class temperatures (may be traced).

  Returns:
    ``[...]`` float32 loss of each example.
  """
  temperatures = _class_vector(temperatures, logits, "cdt", "temperatures")
  return cross_entropy(_at_least_float32(logits) / temperatures, labels)


def cdt_temperatures(class_counts: ArrayLike, gamma: float) -> Array:
  """CDT temperatures ``a_j = (n_max / n_j)**gamma``: 1 for the largest class.

  Args:
    class_counts: ``[C]`` number of training examples of each class (host values).
    gamma: ``>= 0``; 0 gives ones (plain cross-entropy). 0.2 on CIFAR-LT x100.

  Returns:
    ``[C]`` float32 temperatures, at least 1.
  """
  counts = _positive_counts(class_counts, "cdt_temperatures")
  if gamma < 0:
    raise ValueError(f"cdt_temperatures: gamma must be >= 0, got {gamma}.")
  return jnp.asarray((counts.max() / counts) ** gamma, dtype=jnp.float32)


def logit_adjusted(logits: Array, labels: Array, *, log_prior: ArrayLike,
                   tau: ArrayLike = 1.0) -> Array:
  """Logit-adjusted loss per example (Menon et al. 2021).

  ``ce(logits + tau * log_prior, label)`` with ``log_prior_j = log pi_j``
  (:func:`log_prior`): the frequent classes get a head start in training, so
  the raw logits learn the balanced posterior. With ``tau = 1`` this is the
  balanced softmax (Ren et al. 2020); ``tau = 0`` is cross-entropy. Training
  only: inference, the HAR exit masks and early exit use the raw logits.

  Args:
    logits: ``[..., C]`` raw scores of a linear head.
    labels: ``[...]`` integer class indices.
    log_prior: ``[C]`` log class priors (may be traced).
    tau: scalar scale of the adjustment (may be traced).

  Returns:
    ``[...]`` float32 loss of each example.
  """
  log_prior = _class_vector(log_prior, logits, "logit_adjusted", "log_prior")
  return cross_entropy(_at_least_float32(logits) + tau * log_prior, labels)


def log_prior(class_counts: ArrayLike) -> Array:
  """``[C]`` float32 ``log(n_j / N)``, the log of each class's training share."""
  counts = _positive_counts(class_counts, "log_prior")
  return jnp.asarray(np.log(counts / counts.sum()), dtype=jnp.float32)


def ldam_margins(class_counts: ArrayLike, max_margin: float = 0.5) -> Array:
  """LDAM margins ``m_j ∝ n_j**(-1/4)``, scaled so that the largest is ``max_margin``.

  Args:
    class_counts: ``[C]`` number of training examples of each class (host values).
    max_margin: margin of the rarest class.

  Returns:
    ``[C]`` float32 margins.
  """
  counts = _positive_counts(class_counts, "ldam_margins")
  margins = counts ** -0.25
  return jnp.asarray(margins * (max_margin / margins.max()), dtype=jnp.float32)


def class_balanced_weights(class_counts: ArrayLike, beta: float = 0.9999) -> Array:
  """Class-balanced weights from the "effective number" of examples (Cui et al. 2019).

  ``w_j = (1 - beta) / (1 - beta**n_j)``, normalised to sum to C.

  Args:
    class_counts: ``[C]`` number of training examples of each class (host values).
    beta: in ``[0, 1)``; 0 gives uniform weights, values near 1 approach
      inverse class frequency.

  Returns:
    ``[C]`` float32 weights that sum to C.
  """
  counts = _positive_counts(class_counts, "class_balanced_weights")
  if not 0.0 <= beta < 1.0:
    raise ValueError(f"class_balanced_weights: beta must be in [0, 1), got {beta}.")
  weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
  weights = weights / weights.sum() * len(counts)
  return jnp.asarray(weights, dtype=jnp.float32)


def class_confidence(logits: Array, classes: Array, *,
                     logit_scale: ArrayLike = 1.0,
                     margins: Optional[ArrayLike] = None) -> Array:
  """The probability an exit gives a class, as the loss sees it.

  ``softmax(s * (z - m[c] * onehot(c)))[c]``: the class's logit is lowered by
  its margin before the scaled softmax. With ``margins`` None (linear heads: CE,
  focal, CDT, logit-adjusted) it is ``softmax(s * z)[c]``; with LDAM's scale
  and margins it is ``exp(-ldam(z, c))``, so a class with a larger margin (a
  rarer one) must beat the others by more to be as confident.

  Args:
    logits: ``[..., C]`` scores.
    classes: ``[...]`` integer class of each row (the label in training, the
      prediction at inference).
    logit_scale: scalar ``s`` (may be traced).
    margins: optional ``[C]`` per-class margins (may be traced).

  Returns:
    ``[...]`` float32 probabilities.
  """
  logits = _at_least_float32(logits)
  if margins is not None:
    logits = _lowered_by_margin(logits, classes, margins, "class_confidence")
  log_probs = jax.nn.log_softmax(logit_scale * logits, axis=-1)
  return jnp.exp(jnp.take_along_axis(log_probs, classes[..., None], axis=-1)[..., 0])


def exit_masks(exit_logits: Array, labels: Array, *, threshold: ArrayLike,
               logit_scale: ArrayLike = 1.0,
               margins: Optional[ArrayLike] = None) -> Tuple[Array, Array]:
  """Where each example exits during training, and which exits it trains.

  Exit ``i`` qualifies for example ``b`` when it classifies ``b`` correctly and
  confidently: ``argmax z[i, b] == y[b]`` and
  ``softmax(s * (z[i, b] - m[y[b]] * onehot(y[b])))[y[b]] > t``
  (:func:`class_confidence`). The example exits at the first qualifying exit,
  or at the last exit when none qualifies, and contributes loss to every exit
  up to and including that one.

  A threshold of 1 or more never qualifies, which gives every example every
  exit (plain deep supervision).

  The criterion reads the raw logits the model returns: what CDT's
  temperatures or the logit adjustment do to them stays in the training loss,
  and LDAM's margins enter only as ``margins``. The confidence a training exit
  is judged by is the one early-exit inference uses.

  Args:
    exit_logits: ``[E, B, C]`` logits of every exit, shallow to deep.
    labels: ``[B]`` integer class indices, or ``[E, B]`` for a label per exit
      (a mixed example judged by its dominant label at the mixed exits).
    threshold: scalar confidence threshold ``t`` (may be traced).
    logit_scale: scalar ``s`` applied before the softmax: 1 for linear heads,
      the LDAM scale for cosine heads.
    margins: optional ``[C]`` class margins ``m`` (LDAM's, for cosine heads:
      the confidence is then ``exp(-ldam loss)``); None: no margin.

  Returns:
    ``(masks, exit_index)``: ``masks`` ``[E, B]`` float32 with
    ``masks[i, b] = 1`` iff ``i <= exit_index[b]``, and ``exit_index`` ``[B]``
    int32. Neither carries a gradient.
  """
  _check_exit_inputs(exit_logits, labels, per_exit_labels=True)
  num_exits = exit_logits.shape[0]
  logits = jax.lax.stop_gradient(_at_least_float32(exit_logits))
  label_index = jnp.broadcast_to(labels, logits.shape[:2])
  confidence = class_confidence(logits, label_index, logit_scale=logit_scale,
                                margins=margins)
  correct = jnp.argmax(logits, axis=-1) == label_index
  qualifies = correct & (confidence > threshold)
  # The last exit always takes whoever is left.
  qualifies = qualifies.at[-1].set(True)
  exit_index = jnp.argmax(qualifies, axis=0).astype(jnp.int32)  # first True
  masks = (jnp.arange(num_exits)[:, None] <= exit_index[None, :]).astype(jnp.float32)
  return jax.lax.stop_gradient(masks), jax.lax.stop_gradient(exit_index)


def har_loss(exit_logits: Array, labels: Array, *, threshold: ArrayLike,
             loss_fn: LossFn = cross_entropy,
             class_weights: Optional[ArrayLike] = None,
             where: Optional[Array] = None,
             logit_scale: ArrayLike = 1.0,
             margins: Optional[ArrayLike] = None) -> Array:
  """Hardness-aware re-weighted loss over all exits, as a weighted mean.

  ``L = sum_b v[b] w[y[b]] sum_i m[i,b] l(z[i,b], y[b]) / sum_b v[b] w[y[b]]``

  with masks ``m`` from :func:`exit_masks`, class weights ``w`` (ones when
  None) and validity ``v`` (``where``; ones when None). With one exit this is
  exactly PyTorch's weighted-mean ``F.cross_entropy(..., weight=w)`` (or the
  LDAM loss, with ``loss_fn=partial(ldam, margins=m)``). With no valid
  example the loss is 0.

  Args:
    exit_logits: ``[E, B, C]`` logits of every exit, shallow to deep.
    labels: ``[B]`` integer class indices.
    threshold: scalar exit confidence threshold (may be traced); ``>= 1``
      turns HAR off (every exit trains on every example).
    loss_fn: per-example base loss ``(logits [B, C], labels [B]) -> [B]``,
      e.g. ``functools.partial(ldam, margins=m)``. What it does to the logits
      (CDT's temperatures, logit adjustment) stays in the loss: the masks
      judge the raw ``exit_logits``, as early-exit inference does.
    class_weights: optional ``[C]`` per-class weights (may be traced, e.g. the
      DRW weights switched on by the step).
    where: optional ``[B]`` validity mask (bool or 0/1) for padded examples.
    logit_scale: scale of the confidence softmax, see :func:`exit_masks`.
    margins: optional class margins of the confidence, see :func:`exit_masks`.

  Returns:
    Scalar float32 loss.
  """
  _check_exit_inputs(exit_logits, labels, class_weights=class_weights, where=where)
  masks, _ = exit_masks(exit_logits, labels, threshold=threshold,
                        logit_scale=logit_scale, margins=margins)
  per_exit_loss = jax.vmap(loss_fn, in_axes=(0, None))(exit_logits, labels)  # [E, B]
  return _masked_weighted_mean(per_exit_loss, masks,
                               _example_weights(labels, class_weights, where))


def dominant_labels(labels: Array, partner_labels: Array, label_weights: Array) -> Array:
  """The label a mixed example is judged by: ``labels`` where its weight
  ``label_weights`` is at least 1/2, else ``partner_labels`` (same shape as
  ``label_weights``, e.g. ``[E, B]``)."""
  return jnp.where(jnp.asarray(label_weights) >= 0.5, labels, partner_labels)


def mixed_har_loss(exit_logits: Array, labels: Array, partner_labels: Array,
                   label_weights: ArrayLike, *, threshold: ArrayLike,
                   loss_fn: LossFn = cross_entropy,
                   class_weights: Optional[ArrayLike] = None,
                   logit_scale: ArrayLike = 1.0,
                   margins: Optional[ArrayLike] = None) -> Array:
  """:func:`har_loss` of mixed examples (mixup, manifold mixup).

  Example b's target at exit i is ``y[b]`` with weight ``lam[i, b]`` and
  ``y'[b]`` (``partner_labels``) with ``1 - lam[i, b]``:

  ``L = sum_i [sum_b m w[y] lam l(z, y) / sum_b w[y]
             + sum_b m w[y'] (1 - lam) l(z, y') / sum_b w[y']]``

  with one set of masks ``m``, from :func:`exit_masks` with each exit's
  dominant label (:func:`dominant_labels`). With the masks fixed this is the
  ``lam``-combination of two HAR losses, as mixup's loss is of two plain ones;
  with ``lam = 1`` it is :func:`har_loss`. The exit criterion is
  :func:`har_loss`'s.

  Args:
    exit_logits: ``[E, B, C]`` logits of every exit, shallow to deep.
    labels: ``[B]`` each example's own label.
    partner_labels: ``[B]`` the label of the example it was mixed with.
    label_weights: ``[E, B]`` (or broadcastable, e.g. a scalar) weight of
      ``labels`` in each exit's target, in ``[0, 1]``; 1 at exits that saw
      clean features.
    threshold, loss_fn, class_weights, logit_scale, margins: as in
      :func:`har_loss`.

  Returns:
    Scalar float32 loss.
  """
  _check_exit_inputs(exit_logits, labels, class_weights=class_weights)
  _check_exit_inputs(exit_logits, partner_labels)
  own_weight = jnp.broadcast_to(jnp.asarray(label_weights, jnp.float32),
                                jnp.shape(exit_logits)[:2])
  masks, _ = exit_masks(exit_logits, dominant_labels(labels, partner_labels, own_weight),
                        threshold=threshold, logit_scale=logit_scale,
                        margins=margins)
  loss = 0.0
  for targets, weight in ((labels, own_weight), (partner_labels, 1.0 - own_weight)):
    per_exit_loss = jax.vmap(loss_fn, in_axes=(0, None))(exit_logits, targets)
    # where: a target of weight 0 with an infinite loss contributes 0, not NaN.
    weighted = jnp.where(weight > 0, weight * per_exit_loss, 0.0)
    loss = loss + _masked_weighted_mean(weighted, masks,
                                        _example_weights(targets, class_weights, None))
  return loss


def _example_weights(labels: Array, class_weights: Optional[ArrayLike],
                     where: Optional[Array]) -> Array:
  """``[B]`` float32 ``v[b] w[y[b]]`` (ones where either is None)."""
  example_weight = jnp.ones(jnp.shape(labels), jnp.float32)
  if class_weights is not None:
    example_weight = jnp.asarray(class_weights, jnp.float32)[labels]
  if where is not None:
    example_weight = example_weight * jnp.asarray(where, jnp.float32)
  return example_weight


def _masked_weighted_mean(per_exit_loss: Array, masks: Array,
                          example_weight: Array) -> Array:
  """``sum_b v w sum_i m l / sum_b v w`` (0 with no weight): har_loss's reduction."""
  # where, not a product: a masked-off exit or padded row with an infinite
  # loss must contribute 0, not 0 * inf = NaN.
  per_example = jnp.sum(jnp.where(masks > 0, per_exit_loss, 0.0), axis=0)
  weighted = jnp.where(example_weight > 0, example_weight * per_example, 0.0)
  total_weight = jnp.sum(example_weight)
  safe_total = jnp.where(total_weight > 0, total_weight, 1.0)
  return jnp.sum(weighted) / safe_total


def _at_least_float32(x: Array) -> Array:
  # Softmax of bfloat16 logits loses the small probabilities the loss depends on.
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _class_vector(values: ArrayLike, logits: Array, caller: str, name: str) -> Array:
  values = jnp.asarray(values, dtype=jnp.float32)
  num_classes = jnp.shape(logits)[-1]
  if values.shape != (num_classes,):
    raise ValueError(
        f"{caller}: {name} must have shape [C] = ({num_classes},) to match the "
        f"logits {jnp.shape(logits)}; got {values.shape}.")
  return values


def _lowered_by_margin(logits: Array, classes: Array, margins: ArrayLike,
                       caller: str) -> Array:
  """``logits - margins[c] * onehot(c)`` for the class ``c`` of each row."""
  margins = _class_vector(margins, logits, caller, "margins").astype(logits.dtype)
  onehot = jax.nn.one_hot(classes, logits.shape[-1], dtype=logits.dtype)
  return logits - margins[classes][..., None] * onehot


def _positive_counts(class_counts: ArrayLike, caller: str) -> np.ndarray:
  counts = np.asarray(class_counts, dtype=np.float64)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(f"{caller}: class_counts must be a non-empty [C] vector, "
                     f"got shape {counts.shape}.")
  empty = np.flatnonzero(counts <= 0)
  if empty.size:
    raise ValueError(f"{caller}: class {int(empty[0])} has {counts[empty[0]]:g} "
                     "training examples; every class needs at least one.")
  return counts


def _check_labels_match(logits: Array, labels: Array) -> None:
  if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
    raise ValueError(f"labels must be integer class indices, got dtype "
                     f"{jnp.asarray(labels).dtype}.")
  if jnp.shape(logits)[:-1] != jnp.shape(labels):
    raise ValueError(f"labels shape {jnp.shape(labels)} must equal the logits' "
                     f"leading shape {jnp.shape(logits)[:-1]} (logits {jnp.shape(logits)}).")


def _check_exit_inputs(exit_logits: Array, labels: Array, *,
                       class_weights: Optional[ArrayLike] = None,
                       where: Optional[Array] = None,
                       per_exit_labels: bool = False) -> None:
  shape = jnp.shape(exit_logits)
  if len(shape) != 3:
    raise ValueError(
        f"exit_logits must have rank 3, [E, B, C] (exits, batch, classes); got "
        f"shape {shape}. For a single exit pass logits[None].")
  _, batch, num_classes = shape
  if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
    raise ValueError(f"labels must be integer class indices, got dtype "
                     f"{jnp.asarray(labels).dtype}.")
  if jnp.shape(labels) != (batch,) and not (per_exit_labels
                                            and jnp.shape(labels) == shape[:2]):
    allowed = f" or [E, B] = {shape[:2]}" if per_exit_labels else ""
    raise ValueError(f"labels must have shape [B] = ({batch},){allowed} to match "
                     f"exit_logits {shape}; got {jnp.shape(labels)}.")
  if class_weights is not None and jnp.shape(class_weights) != (num_classes,):
    raise ValueError(f"class_weights must have shape [C] = ({num_classes},) to "
                     f"match exit_logits {shape}; got {jnp.shape(class_weights)}.")
  if where is not None and jnp.shape(where) != (batch,):
    raise ValueError(f"where must have shape [B] = ({batch},) to match "
                     f"exit_logits {shape}; got {jnp.shape(where)}.")
