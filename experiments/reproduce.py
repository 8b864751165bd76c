"""Runs the grid behind the paper's CIFAR-LT tables and writes them as Markdown.

  python experiments/reproduce.py --workdir=runs/paper
  python experiments/reproduce.py --workdir=/tmp/smoke --smoke   # mock data, seconds a run

Every (data set, imbalance factor, method, seed) is one run of the trainer in
WORKDIR/<dataset>_r<rho>/<method>/seed<k>. A run whose summary.json is written
is skipped, and an interrupted run resumes from its checkpoints, so the same
command continues the grid. Each cell's folder holds one run (har_jax/workdir.py):
when any cell's folder records another config than the grid asks for (other
--overrides, say), the grid stops before it runs anything, with one line per
such cell naming the fields; a cell another live process is running is left
to it and reported as failed. The table (WORKDIR/results.md, also printed) gives
Many / Medium / Few / All test accuracy (%) and the FLOPs saving (%) as mean ±
std over seeds, beside the published top-1 accuracy where
experiments/paper_results.json has it.
"""

import contextlib
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from har_jax import config as config_lib
from har_jax import runtime
from har_jax import train
from har_jax import workdir

METHODS = {
    # name: (loss, har, DRW, exits); single-exit methods use the plain backbone.
    "CE": ("ce", False, False, "CBBBE"),
    "Focal": ("focal", False, False, "CBBBE"),
    "CE+DRW": ("ce", False, True, "CBBBE"),
    "HAR(CE)+DRW": ("ce", True, True, "CBEBEBE"),
    "LDAM+DRW": ("ldam", False, True, "CBBBE"),
    "HAR(LDAM)+DRW": ("ldam", True, True, "CBEBEBE"),
}
DATASETS = ("cifar10", "cifar100")
COLUMNS = ("many", "medium", "few", "accuracy", "flops_saving")
PAPER_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "paper_results.json")
# Smoke: a tiny network for a few steps on tfds mock data.
SMOKE = dict(model="resnet8", num_train_steps=2, batch_size=16, eval_batch_size=40,
             warmup_epochs=0, drw_start_epoch=1, lr_decay_epochs=(1,),
             log_every_steps=1, checkpoint_every_steps=2, shot_many=50, shot_few=10)

flags.DEFINE_string("workdir", None, "Root folder of the grid's runs.")
flags.DEFINE_list("datasets", list(DATASETS), "Data sets.")
flags.DEFINE_list("imbalance_factors", ["100", "50", "10"], "Imbalance factors.")
flags.DEFINE_list("methods", list(METHODS), "Methods (rows of the table).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every setting.")
flags.DEFINE_list("overrides", [], "Extra FIELD=VALUE config overrides for every run, "
                  "e.g. num_epochs=10.")
flags.DEFINE_bool("smoke", False, "Run the whole grid for a few steps on mock data "
                  "(no download) to check that everything runs.")
FLAGS = flags.FLAGS


class UsageError(ValueError):
  pass


def run_config(dataset: str, rho: float, method: str, seed: int, smoke: bool,
               overrides=()) -> "config_lib.ml_collections.ConfigDict":
  """The trainer config of one cell of the grid."""
  loss, har, drw, exits = METHODS[method]
  config = config_lib.cifar_lt_config(dataset)
  config.update(imbalance_factor=rho, loss=loss, har=har, exits=exits, seed=seed,
                head="auto", tfds_download=not smoke)
  if not drw:
    config.drw_start_epoch = -1
  if smoke:
    config.update({k: v for k, v in SMOKE.items()
                   if k != "drw_start_epoch" or drw})
  for override in overrides:
    name, _, value = override.partition("=")
    if name not in config:
      raise UsageError(f"--overrides: unknown config field {name!r}.")
    current = config[name]
    try:
      if isinstance(current, bool):
        parsed = {"true": True, "false": False}[value.lower()]
      elif isinstance(current, tuple):
        parsed = tuple(int(v) for v in value.split(",") if v)
      else:
        parsed = type(current)(value)
    except (KeyError, ValueError):
      raise UsageError(f"--overrides: {name}={value!r} is not a "
                       f"{type(current).__name__}.") from None
    config[name] = parsed
  return config


def run_dir(root: str, dataset: str, rho: float, method: str, seed: int) -> str:
  return os.path.join(root, f"{dataset}_r{rho:g}", method.replace("+", "_"), f"seed{seed}")


def refused_cells(root: str, configs: dict) -> list:
  """One line for each cell of ``configs`` (cell -> config) whose folder records
  another config; such a cell is neither run nor counted."""
  refused = []
  for cell, config in configs.items():
    try:
      workdir.check_config(run_dir(root, *cell), config)
    except workdir.WorkdirError as error:
      refused.append(str(error))
  return refused


def aggregate(summaries: list) -> dict:
  """Mean and std (over seeds, in %) of each column; the seeds that finished."""
  row = {"seeds": len(summaries)}
  for column in COLUMNS:
    values = [100 * s[column] for s in summaries if s.get(column) is not None]
    if values:
      row[column] = (float(np.mean(values)), float(np.std(values)))
  return row


def markdown_table(results: dict, paper: dict, datasets, rhos, methods) -> str:
  """One table per (data set, rho): rows are methods."""
  def cell(row, column):
    if column not in row:
      return "—"
    mean, std = row[column]
    return f"{mean:.2f} ± {std:.2f}" if row["seeds"] > 1 else f"{mean:.2f}"

  lines = []
  for dataset in datasets:
    for rho in rhos:
      lines += [f"### {dataset}-LT, imbalance factor {rho:g}", "",
                "| method | seeds | many | medium | few | all | FLOPs saving | paper (all) |",
                "|---|---|---|---|---|---|---|---|"]
      for method in methods:
        row = results.get((dataset, rho, method), {"seeds": 0})
        published = paper.get(dataset, {}).get(f"{rho:g}", {}).get(method)
        lines.append(f"| {method} | {row['seeds']} | " +
                     " | ".join(cell(row, c) for c in COLUMNS) +
                     f" | {'—' if published is None else f'{published:.2f}'} |")
      lines.append("")
  return "\n".join(lines)


def main(argv):
  del argv
  try:
    rhos = [float(r) for r in FLAGS.imbalance_factors]
    seeds = [int(s) for s in FLAGS.seeds]
    for name, values, allowed in (("datasets", FLAGS.datasets, DATASETS),
                                  ("methods", FLAGS.methods, METHODS)):
      unknown = [v for v in values if v not in allowed]
      if unknown:
        raise UsageError(f"--{name}: unknown {unknown}; choose from {list(allowed)}.")
    cells = [(d, r, m, s) for d in FLAGS.datasets for r in rhos
             for m in FLAGS.methods for s in seeds]
    configs = {cell: run_config(*cell, FLAGS.smoke, FLAGS.overrides) for cell in cells}
  except (UsageError, ValueError) as error:
    print(f"reproduce: error: {error}", file=sys.stderr)
    sys.exit(2)
  refused = refused_cells(FLAGS.workdir, configs)
  if refused:
    for message in refused:
      print(f"reproduce: error: {message}", file=sys.stderr)
    sys.exit(2)

  if FLAGS.smoke:
    from har_jax.data import mock  # pylint: disable=g-import-not-at-top
    context = contextlib.ExitStack()
    context.enter_context(mock.mock_tfds(train_per_class=100, test_per_class=4))
    # Every run of the grid compiles programs of its own, which would take far
    # longer than the few steps it runs. Executed op by op, the runs share
    # the compiled operations instead; the computation is the same.
    context.enter_context(jax.disable_jit())
  else:
    context = contextlib.nullcontext()
  with open(PAPER_RESULTS) as f:
    paper = json.load(f)["accuracy"]
  # A resumed grid loads the programs its runs compiled; equal programs are shared.
  runtime.enable_compilation_cache()

  summaries, failed = {}, []
  started = time.time()
  with context:
    for index, cell in enumerate(cells):
      directory = run_dir(FLAGS.workdir, *cell)
      summary_path = os.path.join(directory, "summary.json")
      label = f"[{index + 1}/{len(cells)}] {cell[0]} rho={cell[1]:g} {cell[2]} seed={cell[3]}"
      if os.path.exists(summary_path):
        print(f"{label}: finished before, skipped", flush=True)
      else:
        print(f"{label}: running in {directory}", flush=True)
        run_started = time.time()
        try:
          train.train_and_evaluate(configs[cell], directory)
          print(f"{label}: done in {time.time() - run_started:.0f} s", flush=True)
        except train.Preempted as error:
          print(f"reproduce: {error}; rerun the same command to continue the grid.",
                file=sys.stderr)
          sys.exit(train.PREEMPTED_EXIT_CODE)
        except (config_lib.ConfigError, train.NonFiniteLossError) as error:
          # One bad cell does not stop the grid; the table shows it as missing.
          logging.error("%s failed: %s", label, error)
          failed.append(label)
          continue
      with open(summary_path) as f:
        summaries.setdefault(cell[:3], []).append(json.load(f))
  results = {key: aggregate(value) for key, value in summaries.items()}
  table = markdown_table(results, paper, FLAGS.datasets, rhos, FLAGS.methods)
  header = (f"Test accuracy (%) and FLOPs saving (%), mean ± std over seeds "
            f"{FLAGS.seeds}{' (SMOKE: mock data, a few steps)' if FLAGS.smoke else ''}."
            f" Paper: published top-1 accuracy (experiments/paper_results.json).\n\n")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "results.md"), "w") as f:
    f.write(header + table)
  print(header + table)
  print(f"{len(cells) - len(failed)} of {len(cells)} runs finished in "
        f"{time.time() - started:.0f} s; table in {FLAGS.workdir}/results.md")
  if failed:
    print("failed: " + "; ".join(failed), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  # Here, not at import: tests import this module beside other flag users.
  flags.mark_flag_as_required("workdir")
  app.run(main)
