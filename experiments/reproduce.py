"""Runs the grid behind every table of the paper and the lecture, and reports it.

  python experiments/reproduce.py --workdir=runs/paper --tables=cifar,lecture
  python experiments/reproduce.py --workdir=runs/paper --tables=imagenet_inat --shard=3/8
  python experiments/reproduce.py --workdir=runs/paper --tables=cifar --print_commands
  python experiments/reproduce.py --workdir=runs/digits --datasets=digits
  python experiments/reproduce.py --workdir=/tmp/smoke --smoke \\
      --tables=cifar,imagenet_inat,imagenet_losses,exits,lecture

The tables are data (experiments/tables.py): rows are a stage-one run (config
fields) and an optional second stage (har_jax.decouple), columns are data set x
imbalance factor. Every (setting, run, seed) is one cell: a training run in
WORKDIR/<setting>/<run>/seed<k>, followed by the second stages that rows ask of
it (WORKDIR/<setting>/<run>/seed<k>/decoupled/<stage>/summary.json). A finished
cell is skipped and an interrupted one resumes from its checkpoints, so the same
command continues the grid; runs that several tables share train once.

Each cell's folder holds one run (har_jax/workdir.py): when a folder records
another config than the grid asks for (other --overrides, say), the grid stops
before it runs anything, with one line per such cell naming the fields.
``--shard=K/N`` runs cells K, K+N, K+2N, ... (K from 1 to N) and
``--print_commands`` prints one shell command per cell (``python -m
har_jax.main ...``, then ``python -m har_jax.decouple ...`` for its stages),
for a job array. Every invocation, and ``--report_only``, rebuilds the reports
from whatever cells have finished:

- WORKDIR/results.md: each table as the paper lays it out, ours as mean ± std
  over seeds beside the published number and the difference;
- WORKDIR/results.json: the same numbers;
- WORKDIR/figures/: per table and setting, accuracy by shot group per row and
  accuracy against FLOPs saving; for the runs of ``--figures_for`` (first seed),
  the talk's two figures: the exits of training examples per shot group over the
  epochs (experiments/training_exits.py) and which test examples exit early
  (experiments/analyze.py, in-memory data sets).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import sys
import time
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging
import jax

from har_jax import config as config_lib
from har_jax import runtime
from har_jax import train
from har_jax import workdir as workdir_lib
import tables as tables_lib

USAGE_ERROR = 2
PAPER_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "paper_results.json")


def smoke_fields(recipe: tables_lib.Recipe, run: tables_lib.Run) -> dict:
  """--smoke: two steps of the recipe's stand-in model on mock data. One image
  size, batch and schedule for every data set, so that the runs share the
  operations compiled for the first one (they run op by op)."""
  fields = dict(model=recipe.smoke_model, num_train_steps=2, batch_size=16,
                eval_batch_size=64, image_size=32, shuffle_buffer=64, warmup_epochs=0,
                lr_decay_epochs=(1,), log_every_steps=1, checkpoint_every_steps=2,
                shot_many=50, shot_few=10, tfds_download=False)
  if run.drw:
    fields["drw_start_epoch"] = 0  # two steps: DRW from the first
  return fields


# --smoke: the second stages' fields (decouple.run's overrides), as smoke_fields.
SMOKE_STAGE_FIELDS = dict(num_train_steps=2, batch_size=16, eval_batch_size=64,
                          log_every_steps=1, checkpoint_every_steps=2)


@contextlib.contextmanager
def smoke_data(dataset: str):
  """tfds mock data for a smoke cell: a long tail can be drawn from 100 images a
  class of an in-memory set; the streaming sets (1,000 and 8,142 classes) get
  one training image a class and 64 test (and validation) images, small JPEGs
  encoded once."""
  from har_jax.data import mock  # pylint: disable=g-import-not-at-top
  if dataset in config_lib.IN_MEMORY_DATASETS:
    counts = dict(train_per_class=100, test_per_class=4)
  else:
    counts = dict(train_per_class=1, eval_examples=64, jpeg_size=(32, 32))
  with mock.mock_tfds(**counts):
    yield


class UsageError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Cell:
  """One training run of the grid and the second stages applied to it."""

  dataset: str
  rho: Optional[float]
  run: tables_lib.Run
  seed: int
  stages: tuple[str, ...] = ()

  @property
  def setting(self) -> str:
    return tables_lib.setting_key(self.dataset, self.rho)

  @property
  def label(self) -> str:
    return f"{self.setting} {self.run.name} seed={self.seed}"

  def directory(self, root: str) -> str:
    return os.path.join(root, self.setting, run_folder(self.run.name), f"seed{self.seed}")


def run_folder(name: str) -> str:
  """A run's folder name: ``HAR(LDAM)+DRW`` -> ``HAR_LDAM_DRW``."""
  name = name.replace("γ=", "gamma")
  return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def stage_summary_path(directory: str, stage: str) -> str:
  """Where ``python -m har_jax.decouple --workdir=RUN --method=STAGE`` writes."""
  return os.path.join(directory, "decoupled", stage, "summary.json")


@dataclasses.dataclass(frozen=True)
class Plan:
  """The selected tables (each with its settings and rows) and their cells."""

  tables: tuple[tuple[tables_lib.Table, tuple, tuple], ...]
  cells: tuple[Cell, ...]
  seeds: tuple[int, ...]


def make_plan(table_names, datasets, rhos, row_names, seeds, smoke: bool) -> Plan:
  """The tables, settings, rows and cells the flags select.

  Raises:
    UsageError: an unknown table, data set or row, or a selection left empty.
  """
  _check_known("tables", table_names, tables_lib.TABLES)
  _check_known("datasets", datasets, tables_lib.RECIPES)
  digits = "digits" in datasets
  if digits and len(datasets) > 1:
    raise UsageError("--datasets=digits runs the tables on the offline set alone; "
                     "give it without other data sets.")
  selected = []
  for name in table_names:
    table = tables_lib.TABLES[name]
    if digits:
      if name not in tables_lib.DIGITS_TABLES:
        raise UsageError(f"--tables: {name} has no digits setting; --datasets=digits "
                         f"runs {list(tables_lib.DIGITS_TABLES)}.")
      settings = tables_lib.DIGITS_SETTINGS
    else:
      settings = tuple(s for s in table.settings
                       if (not datasets or s[0] in datasets)
                       and (rhos is None or s[1] is None or s[1] in rhos))
    if smoke:  # every row once: in its table's first column
      settings = settings[:1]
    rows = tuple(r for r in table.rows if not row_names or r.name in row_names)
    if settings and rows:
      selected.append((table, settings, rows))
  known_rows = {r.name for name in table_names for r in tables_lib.TABLES[name].rows}
  _check_known("methods", row_names, known_rows)
  if not selected:
    raise UsageError("the selection holds no cell: --tables, --datasets, "
                     "--imbalance_factors and --methods select nothing together.")
  seeds = tuple(seeds[:1]) if smoke else tuple(seeds)
  # Seeds outermost: a partial grid has every row of seed 0 first.
  cells, fields_of = {}, {}
  for seed in seeds:
    for table, settings, rows in selected:
      for dataset, rho in settings:
        for row in rows:
          fields = row.run.fields(tables_lib.RECIPES[dataset])
          known = fields_of.setdefault((dataset, row.run.name), fields)
          assert known == fields, f"two runs named {row.run.name}: {known} {fields}"
          key = (dataset, rho, row.run, seed)
          cell = cells.get(key, Cell(dataset, rho, row.run, seed))
          if row.stage and row.stage not in cell.stages:
            cell = dataclasses.replace(cell, stages=cell.stages + (row.stage,))
          cells[key] = cell
  return Plan(tuple(selected), tuple(cells.values()), seeds)


def _check_known(name: str, values, allowed) -> None:
  unknown = [v for v in values if v not in allowed]
  if unknown:
    raise UsageError(f"--{name}: unknown {unknown}; choose from {sorted(allowed)}.")


def parse_overrides(config, overrides) -> None:
  """Applies ``FIELD=VALUE`` strings to ``config``, each parsed as its field's type."""
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


def run_config(cell: Cell, smoke: bool, overrides=()):
  """The trainer config of ``cell``: its recipe, its run's fields, the smoke's
  shrink, then ``overrides``."""
  recipe = tables_lib.RECIPES[cell.dataset]
  config = recipe.config()
  config.update(dict(dataset=cell.dataset, seed=cell.seed))
  if cell.rho is not None:
    config.imbalance_factor = cell.rho
  config.update(cell.run.fields(recipe))
  if smoke:
    config.update(smoke_fields(recipe, cell.run))
  parse_overrides(config, overrides)
  return config


def refused_cells(root: str, configs: dict) -> list:
  """One line for each cell of ``configs`` (cell -> config) whose folder records
  another config; such a cell is neither run nor counted."""
  refused = []
  for cell, config in configs.items():
    try:
      workdir_lib.check_config(cell.directory(root), config)
    except workdir_lib.WorkdirError as error:
      refused.append(str(error))
  return refused


def parse_shard(shard: str) -> Optional[tuple[int, int]]:
  """``"K/N"`` -> (K, N) with 1 <= K <= N; ``""`` -> None."""
  if not shard:
    return None
  match = re.fullmatch(r"(\d+)/(\d+)", shard)
  if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
    raise UsageError(f"--shard={shard}: give K/N with 1 <= K <= N, e.g. 1/4 for the "
                     "first of four shards.")
  return int(match.group(1)), int(match.group(2))


def shard_cells(cells, shard: Optional[tuple[int, int]]):
  """Cells K, K + N, K + 2N, ... (1-based) of ``cells`` for shard (K, N)."""
  if shard is None:
    return list(cells)
  index, count = shard
  return [cell for i, cell in enumerate(cells) if i % count == index - 1]


def missing_data(datasets, data_dir: str) -> list:
  """One line for each tfds data set that is neither prepared nor preparable
  now (a manual download missing)."""
  from har_jax.data import tfds_sources  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  problems = []
  for dataset in datasets:
    if dataset not in tfds_sources.SOURCES:
      continue
    source = tfds_sources.SOURCES[dataset]
    if tfds.builder(source.tfds_name, data_dir=data_dir or None).is_prepared():
      continue
    manual = tfds_sources.manual_dir(data_dir or None)
    absent = [f for f in source.manual_files if not os.path.exists(os.path.join(manual, f))]
    if absent:
      problems.append(f"{dataset} is not prepared and needs a manual download: place "
                      f"{', '.join(absent)} in {manual} (README, Data), or leave it out "
                      "with --datasets.")
  return problems


def cell_command(cell: Cell, config, root: str) -> str:
  """The shell command that runs ``cell`` without this script: har_jax.main with
  the recipe's config file and the fields that differ from it, then
  har_jax.decouple for each stage."""
  recipe = tables_lib.RECIPES[cell.dataset]
  base = tables_lib.load_config_file(recipe.config_file)
  directory = cell.directory(root)
  words = ["python", "-m", "har_jax.main", f"--config=configs/{recipe.config_file}",
           f"--workdir={directory}"]
  for name in sorted(config.keys()):
    if config[name] != base[name]:
      words.append(f"--config.{name}={_flag_value(config[name])}")
  commands = [" ".join(shlex.quote(w) for w in words)]
  for stage in cell.stages:
    commands.append(" ".join(shlex.quote(w) for w in (
        "python", "-m", "har_jax.decouple", f"--workdir={directory}",
        f"--method={stage}")))
  return " && ".join(commands)


def _flag_value(value) -> str:
  if isinstance(value, tuple):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def _stage_runner() -> Optional[Callable]:
  """``(run directory, stage, smoke) -> summary`` of har_jax.decouple, or None
  while this checkout has no har_jax.decouple (issue 13)."""
  try:
    from har_jax import decouple  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return lambda directory, stage, smoke: decouple.run(
      directory, stage, SMOKE_STAGE_FIELDS if smoke else None)


class _Progress:
  """Cell k of N, the cells skipped, and the time left at the pace so far."""

  def __init__(self, total: int):
    self.total, self.done, self.skipped, self.seconds = total, 0, 0, 0.0

  def line(self, index: int, cell: Cell, what: str) -> str:
    return f"[{index + 1}/{self.total}] {cell.label}: {what}"

  def finished(self, seconds: Optional[float]) -> str:
    if seconds is None:
      self.skipped += 1
      return ""
    self.done += 1
    self.seconds += seconds
    remaining = self.total - self.done - self.skipped
    left = self.seconds / self.done * remaining
    return (f" ({self.skipped} skipped so far, {remaining} to run, about "
            f"{left / 60:.0f} min left)")


def run_cells(cells, configs, root: str, smoke: bool) -> tuple[list, list]:
  """Trains every cell that has no summary and applies its missing stages.

  Returns:
    (failed, unavailable): labels of the cells that failed, and of the stages
    that could not run because har_jax.decouple is missing.
  """
  stage_runner = _stage_runner()
  failed, unavailable = [], []
  progress = _Progress(len(cells))
  for index, cell in enumerate(cells):
    directory = cell.directory(root)
    summary_path = os.path.join(directory, "summary.json")
    todo_stages = [s for s in cell.stages
                   if not os.path.exists(stage_summary_path(directory, s))]
    if os.path.exists(summary_path) and (not todo_stages or stage_runner is None):
      note = progress.finished(None)
      print(progress.line(index, cell, "finished before, skipped") + note, flush=True)
      unavailable += [f"{cell.label} {s}" for s in todo_stages]
      continue
    print(progress.line(index, cell, f"running in {directory}"), flush=True)
    started = time.time()
    context = smoke_data(cell.dataset) if smoke else contextlib.nullcontext()
    try:
      with context:
        if not os.path.exists(summary_path):
          train.train_and_evaluate(configs[cell], directory)
        for stage in todo_stages:
          if stage_runner is None:
            unavailable.append(f"{cell.label} {stage}")
          else:
            stage_runner(directory, stage, smoke)
    except train.Preempted as error:
      print(f"reproduce: {error}; rerun the same command to continue the grid.",
            file=sys.stderr)
      sys.exit(train.PREEMPTED_EXIT_CODE)
    except (config_lib.ConfigError, train.NonFiniteLossError) as error:
      # One bad cell does not stop the grid; the table shows it as missing.
      logging.error("%s failed: %s", cell.label, error)
      print(progress.line(index, cell, f"FAILED: {error}"), flush=True)
      failed.append(cell.label)
      progress.finished(time.time() - started)
      continue
    seconds = time.time() - started
    note = progress.finished(seconds)
    print(progress.line(index, cell, f"done in {seconds:.0f} s") + note, flush=True)
  if unavailable:
    print(f"reproduce: {len(unavailable)} second stage(s) not run: har_jax.decouple is "
          "not in this checkout yet (issue 13); their rows show as missing.", flush=True)
  return failed, unavailable


def cell_summaries(plan: Plan, root: str) -> dict:
  """(setting, run name, stage or None) -> the summaries of its finished seeds."""
  found = {}
  for cell in plan.cells:
    directory = cell.directory(root)
    for stage in (None, *cell.stages):
      path = (os.path.join(directory, "summary.json") if stage is None
              else stage_summary_path(directory, stage))
      summary = workdir_lib.read_json(path)
      if summary is not None:
        found.setdefault((cell.setting, cell.run.name, stage), []).append(summary)
  return found


def talk_figures(plan: Plan, root: str, run_names, smoke: bool) -> list[str]:
  """The talk's two figures for the runs named ``run_names`` (first seed), in
  WORKDIR/figures/talk/: the exits of training examples per shot group over the
  epochs, and which test examples exit early (analyze.py's exit_by_group.png;
  in-memory data sets only). A figure newer than its run's summary is kept."""
  import analyze  # pylint: disable=g-import-not-at-top
  import training_exits  # pylint: disable=g-import-not-at-top
  output = os.path.join(root, "figures", "talk")
  written = []
  for cell in plan.cells:
    if cell.seed != plan.seeds[0] or cell.run.name not in run_names:
      continue
    directory = cell.directory(root)
    summary = os.path.join(directory, "summary.json")
    if not os.path.exists(summary):
      continue
    stem = os.path.join(output, f"{cell.setting}_{run_folder(cell.run.name)}")
    training, early = stem + "_training_exits.png", stem + "_exit_by_group.png"
    if not _newer(training, summary):
      written.append(training_exits.plot_run(directory, training))
    if cell.dataset in config_lib.IN_MEMORY_DATASETS and not _newer(early, summary):
      with smoke_data(cell.dataset) if smoke else contextlib.nullcontext():
        analyze.run_analysis(directory, max_accuracy_drop=None)
      shutil.copyfile(os.path.join(directory, "analysis", "exit_by_group.png"), early)
      written.append(early)
  return written


def _newer(path: str, than: str) -> bool:
  return os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(than)


def write_reports(plan: Plan, root: str, smoke: bool, figures: bool) -> str:
  """results.md, results.json and the per-table figures from the finished
  cells; returns results.md's text."""
  import tables_report  # pylint: disable=g-import-not-at-top
  paper = workdir_lib.read_json(PAPER_RESULTS)["tables"]
  summaries = cell_summaries(plan, root)
  header = (f"# Reproduction of the paper's tables\n\nOurs: test accuracy and FLOPs "
            f"saving (%), mean ± std over seeds {list(plan.seeds)}"
            f"{' (SMOKE: mock data, two steps: the numbers mean nothing)' if smoke else ''}"
            "; paper: the published number (experiments/paper_results.json) and our "
            "difference from it. — : not run or not finished.\n")
  if any(dataset == "digits" for _, settings, _ in plan.tables for dataset, _ in settings):
    header += ("\nOn digits, the offline default set (ResNet-8, 8x8 digits x10, the CIFAR "
               "recipe at 30 epochs), not the tables' own data: no published numbers.\n")
  sections, results = [header], {}
  for table, settings, rows in plan.tables:
    numbers = tables_report.table_results(table, settings, rows, summaries, paper)
    notes = {row: entry["note"] for row, entry in paper.get(table.name, {}).items()
             if "note" in entry}
    sections.append(tables_report.table_markdown(table, settings, rows, numbers,
                                                 len(plan.seeds), notes))
    results[table.name] = {"title": table.title, "rows": numbers}
    if figures:
      tables_report.plot_table(table, settings, rows, numbers,
                               os.path.join(root, "figures"))
  text = "\n".join(sections)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "results.md.tmp"), "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(os.path.join(root, "results.md.tmp"), os.path.join(root, "results.md"))
  workdir_lib.write_json(os.path.join(root, "results.json"),
                         {"seeds": list(plan.seeds), "smoke": smoke, "tables": results})
  return text


flags.DEFINE_string("workdir", None, "Root folder of the grid's runs and reports.")
flags.DEFINE_list("tables", ["cifar"], f"Tables: {', '.join(tables_lib.TABLES)}.")
flags.DEFINE_list("datasets", [], "Only these data sets (default: every data set of the "
                  "tables); 'digits' runs the cifar and lecture tables on the offline "
                  "default set.")
flags.DEFINE_list("imbalance_factors", [], "Only these imbalance factors (default: the "
                  "tables').")
flags.DEFINE_list("methods", [], "Only these rows (default: every row).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every setting.")
flags.DEFINE_list("overrides", [], "Extra FIELD=VALUE config overrides for every run, "
                  "e.g. num_epochs=10.")
flags.DEFINE_bool("smoke", False, "Every row once (first seed, its table's first "
                  "column), two steps of a tiny model on tfds mock data (no download), to "
                  "check that everything runs.")
flags.DEFINE_string("shard", "", "K/N: run only cells K, K+N, K+2N, ... (1 <= K <= N), "
                    "e.g. --shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.")
flags.DEFINE_bool("print_commands", False, "Print one shell command per cell (of the "
                  "shard) and exit, for a job array.")
flags.DEFINE_bool("report_only", False, "Rebuild the reports from the finished cells; "
                  "run nothing.")
flags.DEFINE_bool("figures", True, "Draw the figures (per table; the talk's two for "
                  "--figures_for).")
flags.DEFINE_list("figures_for", ["HAR(CE)+DRW", "HAR(LDAM)+DRW"],
                  "Runs whose talk figures are drawn (first seed).")
FLAGS = flags.FLAGS


def _usage_error(message: str) -> None:
  print(f"reproduce: error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def main(argv):
  if len(argv) > 1:
    _usage_error(f"unexpected arguments {argv[1:]}; every option is a --flag.")
  try:
    rhos = [float(r) for r in FLAGS.imbalance_factors] or None
    seeds = [int(s) for s in FLAGS.seeds]
    if FLAGS.smoke and FLAGS.print_commands:
      raise UsageError("--print_commands prints the real grid's commands (har_jax.main "
                       "cannot mock data); drop --smoke.")
    plan = make_plan(FLAGS.tables, FLAGS.datasets, rhos, FLAGS.methods, seeds,
                     FLAGS.smoke)
    shard = parse_shard(FLAGS.shard)
    configs = {cell: run_config(cell, FLAGS.smoke, FLAGS.overrides) for cell in plan.cells}
  except ValueError as error:
    _usage_error(str(error))
  mine = shard_cells(plan.cells, shard)
  if FLAGS.print_commands:
    for cell in mine:
      print(cell_command(cell, configs[cell], FLAGS.workdir))
    return
  if not FLAGS.report_only:
    if not FLAGS.smoke:
      data_dir = next(iter(configs.values())).data_dir
      problems = missing_data(sorted({c.dataset for c in mine}), data_dir)
      if problems:
        _usage_error(" ".join(problems))
    refused = refused_cells(FLAGS.workdir, {cell: configs[cell] for cell in mine})
    if refused:
      for message in refused:
        print(f"reproduce: error: {message}", file=sys.stderr)
      sys.exit(USAGE_ERROR)

  if FLAGS.smoke or FLAGS.datasets == ["digits"]:
    # Read when the backend starts, at the first computation.
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}".strip())
  started = time.time()
  failed = []
  with _compilation_cache():
    if not FLAGS.report_only:
      print(f"reproduce: {len(mine)} cells"
            + (f" (shard {FLAGS.shard} of {len(plan.cells)})" if shard else ""), flush=True)
      failed, _ = run_cells(mine, configs, FLAGS.workdir, FLAGS.smoke)
    text = write_reports(plan, FLAGS.workdir, FLAGS.smoke, FLAGS.figures)
    if FLAGS.figures:
      talk_figures(plan, FLAGS.workdir, FLAGS.figures_for, FLAGS.smoke)
  print(text)
  if FLAGS.report_only:
    print(f"reports rebuilt from the finished cells: {FLAGS.workdir}/results.md")
  else:
    print(f"{len(mine) - len(failed)} of {len(mine)} cells finished in "
          f"{time.time() - started:.0f} s; tables in {FLAGS.workdir}/results.md")
  if failed:
    print("failed: " + "; ".join(failed), file=sys.stderr)
    sys.exit(1)


@contextlib.contextmanager
def _compilation_cache():
  """Cells of one setting and seed that share a model compile the same
  initialisation and evaluation programs (the normalisation of each seed's
  long-tailed subset is a constant of the programs, so seeds do not share
  them): a persistent compilation cache (har_jax.runtime's: JAX_COMPILATION_CACHE_DIR, else
  its default; off with JAX_ENABLE_COMPILATION_CACHE=false) compiles each once, and
  a resumed grid loads what its runs compiled."""
  if runtime.enable_compilation_cache() and (
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield


# Without LLVM's optimisations XLA compiles a small CPU program several times
# faster, and compiling is nearly all of the time of a cell whose computation is
# tiny: a smoke cell (two steps; measured against jax.disable_jit, which shares
# the compiled operations between cells but runs each of thousands of operations
# on its own: README, Reproducing the tables) and a cell of the 8x8 digits.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true")


if __name__ == "__main__":
  # Here, not at import: tests import this module beside other flag users.
  flags.mark_flag_as_required("workdir")
  app.run(main)
