"""Confidence-based early-exit inference and its FLOPs saving.

At inference an example leaves at the first exit whose largest softmax
probability exceeds the threshold, else at the last exit.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def predict(exit_logits: Array, *, threshold: Union[float, Array],
            logit_scale: Union[float, Array] = 1.0) -> Tuple[Array, Array]:
  """Prediction of each example at its first confident exit.

  Args:
    exit_logits: ``[E, B, C]`` logits of every exit, shallow to deep.
    threshold: scalar; exit ``i`` is confident on example ``b`` when
      ``max softmax(s * z[i, b]) > threshold``. May be traced.
    logit_scale: ``s``, the scale the training loss used (1 for CE/focal,
      the LDAM scale for cosine heads).

  Returns:
    ``(predictions [B] int32, exit_index [B] int32)``.
  """
  if jnp.ndim(exit_logits) != 3:
    raise ValueError("exit_logits must have rank 3, [E, B, C]; got shape "
                     f"{jnp.shape(exit_logits)}.")
  logits = exit_logits.astype(jnp.promote_types(exit_logits.dtype, jnp.float32))
  confidence = jnp.max(jax.nn.softmax(logit_scale * logits, axis=-1), axis=-1)
  confident = (confidence > threshold).at[-1].set(True)
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
