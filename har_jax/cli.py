"""What the command-line entry points share: usage errors, flag parsing, quiet logs.

``python -m har_jax.main`` and ``python -m har_jax.decouple`` report every bad
input as one line ``har_jax: error: ...`` and exit with status 2, before anything
is written.
"""

import json
import logging as std_logging
import sys
from typing import Callable

from absl import flags
from absl import logging

USAGE_ERROR = 2


def usage_error(message: str) -> None:
  """Prints ``har_jax: error: MESSAGE`` and exits with status 2."""
  print(f"har_jax: error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def parse_flags(argv):
  """absl's flag parser, with its errors (a misspelt ``--config.FIELD`` among
  them) turned into usage errors."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    # What ml_collections raises for a --config.FIELD the config lacks.
    usage_error(f"unknown config field {str(error).strip(chr(34))}; the fields "
                "are listed in har_jax/config.py:base_config.")
  except (flags.Error, TypeError, ValueError) as error:
    usage_error(f"{str(error).strip(chr(34))} (see --helpfull for the flags; the "
                "config fields are in har_jax/config.py)")


def quiet_libraries() -> None:
  """Keeps the libraries' INFO chatter (orbax logs every save) out of the progress."""
  if logging.get_verbosity() > logging.INFO:
    return
  def keep(record):
    return record.levelno >= std_logging.WARNING or "/har_jax/" in record.pathname
  # ABSLHandler hands records to its python_handler without applying its own filters.
  logging.get_absl_handler().python_handler.addFilter(keep)


def report(stage: Callable[[], dict]) -> None:
  """Runs a stage that returns a summary and prints the summary as one JSON line.

  The stage keeps what it compiles in JAX's persistent compilation cache
  (``har_jax.runtime``), so a resumed or repeated stage loads its programs; the
  log says where the cache is and, at the end, how many programs were loaded
  and written. A preempted stage exits with ``train.PREEMPTED_EXIT_CODE`` (its
  checkpoint is saved; the same command resumes), a config it cannot run with a
  usage error, a non-finite loss with status 1.
  """
  # Imported here so that --help and usage errors stay fast.
  from har_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from har_jax import runtime  # pylint: disable=g-import-not-at-top
  from har_jax import train  # pylint: disable=g-import-not-at-top
  cache = runtime.enable_compilation_cache()
  logging.info("Persistent compilation cache: %s", cache or "off (JAX_ENABLE_COMPILATION_CACHE)")
  try:
    summary = stage()
  except train.Preempted as preempted:
    logging.warning("%s", preempted)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except config_lib.ConfigError as error:
    usage_error(str(error))
  except train.NonFiniteLossError as error:
    print(f"har_jax: {error}", file=sys.stderr)
    sys.exit(1)
  if cache:
    logging.info("Compilation cache: %(loaded)d program(s) loaded, %(written)d written.",
                 runtime.compilation_cache_events())
  print(json.dumps(summary, sort_keys=True))


def define_process_flags() -> tuple:
  """``--coordinator_address``, ``--num_processes``, ``--process_id``: the
  arguments of ``jax.distributed.initialize`` for a multi-process run."""
  return (
      flags.DEFINE_string("coordinator_address", None,
                          "host:port of process 0 (multi-process runs)."),
      flags.DEFINE_integer("num_processes", None,
                           "Number of processes (multi-process runs)."),
      flags.DEFINE_integer("process_id", None,
                           "Index of this process (multi-process runs)."))


def no_positional_arguments(argv) -> None:
  if len(argv) > 1:
    usage_error(f"unexpected arguments {argv[1:]}; flags take the form --name=value.")


def initialize_processes(process_flags: tuple) -> None:
  """Starts ``jax.distributed`` from :func:`define_process_flags`'s flags."""
  from har_jax import sharding  # pylint: disable=g-import-not-at-top
  try:
    sharding.initialize_distributed(*(flag.value for flag in process_flags))
  except ValueError as error:
    usage_error(str(error))
