"""Multi-exit ResNets: CIFAR ResNet-8/20/32 (option-A shortcuts), ResNet-50, ResNeXt-50.

One class, ``ResNet``, builds every variant from a stem, a block type and stage
sizes (``functools.partial`` per variant, as flax's ImageNet example does). The
network is cut at its exits into segments: segment k runs the backbone from exit
k-1 (exclusive) to exit k, and exit head k classifies the feature map there.
``__call__`` composes ``segment`` and ``exit_head``, which cascaded inference can
also call one at a time.

Features may be mixed (manifold mixup, MFW: ``har_jax.mixing``) at the stage
boundaries: boundary 0 is the input images, boundary k the features after stage
k. ``apply(..., mix=m)`` calls ``m(features, boundary)`` at each one, so the
exits before the boundary that mixes see the clean features.

Parameter names say which piece they belong to: ``stem``, ``stage{j}_block{b}``
(stage j is 1-based, as in the exit string), ``exit{i}`` for early exit i and
``classifier`` for the backbone's own final classifier, so a single-exit model has
exactly the plain ResNet's parameters; with ``logit_affine``, ``logit_affine{i}``
adjusts the logits of exit i (the last one included).
"""

import functools
from typing import Any, Callable, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from har_jax.models.exits import parse_exits
from har_jax.models.heads import ExitHead
from har_jax.models.heads import LogitAffine
from har_jax.models.heads import check_head
from har_jax.models.heads import classifier
from har_jax.models.heads import global_average_pool
from har_jax.models.layers import Initializer
from har_jax.models.layers import batch_norm
from har_jax.models.layers import conv

ModuleDef = Any
# (features [B, ...], boundary) -> features: mixes features at a stage boundary.
MixFn = Callable[[jax.Array, int], jax.Array]

# PyTorch's kaiming_normal_ (untruncated normal, gain sqrt(2)); the LDAM-DRW CIFAR
# ResNets use fan_in for convs and the classifier, torchvision fan_out for convs.
_KAIMING_FAN_IN = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's nn.Linear default, uniform(+-1/sqrt(fan_in)), which torchvision keeps.
_TORCH_LINEAR = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class Stem(nn.Module):
  """conv (no bias) -> BN -> ReLU, optionally followed by a 3x3/2 max pool.

  ``[B, H, W, 3]`` -> ``[B, H / s, W / s, features]`` with ``s = strides`` (times 2
  with the pool).
  """
  features: int
  kernel_size: int
  strides: int
  max_pool: bool
  dtype: Any
  conv_init: Initializer

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, self.kernel_size, strides=self.strides, dtype=self.dtype,
             kernel_init=self.conv_init, name="conv")(x)
    x = nn.relu(batch_norm(train, self.dtype, name="bn")(x))
    if self.max_pool:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return x


class BasicBlock(nn.Module):
  """Two 3x3 convs with BN; option-A (parameter-free) shortcut as in LDAM-DRW.

  ``[B, H, W, D]`` -> ``[B, H / strides, W / strides, features]``.
  """
  features: int
  strides: int
  dtype: Any
  conv_init: Initializer

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = conv(self.features, 3, strides=self.strides, dtype=self.dtype,
             kernel_init=self.conv_init, name="conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, name="bn1")(y))
    y = conv(self.features, 3, dtype=self.dtype, kernel_init=self.conv_init,
             name="conv2")(y)
    y = batch_norm(train, self.dtype, name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      # Option A of He et al. (2016): subsample and zero-pad the new channels, so the
      # shortcut has no parameters (ResNet-32 keeps its 0.46 M).
      pad = self.features // 4
      x = jnp.pad(x[:, ::self.strides, ::self.strides, :],
                  ((0, 0), (0, 0), (0, 0), (pad, pad)))
    return nn.relu(y + x)


class BottleneckBlock(nn.Module):
  """torchvision's Bottleneck (v1.5: the stride is on the 3x3 conv), optionally grouped.

  ``[B, H, W, D]`` -> ``[B, H / strides, W / strides, 4 * features]``. The inner
  width is ``features * width_per_group / 64 * groups``: ``features`` for ResNet-50,
  ``2 * features`` for ResNeXt-50 32x4d.
  """
  features: int
  strides: int
  dtype: Any
  conv_init: Initializer
  groups: int = 1
  width_per_group: int = 64
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    width = self.features * self.width_per_group // 64 * self.groups
    out_features = self.features * self.expansion
    conv_ = functools.partial(conv, dtype=self.dtype, kernel_init=self.conv_init)
    y = conv_(width, 1, name="conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, name="bn1")(y))
    y = conv_(width, 3, strides=self.strides, groups=self.groups, name="conv2")(y)
    y = nn.relu(batch_norm(train, self.dtype, name="bn2")(y))
    y = conv_(out_features, 1, name="conv3")(y)
    y = batch_norm(train, self.dtype, name="bn3")(y)
    if self.strides != 1 or x.shape[-1] != out_features:
      x = conv_(out_features, 1, strides=self.strides, name="downsample_conv")(x)
      x = batch_norm(train, self.dtype, name="downsample_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet with early exits; returns every exit's logits.

  ``apply(variables, images [B, H, W, 3], train=..., mix=None)`` -> float32
  logits ``[E, B, C]``, exits ordered shallow to deep, the last being the
  backbone's own classifier. Pass ``mutable=["batch_stats"]`` when ``train`` is
  true. ``mix``, a ``(features, boundary) -> features`` function such as a
  ``mixing.Mixing``, is called at every stage boundary (``mixing_boundaries``).

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(5, 5, 5)`` for ResNet-32.
    stage_widths: ``features`` of each stage's blocks (the first stage has stride 1,
      the others 2).
    stem_cls: ``Stem`` partial (all but ``dtype`` and ``conv_init``).
    block_cls: ``BasicBlock`` or ``BottleneckBlock`` (partial).
    conv_init: initialiser of every conv kernel, exit heads included.
    classifier_init: initialiser of linear classifiers' kernels.
    num_classes: C.
    exits: exit string, e.g. ``"CBEBEBE"`` (see ``parse_exits``).
    head: ``"linear"`` or ``"normed"`` (cosine), for every exit.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters and logits are
      float32.
    logit_affine: pass every exit's logits through a ``LogitAffine``
      (per-class scale and offset, the identity at init).
  """
  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  stem_cls: ModuleDef
  block_cls: ModuleDef
  conv_init: Initializer
  classifier_init: Initializer
  num_classes: int
  exits: str
  head: str = "linear"
  dtype: Any = jnp.float32
  logit_affine: bool = False

  @property
  def exit_positions(self) -> tuple[int, ...]:
    """Where each exit sits: 0 after the stem, j after stage j (see ``parse_exits``)."""
    return parse_exits(self.exits, len(self.stage_sizes))

  @property
  def num_exits(self) -> int:
    """E, the number of exits including the final classifier."""
    return len(self.exit_positions)

  @property
  def mixing_boundaries(self) -> tuple[int, ...]:
    """Where features may be mixed: 0 the input images, k after stage k. The
    exit at position p (``exit_positions``) sees boundary k's mixing iff p >= k."""
    return tuple(range(len(self.stage_sizes) + 1))

  def _check_exit_index(self, index: int) -> None:
    # A negative index would silently pick the wrong layers in ``segment``.
    if not 0 <= index < self.num_exits:
      raise ValueError(f"exit index must be in [0, {self.num_exits}), got {index}")

  def setup(self):
    self.stem = self.stem_cls(dtype=self.dtype, conv_init=self.conv_init)
    self.stages = [
        [self.block_cls(features=width, strides=1 if stage == 0 or block > 0 else 2,
                        dtype=self.dtype, conv_init=self.conv_init,
                        name=f"stage{stage + 1}_block{block}")
         for block in range(size)]
        for stage, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths))]
    self.exit_heads = [
        ExitHead(self.num_classes, self.head, self.dtype, self.conv_init,
                 self.classifier_init, name=f"exit{index}")
        for index in range(self.num_exits - 1)]
    self.classifier = classifier(self.head, self.num_classes, self.classifier_init)
    if self.logit_affine:
      self.logit_affines = [LogitAffine(self.num_classes, name=f"logit_affine{index}")
                            for index in range(self.num_exits)]

  def segment(self, x: jax.Array, index: int, train: bool,
              mix: Optional[MixFn] = None) -> jax.Array:
    """Runs segment ``index``: the backbone from exit ``index - 1`` to exit ``index``.

    Args:
      x: images ``[B, H, W, 3]`` for ``index == 0``, else the feature map that
        segment ``index - 1`` returned.
      index: exit index in ``[0, E)``, a Python int.
      train: batch statistics (true) or running averages (false) in BatchNorm.
      mix: optional ``(features, boundary) -> features``, called with the input
        (boundary 0) before the stem and after every stage k (boundary k).

    Returns:
      The feature map at exit ``index``, ``[B, H', W', D']`` in ``dtype``.
    """
    self._check_exit_index(index)
    mix = mix or (lambda features, boundary: features)
    positions = self.exit_positions
    first = positions[index - 1] + 1 if index > 0 else 0
    for position in range(first, positions[index] + 1):
      if position == 0:
        x = self.stem(mix(x, 0), train)
      else:
        for block in self.stages[position - 1]:
          x = block(x, train)
        x = mix(x, position)
    return x

  def exit_head(self, x: jax.Array, index: int, train: bool) -> jax.Array:
    """Exit ``index``'s float32 logits ``[B, C]`` from the map ``segment`` returned."""
    self._check_exit_index(index)
    if index == self.num_exits - 1:
      logits = self.classifier(global_average_pool(x))
    else:
      logits = self.exit_heads[index](x, train)
    return self.logit_affines[index](logits) if self.logit_affine else logits

  def __call__(self, images: jax.Array, train: bool,
               mix: Optional[MixFn] = None) -> jax.Array:
    """Every exit's logits, float32 ``[E, B, C]``, from images ``[B, H, W, 3]``;
    ``mix`` as in :meth:`segment`."""
    x = images
    logits = []
    for index in range(self.num_exits):
      x = self.segment(x, index, train, mix)
      logits.append(self.exit_head(x, index, train))
    return jnp.stack(logits)


CifarResNet = functools.partial(
    ResNet, stage_widths=(16, 32, 64),
    stem_cls=functools.partial(Stem, features=16, kernel_size=3, strides=1,
                               max_pool=False),
    block_cls=BasicBlock, conv_init=_KAIMING_FAN_IN, classifier_init=_KAIMING_FAN_IN)
ResNet8 = functools.partial(CifarResNet, stage_sizes=(1, 1, 1))
ResNet20 = functools.partial(CifarResNet, stage_sizes=(3, 3, 3))
ResNet32 = functools.partial(CifarResNet, stage_sizes=(5, 5, 5))

ImageNetResNet = functools.partial(
    ResNet, stage_sizes=(3, 4, 6, 3), stage_widths=(64, 128, 256, 512),
    stem_cls=functools.partial(Stem, features=64, kernel_size=7, strides=2,
                               max_pool=True),
    conv_init=_KAIMING_FAN_OUT, classifier_init=_TORCH_LINEAR)
ResNet50 = functools.partial(ImageNetResNet, block_cls=BottleneckBlock)
ResNeXt50_32x4d = functools.partial(
    ImageNetResNet,
    block_cls=functools.partial(BottleneckBlock, groups=32, width_per_group=4))
# ResNet-50's layout (stem with max pool, four bottleneck stages, so the same
# exit strings and exit positions) at a fraction of its cost: one block per
# stage, an eighth of the widths. For smoke runs and tests of the ImageNet-layout
# code paths, not for results.
ResNet50Mini = functools.partial(
    ResNet, stage_sizes=(1, 1, 1, 1), stage_widths=(8, 16, 32, 64),
    stem_cls=functools.partial(Stem, features=8, kernel_size=7, strides=2,
                               max_pool=True),
    block_cls=BottleneckBlock, conv_init=_KAIMING_FAN_OUT, classifier_init=_TORCH_LINEAR)


def _build(module_def: ModuleDef, model_name: str, num_classes: int, exits: str,
           head: str, dtype: Any, logit_affine: bool) -> ResNet:
  """Instantiates a variant; checks ``exits`` and ``head`` now rather than at init."""
  model = module_def(num_classes=num_classes, exits=exits, head=head, dtype=dtype,
                     logit_affine=logit_affine)
  parse_exits(exits, len(model.stage_sizes), model_name=model_name)
  check_head(head)
  return model


def _factory(module_def: ModuleDef, name: str, default_exits: str, doc: str):
  """The public constructor of one variant, with its own name and docstring."""
  def factory(num_classes: int, exits: str = default_exits, head: str = "linear",
              dtype: Any = jnp.float32, logit_affine: bool = False) -> ResNet:
    return _build(module_def, name, num_classes, exits, head, dtype, logit_affine)
  factory.__name__ = factory.__qualname__ = name
  factory.__doc__ = doc
  return factory


resnet8 = _factory(ResNet8, "resnet8", "CBEBEBE",
                   "CIFAR ResNet-8 (one BasicBlock per stage), for fast tests.")
resnet20 = _factory(ResNet20, "resnet20", "CBEBEBE",
                    "CIFAR ResNet-20 (0.27 M parameters, 41 M MACs at 32x32).")
resnet32 = _factory(ResNet32, "resnet32", "CBEBEBE",
                    "CIFAR ResNet-32 of LDAM-DRW (0.46 M parameters, 69 M MACs at 32x32).")
resnet50 = _factory(ResNet50, "resnet50", "CBBBBE",
                    "torchvision ResNet-50 (25.6 M parameters, 4.1 G MACs at 224x224).")
resnext50_32x4d = _factory(
    ResNeXt50_32x4d, "resnext50_32x4d", "CBBBBE",
    "torchvision ResNeXt-50 32x4d (25.0 M parameters, 4.2 G MACs at 224x224).")

resnet50_mini = _factory(
    ResNet50Mini, "resnet50_mini", "CBBBBE",
    "ResNet-50's four bottleneck stages at one block each and 1/8 of the widths "
    "(exit strings CBBBBE ... CEBEBEBEBE, as ResNet-50's): for smoke runs and tests.")


_FACTORIES = {f.__name__: f for f in (resnet8, resnet20, resnet32, resnet50,
                                        resnext50_32x4d, resnet50_mini)}
MODEL_NAMES = tuple(_FACTORIES)


def get_model(name: str, **kwargs: Any) -> ResNet:
  """The model ``name`` (one of ``MODEL_NAMES``); ``kwargs`` go to its factory."""
  if name not in _FACTORIES:
    raise ValueError(f"unknown model {name!r}; valid names are {MODEL_NAMES}")
  return _FACTORIES[name](**kwargs)
