"""A workdir holds one run: its config, the record of its starts, and its lock.

Every stage that writes a run's folder (training, the reproduction grid's cells,
decoupling) claims the folder first::

  with workdir.claim(directory, config) as claimed:
    ...  # check what else the folder holds (its checkpoints fit the model)
    claimed.record_start()
    ...  # train, checkpoint, write summaries into directory

Claiming a folder, on process 0 of the run:

- takes ``DIR/lock``, an OS file lock (``flock``), for as long as the run lives:
  a second run on the folder stops at once, naming the holder's host and pid;
  the OS releases the lock when its process dies, so a killed run never blocks
  its own resume;
- compares the config with ``DIR/config.json``, the config the run was started
  with: any difference outside ``restart_safe`` stops the run, naming each field
  and both values, before anything is written.

``record_start`` then, once the stage's own checks passed:

- appends the start (time, host, pid, processes, config) to ``DIR/starts.jsonl``,
  which is never rewritten, so the history of a run survives every restart;
- writes the config to ``DIR/config.json``, which the analyses read. Its fields
  outside ``restart_safe`` never change after the first start; the others are
  those of the latest start.

A start refused by a later check records nothing, so a refused config never
becomes the folder's.

The other processes of a multi-process run share the folder and the claim: they
wait for process 0's verdict and stop with it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import TYPE_CHECKING, Any, Collection, Iterator, Optional

from absl import logging
import jax

from har_jax import config as config_lib
from har_jax import sharding

if TYPE_CHECKING:  # the annotations; the train step runs without ml_collections
  import ml_collections

CONFIG_FILE = "config.json"
STARTS_FILE = "starts.jsonl"
LOCK_FILE = "lock"

# Raised by flock where another process holds the lock.
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class WorkdirError(config_lib.ConfigError):
  """The folder holds another run (its config or checkpoints) or a live one; the
  message says what to do."""


def read_json(path: str) -> Optional[Any]:
  """The JSON value in ``path``, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_json(path: str, value: Any) -> None:
  """Writes ``value`` to ``path`` whole or not at all (write, then rename)."""
  temporary = path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(temporary, path)


def config_differences(recorded: dict, config: ml_collections.ConfigDict, *,
                       restart_safe: Collection[str] = config_lib.RESTART_SAFE_FIELDS,
                       defaults: Optional[ml_collections.ConfigDict] = None) -> list:
  """``"FIELD RECORDED there, NOW now"`` for every field outside ``restart_safe``
  whose value in ``config`` differs from ``recorded`` (a config as JSON).

  Args:
    defaults: the values of fields ``recorded`` lacks (fields added to the
      config since it was written); default :func:`har_jax.config.base_config`.
  """
  defaults = _as_json(config_lib.base_config() if defaults is None else defaults)
  current = _as_json(config)
  missing = object()
  differences = []
  for name in sorted(set(recorded) | set(current)):
    if name in restart_safe:
      continue
    before = recorded.get(name, defaults.get(name, missing))
    now = current.get(name, missing)
    if before != now:
      differences.append(f"{name} {_shown(before, missing)} there, "
                         f"{_shown(now, missing)} now")
  return differences


def check_config(directory: str, config: ml_collections.ConfigDict, **kwargs) -> None:
  """Raises WorkdirError when ``directory`` records a config that differs from
  ``config`` (see :func:`config_differences` for ``kwargs``); reads only."""
  path = os.path.join(directory, CONFIG_FILE)
  recorded = read_json(path)
  if recorded is None:
    return
  differences = config_differences(recorded, config, **kwargs)
  if differences:
    raise WorkdirError(
        f"{directory} holds a run of another config: {'; '.join(differences)}. "
        f"Rerun with the config in {path}, or give this config a new workdir.")


class Claim:
  """A folder claimed by :func:`claim`."""

  def __init__(self, directory: str, config: ml_collections.ConfigDict):
    self.directory = directory
    self._config = config

  def record_start(self) -> None:
    """Appends this start to ``DIR/starts.jsonl`` and writes ``DIR/config.json``
    (process 0); call it once the stage's checks of the folder passed."""
    if jax.process_index() > 0:
      return
    start = {**_this_process(), "processes": jax.process_count(),
             "config": _as_json(self._config)}
    with open(os.path.join(self.directory, STARTS_FILE), "a", encoding="utf-8") as f:
      f.write(json.dumps(start, sort_keys=True) + "\n")
    write_json(os.path.join(self.directory, CONFIG_FILE), start["config"])


@contextlib.contextmanager
def claim(directory: str, config: ml_collections.ConfigDict, **kwargs) -> Iterator[Claim]:
  """Makes ``directory`` this run's for the duration (see the module docstring).

  Every process of the run enters it; process 0 locks and checks.
  ``kwargs`` are those of :func:`config_differences`.

  Raises:
    WorkdirError: another live run holds the folder, or it records another
      config. Nothing has been written then, beyond the lock file.
  """
  lock, error = None, None
  try:
    if jax.process_index() == 0:
      try:
        lock = _lock(directory)
        check_config(directory, config, **kwargs)
      except WorkdirError as refused:
        error = refused
    if not sharding.on_every_process([error is None])[0]:
      raise error or WorkdirError(
          f"process 0 refused {directory}; its error message says why.")
    yield Claim(directory, config)
  finally:
    if lock is not None:
      os.close(lock)  # releases the lock


def _lock(directory: str) -> Optional[int]:
  """Takes ``DIR/lock`` and writes the holder into it; returns its descriptor,
  or None where the file system has no locks."""
  try:
    os.makedirs(directory, exist_ok=True)
    descriptor = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT,
                         0o644)
  except OSError as error:
    raise WorkdirError(f"cannot write to {directory}: {error.strerror}; choose a "
                       "workdir this process may write to.") from None
  try:
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as error:
    if error.errno not in _HELD:
      # Some network file systems have no locks; the run goes on unguarded.
      logging.warning("Cannot lock %s (%s): a second run started on it would not "
                      "be stopped.", directory, error.strerror)
      os.close(descriptor)
      return None
    holder = os.read(descriptor, 4096).decode("utf-8", "replace")
    os.close(descriptor)
    raise WorkdirError(f"{directory} is in use by a live run ({_holder(holder)}); "
                       "wait for it to end, or give this run another workdir.") from None
  os.ftruncate(descriptor, 0)
  os.pwrite(descriptor, json.dumps(_this_process()).encode("utf-8"), 0)
  return descriptor


def _holder(text: str) -> str:
  try:
    holder = json.loads(text)
    return f"host {holder['host']}, pid {holder['pid']}, since {holder['time']}"
  except (ValueError, KeyError, TypeError):
    return "its host and pid are not written yet"


def _this_process() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds")}


def _as_json(config: ml_collections.ConfigDict) -> dict:
  """The config as its JSON file holds it (tuples as lists)."""
  return json.loads(json.dumps(config.to_dict()))


def _shown(value, missing) -> str:
  return "(absent)" if value is missing else json.dumps(value)
