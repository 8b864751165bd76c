"""Trains and evaluates a HAR / ELF model; the logic lives in har_jax.train.

  python -m har_jax.main --config=configs/default.py --workdir=/tmp/har \
      [--config.FIELD=VALUE ...]

Running the same command in the same workdir resumes from its latest checkpoint;
a config that differs outside har_jax.config.RESTART_SAFE_FIELDS, or a second live
run on the workdir, is refused (har_jax/workdir.py).
"""

import json
import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

USAGE_ERROR = 2

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, "
                               "TensorBoard events and summary.json.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Index of this process (multi-process runs).")


def _usage_error(message: str) -> None:
  print(f"har_jax: error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    # What ml_collections raises for a --config.FIELD the config lacks.
    _usage_error(f"unknown config field {str(error).strip(chr(34))}; the fields "
                 "are listed in har_jax/config.py:base_config.")
  except (flags.Error, TypeError, ValueError) as error:
    _usage_error(f"{str(error).strip(chr(34))} (see --helpfull for the flags; the "
                 "config fields are in har_jax/config.py)")


def _quiet_libraries() -> None:
  """Keeps the libraries' INFO chatter (orbax logs every save) out of the progress."""
  def keep(record):
    return record.levelno >= std_logging.WARNING or "/har_jax/" in record.pathname
  # ABSLHandler hands records to its python_handler without applying its own filters.
  logging.get_absl_handler().python_handler.addFilter(keep)


def main(argv):
  if len(argv) > 1:
    _usage_error(f"unexpected arguments {argv[1:]}; flags take the form --name=value.")
  if _WORKDIR.value is None:
    _usage_error("--workdir is required: checkpoints, logs and summary.json go there.")
  try:
    config = _CONFIG.value
    config.keys()
  except Exception as error:  # pylint: disable=broad-except
    _usage_error(f"cannot load --config: {error}")
  # Imported after flag parsing so that --help and usage errors stay fast.
  import jax  # pylint: disable=g-import-not-at-top
  from har_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from har_jax import runtime  # pylint: disable=g-import-not-at-top
  from har_jax import sharding  # pylint: disable=g-import-not-at-top
  from har_jax import train  # pylint: disable=g-import-not-at-top
  cache = runtime.enable_compilation_cache()  # a resume loads its programs
  try:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value)
    config_lib.validate(config, num_devices=jax.device_count(),
                        num_processes=jax.process_count())
  except ValueError as error:  # config.ConfigError among them
    _usage_error(str(error))
  if logging.get_verbosity() <= logging.INFO:
    _quiet_libraries()
  logging.info("Config:\n%s", config)
  logging.info("Persistent compilation cache: %s", cache or "off (JAX_ENABLE_COMPILATION_CACHE)")
  try:
    summary = train.train_and_evaluate(config, _WORKDIR.value)
  except train.Preempted as preempted:
    logging.warning("%s", preempted)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except config_lib.ConfigError as error:
    _usage_error(str(error))
  except train.NonFiniteLossError as error:
    print(f"har_jax: {error}", file=sys.stderr)
    sys.exit(1)
  if cache:
    logging.info("Compilation cache: %(loaded)d program(s) loaded, %(written)d written.",
                 runtime.compilation_cache_events())
  print(json.dumps(summary, sort_keys=True))


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
