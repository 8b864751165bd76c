"""Fast float32 convolutions on the CPU: compiled kernels called through the XLA FFI.

XLA's CPU backend runs a convolution's weight gradient as a convolution over the
batch, after transposing both operands into another layout (and re-running the
fused BatchNorm/ReLU producers inside those transposes): on CIFAR ResNet-32 that
is over half the training step (BENCHMARKS.md, "Profile"). ``csrc/cpu_conv.cc``
computes the forward pass and the weight gradient straight from NHWC, with the
output channels in vector registers, on XLA's own thread pool; the input gradient
is the forward kernel over the output gradient with flipped, transposed weights
(split by output residue under a stride). With them the step of a CIFAR ResNet-32
runs about 4x faster than on XLA's convolutions on a 2-core CPU (BENCHMARKS.md).

The kernels are compiled with the machine's C++ compiler on first use (about
10-15 s) into a cache (``$HAR_JAX_KERNEL_CACHE``, default ``~/.cache/har_jax``),
keyed by the source, the compiler flags, jaxlib's version and the CPU.

Use: ``conv_general_dilated`` has ``lax.conv_general_dilated``'s signature and
is what ``models.layers.conv`` hands to ``nn.Conv``. It runs the kernels only
inside ``native_convolutions(True)`` and only for what they cover (float32,
NHWC/HWIO, no dilation or groups, output channels a multiple of 16); everything
else goes to ``lax.conv_general_dilated``. The kernels see whole arrays, so they
are for a single CPU device: ``resolve`` decides from the configured
``conv_impl`` and the devices of the mesh.
"""

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

CONV_IMPLS = ("auto", "native", "xla")
_SOURCE = pathlib.Path(__file__).parent / "csrc" / "cpu_conv.cc"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_FORWARD = "har_conv_forward"
_FILTER_GRAD = "har_conv_filter_grad"
_BN_GRAD_STATS = "har_batch_norm_grad_stats"
_LANES = 16
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


class KernelsUnavailable(RuntimeError):
  """The CPU kernels could not be built or loaded (the message says why)."""


def _cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / ".cache" / "har_jax"
  return pathlib.Path(os.environ.get("HAR_JAX_KERNEL_CACHE", default))


def _compiler() -> str:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return name
  raise KernelsUnavailable("no C++ compiler found (set CXX, or install g++ or clang++)")


def compiler_found() -> bool:
  try:
    _compiler()
  except KernelsUnavailable:
    return False
  return True


def _cpu_signature() -> str:
  """What -march=native depends on: the CPU's model and feature flags."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      lines = [l for l in f if l.startswith(("flags", "model name", "Features"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor() or platform.machine()


@functools.cache
def _library() -> ctypes.CDLL:
  """Builds (once per machine) and loads the kernels, and registers them with XLA."""
  if not _SOURCE.is_file():
    raise KernelsUnavailable(f"kernel source {_SOURCE} is missing from the installation")
  compiler = _compiler()
  include = jax.ffi.include_dir()
  key = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), " ".join(_FLAGS), compiler,
               importlib.metadata.version("jaxlib"), _cpu_signature()):
    key.update(part if isinstance(part, bytes) else part.encode())
  target = _cache_dir() / f"cpu_conv-{key.hexdigest()[:16]}.so"
  if not target.is_file():
    logging.info("Compiling har_jax's CPU convolution kernels into %s", target)
    try:
      target.parent.mkdir(parents=True, exist_ok=True)
      # Another process may build the same file: write apart, then rename.
      with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = pathlib.Path(tmp) / target.name
        command = [compiler, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                timeout=600)
        if result.returncode != 0:
          tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
          raise KernelsUnavailable(f"compiling {_SOURCE.name} failed: " + " | ".join(tail))
        os.replace(built, target)
    except subprocess.TimeoutExpired:
      raise KernelsUnavailable(f"compiling {_SOURCE.name} took over 10 minutes") from None
    except OSError as error:
      raise KernelsUnavailable(
          f"cannot build into the kernel cache {target.parent} ({error}); set "
          "HAR_JAX_KERNEL_CACHE to a writable folder") from None
  try:
    library = ctypes.cdll.LoadLibrary(str(target))
  except OSError as error:
    raise KernelsUnavailable(f"loading {target} failed: {error}") from None
  jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(library.HarConvForward),
                              platform="cpu")
  jax.ffi.register_ffi_target(_FILTER_GRAD, jax.ffi.pycapsule(library.HarConvFilterGrad),
                              platform="cpu")
  jax.ffi.register_ffi_target(_BN_GRAD_STATS,
                              jax.ffi.pycapsule(library.HarBatchNormGradStats),
                              platform="cpu")
  return library


def unavailable_reason() -> str | None:
  """None when the kernels load on this machine, else why they do not."""
  try:
    _library()
  except KernelsUnavailable as error:
    return str(error)
  return None


def resolve(conv_impl: str, devices: Sequence[jax.Device], dtype: str = "float32") -> bool:
  """Whether a step on ``devices`` computing in ``dtype`` runs the kernels.

  'xla': never. 'native': always, and a ValueError when it cannot (not float32,
  not one CPU device, or the kernels do not build). 'auto': when it can, with a
  warning when only the build stops it.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
  if conv_impl == "xla":
    return False
  if jnp.dtype(dtype) != jnp.float32:
    if conv_impl == "native":
      raise ValueError(f"conv_impl 'native' computes in float32, but dtype is {dtype}; "
                       "use conv_impl 'auto' or 'xla'.")
    return False
  devices = list(devices)
  single_cpu = len(devices) == 1 and devices[0].platform == "cpu"
  if not single_cpu:
    if conv_impl == "native":
      raise ValueError(
          f"conv_impl 'native' runs on one CPU device, but the mesh has {len(devices)} "
          f"{devices[0].platform} device(s); use conv_impl 'auto' or 'xla'.")
    return False
  reason = unavailable_reason()
  if reason is not None:
    if conv_impl == "native":
      raise ValueError(f"conv_impl 'native': the CPU kernels are unavailable: {reason}; "
                       "use conv_impl 'auto' or 'xla'.")
    logging.warning("Using XLA's convolutions: the CPU kernels are unavailable: %s", reason)
    return False
  return True


_state = threading.local()


@contextlib.contextmanager
def native_convolutions(enabled: bool = True):
  """Within this block (while tracing), supported convolutions use the kernels."""
  previous = getattr(_state, "enabled", False)
  _state.enabled = enabled
  try:
    yield
  finally:
    _state.enabled = previous


def enabled() -> bool:
  """Whether the code being traced is inside ``native_convolutions(True)``."""
  return getattr(_state, "enabled", False)


def supports_batch_norm(x) -> bool:
  """Whether ``batch_norm_grad_stats`` takes this BatchNorm input."""
  return x.dtype == jnp.float32 and x.ndim >= 2 and x.size > 0 and (
      x.shape[-1] % _LANES == 0)


def batch_norm_grad_stats(dy, x, mean):
  """``(sum(dy), sum(dy * (x - mean)))`` over all axes but the last, in one pass.

  The two per-channel sums of BatchNorm's gradient, read straight from ``dy`` and
  ``x`` (XLA's CPU reductions would read them twice and need ``x - mean`` written
  out first). float32, channels a multiple of 16 (``supports_batch_norm``).
  """
  _library()
  stats = jax.ffi.ffi_call(
      _BN_GRAD_STATS, jax.ShapeDtypeStruct((2, x.shape[-1]), jnp.float32),
      vmap_method="sequential")(dy, x, mean)
  return stats[0], stats[1]


def _explicit_padding(padding, lhs_shape, rhs_shape, strides):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], strides, padding))
  return tuple(tuple(int(p) for p in pair) for pair in padding)


def _kernel_padding(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, batch_group_count,
                    preferred_element_type):
  """The explicit padding of a ``lax.conv_general_dilated`` call the kernels
  compute (float32 NHWC/HWIO, one stride, no dilation or groups, output channels
  a multiple of 16, non-negative padding, a non-empty output), else None."""
  if lhs.ndim != 4 or rhs.ndim != 4 or lhs.size == 0 or rhs.size == 0:
    return None
  numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if not (numbers == _NHWC and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
          and preferred_element_type in (None, jnp.float32)
          and feature_group_count == 1 and batch_group_count == 1
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and all(d == 1 for d in (rhs_dilation or (1, 1)))
          and len(set(window_strides)) == 1
          and rhs.shape[3] % _LANES == 0):
    return None
  pads = _explicit_padding(padding, lhs.shape, rhs.shape, window_strides)
  stride = int(window_strides[0])
  if any(lo < 0 or hi < 0 for lo, hi in pads) or any(
      _output_size(lhs.shape[1 + a], rhs.shape[a], stride, pads[a]) < 1 for a in (0, 1)):
    return None
  return pads


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated``, on the kernels where enabled and supported."""
  if enabled():
    pads = _kernel_padding(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                           dimension_numbers, feature_group_count, batch_group_count,
                           preferred_element_type)
    if pads is not None:
      return conv_nhwc(lhs, rhs, int(window_strides[0]), pads)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)


def _forward(x, w, stride: int, pad_low, out_hw):
  """The kernel's convolution; ``pad_low`` zero rows/columns above/left of x.

  Padding below and right is implied by ``out_hw``: taps that fall outside x
  read zeros.
  """
  _library()
  shape = (x.shape[0], *out_hw, w.shape[3])
  return jax.ffi.ffi_call(_FORWARD, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(
      x, w, stride=np.int64(stride), pad_top=np.int64(pad_low[0]),
      pad_left=np.int64(pad_low[1]))


def _filter_grad(x, dy, stride: int, pad_low, kernel_shape):
  _library()
  return jax.ffi.ffi_call(_FILTER_GRAD, jax.ShapeDtypeStruct(kernel_shape, jnp.float32),
                          vmap_method="sequential")(
      x, dy, stride=np.int64(stride), pad_top=np.int64(pad_low[0]),
      pad_left=np.int64(pad_low[1]))


def _output_size(size: int, taps: int, stride: int, pad) -> int:
  return max(0, (size + pad[0] + pad[1] - taps) // stride + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x, w, stride: int, pads):
  """NHWC x HWIO -> NHWC float32 convolution with ``pads`` ((lo, hi), (lo, hi))."""
  out_hw = tuple(_output_size(x.shape[1 + a], w.shape[a], stride, pads[a]) for a in (0, 1))
  return _forward(x, w, stride, (pads[0][0], pads[1][0]), out_hw)


def _conv_nhwc_fwd(x, w, stride, pads):
  return conv_nhwc(x, w, stride, pads), (x, w)


def _conv_nhwc_bwd(stride, pads, residuals, dy):
  x, w = residuals
  dw = _filter_grad(x, dy, stride, (pads[0][0], pads[1][0]), w.shape)
  if x.shape[3] % _LANES == 0:
    dx = _input_grad(dy, w, stride, pads, x.shape[1:3])
  else:  # e.g. a stem's 3 input channels: XLA's own input gradient
    _, vjp = jax.vjp(lambda x: lax.conv_general_dilated(
        x, w, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")), x)
    (dx,) = vjp(dy)
  return dx, dw


def _input_grad(dy, w, stride: int, pads, in_hw):
  """dx[i] = sum of dy[o] w[t] over o * stride - lo + t = i, with the forward kernel.

  Stride 1: a convolution of dy padded by taps - 1 - lo with the flipped,
  transposed kernel. Stride s > 1: the inputs i = s * a + r of each residue r
  (per axis) receive only the taps t = t0 + s * m with t0 = (r + lo) mod s, so
  dx splits into s * s stride-1 convolutions with those sub-kernels, interleaved
  afterwards; no multiplications by the zeros of a dilated dy.
  """
  if stride == 1:
    low = tuple(w.shape[a] - 1 - pads[a][0] for a in (0, 1))
    return _forward(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), 1, low, in_hw)
  n, channels = dy.shape[0], w.shape[2]
  size = tuple(-(-in_hw[a] // stride) for a in (0, 1))  # positions per residue

  def taps(axis, residue):
    first = (residue + pads[axis][0]) % stride
    count = len(range(first, w.shape[axis], stride))
    shift = (residue + pads[axis][0]) // stride
    return first, count, count - 1 - shift

  rows = []
  for r in range(stride):
    first_h, count_h, low_h = taps(0, r)
    columns = []
    for c in range(stride):
      first_w, count_w, low_w = taps(1, c)
      if count_h == 0 or count_w == 0:
        columns.append(jnp.zeros((n, *size, channels), dy.dtype))
        continue
      kernel = w[first_h::stride, first_w::stride]  # taps t0 + s*m, m ascending
      kernel = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
      columns.append(_forward(dy, kernel, 1, (low_h, low_w), size))
    rows.append(jnp.stack(columns, axis=3))  # [N, A, B, s, C]
  dx = jnp.stack(rows, axis=2)  # [N, A, s, B, s, C]
  dx = dx.reshape(n, size[0] * stride, size[1] * stride, channels)
  return dx[:, :in_hw[0], :in_hw[1]]


conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)
