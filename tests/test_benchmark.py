"""experiments/benchmark.py and gpu_benchmark.py: tiny configs, run as a user runs them."""

import json
import os
import subprocess
import sys

import numpy as np

from har_jax import cpu_conv
from tests import runs

BENCHMARK = os.path.join(runs.REPO, "experiments", "benchmark.py")
GPU_BENCHMARK = os.path.join(runs.REPO, "experiments", "gpu_benchmark.py")

# Runs a script (the first argument) as `python SCRIPT ARGS` does.
RUN_SCRIPT = """
import os, runpy
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""

TINY = ["--config.model=resnet8", "--config.batch_size=16", "--steps=2", "--warmup=1"]
# XLA's CPU backend without LLVM's optimisations: programs compile in half the
# time or less (experiments/gpu_benchmark.py --tiny, two pairs on this shared
# machine: 119 and 104 s, against 32 and 52 s).
FAST_CPU_COMPILES = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_script(blocked: str, *args, one_device=False, **env_overrides):
  env = dict(os.environ, PYTHONPATH=runs.REPO)
  if one_device:  # as a user runs it on a CPU: no simulated devices
    env.pop("XLA_FLAGS", None)
  env.update(env_overrides)
  result = subprocess.run([sys.executable, "-c", blocked + RUN_SCRIPT, *args],
                          capture_output=True, text=True, timeout=600, env=env,
                          cwd=runs.REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def run_benchmark(*args, one_device=False, **env_overrides):
  """benchmark.py with TensorFlow unimportable, as on an accelerator image."""
  result = run_script(runs.BLOCK_TENSORFLOW, BENCHMARK, f"--config={runs.DEFAULT_CONFIG}",
                      *TINY, *args, one_device=one_device, **env_overrides)
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_reports_the_step_as_json_without_tensorflow():
  report = run_benchmark()
  for field in ("images_per_sec", "step_ms", "compile_s", "images_per_sec_per_device",
                "flops_per_sec", "macs_per_image"):
    assert report[field] > 0, (field, report)
  assert report["batch_size"] == 16
  assert report["devices"] >= 1
  assert report["timed_steps"] == 2
  assert report["image_shape"] == [8, 8, 1]  # the digits spec
  assert abs(report["images_per_sec"] - 16e3 / report["step_ms"]) < 1e-6 * report[
      "images_per_sec"]
  # 6 FLOPs per MAC and image: forward, input and weight gradients.
  assert report["train_flops_per_step"] == 6 * 16 * report["macs_per_image"]


def test_against_times_a_second_config_in_the_same_run():
  # The steps that gather their batch on the devices, mixup and class-balanced
  # re-sampling against the plain one.
  report = run_benchmark("--against=mixing=none,sampler=instance", "--gather",
                         "--config.mixing=mixup", "--config.sampler=class_balanced",
                         "--image_shape=16,16,3", "--num_classes=5", "--largest_class=40")
  assert report["image_shape"] == [16, 16, 3] and report["num_classes"] == 5
  assert report["gather"] and report["mixing"] == "mixup"
  assert report["against"]["overrides"] == ["mixing=none", "sampler=instance"]
  assert report["against"]["step_ms"] > 0
  assert abs(report["step_ratio"] - report["step_ms"] / report["against"]["step_ms"]
             ) < 1e-9


def test_one_cpu_device_runs_the_cpu_kernels_against_xla_and_reloads_them(tmp_path):
  # Two runs on one persistent compilation cache: the second loads both steps,
  # the CPU kernels' custom calls included, and computes what the first did.
  cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  args = ("--image_shape=16,16,3", "--against=conv_impl=xla")
  first = run_benchmark(*args, one_device=True, **cache)
  assert first["devices"] == 1
  assert first["conv_impl"] == "auto"
  assert first["native_convolutions"] == (cpu_conv.unavailable_reason() is None)
  assert first["against"]["native_convolutions"] is False
  assert first["compilation_cache"] == str(tmp_path)
  again = run_benchmark(*args, one_device=True, **cache)
  for report in (first, first["against"]):
    assert report["compile_cache_hit"] is False
  for report in (again, again["against"]):
    assert report["compile_cache_hit"] is True
  assert again["last_loss"] == first["last_loss"]
  assert again["against"]["last_loss"] == first["against"]["last_loss"]


def test_gpu_benchmark_runs_tiny_without_the_trainer_s_packages(tmp_path):
  # The script's plumbing, not its speed: compiled fast.
  run_script(runs.BLOCK_TRAINER, GPU_BENCHMARK, "--tiny", "--dtypes=float32",
             f"--out={tmp_path}", one_device=True, XLA_FLAGS=FAST_CPU_COMPILES)
  results = json.loads((tmp_path / "gpu_benchmark.json").read_text())
  assert not results["errors"] and not results["skipped"], results
  assert results["roofline"]["bandwidth_bytes_per_sec"] > 0
  assert min(results["roofline"]["matmul_flops_per_sec"].values()) > 0
  steps = results["train_steps"]
  assert [(row["har"], row["batch_size"]) for row in steps] == [(True, 16), (False, 16)]
  for row in steps:
    assert row["step_ms"] > 0 and row["compile_s"] > 0 and np.isfinite(row["last_loss"])
    assert row["compile_cache_hit"] is False and row["warm_compile_cache_hit"] is True
  assert steps[0]["har_over_plain"] == steps[0]["step_ms"] / steps[1]["step_ms"]
  (cascade,) = results["cascade"]
  # The rescaled exit classifiers send the asked-for fractions out at each exit.
  np.testing.assert_allclose(cascade["exit_fraction"], [0.5, 0.25, 0.25], atol=0.1)
  assert cascade["compiles_while_timed"] == 0
  assert "| resnet8 | float32 | 16 | True |" in (tmp_path / "gpu_benchmark.md").read_text()
