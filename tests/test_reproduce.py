"""experiments/reproduce.py: the whole grid on mock data, resumable, as Markdown."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "reproduce.py")
sys.path.insert(0, os.path.join(REPO, "experiments"))
import reproduce  # pylint: disable=g-import-not-at-top,wrong-import-position


def _run(*args):
  env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True,
                        text=True, env=env, timeout=3000, check=False)


def test_smoke_runs_the_whole_grid_and_a_rerun_skips_every_run(tmp_path):
  # One seed keeps the suite short; several seeds are the table's business
  # (test_table_gives_mean_and_std_beside_the_paper).
  workdir = str(tmp_path / "grid")
  first = _run(f"--workdir={workdir}", "--smoke", "--seeds=0")
  assert first.returncode == 0, first.stderr[-3000:]
  cells = 2 * 3 * 6
  assert f"{cells} of {cells} runs finished" in first.stdout
  table = open(os.path.join(workdir, "results.md")).read()
  for dataset in reproduce.DATASETS:
    for rho in ("100", "50", "10"):
      assert f"### {dataset}-LT, imbalance factor {rho}" in table
  rows = [line for line in table.splitlines()
          if line.startswith("| ") and not line.startswith("| method")]
  assert len(rows) == cells
  for row in rows:
    fields = row.strip("| ").split(" | ")
    assert fields[1] == "1", f"the run finished: {row}"
    # all and FLOPs saving are always measured (the saving is negative when
    # the exit heads cost more than early exits save); few is a dash where no
    # class of the mock long tail is few-shot.
    assert 0.0 <= float(fields[5]) <= 100.0, row
    assert -100.0 <= float(fields[6]) <= 100.0, row
  # Single-exit methods save no FLOPs; the published number rides along.
  ce = next(r for r in rows if r.startswith("| CE |"))
  assert ce.endswith("| 0.00 | 70.36 |"), ce
  har = next(r for r in rows if r.startswith("| HAR(CE)+DRW |"))
  assert float(har.split(" | ")[6]) != 0.0, f"a multi-exit network: {har}"

  again = _run(f"--workdir={workdir}", "--smoke", "--seeds=0")
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("finished before, skipped") == cells
  assert open(os.path.join(workdir, "results.md")).read() == table


def test_table_gives_mean_and_std_beside_the_paper():
  results = {("cifar10", 100.0, "CE"): reproduce.aggregate([
      {"many": 0.9, "medium": 0.6, "few": 0.2, "accuracy": 0.70, "flops_saving": 0.0},
      {"many": 0.8, "medium": 0.5, "few": 0.4, "accuracy": 0.72, "flops_saving": 0.0}])}
  paper = {"cifar10": {"100": {"CE": 70.36}}}
  table = reproduce.markdown_table(results, paper, ["cifar10"], [100.0], ["CE", "Focal"])
  assert ("| CE | 2 | 85.00 ± 5.00 | 55.00 ± 5.00 | 30.00 ± 10.00 | 71.00 ± 1.00 "
          "| 0.00 ± 0.00 | 70.36 |") in table
  assert "| Focal | 0 | — | — | — | — | — | — |" in table


def test_aggregate_is_mean_and_std_over_seeds_in_percent():
  summaries = [{"many": 0.5, "medium": 0.25, "few": 0.0, "accuracy": 0.4,
                "flops_saving": 0.1},
               {"many": 0.7, "medium": 0.35, "few": 0.1, "accuracy": 0.6,
                "flops_saving": 0.3}]
  row = reproduce.aggregate(summaries)
  assert row["seeds"] == 2
  for column in reproduce.COLUMNS:
    values = [100 * s[column] for s in summaries]
    np.testing.assert_allclose(row[column], (np.mean(values), np.std(values)))


def test_each_method_configures_its_loss_har_drw_and_exits():
  for method, (loss, har, drw, exits) in reproduce.METHODS.items():
    config = reproduce.run_config("cifar100", 50.0, method, 3, smoke=False)
    assert (config.loss, config.har, config.exits) == (loss, har, exits)
    assert (config.drw_start_epoch == 160) == drw and (config.drw_start_epoch < 0) != drw
    assert config.imbalance_factor == 50.0 and config.seed == 3
    assert config.dataset == "cifar100" and config.num_epochs == 200


def test_a_cell_whose_folder_records_another_config_is_refused(tmp_path):
  cells = [("cifar10", 100.0, "CE", 0), ("cifar10", 100.0, "CE", 1),
           ("cifar10", 100.0, "Focal", 0)]
  configs = {cell: reproduce.run_config(*cell, smoke=False) for cell in cells}
  planted = {cells[0]: {"learning_rate": 0.2},  # another experiment
             cells[1]: {"log_every_steps": 7}}  # a field a restart may change
  for cell, change in planted.items():
    recorded = reproduce.run_config(*cell, smoke=False)
    recorded.update(change)
    directory = reproduce.run_dir(str(tmp_path), *cell)
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(recorded.to_dict(), f)

  refused = reproduce.refused_cells(str(tmp_path), configs)

  assert len(refused) == 1, refused
  assert refused[0].startswith(reproduce.run_dir(str(tmp_path), *cells[0]))
  assert "learning_rate 0.2 there, 0.1 now" in refused[0]


@pytest.mark.parametrize("args, message", [
    (["--methods=CE,Nope"], "--methods: unknown ['Nope']"),
    (["--overrides=num_epoch=3"], "unknown config field 'num_epoch'"),
    (["--overrides=num_epochs=many"], "num_epochs='many' is not a int"),
])
def test_bad_arguments_exit_2_with_one_message(tmp_path, args, message):
  result = _run(f"--workdir={tmp_path}", *args)
  assert result.returncode == 2
  assert message in result.stderr
