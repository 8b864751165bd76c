"""Per-exit compute of a multi-exit model, in multiply-accumulates (MACs) per image.

Only convolutions and dense layers count (pooling, normalisation, biases and
activations do not): the convention in which ResNet-32 costs 69 M and ResNet-50
4.1 G at 224x224. The counts come from tracing the model abstractly
(``jax.eval_shape``), so nothing is materialised and any model with ``segment``,
``exit_head`` and ``num_exits`` (as ``ResNet``) can be measured.
"""

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from har_jax.models.heads import NormedLinear

_WEIGHTED_LAYERS = (nn.Conv, nn.Dense, NormedLinear)


class ExitFlops(NamedTuple):
  """MACs per image of a multi-exit model with E exits.

  Attributes:
    per_exit: ``[E]`` cumulative cost of leaving at each exit: the backbone up to it,
      the heads of the exits passed on the way (an example is only known to go on
      after they have run) and its own head. The last entry is the full backbone
      plus every exit head.
    backbone: the plain backbone with only its final classifier, the reference of
      FLOPs saving.
    segments: ``[E]`` cost of each segment (the backbone from the previous exit to
      this one).
    heads: ``[E]`` cost of each exit head; the last is the final classifier.
  """
  per_exit: tuple[int, ...]
  backbone: int
  segments: tuple[int, ...]
  heads: tuple[int, ...]


def _traced_macs(model: nn.Module, variables, method: str, x: jax.ShapeDtypeStruct,
                 index: int) -> tuple[int, jax.ShapeDtypeStruct]:
  """MACs per image of ``model.<method>(x, index)`` (batch of one) and its output."""
  macs = 0

  def count(next_fun, args, kwargs, context):
    nonlocal macs
    out = next_fun(*args, **kwargs)
    if (context.method_name == "__call__"
        and isinstance(context.module, _WEIGHTED_LAYERS)):
      # A kernel holds one MAC per weight for each output position: kh*kw*Cin/groups
      # * Cout for a conv, D * C for a dense layer (no spatial positions).
      kernel = context.module.get_variable("params", "kernel")
      macs += kernel.size * math.prod(out.shape[1:-1])
    return out

  apply = functools.partial(model.apply, method=method, train=False)
  with nn.intercept_methods(count):
    out = jax.eval_shape(lambda v, x: apply(v, x, index), variables, x)
  return macs, out


def exit_flops(model: nn.Module, image_shape: tuple[int, int, int]) -> ExitFlops:
  """Per-exit MACs per image of ``model`` on images of ``image_shape`` ``(H, W, 3)``.

  ``exit_flops(resnet32(10, "CBBBE"), (32, 32, 3)).backbone`` is 68.9 M.
  """
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), images)
  segments, heads = [], []
  x = images
  for index in range(model.num_exits):
    segment_macs, x = _traced_macs(model, variables, "segment", x, index)
    head_macs, _ = _traced_macs(model, variables, "exit_head", x, index)
    segments.append(segment_macs)
    heads.append(head_macs)
  per_exit = tuple(sum(segments[:i + 1]) + sum(heads[:i + 1])
                   for i in range(len(heads)))
  return ExitFlops(per_exit=per_exit, backbone=sum(segments) + heads[-1],
                   segments=tuple(segments), heads=tuple(heads))
