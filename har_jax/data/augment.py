"""Augmentation in JAX, run inside the compiled train step on the global batch.

The LDAM-DRW training transform is ``RandomCrop(H, padding=4)``,
``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(mean, std)``:
torchvision pads the uint8 image with zeros *before* normalisation. The same
transform here is

  ``normalize(random_crop_flip(images.astype(jnp.float32), key, pad=4,
  flip=True), mean, std)``

i.e. crop the un-normalised pixels so that the zero padding is black, as in the
reference, and normalise afterwards.

Random draws are made for the whole global batch from one key, so the result
does not depend on how the batch is sharded over devices.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def normalize(images: Array, mean: Sequence[float],
              std: Sequence[float]) -> Array:
  """``(images / 255 - mean) / std`` per channel.

  Args:
    images: ``[B, H, W, C]`` pixels in 0..255 (uint8 or float).
    mean: ``[C]`` channel means in ``[0, 1]`` units.
    std: ``[C]`` channel standard deviations in ``[0, 1]`` units.

  Returns:
    ``[B, H, W, C]`` float32.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def random_crop_flip(images: Array, key: Array, *, pad: int,
                     flip: bool) -> Array:
  """Random ``H x W`` crop of the zero-padded images and random horizontal flip.

  Each example is padded with ``pad`` zeros on every side, cropped back to
  ``H x W`` at an offset drawn uniformly from ``[0, 2 * pad]`` in each
  direction, and, when ``flip`` is set, mirrored left-right with probability
  1/2. Shapes are static, so the function traces once for every key.

  Args:
    images: ``[B, H, W, C]`` float images; see the module docstring for why
      they are not yet normalised.
    key: PRNG key for the whole (global) batch.
    pad: padding in pixels, ``>= 0``; 0 disables cropping.
    flip: whether to flip at random.

  Returns:
    ``[B, H, W, C]``, the same dtype; ``images`` itself when ``pad == 0`` and
    not ``flip``.
  """
  if pad < 0:
    raise ValueError(f"random_crop_flip: pad must be >= 0, got {pad}.")
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  if pad:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)

    def crop(image, offset):
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                   (height, width, channels))

    images = jax.vmap(crop)(padded, offsets)
  if flip:
    flipped = jax.random.bernoulli(flip_key, 0.5, (batch,))
    images = jnp.where(flipped[:, None, None, None], images[:, :, ::-1, :],
                       images)
  return images
