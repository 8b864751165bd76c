"""Convolution and BatchNorm as the PyTorch reference models configure them."""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from har_jax import cpu_conv

Initializer = Callable[..., Any]


def conv(features: int, kernel_size: int, *, strides: int = 1, groups: int = 1,
         dtype: Any, kernel_init: Initializer, name: str | None = None) -> nn.Conv:
  """Bias-free square convolution with PyTorch's symmetric padding ``kernel_size // 2``.

  Flax's 'SAME' pads an even input (0, 1) under stride 2 where PyTorch pads (1, 1);
  explicit symmetric padding keeps the reference models' arithmetic.
  Parameters are float32 whatever the computation ``dtype``. Inside
  ``cpu_conv.native_convolutions()`` the supported float32 cases run on
  har_jax's CPU kernels; elsewhere this is ``lax.conv_general_dilated``.
  """
  pad = kernel_size // 2
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=strides,
      padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=False,
      dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
      conv_general_dilated=cpu_conv.conv_general_dilated, name=name)


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> "BatchNorm":
  """BatchNorm with PyTorch's defaults (its momentum 0.1 is Flax's 0.9).

  No ``axis_name``: under ``jit`` with a sharded batch the statistics are global
  already.
  """
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=dtype, name=name)


class BatchNorm(nn.Module):
  """``flax.linen.BatchNorm`` over the last axis, with a hand-written gradient.

  The same variables (params ``scale``, ``bias``; batch_stats ``mean``, ``var``),
  statistics (float32, ``var = E[x^2] - E[x]^2``, running averages of the biased
  batch variance) and output as Flax's module, which tests/test_models.py checks.
  The difference is the backward pass: ``jax.grad`` of Flax's module differentiates
  through both moment reductions, which XLA compiles into several passes over the
  activations; ``_normalize`` has the textbook gradient (two per-channel sums,
  then one elementwise pass), about 1.7x faster for a CIFAR ResNet's BatchNorm +
  ReLU on the CPU.
  """

  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
    # As Flax: without a dtype, the input's promoted with the float32 parameters.
    dtype = self.dtype or jnp.result_type(x.dtype, jnp.float32)
    if self.use_running_average:
      multiplier = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      y = (x.astype(jnp.float32) - ra_mean.value) * multiplier + bias
      return y.astype(dtype)
    # On the CPU kernels' path the gradient's sums run in one pass (cpu_conv).
    native = cpu_conv.enabled() and cpu_conv.supports_batch_norm(x)
    y, mean, var = _normalize(x, scale, bias, self.epsilon, native)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(dtype)


def _moments(x32):
  axes = tuple(range(x32.ndim - 1))
  mean = jnp.mean(x32, axes)
  var = jnp.maximum(jnp.mean(jnp.square(x32), axes) - jnp.square(mean), 0.0)
  return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x, scale, bias, epsilon, native):
  """Training-mode BatchNorm: (normalised x * scale + bias, batch mean, batch var).

  ``native``: the gradient's per-channel sums on the CPU kernel.
  """
  return _normalize_fwd(x, scale, bias, epsilon, native)[0]


def _normalize_fwd(x, scale, bias, epsilon, native):
  del native
  x32 = x.astype(jnp.float32)
  mean, var = _moments(x32)
  inv = jax.lax.rsqrt(var + epsilon)
  y = (x32 - mean) * (inv * scale) + bias
  return (y, mean, var), (x, mean, inv, scale)


def _normalize_bwd(epsilon, native, residuals, cotangents):
  del epsilon
  x, mean, inv, scale = residuals
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  centred = x.astype(jnp.float32) - mean
  x_hat = centred * inv
  dy = dy.astype(jnp.float32)
  if native:
    dbias, dy_centred = cpu_conv.batch_norm_grad_stats(dy, x, mean)
    dscale = inv * dy_centred
  else:
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * x_hat, axes)
  # Through the normalisation (batch statistics included), then through the
  # statistics returned for the running averages (zero in training).
  dx = (scale * inv / count) * (count * dy - dbias - x_hat * dscale)
  dx = dx + dmean / count + dvar * (2.0 / count) * centred
  return dx.astype(x.dtype), dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)
