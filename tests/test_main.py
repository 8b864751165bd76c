"""The command line, `python -m har_jax.main`, run in subprocesses as a user runs it.

Each training subprocess costs 15-50 s of imports and compilation on a small CPU
machine, so one uninterrupted reference run (module fixture) serves every test
that needs a finished run or numbers to compare against.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from har_jax import train

import runs

# The small run of tests/runs.py, checkpointed early and often: a signal sent
# just after the first checkpoint (step 4) then lands well before the end (the
# validation at step 14 alone compiles for seconds), and the interrupted runs
# stop before paying for that compile.
TOTAL_STEPS = 24
FLAGS = runs.config_flags(num_train_steps=TOTAL_STEPS, checkpoint_every_steps=4)
# Generous: the machine is shared, and a hung run must not hang the suite.
TIMEOUT_S = 300
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
       "TF_CPP_MIN_LOG_LEVEL": "3"}
# Everything a resumed run must reproduce bit for bit (not images_per_sec, a timing).
DETERMINISTIC = ("accuracy", "many", "medium", "few", "per_exit_accuracy",
                 "exit_fraction", "flops_saving", "train_loss", "steps", "validation")
# absl / glog records ("I1122 06:54:10.41 1406 file.py:403] ..."), and the line
# the C++ logger prints before it is initialised.
LOG_RECORD = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]|"
                        r"WARNING: All log messages before absl::InitializeLog)")
RESUMED = re.compile(r"Resumed from the checkpoint of step (\d+)")
PROGRESS = re.compile(r"\] step \d+/\d+ \(epoch")


def _command(workdir, *extra):
  return [sys.executable, "-m", "har_jax.main", *FLAGS, f"--workdir={workdir}", *extra]


def _run(args):
  """Runs to the end; pipes are fine here since communicate() drains them."""
  return subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=runs.REPO,
                        timeout=TIMEOUT_S, check=False)


def _read_summary(workdir):
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    return json.load(f)


def _finished_steps(workdir):
  """Steps whose checkpoint is complete on disk.

  Orbax writes into `<step>.orbax-checkpoint-tmp*` and renames to `<step>` when
  done; it also leaves `commit_success.txt` in the finished step directory.
  Requiring both keeps a half-written checkpoint from counting.
  """
  directory = os.path.join(workdir, "checkpoints")
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return set()
  return {int(name) for name in names if name.isdigit() and os.path.exists(
      os.path.join(directory, name, "commit_success.txt"))}


def _tail(path, chars=3000):
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()[-chars:]


class _Background:
  """A run in the background; its output goes to files, since a full pipe would
  block the child (orbax logs a lot) while the test is busy polling."""

  def __init__(self, workdir, logs):
    self.workdir = workdir
    os.makedirs(logs, exist_ok=True)
    self.stdout_path = os.path.join(logs, "stdout")
    self.stderr_path = os.path.join(logs, "stderr")
    with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
      self.process = subprocess.Popen(_command(workdir), stdout=out, stderr=err,
                                      env=ENV, cwd=runs.REPO)

  def wait(self):
    return self.process.wait(timeout=TIMEOUT_S)

  def stderr(self):
    with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
      return f.read()

  def ensure_stopped(self):
    # A failing assertion must not leave a training process behind.
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait(timeout=60)


@dataclasses.dataclass
class _Interruption:
  """What an interrupted run left, and how the same command then ended."""

  first_checkpoint: int     # the step whose finished checkpoint set off the signal
  returncode: int
  stderr: str
  finished_steps: set       # complete checkpoints when the process was gone
  wrote_summary: bool
  resumed_returncode: int
  resumed_stderr: str
  resumed_summary: dict     # None when the rerun wrote none


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """{SIGKILL: _Interruption, SIGTERM: _Interruption}.

  Each run gets its signal as soon as its first checkpoint is complete, then
  the same command runs again in its workdir. The two lineages run side by
  side: each process spends most of its time in single-threaded imports and
  compilation, so two share the machine's cores at little cost to either.
  """
  base = tmp_path_factory.mktemp("interrupted")
  signals = (signal.SIGKILL, signal.SIGTERM)
  first_runs = {sig: _Background(str(base / sig.name), str(base / f"{sig.name}.first"))
                for sig in signals}
  first_checkpoint = {}
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while len(first_checkpoint) < len(signals):
      for sig, run in first_runs.items():
        if sig in first_checkpoint:
          continue
        finished = _finished_steps(run.workdir)
        if finished:
          first_checkpoint[sig] = min(finished)
          run.process.send_signal(sig)
        elif run.process.poll() is not None:
          pytest.fail(f"the {sig.name} run ended (exit code {run.process.returncode}) "
                      f"before its first checkpoint:\n{_tail(run.stderr_path)}")
      if time.monotonic() > deadline:
        pytest.fail(f"no finished checkpoint after {TIMEOUT_S} s")
      time.sleep(0.02)  # polling interval only; the condition is checked above
    returncodes = {sig: run.wait() for sig, run in first_runs.items()}
  finally:
    for run in first_runs.values():
      run.ensure_stopped()
  # Recorded before the reruns change the workdirs.
  left = {sig: (_finished_steps(run.workdir),
                os.path.exists(os.path.join(run.workdir, "summary.json")))
          for sig, run in first_runs.items()}

  reruns = {sig: _Background(run.workdir, str(base / f"{sig.name}.again"))
            for sig, run in first_runs.items()}
  try:
    rerun_codes = {sig: run.wait() for sig, run in reruns.items()}
  finally:
    for run in reruns.values():
      run.ensure_stopped()
  results = {}
  for sig in signals:
    summary_path = os.path.join(first_runs[sig].workdir, "summary.json")
    results[sig] = _Interruption(
        first_checkpoint=first_checkpoint[sig], returncode=returncodes[sig],
        stderr=first_runs[sig].stderr(), finished_steps=left[sig][0],
        wrote_summary=left[sig][1], resumed_returncode=rerun_codes[sig],
        resumed_stderr=reruns[sig].stderr(),
        resumed_summary=(_read_summary(first_runs[sig].workdir)
                         if os.path.exists(summary_path) else None))
  return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run: (workdir, completed process, its summary.json)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = _run(_command(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result, _read_summary(workdir)


def _assert_same_as_reference(summary, reference_summary):
  for field in DETERMINISTIC:
    assert summary[field] == reference_summary[field], field


# --- Bad input: one clear line, exit code 2, no traceback. -------------------------

WORKDIR_FLAG = "--workdir={}"  # filled in with the test's directory


@pytest.mark.parametrize("extra, keyword", [
    (["--config.not_a_field=1", WORKDIR_FLAG], r"(?i)unknown.*not_a_field"),
    (["--config.exits=CBBE", WORKDIR_FLAG], r"CBBE.*stages"),
    (["--config.imbalance_factor=0.5", WORKDIR_FLAG], r"imbalance_factor.*0\.5"),
    (["--config.batch_size=60", WORKDIR_FLAG], r"batch_size 60.*device count \(8\)"),
    ([], r"--workdir is required"),
], ids=["unknown_field", "unplaceable_exits", "imbalance_below_one",
        "batch_not_divisible", "missing_workdir"])
def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path, extra, keyword):
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "har_jax.main", *FLAGS,
          *(flag.format(workdir) for flag in extra)]
  started = time.monotonic()
  result = _run(args)
  seconds = time.monotonic() - started
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  # JAX may log its backend probing (an absl INFO record) before the check that
  # fails; the user-facing message is what must be a single line.
  messages = [line for line in result.stderr.splitlines()
              if line.strip() and not LOG_RECORD.match(line)]
  assert len(messages) == 1, result.stderr
  assert messages[0].startswith("har_jax: error: "), messages[0]
  assert re.search(keyword, messages[0]), messages[0]
  # Warnings or errors logged on the way would be a second, unexplained message.
  assert not re.search(r"^[WEF]\d{4} ", result.stderr, re.MULTILINE), result.stderr
  assert result.stdout == ""
  # Rejected before training, so nothing was written.
  assert not (workdir / "checkpoints").exists()
  assert seconds < 60, f"a usage error took {seconds:.0f} s"


# --- End to end. -----------------------------------------------------------------

def test_run_prints_and_writes_the_summary(reference):
  workdir, result, summary = reference
  assert "Traceback" not in result.stderr
  # The JSON summary is the last line of stdout, and the same as summary.json.
  assert json.loads(result.stdout.strip().splitlines()[-1]) == summary
  for field in ("accuracy", "many", "medium", "few", "per_exit_accuracy",
                "exit_fraction", "flops_saving", "train_loss", "train_step_compiles",
                "steps", "images_per_sec"):
    assert field in summary, field
  assert summary["train_step_compiles"] == 1
  assert summary["steps"] == TOTAL_STEPS
  assert summary["images_per_sec"] > 0
  assert len(summary["per_exit_accuracy"]) == len(summary["exit_fraction"]) == 3
  assert sum(summary["exit_fraction"]) == pytest.approx(1.0, abs=1e-5)
  # 10 balanced test classes: chance is 0.1; this run reaches about 0.55.
  assert summary["accuracy"] > 0.3
  for group in ("many", "medium", "few"):
    assert 0.0 <= summary[group] <= 1.0, group
  assert summary["train_loss"] > 0
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  assert max(_finished_steps(workdir)) == TOTAL_STEPS


def test_library_info_logs_stay_out_of_stderr(reference):
  # main.py filters the libraries' INFO records (orbax logs every save) so that
  # the progress lines stay readable; its own INFO lines must still come through.
  _, result, _ = reference
  assert PROGRESS.search(result.stderr), result.stderr[-3000:]
  chatter = [line for line in result.stderr.splitlines()
             if re.match(r"I\d{4} .* (checkpoint_manager|async_checkpointer)\.py:", line)]
  assert not chatter, chatter[:3]


def test_run_logs_its_devices_and_compilation_cache(reference):
  _, result, _ = reference
  assert re.search(r"\] JAX \S+ on cpu: 8 device\(s\) \(8 x cpu\)", result.stderr), (
      result.stderr[-3000:])
  if os.environ.get("JAX_ENABLE_COMPILATION_CACHE", "").lower() in ("false", "0"):
    assert "Persistent compilation cache: off" in result.stderr
    return
  cache = os.environ["JAX_COMPILATION_CACHE_DIR"]  # tests/conftest.py's
  assert f"Persistent compilation cache: {cache}" in result.stderr
  assert re.search(r"Compilation cache: \d+ program\(s\) loaded, \d+ written\.",
                   result.stderr), result.stderr[-3000:]


# --- Interrupted runs resume and end exactly where an uninterrupted run ends. ------

def test_sigkill_then_rerun_resumes_and_matches(interrupted, reference):
  run = interrupted[signal.SIGKILL]
  assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
  assert not run.wrote_summary, "the run finished before the kill; it proves nothing"

  assert run.resumed_returncode == 0, run.resumed_stderr[-3000:]
  assert "Traceback" not in run.resumed_stderr
  resumed = RESUMED.search(run.resumed_stderr)
  assert resumed, run.resumed_stderr[-3000:]
  resumed_step = int(resumed.group(1))
  # From the newest checkpoint the killed run completed, not from scratch.
  assert resumed_step == max(run.finished_steps)
  assert run.first_checkpoint <= resumed_step < TOTAL_STEPS
  assert run.resumed_summary is not None
  _assert_same_as_reference(run.resumed_summary, reference[2])
  assert run.resumed_summary["train_step_compiles"] == 1


def test_sigterm_saves_exits_143_and_rerun_matches(interrupted, reference):
  run = interrupted[signal.SIGTERM]
  assert run.returncode == train.PREEMPTED_EXIT_CODE, run.stderr[-3000:]
  assert "Traceback" not in run.stderr
  assert not run.wrote_summary
  preempted = re.search(r"preempted at step (\d+)", run.stderr)
  assert preempted, run.stderr[-3000:]
  stopped_at = int(preempted.group(1))
  # SIGTERM came after the first checkpoint, so the stop is at a later step,
  # and the state of that very step was saved (completely) before the exit.
  assert run.first_checkpoint < stopped_at < TOTAL_STEPS
  assert max(run.finished_steps) == stopped_at

  assert run.resumed_returncode == 0, run.resumed_stderr[-3000:]
  assert f"Resumed from the checkpoint of step {stopped_at} " in run.resumed_stderr
  assert run.resumed_summary is not None
  _assert_same_as_reference(run.resumed_summary, reference[2])


# --- A finished run, run again, does not train again. -----------------------------

def test_finished_run_is_not_trained_again(tmp_path, reference):
  # A copy, so that the reference stays as the uninterrupted run left it.
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  checkpoints_before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  result = _run(_command(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from the checkpoint of step {TOTAL_STEPS} " in result.stderr
  assert not PROGRESS.search(result.stderr), "no train step may run"
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints_before
  summary = _read_summary(workdir)
  assert json.loads(result.stdout.strip().splitlines()[-1]) == summary
  assert summary["steps"] == TOTAL_STEPS
  # train_loss included: a rerun must not replace the finished run's numbers
  # with "nothing trained here" placeholders.
  _assert_same_as_reference(summary, reference[2])
