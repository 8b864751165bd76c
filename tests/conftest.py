"""Test set-up: simulate 8 CPU devices so multi-device code paths run everywhere."""

import os

# Must be set before JAX initialises its backends.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest


@pytest.fixture(autouse=True)
def _absl_verbosity_is_restored():
  """Commands run in-process (analyze, early_exit_benchmark) lower absl's verbosity to
  WARNING; restore it after each test so a later test's caplog sees absl's INFO records
  whatever ran before it."""
  from absl import logging as absl_logging
  level = absl_logging.get_verbosity()
  yield
  absl_logging.set_verbosity(level)
