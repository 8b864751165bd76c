"""The command line, `python -m har_jax.main`, run in subprocesses as a user runs it.

Each training subprocess costs 15-50 s of imports and compilation on a small CPU
machine, so one uninterrupted reference run (module fixture) serves every test
that needs a finished run or numbers to compare against; a second run started on
its workdir while it lives shows the lock.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from har_jax import train
from har_jax import workdir as workdir_lib

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
LOGGED_STEP = re.compile(r"\] step (\d+)/\d+ \(epoch")
# A field a restart may change (config.RESTART_SAFE_FIELDS); the run logs every 8.
RERUN_LOG_EVERY = 3
RERUN_LOG_FLAG = f"--config.log_every_steps={RERUN_LOG_EVERY}"


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


def _starts(workdir):
  """The starts the workdir recorded (har_jax/workdir.py), oldest first."""
  path = os.path.join(workdir, workdir_lib.STARTS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _lock_holder(workdir):
  """The pid the lock file names, or None before a run has written it."""
  try:
    with open(os.path.join(workdir, workdir_lib.LOCK_FILE), encoding="utf-8") as f:
      return json.loads(f.read())["pid"]
  except (FileNotFoundError, ValueError, KeyError):
    return None


def _messages(stderr):
  """The lines of stderr that are not log records: what the user is told.

  main.py logs the config (one record over many lines) once it is valid; its
  lines end at the next record or at har_jax's own message.
  """
  messages, in_config = [], False
  for line in stderr.splitlines():
    if LOG_RECORD.match(line):
      in_config = line.endswith("] Config:")
    elif line.startswith("har_jax:"):
      in_config = False
      messages.append(line)
    elif line.strip() and not in_config:
      messages.append(line)
  return messages


def _tail(path, chars=3000):
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()[-chars:]


class _Background:
  """A run in the background; its output goes to files, since a full pipe would
  block the child (orbax logs a lot) while the test is busy polling."""

  def __init__(self, workdir, logs, *extra):
    self.workdir = workdir
    os.makedirs(logs, exist_ok=True)
    self.stdout_path = os.path.join(logs, "stdout")
    self.stderr_path = os.path.join(logs, "stderr")
    with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
      self.process = subprocess.Popen(_command(workdir, *extra), stdout=out,
                                      stderr=err, env=ENV, cwd=runs.REPO)

  def wait(self):
    return self.process.wait(timeout=TIMEOUT_S)

  def stderr(self):
    with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
      return f.read()

  def stdout(self):
    with open(self.stdout_path, encoding="utf-8", errors="replace") as f:
      return f.read()

  def ensure_stopped(self):
    # A failing assertion must not leave a training process behind.
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait(timeout=60)


def _await(runs, arrived, what):
  """Polls until ``arrived(name)`` has returned True once for every ``name`` of
  ``runs`` ({name: _Background}); fails when one of them ends first."""
  waiting = set(runs)
  deadline = time.monotonic() + TIMEOUT_S
  while waiting:
    for name in sorted(waiting):
      run = runs[name]
      if arrived(name):
        waiting.remove(name)
      elif run.process.poll() is not None:
        pytest.fail(f"the {name} run ended (exit code {run.process.returncode}) "
                    f"before {what}:\n{_tail(run.stderr_path)}")
    if waiting and time.monotonic() > deadline:
      pytest.fail(f"runs {sorted(waiting)}: no {what} after {TIMEOUT_S} s")
    time.sleep(0.02)  # polling interval only; the condition is checked above


@dataclasses.dataclass
class _Interruption:
  """What an interrupted run left, and how the same command then ended."""

  first_checkpoint: int     # the step whose finished checkpoint set off the signal
  returncode: int
  stderr: str
  finished_steps: set       # complete checkpoints when the process was gone
  wrote_summary: bool
  lock_holder: int          # the pid the lock file named when the process was gone
  resumed_returncode: int
  resumed_stderr: str
  resumed_summary: dict     # None when the rerun wrote none
  pids: tuple               # of the first run and of the rerun
  starts: list              # the workdir's recorded starts after the rerun


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """{SIGKILL: _Interruption, SIGTERM: _Interruption}.

  Each run gets its signal as soon as its first checkpoint is complete, then
  the same command runs again in its workdir (after SIGTERM with another log
  interval, a field a restart may change). The two lineages run side by side:
  each process spends most of its time in single-threaded imports and
  compilation, so two share the machine's cores at little cost to either.
  """
  base = tmp_path_factory.mktemp("interrupted")
  signals = (signal.SIGKILL, signal.SIGTERM)
  first_runs = {sig: _Background(str(base / sig.name), str(base / f"{sig.name}.first"))
                for sig in signals}
  first_checkpoint = {}

  def signal_after_first_checkpoint(name):
    sig, run = signal.Signals[name], first_runs[signal.Signals[name]]
    finished = _finished_steps(run.workdir)
    if finished:
      first_checkpoint[sig] = min(finished)
      run.process.send_signal(sig)
    return bool(finished)

  try:
    _await({sig.name: run for sig, run in first_runs.items()},
           signal_after_first_checkpoint, "its first checkpoint")
    returncodes = {sig: run.wait() for sig, run in first_runs.items()}
  finally:
    for run in first_runs.values():
      run.ensure_stopped()
  # Recorded before the reruns change the workdirs.
  left = {sig: (_finished_steps(run.workdir),
                os.path.exists(os.path.join(run.workdir, "summary.json")),
                _lock_holder(run.workdir))
          for sig, run in first_runs.items()}

  rerun_flags = {signal.SIGKILL: (), signal.SIGTERM: (RERUN_LOG_FLAG,)}
  reruns = {sig: _Background(run.workdir, str(base / f"{sig.name}.again"),
                             *rerun_flags[sig])
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
        wrote_summary=left[sig][1], lock_holder=left[sig][2],
        resumed_returncode=rerun_codes[sig], resumed_stderr=reruns[sig].stderr(),
        resumed_summary=(_read_summary(first_runs[sig].workdir)
                         if os.path.exists(summary_path) else None),
        pids=(first_runs[sig].process.pid, reruns[sig].process.pid),
        starts=_starts(first_runs[sig].workdir))
  return results


@dataclasses.dataclass
class _Reference:
  """The uninterrupted run, and a second run started on its workdir meanwhile."""

  workdir: str
  result: subprocess.CompletedProcess
  summary: dict
  pid: int
  second: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run. As soon as it holds its workdir's lock it is paused
  (SIGSTOP), so that the same command started on the workdir meets a live run
  however slowly it starts; then the reference continues to its end."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  run = _Background(workdir, workdir + ".logs")
  try:
    _await({"reference": run}, lambda _: _lock_holder(workdir) == run.process.pid,
           "its workdir's lock")
    run.process.send_signal(signal.SIGSTOP)
    try:
      second = _run(_command(workdir))
    finally:
      run.process.send_signal(signal.SIGCONT)
    returncode = run.wait()
  finally:
    run.ensure_stopped()
  stderr = run.stderr()
  assert returncode == 0, stderr[-3000:]
  result = subprocess.CompletedProcess(run.process.args, returncode, run.stdout(), stderr)
  return _Reference(workdir=workdir, result=result, summary=_read_summary(workdir),
                    pid=run.process.pid, second=second)


def _assert_same_as_reference(summary, reference_summary):
  for field in DETERMINISTIC:
    assert summary[field] == reference_summary[field], field


# --- Bad input: one clear line, exit code 2, no traceback. -------------------------

WORKDIR_FLAG = "--workdir={}"  # filled in with the test's directory
# The config a run with FLAGS records in its workdir, but another learning rate.
OTHER_LEARNING_RATE = runs.small_config(num_train_steps=TOTAL_STEPS,
                                        checkpoint_every_steps=4, learning_rate=0.05)


@pytest.mark.parametrize("extra, keyword, recorded", [
    (["--config.not_a_field=1", WORKDIR_FLAG], r"(?i)unknown.*not_a_field", None),
    (["--config.exits=CBBE", WORKDIR_FLAG], r"CBBE.*stages", None),
    (["--config.imbalance_factor=0.5", WORKDIR_FLAG], r"imbalance_factor.*0\.5", None),
    (["--config.batch_size=60", WORKDIR_FLAG], r"batch_size 60.*device count \(8\)",
     None),
    ([], r"--workdir is required", None),
    ([WORKDIR_FLAG], r"holds a run of another config: learning_rate 0\.05 there, "
     r"0\.1 now\. Rerun with the config in .*config\.json, or give this config a "
     r"new workdir\.$", OTHER_LEARNING_RATE),
], ids=["unknown_field", "unplaceable_exits", "imbalance_below_one",
        "batch_not_divisible", "missing_workdir", "changed_learning_rate"])
def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path, extra, keyword, recorded):
  workdir = tmp_path / "run"
  if recorded is not None:  # what a first run in the workdir left
    workdir.mkdir()
    (workdir / workdir_lib.CONFIG_FILE).write_text(json.dumps(recorded.to_dict()))
  args = [sys.executable, "-m", "har_jax.main", *FLAGS,
          *(flag.format(workdir) for flag in extra)]
  started = time.monotonic()
  result = _run(args)
  seconds = time.monotonic() - started
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  # JAX may log its backend probing (an absl INFO record) before the check that
  # fails; the user-facing message is what must be a single line.
  messages = _messages(result.stderr)
  assert len(messages) == 1, result.stderr
  assert messages[0].startswith("har_jax: error: "), messages[0]
  assert re.search(keyword, messages[0]), messages[0]
  # Warnings or errors logged on the way would be a second, unexplained message.
  assert not re.search(r"^[WEF]\d{4} ", result.stderr, re.MULTILINE), result.stderr
  assert result.stdout == ""
  # Rejected before training, so nothing was written.
  assert not (workdir / "checkpoints").exists()
  assert not (workdir / workdir_lib.STARTS_FILE).exists()
  if recorded is not None:
    assert json.loads((workdir / workdir_lib.CONFIG_FILE).read_text()) == json.loads(
        json.dumps(recorded.to_dict()))
  assert seconds < 60, f"a usage error took {seconds:.0f} s"


# --- End to end. -----------------------------------------------------------------

def test_run_prints_and_writes_the_summary(reference):
  workdir, result, summary = reference.workdir, reference.result, reference.summary
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
  result = reference.result
  assert PROGRESS.search(result.stderr), result.stderr[-3000:]
  chatter = [line for line in result.stderr.splitlines()
             if re.match(r"I\d{4} .* (checkpoint_manager|async_checkpointer)\.py:", line)]
  assert not chatter, chatter[:3]


def test_run_logs_its_devices_and_compilation_cache(reference):
  result = reference.result
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
  _assert_same_as_reference(run.resumed_summary, reference.summary)
  assert run.resumed_summary["train_step_compiles"] == 1
  # The killed run held the workdir's lock; the OS dropped it with the process,
  # so the rerun was not refused. Both starts are on record.
  assert run.lock_holder == run.pids[0]
  assert [start["pid"] for start in run.starts] == list(run.pids)


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
  _assert_same_as_reference(run.resumed_summary, reference.summary)
  # The rerun changed the log interval, which a restart may: it logged at its own
  # interval, and the history keeps both starts' configs.
  logged = [int(step) for step in LOGGED_STEP.findall(run.resumed_stderr)]
  assert logged == [step for step in range(stopped_at + 1, TOTAL_STEPS + 1)
                    if step % RERUN_LOG_EVERY == 0 or step == TOTAL_STEPS], logged
  assert [start["config"]["log_every_steps"] for start in run.starts] == [
      runs.SMALL["log_every_steps"], RERUN_LOG_EVERY]


# --- A workdir holds one run. -----------------------------------------------------

def test_a_second_live_run_is_refused_and_the_first_finishes(reference):
  second = reference.second
  assert second.returncode == 2, second.stderr[-3000:]
  messages = _messages(second.stderr)
  assert len(messages) == 1, second.stderr
  assert re.match(rf"har_jax: error: {re.escape(reference.workdir)} is in use by a "
                  rf"live run \(host {re.escape(socket.gethostname())}, pid "
                  rf"{reference.pid}, since ", messages[0]), messages[0]
  assert second.stdout == ""
  # The first run was not disturbed (its summary is checked above and against the
  # resumed runs), and the refused one left no record.
  assert [start["pid"] for start in _starts(reference.workdir)] == [reference.pid]


def test_checkpoints_of_other_exits_are_refused_in_one_line(tmp_path, reference):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference.workdir, workdir)
  # A workdir from before runs recorded their config: only the checkpoints tell.
  os.remove(os.path.join(workdir, workdir_lib.CONFIG_FILE))
  result = _run(_command(workdir, "--config.exits=CBBBE"))
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  messages = _messages(result.stderr)
  assert len(messages) == 1, result.stderr
  assert messages[0].startswith(
      f"har_jax: error: {workdir} holds checkpoints of another model, exits or data "
      "set than this config asks for (resnet8, exits CBBBE, 10 classes of digits): "
      f"the checkpoint of step {TOTAL_STEPS} in "), messages[0]
  # The two early exits are in the checkpoint, not in this config's model.
  assert "only in the checkpoint: params/exit0, params/exit1" in messages[0]
  assert messages[0].endswith("Give this config a new workdir."), messages[0]
  # The refused config did not become the workdir's.
  assert not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE))
  assert len(_starts(workdir)) == 1


# --- A finished run, run again, does not train again. -----------------------------

def test_finished_run_is_not_trained_again(tmp_path, reference):
  # A copy, so that the reference stays as the uninterrupted run left it.
  workdir = str(tmp_path / "run")
  shutil.copytree(reference.workdir, workdir)
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
  _assert_same_as_reference(summary, reference.summary)
  # A start of its own on record, after the reference's.
  assert [start["pid"] for start in _starts(workdir)][:1] == [reference.pid]
  assert len(_starts(workdir)) == 2
