"""Test set-up: simulate 8 CPU devices so multi-device code paths run everywhere,
give the session a persistent compilation cache of its own, and restore absl's
verbosity after each test."""

import atexit
import os
import shutil
import tempfile

import pytest

# Must be set before JAX initialises its backends.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite checks behaviour, not speed, and most of its time is XLA compiling
# small programs: without LLVM's expensive passes the same tests take 0.57x the
# CPU time (tests/test_baselines.py, measured alternately). BENCHMARKS.md's
# figures are measured without them.
for _flag in ("--xla_backend_optimization_level=0",
              "--xla_llvm_disable_expensive_passes=true"):
  if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _flag

# Read by JAX when it is imported, here and in every subprocess (har_jax.main,
# the experiments): a program compiled once in the session is loaded after
# that. Empty at the start, so no test sees an earlier session's programs or
# the user's cache (~/.cache/har_jax/jax_cache).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="har_jax_test_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _absl_verbosity_is_restored():
  """Commands run in-process (analyze, early_exit_benchmark) lower absl's verbosity to
  WARNING; restore it after each test so a later test's caplog sees absl's INFO records
  whatever ran before it."""
  from absl import logging as absl_logging
  level = absl_logging.get_verbosity()
  yield
  absl_logging.set_verbosity(level)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
  """One finished run of ``runs.small_config()`` on every device, shared by the
  modules that study a trained run (analyses, the second stage); read-only."""
  from har_jax import train  # pylint: disable=g-import-not-at-top
  import runs  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("small_run"))
  train.train_and_evaluate(runs.small_config(), path)
  return path
