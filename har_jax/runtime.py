"""Where a program runs: the devices JAX uses, and JAX's persistent compilation cache.

The command-line programs (``har_jax.main`` and ``har_jax.decouple`` through
``har_jax.cli.report``, ``experiments/*.py``) call
:func:`enable_compilation_cache` before they compile anything, so a resumed run,
a rerun benchmark or the next cell of the reproduction grid loads its compiled
programs from disk instead of compiling them again. The cache lives in
``~/.cache/har_jax/jax_cache``; JAX's own variables move it
(``JAX_COMPILATION_CACHE_DIR=DIR``) or turn it off
(``JAX_ENABLE_COMPILATION_CACHE=false``). JAX writes a program there when it
took at least ``jax_persistent_cache_min_compile_time_secs`` (1 s by default)
to compile, and keys it by the program, the devices, the compile options and
the versions of JAX and jaxlib, so a changed program or another machine never
gets a stale executable. Only trusted users should be able to write to the
directory (JAX loads what it finds there).

:func:`log_platform` says at the start of a run where it runs, and warns when
the machine has an NVIDIA GPU that JAX does not use.
"""

from __future__ import annotations

import collections
import os
import pathlib
import shutil
import threading
from typing import Optional, Sequence

from absl import logging
import jax

DEFAULT_COMPILATION_CACHE = pathlib.Path.home() / ".cache" / "har_jax" / "jax_cache"
# What `pip install` adds to a CPU-only install on a GPU machine (setup.py).
CUDA_INSTALL = 'pip install -e ".[train,cuda]"'
_NVIDIA_DEVICE_FILE = "/dev/nvidia0"
_CACHE_EVENT_PREFIX = "/jax/compilation_cache/"

_cache_events = collections.Counter()
_listening = threading.Lock()
_listener_registered = False


def enable_compilation_cache() -> Optional[str]:
  """Turns JAX's persistent compilation cache on; returns its directory.

  The directory is ``JAX_COMPILATION_CACHE_DIR`` (or ``jax_compilation_cache_dir``
  as set already), else :data:`DEFAULT_COMPILATION_CACHE`. Returns None, and
  changes nothing, when ``JAX_ENABLE_COMPILATION_CACHE=false`` turned it off.
  Cache hits and misses are counted from then on (:func:`compilation_cache_events`).
  """
  global _listener_registered
  if not jax.config.jax_enable_compilation_cache:
    return None
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(DEFAULT_COMPILATION_CACHE))
  with _listening:
    if not _listener_registered:
      jax.monitoring.register_event_listener(_count_cache_event)
      _listener_registered = True
  return compilation_cache_dir()


def compilation_cache_dir() -> Optional[str]:
  """The directory of JAX's persistent compilation cache, None when it is off."""
  if not jax.config.jax_enable_compilation_cache:
    return None
  return jax.config.jax_compilation_cache_dir or None


def _count_cache_event(event: str, *args, **kwargs) -> None:
  del args, kwargs
  if event.startswith(_CACHE_EVENT_PREFIX):
    _cache_events[event[len(_CACHE_EVENT_PREFIX):]] += 1


def compilation_cache_events() -> dict:
  """Since :func:`enable_compilation_cache`: how many programs were ``loaded`` from
  the persistent cache, and how many compiled and ``written`` to it (JAX's
  ``cache_hits`` and ``cache_misses``; programs that compiled faster than
  ``jax_persistent_cache_min_compile_time_secs`` are neither)."""
  return {"loaded": _cache_events["cache_hits"], "written": _cache_events["cache_misses"]}


def missing_gpu_warning(platform: str, *, nvidia_smi_on_path: bool,
                        nvidia_device_file: bool, jax_platforms: str = "") -> Optional[str]:
  """The warning for a machine with an NVIDIA GPU that JAX does not use, or None.

  Args:
    platform: the platform JAX computes on (``jax.default_backend()``).
    nvidia_smi_on_path: whether ``nvidia-smi`` is on the PATH.
    nvidia_device_file: whether ``/dev/nvidia0`` exists.
    jax_platforms: ``$JAX_PLATFORMS``; a user who chose the CPU is not warned.
  """
  if platform != "cpu" or jax_platforms.strip():
    return None
  if not (nvidia_smi_on_path or nvidia_device_file):
    return None
  return ("This machine has an NVIDIA GPU (nvidia-smi, /dev/nvidia0) but JAX computes "
          f"on the CPU: JAX's CUDA build is not installed; {CUDA_INSTALL} installs it.")


def describe_devices(devices: Sequence[jax.Device]) -> str:
  """One line: the JAX version, the platform, the devices and the processes."""
  kinds = collections.Counter(device.device_kind for device in devices)
  local = sum(device.process_index == jax.process_index() for device in devices)
  return (f"JAX {jax.__version__} on {devices[0].platform}: {len(devices)} device(s) "
          f"({', '.join(f'{count} x {kind}' for kind, count in kinds.items())}), "
          f"{local} in this process of {jax.process_count()}")


def log_platform(devices: Optional[Sequence[jax.Device]] = None) -> None:
  """Logs where the program computes (``devices``, default all of them) and warns
  when an NVIDIA GPU is present but unused."""
  devices = jax.devices() if devices is None else list(devices)
  logging.info("%s.", describe_devices(devices))
  warning = missing_gpu_warning(
      devices[0].platform, nvidia_smi_on_path=shutil.which("nvidia-smi") is not None,
      nvidia_device_file=os.path.exists(_NVIDIA_DEVICE_FILE),
      jax_platforms=os.environ.get("JAX_PLATFORMS", ""))
  if warning:
    logging.warning("%s", warning)
