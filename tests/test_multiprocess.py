"""Two processes on loopback (CPU collectives) against one process, same devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

import runs

# XLA's convolutions in both runs: this compares sharding, not convolution kernels
# (one process on one CPU device would otherwise pick har_jax's own).
FLAGS = runs.config_flags(num_train_steps=14, eval_every_epochs=1, drw_start_epoch=1,
                          conv_impl="xla", log_every_steps=1)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, devices, extra=()):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-m", "har_jax.main", *FLAGS,
                           f"--workdir={workdir}", *extra], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process):
  try:
    stdout, stderr = process.communicate(timeout=420)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  assert process.returncode == 0, stderr[-3000:]
  return stdout


def test_two_processes_agree_with_one(tmp_path):
  address = f"127.0.0.1:{_free_port()}"
  two = [_launch(tmp_path / "two", 4, [f"--coordinator_address={address}",
                                       "--num_processes=2", f"--process_id={index}"])
         for index in range(2)]
  one = _launch(tmp_path / "one", 8)
  outputs = [_finish(process) for process in two]
  _finish(one)
  # Both processes report the same global result.
  written = runs.read_summary(tmp_path / "two")
  for output in outputs:
    assert json.loads(output.splitlines()[-1])["accuracy"] == written["accuracy"]
  # Four devices in each of two processes reduce over the CPU collectives in
  # another order than eight devices in one process: the same training, other
  # rounding (runs.assert_runs_agree says what that guarantees).
  double, single = runs.assert_runs_agree(tmp_path / "two", tmp_path / "one")
  # The best validation accuracy (100 images) agrees within the same flips;
  # its step may differ only where two validations were that close.
  assert abs(double["validation"]["best_accuracy"]
             - single["validation"]["best_accuracy"]) <= 10 / 100 + 1e-9
