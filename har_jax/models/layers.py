"""Convolution and BatchNorm as the PyTorch reference models configure them."""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

Initializer = Callable[..., Any]


def conv(features: int, kernel_size: int, *, strides: int = 1, groups: int = 1,
         dtype: Any, kernel_init: Initializer, name: str | None = None) -> nn.Conv:
  """Bias-free square convolution with PyTorch's symmetric padding ``kernel_size // 2``.

  Flax's 'SAME' pads an even input (0, 1) under stride 2 where PyTorch pads (1, 1);
  explicit symmetric padding keeps the reference models' arithmetic.
  Parameters are float32 whatever the computation ``dtype``.
  """
  pad = kernel_size // 2
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=strides,
      padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=False,
      dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init, name=name)


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (its momentum 0.1 is Flax's 0.9).

  No ``axis_name``: under ``jit`` with a sharded batch the statistics are global
  already.
  """
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
      param_dtype=jnp.float32, name=name)
