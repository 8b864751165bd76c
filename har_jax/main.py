"""Trains and evaluates a HAR / ELF model; the logic lives in har_jax.train.

  python -m har_jax.main --config=configs/default.py --workdir=/tmp/har \
      [--config.FIELD=VALUE ...]

Running the same command in the same workdir resumes from its latest checkpoint;
a config that differs outside har_jax.config.RESTART_SAFE_FIELDS, or a second live
run on the workdir, is refused (har_jax/workdir.py).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from har_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, "
                               "TensorBoard events and summary.json.")
_PROCESSES = cli.define_process_flags()


def main(argv):
  cli.no_positional_arguments(argv)
  if _WORKDIR.value is None:
    cli.usage_error("--workdir is required: checkpoints, logs and summary.json go there.")
  try:
    config = _CONFIG.value
    config.keys()
  except Exception as error:  # pylint: disable=broad-except
    cli.usage_error(f"cannot load --config: {error}")
  # Imported after flag parsing so that --help and usage errors stay fast.
  import jax  # pylint: disable=g-import-not-at-top
  from har_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from har_jax import train  # pylint: disable=g-import-not-at-top
  cli.initialize_processes(_PROCESSES)
  try:
    config_lib.validate(config, num_devices=jax.device_count(),
                        num_processes=jax.process_count())
  except ValueError as error:  # config.ConfigError among them
    cli.usage_error(str(error))
  cli.quiet_libraries()
  logging.info("Config:\n%s", config)
  cli.report(lambda: train.train_and_evaluate(config, _WORKDIR.value))


def run():
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
