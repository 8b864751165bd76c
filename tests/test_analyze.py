"""experiments/analyze.py and early_exit_benchmark.py on a tiny trained workdir.

The numbers behind the plots are checked against loop references and against
the trainer's own evaluation (summary.json), which shares none of their code.
"""

import json
import os
import subprocess
import sys

from absl import flags
import numpy as np
import pytest

import runs

EXPERIMENTS = os.path.join(runs.REPO, "experiments")
sys.path.insert(0, EXPERIMENTS)
import analyze  # pylint: disable=g-import-not-at-top,wrong-import-position
import har_ldam_study  # pylint: disable=g-import-not-at-top,wrong-import-position

PLOTS = ("exit_by_class.png", "exit_by_group.png", "per_exit_accuracy.png",
         "accuracy_flops.png", "class_accuracy.png")


def _script(name, *args):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [runs.REPO, os.environ.get("PYTHONPATH", "")])}
  return subprocess.run([sys.executable, os.path.join(EXPERIMENTS, name), *args],
                        capture_output=True, text=True, env=env, timeout=600,
                        check=False)


@pytest.fixture(scope="module")
def workdir(small_run):
  return small_run


@pytest.fixture(scope="module")
def analyzed(workdir):
  """The command run end to end, once: (its output folder, its numbers)."""
  result = _script("analyze.py", workdir, "--flops_budget=0.8")
  assert result.returncode == 0, result.stderr
  assert "exit logits of the test split" in result.stderr  # progress is shown
  output = os.path.join(workdir, "analysis")
  with open(os.path.join(output, "analysis.json"), encoding="utf-8") as f:
    return output, json.load(f)


# ----------------------------------------------------------------------------
# The pure functions against loops.


def test_exit_fraction_by_class_and_group():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 6, 300)
  labels[labels == 4] = 5  # class 4 has no examples
  exit_index = rng.integers(0, 3, 300)
  groups = np.array([0, 0, 1, 1, 2, 2])
  by_class = analyze.exit_fraction_by_class(exit_index, labels, 6, 3)
  by_group = analyze.exit_fraction_by_group(exit_index, labels, groups, 3)
  for c in range(6):
    members = [e for e, y in zip(exit_index, labels) if y == c]
    for e in range(3):
      want = members.count(e) / len(members) if members else np.nan
      np.testing.assert_equal(by_class[c, e], want, err_msg=f"class {c} exit {e}")
  for g in range(3):
    members = [e for e, y in zip(exit_index, labels) if groups[y] == g]
    for e in range(3):
      assert by_group[g, e] == pytest.approx(members.count(e) / len(members))


def test_accuracies_and_class_order():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 200, 5))
  labels = rng.integers(0, 5, 200)
  per_exit = analyze.per_exit_accuracy(logits, labels)
  for e in range(3):
    want = sum(int(np.argmax(logits[e, b]) == labels[b]) for b in range(200)) / 200
    assert per_exit[e] == pytest.approx(want)
  predictions = rng.integers(0, 5, 200)
  per_class = analyze.per_class_accuracy(predictions, labels, 6)
  for c in range(5):
    hits = [p == y for p, y in zip(predictions, labels) if y == c]
    assert per_class[c] == pytest.approx(sum(hits) / len(hits))
  assert np.isnan(per_class[5])
  assert analyze.class_order([5, 9, 5, 1]).tolist() == [1, 0, 2, 3]


def test_analysis_numbers_against_loops():
  rng = np.random.default_rng(2)
  test_logits = rng.normal(size=(3, 120, 4)) * 2
  test_labels = rng.integers(0, 4, 120)
  counts = [150, 60, 30, 10]  # many, medium, medium, few (bounds 100 / 20)
  numbers = analyze.analysis_numbers(
      test_logits, test_labels, validation_logits=test_logits[:, :60],
      validation_labels=test_labels[:60], class_counts=counts, shot_many=100,
      shot_few=20, exit_flops=[10.0, 20.0, 35.0], backbone_flops=30.0, threshold=0.7,
      logit_scale=1.0, thresholds=[0.0, 0.5, 0.7, 0.9, 1.0], max_accuracy_drop=0.05,
      flops_budget=0.9)
  assert numbers["shot_groups"] == ["many", "medium", "medium", "few"]
  # Loop reference of the decisions at the run threshold.
  exits, correct = [], []
  for b in range(120):
    for e in range(3):
      p = np.exp(test_logits[e, b] - test_logits[e, b].max())
      if (p / p.sum()).max() > 0.7 or e == 2:
        exits.append(e)
        correct.append(np.argmax(test_logits[e, b]) == test_labels[b])
        break
  exits, correct = np.array(exits), np.array(correct)
  test = numbers["test"]
  assert test["accuracy"] == pytest.approx(correct.mean())
  assert test["exit_fraction"] == pytest.approx([np.mean(exits == e) for e in range(3)])
  spent = np.mean([[10.0, 20.0, 35.0][e] for e in exits])
  assert test["flops_saving"] == pytest.approx(1 - spent / 30.0)
  few = test_labels == 3
  assert test["exit_fraction_by_group"]["few"] == pytest.approx(
      [np.mean(exits[few] == e) for e in range(3)])
  class_accuracy = [correct[test_labels == c].mean() for c in range(4)]
  assert test["group_accuracy"]["medium"] == pytest.approx(np.mean(class_accuracy[1:3]))
  assert numbers["test_curve"]["accuracy"][2] == pytest.approx(correct.mean())
  assert [entry["target"] for entry in numbers["calibration"]] == [
      "max_accuracy_drop", "flops_budget"]
  for entry in numbers["calibration"]:
    # The threshold is chosen among the curve's and reported on both splits.
    assert entry["threshold"] in numbers["validation_curve"]["thresholds"]
    index = numbers["test_curve"]["thresholds"].index(entry["threshold"])
    assert entry["test"]["accuracy"] == pytest.approx(
        numbers["test_curve"]["accuracy"][index])


# ----------------------------------------------------------------------------
# The command on a trained workdir.


def test_analyze_writes_report_and_plots(analyzed):
  output, numbers = analyzed
  for name in PLOTS:
    with open(os.path.join(output, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  with open(os.path.join(output, "report.md"), encoding="utf-8") as f:
    report = f.read()
  for name in PLOTS:
    assert f"]({name})" in report
  assert "## Which examples exit early" in report
  assert "flops_budget 0.8" in report


def test_analyze_numbers_match_the_trainers_evaluation(workdir, analyzed):
  _, numbers = analyzed
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  test = numbers["test"]
  assert numbers["step"] == summary["steps"]
  assert test["accuracy"] == pytest.approx(summary["accuracy"], abs=1e-6)
  assert test["flops_saving"] == pytest.approx(summary["flops_saving"], abs=1e-6)
  assert test["exit_fraction"] == pytest.approx(summary["exit_fraction"], abs=1e-6)
  assert test["per_exit_accuracy"] == pytest.approx(summary["per_exit_accuracy"],
                                                    abs=1e-6)
  for name in ("many", "medium", "few"):
    assert test["group_accuracy"][name] == pytest.approx(summary[name], abs=1e-6)
  assert numbers["class_counts"] == summary["class_counts"]
  # The digits test split has 50 examples of every class: the per-class exit
  # fractions average to the overall ones.
  by_class = np.array(test["exit_fraction_by_class"])
  np.testing.assert_allclose(by_class.mean(axis=0), test["exit_fraction"], atol=1e-12)
  np.testing.assert_allclose(by_class.sum(axis=1), 1.0, atol=1e-12)
  curve = numbers["test_curve"]
  index = curve["thresholds"].index(numbers["threshold"])
  assert curve["accuracy"][index] == pytest.approx(test["accuracy"])
  assert len(numbers["validation_curve"]["thresholds"]) == len(curve["thresholds"])
  assert len(numbers["calibration"]) == 2


@pytest.fixture
def parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["analyze"])


@pytest.mark.parametrize("case", ["missing", "empty", "no_config"])
def test_analyze_bad_workdir_exits_2_with_one_line(tmp_path, workdir, case, capsys,
                                                   parsed_flags):
  del parsed_flags
  path = tmp_path / "run"
  if case == "empty":
    path.mkdir()
  if case == "no_config":
    (path / "checkpoints" / "8").mkdir(parents=True)
  with pytest.raises(SystemExit) as exited:
    analyze.main(["analyze", str(path)])
  assert exited.value.code == 2
  message = capsys.readouterr().err.strip()
  assert message.count("\n") == 0 and message.startswith("analyze: error:"), message
  assert {"missing": "does not exist", "empty": "no checkpoint",
          "no_config": "no config.json"}[case] in message


def test_analyze_usage_error(capsys, parsed_flags):
  del parsed_flags
  with pytest.raises(SystemExit) as exited:
    analyze.main(["analyze"])
  assert exited.value.code == 2
  assert "give one WORKDIR" in capsys.readouterr().err


def test_benchmark_reports_json(workdir):
  # 500 test images in batches of 100: every image once, and 100 is not a bucket.
  result = _script("early_exit_benchmark.py", f"--workdir={workdir}",
                   "--batch_size=100", "--repeats=2", "--warmup=1")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert report["cascade_matches_predict"] is True
  assert report["flops_saving"] == pytest.approx(summary["flops_saving"], abs=1e-6)
  # Each batch of 100 is padded to 128 rows: computed, but not saved.
  assert report["flops_saving_padded"] < report["flops_saving"]
  assert report["exit_fraction"] == pytest.approx(summary["exit_fraction"], abs=1e-6)
  assert report["wall_saving"] == pytest.approx(
      1 - report["median_ms"]["cascade"] / report["median_ms"]["full"])
  assert report["images_per_sec_full"] > 0 and report["images_per_sec_cascade"] > 0
  assert report["compiles"] >= 3 and report["compiles_while_timed"] == 0
  assert report["threshold"] == 0.9 and report["batch_size"] == 100


def test_har_ldam_study_reads_a_run_back(workdir):
  record = har_ldam_study.study_run(workdir)
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  for field in ("accuracy", "per_exit_accuracy", "exit_fraction", "flops_saving"):
    assert record[field] == summary[field], field
  # Logged every 8 of the 24 steps; each window's exit fractions sum to 1.
  fractions = record["train_exit_fraction"]
  assert sorted(fractions) == [8, 16, 24]
  np.testing.assert_allclose([sum(row) for row in fractions.values()], 1.0, rtol=1e-5)
  calibrated = record["inference"][
      "own confidence, threshold calibrated on validation (1 point)"]
  assert 0.0 <= calibrated["threshold"] <= 1.0


def test_calibrated_temperature_recovers_the_labels_temperature():
  rng = np.random.default_rng(0)
  logits = rng.uniform(-1.0, 1.0, size=(20000, 10))
  scaled = 8.0 * logits
  probabilities = np.exp(scaled) / np.exp(scaled).sum(axis=1, keepdims=True)
  labels = np.array([rng.choice(10, p=p) for p in probabilities])
  assert har_ldam_study.calibrated_temperature(logits, labels) == pytest.approx(8.0,
                                                                                rel=0.06)
