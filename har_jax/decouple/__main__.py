"""The second stage on a finished run (har_jax.decouple has the definitions):

  python -m har_jax.decouple --workdir=RUN --method=crt|lws|tau_norm|logit_adjust \
      [--config.FIELD=VALUE ...]

``--config.FIELD=VALUE`` sets a field of the stage's config
(``decouple.stage_config``: the run's config with the method's recipe). Writes
``RUN/decoupled/METHOD/``; the same command again resumes or returns the finished
summary. Bad input is one line and exit status 2, before anything is written.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from har_jax import cli
from har_jax import config as config_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's folder.")
_METHOD = flags.DEFINE_string("method", None, "crt, lws, tau_norm or logit_adjust.")
_CONFIG = config_flags.DEFINE_config_dict(
    "config", config_lib.base_config(), "The stage's config: the run's, with the "
    "method's recipe; set a field with --config.FIELD=VALUE.", lock_config=True)
_PROCESSES = cli.define_process_flags()


def main(argv):
  cli.no_positional_arguments(argv)
  if _WORKDIR.value is None:
    cli.usage_error("--workdir is required: the folder of the finished run to decouple.")
  from har_jax import decouple  # pylint: disable=g-import-not-at-top
  if _METHOD.value not in decouple.METHODS:
    cli.usage_error(f"--method must be one of {list(decouple.METHODS)}, got "
                    f"{_METHOD.value!r}.")
  cli.initialize_processes(_PROCESSES)
  cli.quiet_libraries()
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  cli.report(lambda: decouple.run(_WORKDIR.value, _METHOD.value, overrides))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
