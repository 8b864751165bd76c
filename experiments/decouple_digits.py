"""Does the second stage re-balance the default run? Stage one and each method, per seed.

  python experiments/decouple_digits.py --workdir=DIR [--seeds=0,1,2]
      [--methods=crt,lws,tau_norm,logit_adjust]

Trains the default digits run (configs/default.py) once per seed into
``DIR/seed<S>`` (or reuses a finished one), runs each method on it
(``decouple.run``, the recipes of ``decouple.stage_config``) and prints, per
seed and method, the test accuracy, the shot groups (the digits' few-shot
classes have 11-19 training images), the last exit's accuracy and the FLOPs
saving beside stage one's. The last line is one JSON object with every number.
"""

import importlib.util
import json
import os

from absl import app
from absl import flags
from absl import logging

from har_jax import decouple
from har_jax import train

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go.", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the default run.")
_METHODS = flags.DEFINE_list("methods", list(decouple.METHODS), "Second stages to run.")
_FIELDS = ("accuracy", "many", "medium", "few", "flops_saving")


def default_config():
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "default.py")
  spec = importlib.util.spec_from_file_location("default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _row(name, summary):
  numbers = " ".join(f"{field} {100 * summary[field]:5.1f}" for field in _FIELDS)
  return f"{name:>13}: {numbers} last-exit {100 * summary['per_exit_accuracy'][-1]:5.1f}"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  results = {}
  for seed in map(int, _SEEDS.value):
    run_dir = os.path.join(_WORKDIR.value, f"seed{seed}")
    config = default_config()
    config.seed = seed
    stage_one = train.train_and_evaluate(config, run_dir)
    results[seed] = {"stage_one": stage_one}
    print(f"seed {seed}\n{_row('stage one', stage_one)}", flush=True)
    for method in _METHODS.value:
      summary = decouple.run(run_dir, method)
      results[seed][method] = summary
      print(_row(method, summary), flush=True)
  for method in _METHODS.value:
    raised = sum(results[seed][method]["few"] > results[seed]["stage_one"]["few"]
                 for seed in results)
    print(f"{method}: few-shot accuracy above stage one's on {raised} of "
          f"{len(results)} seeds")
  print(json.dumps({str(seed): {name: {field: summary[field] for field in
                                       (*_FIELDS, "per_exit_accuracy", "exit_threshold")}
                                for name, summary in by_method.items()}
                    for seed, by_method in results.items()}, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
