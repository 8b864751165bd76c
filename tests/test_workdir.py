"""har_jax.workdir in process: config identity, the record of starts, the lock.

The command line's side (exit code 2, one line, a second live process, a killed
run's resume) is in tests/test_main.py.
"""

import errno
import json
import os
import socket

import pytest

from har_jax import workdir

import runs


def _starts(directory):
  with open(os.path.join(directory, workdir.STARTS_FILE), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _recorded(directory):
  with open(os.path.join(directory, workdir.CONFIG_FILE), encoding="utf-8") as f:
    return json.load(f)


def _start(directory, config):
  with workdir.claim(directory, config) as claimed:
    claimed.record_start()


def test_each_start_is_recorded_and_config_json_follows_restart_safe_fields(tmp_path):
  directory = str(tmp_path / "run")
  first = runs.small_config()
  _start(directory, first)
  again = runs.small_config(log_every_steps=3, eval_batch_size=64)
  _start(directory, again)

  starts = _starts(directory)
  assert [s["config"]["log_every_steps"] for s in starts] == [8, 3]
  assert [s["pid"] for s in starts] == [os.getpid()] * 2
  assert starts[0]["host"] == socket.gethostname() and starts[0]["processes"] == 1
  # config.json is the latest start's; it equals the first outside those fields.
  assert _recorded(directory) == starts[1]["config"]
  assert {name for name in starts[0]["config"]
          if starts[0]["config"][name] != starts[1]["config"][name]} == {
              "log_every_steps", "eval_batch_size"}


def test_a_changed_field_is_refused_with_both_values_and_nothing_written(tmp_path):
  directory = str(tmp_path / "run")
  _start(directory, runs.small_config())
  before = (_starts(directory), _recorded(directory))

  with pytest.raises(workdir.WorkdirError) as error:
    _start(directory, runs.small_config(learning_rate=0.05, seed=3))
  message = str(error.value)
  assert "\n" not in message
  assert "learning_rate 0.1 there, 0.05 now" in message
  assert "seed 0 there, 3 now" in message
  assert (_starts(directory), _recorded(directory)) == before


def test_fields_a_recorded_config_lacks_count_as_their_defaults():
  config = runs.small_config()
  older = json.loads(json.dumps(config.to_dict()))
  # Written before these fields existed; the run used what is now the default.
  del older["focal_gamma"], older["augment_pad"]
  assert workdir.config_differences(older, config) == [
      f"augment_pad 4 there, {config.augment_pad} now"]
  older["retired_field"] = 1
  assert "retired_field 1 there, (absent) now" in workdir.config_differences(
      older, config)


def test_a_start_refused_after_the_claim_records_nothing(tmp_path):
  # A stage's own checks (the checkpoints fit the model) come before the record.
  directory = str(tmp_path / "run")
  with pytest.raises(RuntimeError):
    with workdir.claim(directory, runs.small_config()):
      raise RuntimeError("the checkpoints hold another model")
  assert not os.path.exists(os.path.join(directory, workdir.STARTS_FILE))
  assert not os.path.exists(os.path.join(directory, workdir.CONFIG_FILE))
  _start(directory, runs.small_config(seed=5))  # and the folder is free again


def test_a_second_claim_is_refused_naming_the_holder(tmp_path):
  directory = str(tmp_path / "run")
  with workdir.claim(directory, runs.small_config()):
    with pytest.raises(workdir.WorkdirError) as error:
      _start(directory, runs.small_config())
  message = str(error.value)
  assert f"host {socket.gethostname()}, pid {os.getpid()}" in message
  assert "in use by a live run" in message
  _start(directory, runs.small_config())  # released on exit


def test_a_stale_lock_file_does_not_block(tmp_path):
  directory = tmp_path / "run"
  directory.mkdir()
  # What a killed run leaves: the file naming it, but no lock (the OS dropped it).
  (directory / workdir.LOCK_FILE).write_text(json.dumps(
      {"host": "elsewhere", "pid": 1, "time": "2020-01-01T00:00:00+00:00"}))
  _start(str(directory), runs.small_config())
  holder = json.loads((directory / workdir.LOCK_FILE).read_text())
  assert holder["pid"] == os.getpid()


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch, caplog):
  def no_locks(*_):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(workdir.fcntl, "flock", no_locks)
  directory = str(tmp_path / "run")
  _start(directory, runs.small_config())
  assert len(_starts(directory)) == 1
  assert "would not be stopped" in caplog.text
