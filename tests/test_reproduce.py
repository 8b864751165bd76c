"""experiments/reproduce.py: every table as data, the smoke of all of them once,
resumable, shardable, as Markdown beside the published numbers."""

import json
import os
import re
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "reproduce.py")
sys.path.insert(0, os.path.join(REPO, "experiments"))
import reproduce  # pylint: disable=g-import-not-at-top,wrong-import-position
import tables  # pylint: disable=g-import-not-at-top,wrong-import-position
import tables_report  # pylint: disable=g-import-not-at-top,wrong-import-position

ALL_TABLES = tuple(tables.TABLES)


def _run(*args):
  env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True,
                        text=True, env=env, timeout=3000, check=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """The whole smoke, once: every row of every table, first seed, each table's
  first column. Every test of the grid's outcome reads this one run."""
  workdir = str(tmp_path_factory.mktemp("smoke"))
  result = _run(f"--workdir={workdir}", "--smoke", f"--tables={','.join(ALL_TABLES)}")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  plan = reproduce.make_plan(ALL_TABLES, [], None, [], [0, 1, 2], smoke=True)
  return workdir, result.stdout, plan


def _rows(markdown: str, title: str) -> dict:
  """The rows of the table under ``### title``: name -> cells."""
  section = markdown.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]
  rows = {}
  for line in section.splitlines():
    if line.startswith("| ") and not line.startswith("| method"):
      fields = [f.strip() for f in line.strip("|").split(" | ")]
      rows[fields[0]] = fields[1:]
  return rows


def test_smoke_reports_every_row_of_every_table_beside_the_paper(smoke):
  workdir, stdout, plan = smoke
  markdown = open(os.path.join(workdir, "results.md"), encoding="utf-8").read()
  paper = json.load(open(reproduce.PAPER_RESULTS, encoding="utf-8"))["tables"]
  stages_available = reproduce._stage_runner() is not None
  assert len(plan.cells) == 36, "Tables A-D and the lecture share some runs"
  assert f"[{len(plan.cells)}/{len(plan.cells)}]" in stdout
  assert "min left" in stdout
  for table, settings, rows in plan.tables:
    found = _rows(markdown, table.title)
    columns = [(tables.setting_key(*s), m) for s in settings for m in table.metrics]
    for row in rows:
      name = row.name + (" *" if row.stage else "")
      assert name in found, f"{table.name}: no row {name}"
      cells = dict(zip(columns, found[name]))
      for (setting, metric), text in cells.items():
        published = paper.get(table.name, {}).get(row.name, {}).get(
            "values", {}).get(setting, {}).get(metric)
        if published is not None:
          assert f"paper {published:g}" in text, (table.name, row.name, setting, text)
        if metric == "accuracy" and (stages_available or not row.stage):
          assert re.match(r"-?\d+\.\d\d", text), f"{table.name} {name}: {text}"
      if row.stage and not stages_available:
        assert all(t.startswith("—") for t in found[name]), found[name]
    for name in table.flops_rows:
      if any(r.name == name for r in rows):
        assert f"FLOPs saving of {name}" in found
  if not stages_available:
    assert "har_jax.decouple is not in this checkout" in stdout
  # Every published number of a selected setting appears.
  assert markdown.count("(paper ") >= 40


def test_smoke_draws_the_table_figures_and_the_talks_two(smoke):
  workdir, _, plan = smoke
  figures = os.path.join(workdir, "figures")
  for table, settings, _ in plan.tables:
    for setting in settings:
      key = tables.setting_key(*setting)
      for kind in ("shot_groups", "accuracy_flops"):
        assert os.path.getsize(os.path.join(figures, f"{table.name}_{key}_{kind}.png")) > 0
  talk = os.listdir(os.path.join(figures, "talk"))
  for kind in ("training_exits", "exit_by_group"):
    assert f"cifar10_r100_HAR_CE_DRW_{kind}.png" in talk, talk
  # Streaming sets: the training figure (analyze.py reads in-memory sets only).
  assert "imagenet_lt_HAR_LDAM_DRW_training_exits.png" in talk, talk


def test_a_rerun_skips_every_cell_and_rebuilds_the_same_report(smoke, capsys):
  workdir, _, plan = smoke
  before = open(os.path.join(workdir, "results.md"), encoding="utf-8").read()
  configs = {cell: reproduce.run_config(cell, smoke=True) for cell in plan.cells}
  assert not reproduce.refused_cells(workdir, configs)

  failed, _ = reproduce.run_cells(plan.cells, configs, workdir, smoke=True)

  out = capsys.readouterr().out
  assert not failed
  assert out.count("finished before, skipped") == len(plan.cells), out[-2000:]
  assert "running in" not in out
  text = reproduce.write_reports(plan, workdir, smoke=True, figures=False)
  assert text == before
  results = json.load(open(os.path.join(workdir, "results.json"), encoding="utf-8"))
  assert set(results["tables"]) == set(ALL_TABLES)


def test_tables_share_runs_and_a_run_name_is_one_config():
  plan = reproduce.make_plan(ALL_TABLES, [], None, [], [0, 1, 2], smoke=False)
  keys = [(c.setting, c.run.name, c.seed) for c in plan.cells]
  assert len(keys) == len(set(keys))
  # CE on ImageNet-LT serves Tables A, B (with cRT, LWS, tau-norm) and D once.
  ce = [c for c in plan.cells if c.setting == "imagenet_lt" and c.run.name == "CE"]
  assert len(ce) == 3 and all(c.stages == ("crt", "lws", "tau_norm") for c in ce)
  # Different runs never share a folder, and one name is one config.
  by_folder = {}
  for cell in plan.cells:
    config = reproduce.run_config(cell, smoke=False).to_dict()
    config.pop("seed")
    known = by_folder.setdefault(cell.directory("/r").rsplit("/", 1)[0], config)
    assert known == config, cell.label
  # The seeds outermost: every cell of seed 0 before any of seed 1.
  seeds = [c.seed for c in plan.cells]
  assert seeds == sorted(seeds)


def test_each_rows_config_is_its_recipe_and_its_methods_fields():
  plan = reproduce.make_plan(("cifar", "imagenet_inat", "lecture"), [], None, [], [3],
                             smoke=False)
  configs = {(c.setting, c.run.name): reproduce.run_config(c, smoke=False)
             for c in plan.cells}
  har_ldam = configs[("cifar100_r50", "HAR(LDAM)+DRW")]
  assert (har_ldam.loss, har_ldam.har, har_ldam.exits, har_ldam.drw_start_epoch,
          har_ldam.model, har_ldam.imbalance_factor, har_ldam.seed,
          har_ldam.num_epochs) == ("ldam", True, "CBEBEBE", 160, "resnet32", 50.0, 3, 200)
  ce = configs[("imagenet_lt", "CE")]
  assert (ce.loss, ce.har, ce.exits, ce.drw_start_epoch, ce.model, ce.schedule) == (
      "ce", False, "CBBBBE", -1, "resnet50", "cosine")
  assert configs[("i_naturalist2018", "HAR(CE)+DRW")].drw_start_epoch == 60
  mixup = configs[("cifar10_r10", "CE+Mixup")]
  assert (mixup.mixing, mixup.mixup_alpha, mixup.drw_start_epoch) == ("mixup", 1.0, -1)
  sampler = configs[("cifar10_r100", "HAR(CE)+sqrt sampling")]
  assert (sampler.sampler, sampler.har, sampler.exits) == ("square_root", True, "CBEBEBE")
  assert configs[("cifar100_r100", "CDT")].cdt_gamma == 0.2


def test_smoke_takes_one_seed_each_tables_first_column_and_a_tiny_model():
  plan = reproduce.make_plan(ALL_TABLES, [], None, [], [0, 1, 2], smoke=True)
  assert plan.seeds == (0,)
  assert {c.setting for c in plan.cells} == {"cifar10_r100", "imagenet_lt"}
  assert {s for _, settings, _ in plan.tables for s in settings} == {
      ("cifar10", 100.0), ("imagenet_lt", None)}
  models = {reproduce.run_config(c, smoke=True).model for c in plan.cells}
  assert models == {"resnet8", "resnet50_mini"}


def test_digits_runs_the_cifar_and_lecture_tables_on_the_offline_set():
  plan = reproduce.make_plan(("cifar", "lecture"), ["digits"], None, [], [0, 1, 2],
                             smoke=False)
  assert {c.setting for c in plan.cells} == {"digits_r10"}
  rows = {r.name for _, _, rs in plan.tables for r in rs}
  assert len(plan.cells) == 3 * len({r.run.name for _, _, rs in plan.tables for r in rs})
  assert "HAR(CE) → cRT" in rows
  config = reproduce.run_config(plan.cells[0], smoke=False)
  assert (config.dataset, config.model, config.num_epochs) == ("digits", "resnet8", 30)


def test_shards_split_the_grid_into_disjoint_round_robin_parts():
  cells = list(range(23))
  shards = [reproduce.shard_cells(cells, (k, 5)) for k in range(1, 6)]
  assert sorted(sum(shards, [])) == cells
  assert shards[1] == [1, 6, 11, 16, 21]
  assert reproduce.parse_shard("5/5") == (5, 5) and reproduce.parse_shard("") is None


def _main(argv):
  """reproduce.main in this process, as ``python experiments/reproduce.py ARGV``."""
  reproduce.FLAGS(["reproduce", *argv])
  try:
    reproduce.main(["reproduce"])
  finally:
    reproduce.FLAGS.unparse_flags()


def test_each_printed_command_rebuilds_its_cells_config(tmp_path, capsys, monkeypatch):
  _main([f"--workdir={tmp_path}", "--tables=cifar,imagenet_inat", "--seeds=1",
         "--print_commands", "--shard=2/7"])
  lines = capsys.readouterr().out.strip().splitlines()
  plan = reproduce.make_plan(("cifar", "imagenet_inat"), [], None, [], [1], smoke=False)
  mine = reproduce.shard_cells(plan.cells, (2, 7))
  assert len(lines) == len(mine)
  for line, cell in zip(lines, mine):
    main_command, *stages = line.split(" && ")
    words = main_command.split()
    assert words[:3] == ["python", "-m", "har_jax.main"]
    # Parse as har_jax.main does: the config file, then every --config.FIELD.
    argv = ["main", *[w.strip("'") for w in words[3:]]]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    monkeypatch.chdir(REPO)
    flag_values(argv)
    assert flag_values.workdir == cell.directory(str(tmp_path))
    expected = reproduce.run_config(cell, smoke=False).to_dict()
    assert flag_values.config.to_dict() == expected, cell.label
    assert stages == [f"python -m har_jax.decouple --workdir={cell.directory(str(tmp_path))}"
                      f" --method={s}" for s in cell.stages]


def test_aggregate_is_mean_and_std_over_seeds_in_percent():
  summaries = [{"many": 0.5, "medium": 0.25, "few": None, "accuracy": 0.4,
                "flops_saving": 0.1},
               {"many": 0.7, "medium": 0.35, "few": None, "accuracy": 0.6,
                "flops_saving": 0.3}]
  row = tables_report.aggregate(summaries)
  assert row["seeds"] == 2 and "few" not in row
  for column in ("many", "medium", "accuracy", "flops_saving"):
    values = [100 * s[column] for s in summaries]
    np.testing.assert_allclose(row[column], (np.mean(values), np.std(values)))


def test_the_table_gives_mean_std_the_paper_and_the_difference():
  table = tables.TABLES["cifar"]
  settings = (("cifar10", 100.0),)
  rows = table.rows[:2]
  summaries = {("cifar10_r100", "CE", None): [
      {"accuracy": 0.70, "flops_saving": 0.0}, {"accuracy": 0.72, "flops_saving": 0.0}]}
  paper = {"cifar": {"CE": {"values": {"cifar10_r100": {"accuracy": 70.4}}}}}
  results = tables_report.table_results(table, settings, rows, summaries, paper)
  text = tables_report.table_markdown(table, settings, rows, results, seeds=3,
                                      paper_notes={})
  found = _rows(text, table.title)
  assert found["CE"] == ["71.00 ± 1.00 [2/3 seeds] (paper 70.4, +0.60)"]
  assert found["Focal"] == ["—"]


def test_every_published_number_is_the_one_in_paper_tables_md():
  """paper_results.json against ../shared/paper_tables.md, parsed here."""
  source = os.path.join(os.path.dirname(REPO), "..", "shared", "paper_tables.md")
  source = source if os.path.exists(source) else "/work/shared/paper_tables.md"
  if not os.path.exists(source):
    pytest.skip("paper_tables.md is not beside the repository")
  markdown = open(source, encoding="utf-8").read()
  paper = json.load(open(reproduce.PAPER_RESULTS, encoding="utf-8"))
  for table_name, rows in paper["tables"].items():
    for row, entry in rows.items():
      assert entry["source"] in paper["sources"], (table_name, row)
      assert any(r.name == row for r in tables.TABLES[table_name].rows), row
  # Table A: the seven losses, Many / Med / Few / All.
  section = markdown.split("## Table A")[1].split("## Table B")[0]
  for line in section.splitlines():
    if line.startswith("| ") and line[2:6] not in ("loss", "---|"):
      name, *numbers = [f.strip() for f in line.strip("|").split("|")]
      entry = paper["tables"]["imagenet_losses"][name]["values"]["imagenet_lt"]
      assert [entry[m] for m in ("many", "medium", "few", "accuracy")] == [
          float(n) for n in numbers], name
  # Table C: All accuracy over the six settings (the first number of a cell).
  section = markdown.split("## Table C")[1].split("## Table D")[0]
  settings = [f"{d}_r{r}" for d in ("cifar10", "cifar100") for r in (100, 50, 10)]
  for line in section.splitlines():
    name = line.strip("|").split("|")[0].strip().rstrip(" †")
    if line.startswith("| ") and name.replace(" + ", "+") in paper["tables"]["cifar"]:
      numbers = [float(re.match(r"\s*([\d.]+)", f).group(1))
                 for f in line.strip("|").split("|")[1:]]
      entry = paper["tables"]["cifar"][name.replace(" + ", "+")]["values"]
      assert [entry[s]["accuracy"] for s in settings] == numbers, name


def test_a_cell_whose_folder_records_another_config_is_refused(tmp_path):
  plan = reproduce.make_plan(("cifar",), ["cifar10"], [100.0], ["CE", "Focal"], [0, 1],
                             smoke=False)
  configs = {cell: reproduce.run_config(cell, smoke=False) for cell in plan.cells}
  first, second = plan.cells[0], plan.cells[2]
  planted = {first: {"learning_rate": 0.2},  # another experiment
             second: {"log_every_steps": 7}}  # a field a restart may change
  for cell, change in planted.items():
    recorded = reproduce.run_config(cell, smoke=False)
    recorded.update(change)
    os.makedirs(cell.directory(str(tmp_path)))
    with open(os.path.join(cell.directory(str(tmp_path)), "config.json"), "w") as f:
      json.dump(recorded.to_dict(), f)

  refused = reproduce.refused_cells(str(tmp_path), configs)

  assert len(refused) == 1, refused
  assert refused[0].startswith(first.directory(str(tmp_path)))
  assert "learning_rate 0.2 there, 0.1 now" in refused[0]


@pytest.mark.parametrize("args, message", [
    (["--tables=cifar,nope"], "--tables: unknown ['nope']"),
    (["--methods=CE,Nope"], "--methods: unknown ['Nope']"),
    (["--datasets=cifar1000"], "--datasets: unknown ['cifar1000']"),
    (["--datasets=digits", "--tables=exits"], "exits has no digits setting"),
    (["--shard=0/4"], "--shard=0/4: give K/N with 1 <= K <= N"),
    (["--shard=5/4"], "--shard=5/4: give K/N"),
    (["--overrides=num_epoch=3"], "unknown config field 'num_epoch'"),
    (["--overrides=num_epochs=many"], "num_epochs='many' is not a int"),
    (["--smoke", "--print_commands"], "drop --smoke"),
    (["--tables=imagenet_losses", "--overrides=data_dir={tmp}"],
     "imagenet_lt is not prepared and needs a manual download"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_run(tmp_path, capsys, args, message):
  workdir = tmp_path / "grid"
  with pytest.raises(SystemExit) as exited:
    _main([f"--workdir={workdir}", *[a.replace("{tmp}", str(tmp_path)) for a in args]])
  assert exited.value.code == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1, err
  assert not workdir.exists()
