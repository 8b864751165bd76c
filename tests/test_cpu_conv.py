"""The CPU convolution kernels against XLA's convolution and its gradients."""

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from har_jax import cpu_conv
from har_jax import models

# Only a missing compiler may skip: a kernel that fails to build fails the tests.
pytestmark = pytest.mark.skipif(not cpu_conv.compiler_found(),
                                reason="no C++ compiler to build the CPU kernels")

_NHWC = ("NHWC", "HWIO", "NHWC")

# (batch, height, width, in channels, out channels, kernel, stride, padding)
_CASES = [
    (2, 8, 8, 16, 16, 3, 1, ((1, 1), (1, 1))),      # a CIFAR ResNet block
    (2, 9, 7, 16, 32, 3, 2, ((1, 1), (1, 1))),      # odd sizes, stride 2
    (3, 10, 10, 32, 32, 3, 2, ((1, 1), (1, 1))),    # even size, stride 2
    (2, 11, 13, 3, 16, 3, 1, ((1, 1), (1, 1))),     # a stem: 3 input channels
    (1, 12, 12, 3, 64, 7, 2, ((3, 3), (3, 3))),     # ResNet-50's stem
    (2, 6, 6, 24, 48, 1, 1, ((0, 0), (0, 0))),      # 1x1, three vectors of outputs
    (2, 7, 7, 20, 80, 1, 2, ((0, 0), (0, 0))),      # 1x1/2 downsample, 4 + 1 vectors
    (2, 5, 30, 40, 16, 3, 1, ((2, 0), (0, 2))),     # asymmetric padding, wide rows
    (1, 4, 4, 16, 64, 3, 1, ((1, 1), (1, 1))),      # output smaller than a tile
    (2, 8, 8, 16, 16, 5, 3, ((2, 1), (1, 2))),      # stride 3, 5x5
]


def _arrays(case, seed=0):
  n, h, w, c, k, taps, stride, pads = case
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((taps, taps, c, k)) / np.sqrt(taps * taps * c),
                       jnp.float32)
  return x, kernel


def _reference(x, kernel, stride, pads):
  return lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                  dimension_numbers=_NHWC,
                                  precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("case", _CASES, ids=[str(c[:8]) for c in _CASES])
def test_forward_and_gradients_match_xla(case):
  x, kernel = _arrays(case)
  stride, pads = case[6], case[7]
  native = jax.jit(lambda x, k: cpu_conv.conv_nhwc(x, k, stride, pads))
  expected = _reference(x, kernel, stride, pads)
  got = native(x, kernel)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(expected.shape),
                          jnp.float32)
  _, reference_vjp = jax.vjp(lambda x, k: _reference(x, k, stride, pads), x, kernel)
  _, native_vjp = jax.vjp(lambda x, k: cpu_conv.conv_nhwc(x, k, stride, pads), x, kernel)
  for got, want in zip(jax.jit(native_vjp)(cotangent), reference_vjp(cotangent)):
    assert got.shape == want.shape
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_dispatch_uses_kernels_only_inside_the_block_and_for_what_they_cover():
  x, kernel = _arrays(_CASES[0])

  def lowered(fn, *args):
    return jax.jit(fn).lower(*args).as_text()

  def conv(x, k):
    return cpu_conv.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=_NHWC)

  def conv_native(x, k):
    with cpu_conv.native_convolutions():
      return conv(x, k)

  assert "har_conv_forward" not in lowered(conv, x, kernel)
  assert "har_conv_forward" in lowered(conv_native, x, kernel)
  # bfloat16 and 8 output channels (not a multiple of 16) stay with XLA.
  assert "har_conv_forward" not in lowered(conv_native, x.astype(jnp.bfloat16),
                                           kernel.astype(jnp.bfloat16))
  assert "har_conv_forward" not in lowered(conv_native, x, kernel[..., :8])


def test_model_gradients_match_with_native_convolutions():
  model = models.resnet8(num_classes=5, exits="CBEBEBE", head="linear")
  images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)),
                       jnp.float32)
  labels = jnp.arange(4) % 5
  variables = model.init(jax.random.key(0), images, train=False)

  def loss(params, native):
    with cpu_conv.native_convolutions(native):
      logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                              images, train=True, mutable=["batch_stats"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[None, :, None],
                                         -1))

  native_loss, native_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, True)))(
      variables["params"])
  xla_loss, xla_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(
      variables["params"])
  np.testing.assert_allclose(native_loss, xla_loss, rtol=1e-5)
  flat_native = jax.tree_util.tree_leaves_with_path(native_grads)
  flat_xla = jax.tree.leaves(xla_grads)
  for (path, got), want in zip(flat_native, flat_xla):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_resolve():
  cpu = jax.devices("cpu")
  assert cpu_conv.resolve("xla", cpu[:1]) is False
  assert cpu_conv.resolve("auto", cpu[:1]) is True
  assert cpu_conv.resolve("native", cpu[:1]) is True
  if len(cpu) > 1:
    assert cpu_conv.resolve("auto", cpu[:2]) is False
    with pytest.raises(ValueError, match="one CPU device"):
      cpu_conv.resolve("native", cpu[:2])
  assert cpu_conv.resolve("auto", cpu[:1], "bfloat16") is False
  with pytest.raises(ValueError, match="computes in float32"):
    cpu_conv.resolve("native", cpu[:1], "bfloat16")
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    cpu_conv.resolve("fast", cpu[:1])


def test_weight_gradient_is_reproducible():
  """The batch sum is split by shape, not by thread: same inputs, same bits."""
  x, kernel = _arrays((64, 16, 16, 16, 32, 3, 1, ((1, 1), (1, 1))))
  cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((64, 16, 16, 32)),
                          jnp.float32)
  grad = jax.jit(lambda x, k, g: jax.vjp(
      lambda k: cpu_conv.conv_nhwc(x, k, 1, ((1, 1), (1, 1))), k)[1](g)[0])
  first = np.asarray(grad(x, kernel, cotangent))
  for _ in range(5):
    np.testing.assert_array_equal(np.asarray(grad(x, kernel, cotangent)), first)


@pytest.mark.parametrize("shape", [(7, 5, 3, 32), (300, 16), (2, 3, 48), (64, 32, 16)])
def test_batch_norm_grad_stats_match_float64_sums(shape):
  rng = np.random.default_rng(3)
  dy = rng.standard_normal(shape).astype(np.float32)
  x = rng.normal(4.0, 2.0, shape).astype(np.float32)
  mean = x.reshape(-1, shape[-1]).mean(0)
  sum_dy, sum_dy_centred = jax.jit(cpu_conv.batch_norm_grad_stats)(dy, x, mean)
  rows = dy.reshape(-1, shape[-1]).astype(np.float64)
  centred = x.reshape(-1, shape[-1]).astype(np.float64) - mean
  np.testing.assert_allclose(sum_dy, rows.sum(0), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(sum_dy_centred, (rows * centred).sum(0), rtol=1e-5, atol=1e-3)


def test_unwritable_cache_falls_back_to_xla_under_auto(tmp_path, monkeypatch):
  """No kernels: 'auto' runs XLA's convolutions, 'native' says why in one line."""
  blocked = tmp_path / "file"
  blocked.write_text("not a folder")
  monkeypatch.setenv("HAR_JAX_KERNEL_CACHE", str(blocked / "cache"))
  monkeypatch.setattr(cpu_conv, "_library", functools.cache(cpu_conv._library.__wrapped__))
  reason = cpu_conv.unavailable_reason()
  assert reason is not None and "HAR_JAX_KERNEL_CACHE" in reason
  cpu = jax.devices("cpu")[:1]
  assert cpu_conv.resolve("auto", cpu) is False
  with pytest.raises(ValueError, match="kernels are unavailable"):
    cpu_conv.resolve("native", cpu)


def test_empty_outputs_and_vmap_follow_lax():
  """Shapes the kernels do not cover go to lax; vmap over the kernels works."""
  def both(x, k, padding):
    def native(x, k):
      with cpu_conv.native_convolutions():
        return cpu_conv.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=_NHWC)
    def xla(x, k):
      return lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=_NHWC)
    for f in (native, xla):
      yield jax.jit(f)(x, k), jax.jit(jax.grad(lambda k: jnp.sum(f(x, k) ** 2)))(k)

  kernel = jnp.ones((3, 3, 16, 16), jnp.float32)
  for x, padding in [(jnp.ones((1, 2, 2, 16)), "VALID"),
                     (jnp.ones((1, 1, 5, 16)), ((0, 0), (1, 1)))]:
    (y_native, g_native), (y_xla, g_xla) = both(x, kernel, padding)
    assert y_native.shape == y_xla.shape and y_native.size == 0
    np.testing.assert_array_equal(g_native, g_xla)

  x, kernel = _arrays(_CASES[0])
  batched = jnp.stack([x, 2 * x])
  got = jax.vmap(lambda x: cpu_conv.conv_nhwc(x, kernel, 1, ((1, 1), (1, 1))))(batched)
  np.testing.assert_allclose(got[1], _reference(2 * x, kernel, 1, ((1, 1), (1, 1))),
                             rtol=1e-4, atol=1e-4)
