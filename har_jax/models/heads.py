"""Classifier heads: linear, cosine (LDAM's NormedLinear) and the light exit head.

FLOPs are counted as multiply-accumulates (MACs) per image of convolutions and dense
layers; pooling, normalisation, biases and activations are not counted (the
convention in which ResNet-50 costs 4.1 G).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from har_jax.models.layers import Initializer
from har_jax.models.layers import batch_norm
from har_jax.models.layers import conv

HEADS = ("linear", "normed")


def check_head(head: str) -> None:
  """Raises ValueError unless ``head`` is one of ``HEADS``."""
  if head not in HEADS:
    raise ValueError(f"head must be one of {HEADS}, got {head!r}")


def global_average_pool(x: jax.Array) -> jax.Array:
  """``[B, H, W, D]`` feature map -> ``[B, D]`` float32 mean over space.

  Classifiers run in float32: they are tiny, and the cosine logits are multiplied
  by the LDAM scale (30), which would magnify bfloat16 rounding.
  """
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _l2_normalize(x: jax.Array, axis: int, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along ``axis``, as PyTorch's ``F.normalize``.

  Written with ``rsqrt(max(sum x^2, eps^2))`` so that an all-zero vector (e.g. a
  pooled map of dead ReLUs) has a finite gradient, which ``norm`` does not.
  """
  squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def unit_columns_uniform(key: jax.Array, shape: tuple[int, ...],
                         dtype: Any = jnp.float32) -> jax.Array:
  """LDAM-DRW's NormedLinear init of ``W [D, C]``: uniform(-1, 1), unit-norm columns."""
  return _l2_normalize(jax.random.uniform(key, shape, dtype, -1.0, 1.0), axis=0)


class NormedLinear(nn.Module):
  """Cosine classifier of LDAM-DRW: ``normalize(x, -1) @ normalize(W, 0)``, no bias.

  Maps ``[..., D]`` to ``[..., C]`` float32 cosines in [-1, 1]; the loss scales them
  (``losses.ldam``'s ``scale``). ``W`` has shape ``[D, C]``.
  FLOPs: ``D * C`` MACs per image (normalising ``W`` is paid once per batch).

  Attributes:
    features: number of classes C.
    kernel_init: initialiser of ``W``.
  """
  features: int
  kernel_init: Initializer = unit_columns_uniform

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        jnp.float32)
    return _l2_normalize(x.astype(jnp.float32), axis=-1) @ _l2_normalize(kernel, axis=0)


def classifier(head: str, num_classes: int, kernel_init: Initializer,
               name: str | None = None) -> nn.Module:
  """The classification layer on pooled features, ``[B, D]`` -> ``[B, C]``, float32.

  Args:
    head: ``"linear"`` (Dense with bias; ``D * C`` MACs) or ``"normed"``
      (``NormedLinear``, no bias, its own unit-column init; ``D * C`` MACs).
    num_classes: C.
    kernel_init: initialiser of the linear head's kernel.
    name: module name.
  """
  check_head(head)
  if head == "linear":
    return nn.Dense(num_classes, kernel_init=kernel_init, dtype=jnp.float32,
                    param_dtype=jnp.float32, name=name)
  return NormedLinear(num_classes, name=name)


class LogitAffine(nn.Module):
  """Per-class ``scale * z + offset`` on ``[..., C]`` logits, the identity at init.

  A second stage on a trained network adjusts its classifiers through it: LWS
  (Kang et al. 2020) learns ``scale``, post-hoc logit adjustment sets ``offset``
  (har_jax/decouple.py). Elementwise, so it counts no MACs.

  Attributes:
    num_classes: C; ``scale`` and ``offset`` are float32 ``[C]``.
  """
  num_classes: int

  @nn.compact
  def __call__(self, logits: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (self.num_classes,), jnp.float32)
    offset = self.param("offset", nn.initializers.zeros, (self.num_classes,),
                        jnp.float32)
    return logits * scale + offset


class ExitHead(nn.Module):
  """Light early-exit head: conv3x3/2 (no bias), BN, ReLU, global pool, classifier.

  Maps a feature map ``[B, H, W, D]`` to float32 logits ``[B, C]``. The conv width
  is ``K = min(2 * D, 128)``.
  FLOPs: ``9 * D * K * ceil(H/2) * ceil(W/2) + K * C`` MACs per image.

  Attributes:
    num_classes: C.
    head: ``"linear"`` or ``"normed"``, the same kind as the final classifier.
    dtype: computation dtype of the conv and BN; parameters are float32.
    conv_init: initialiser of the conv kernel (the backbone's).
    classifier_init: initialiser of the linear classifier's kernel (the backbone's).
  """
  num_classes: int
  head: str
  dtype: Any
  conv_init: Initializer
  classifier_init: Initializer

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # Pooling shallow features straight into a classifier would force the backbone's
    # early layers to become linearly separable, at the deep layers' expense; one
    # conv of its own gives the exit capacity. Stride 2 quarters its cost, and the
    # 128 cap keeps heads on ResNet-50's wide (256-1024 channel) maps cheap.
    width = min(2 * x.shape[-1], 128)
    x = conv(width, 3, strides=2, dtype=self.dtype, kernel_init=self.conv_init,
             name="conv")(x)
    x = nn.relu(batch_norm(train, self.dtype, name="bn")(x))
    return classifier(self.head, self.num_classes, self.classifier_init,
                      name="classifier")(global_average_pool(x))
