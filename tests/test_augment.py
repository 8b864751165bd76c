"""har_jax.data.augment: normalisation, random crop and flip in JAX."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from har_jax import data

# Jitted once per (shape, pad, flip): op-by-op dispatch of the vmapped crop is slow.
_random_crop_flip = jax.jit(data.random_crop_flip, static_argnames=("pad", "flip"))

def _images(batch, height=5, width=5, channels=2, seed=0):
  # Continuous random values, so no two crops of an image coincide by chance.
  return np.random.default_rng(seed).uniform(
      0.5, 1.5, (batch, height, width, channels)).astype(np.float32)


def test_normalize_matches_numpy():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 3, 3, 3), dtype=np.uint8)
  mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
  got = data.normalize(jnp.asarray(images), mean, std)
  want = (images / 255.0 - np.array(mean)) / np.array(std)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_no_padding_and_no_flip_is_the_identity():
  images = jnp.asarray(_images(4))
  out = data.random_crop_flip(images, jax.random.key(0), pad=0, flip=False)
  np.testing.assert_array_equal(out, images)


def _matching_crops(out, images, pad):
  """Per example, every ``(dy, dx, flipped)`` for which ``out[b]`` is that crop."""
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  height, width = images.shape[1:3]
  offsets = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
  matches = []
  for b in range(len(images)):
    found = []
    for (dy, dx) in offsets:
      crop = padded[b, dy:dy + height, dx:dx + width]
      for flipped in (False, True):
        if np.array_equal(out[b], crop[:, ::-1] if flipped else crop):
          found.append((dy, dx, flipped))
    matches.append(found)
  return matches


def test_every_output_is_a_crop_of_the_zero_padded_input():
  images = _images(32)
  out = np.asarray(_random_crop_flip(jnp.asarray(images), jax.random.key(1),
                                     pad=2, flip=True))
  matches = _matching_crops(out, images, pad=2)
  for b, found in enumerate(matches):
    assert len(found) == 1, f"example {b} matches crops {found}"
  offsets = {found[0][:2] for found in matches}
  assert len(offsets) > 5, f"offsets are not random: {offsets}"
  assert {found[0][2] for found in matches} == {False, True}


def test_flip_mirrors_some_examples_and_keeps_others():
  images = _images(64)
  out = np.asarray(_random_crop_flip(jnp.asarray(images), jax.random.key(2),
                                     pad=0, flip=True))
  matches = _matching_crops(out, images, pad=0)
  assert all(len(found) == 1 for found in matches), matches
  mirrored = sum(found[0][2] for found in matches)
  assert 0 < mirrored < len(images), f"{mirrored} of {len(images)} flipped"


def test_crop_without_flip_never_mirrors():
  images = _images(16)
  out = np.asarray(_random_crop_flip(jnp.asarray(images), jax.random.key(3),
                                     pad=1, flip=False))
  for b, found in enumerate(_matching_crops(out, images, pad=1)):
    assert [f[2] for f in found] == [False], f"example {b} matches {found}"


def test_jit_traces_once_for_different_keys():
  traces = []

  @functools.partial(jax.jit, static_argnames=("pad", "flip"))
  def augment(images, key, *, pad, flip):
    traces.append(None)
    return data.random_crop_flip(images, key, pad=pad, flip=flip)

  images = jnp.asarray(_images(8))
  outs = [augment(images, jax.random.key(seed), pad=2, flip=True)
          for seed in range(3)]
  assert len(traces) == 1
  assert not np.array_equal(outs[0], outs[1])


def test_sharded_batch_gives_the_unsharded_result():
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several devices (conftest simulates 8 CPUs)")
  mesh = Mesh(np.array(devices), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  images = _images(2 * len(devices), height=6, width=6)
  augment = jax.jit(functools.partial(data.random_crop_flip, pad=2, flip=True))
  key = jax.random.key(4)
  unsharded = augment(jax.device_put(images, devices[0]), key)
  sharded = augment(jax.device_put(images, sharding), key)
  assert sharded.sharding.is_equivalent_to(sharding, images.ndim)
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(unsharded))


def test_negative_padding_is_rejected():
  with pytest.raises(ValueError, match="pad must be >= 0"):
    data.random_crop_flip(jnp.asarray(_images(2)), jax.random.key(0), pad=-1,
                          flip=False)
