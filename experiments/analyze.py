"""Which examples exit early, and what the exits cost and save: the paper's analyses.

  python experiments/analyze.py WORKDIR [--output=DIR] [--max_accuracy_drop=0.01]
      [--flops_budget=F] [--batch_size=256]

Restores the latest checkpoint of a trained workdir and writes, under
``WORKDIR/analysis`` (or ``--output``):

- ``report.md``: the tables below and the plots;
- ``analysis.json``: every number behind them;
- ``exit_by_class.png``: the fraction of test examples leaving at each exit, per
  class, classes ordered by training count (head to tail);
- ``exit_by_group.png``: the same per shot group (many / medium / few, by the
  run's ``shot_many`` / ``shot_few``);
- ``per_exit_accuracy.png``: the test accuracy of each exit alone;
- ``accuracy_flops.png``: accuracy against FLOPs over exit thresholds, on the
  validation split (where thresholds are calibrated) and on the test split
  (where they are shown), with the run's and the calibrated thresholds marked;
- ``class_accuracy.png``: test accuracy of each class against its training count.

Classes are named by the data set's class names where it has them (an
``image_folder`` set's folder names), by their indices otherwise. The numbers
come from the pure functions below; plotting only draws them.
A missing workdir, or one without a checkpoint, exits with status 2 and one line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import matplotlib
matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from har_jax import early_exit
from har_jax import metrics
from har_jax import models
from har_jax.data import long_tail
from har_jax.metrics import per_class_accuracy
from har_jax.metrics import per_exit_accuracy
import trained_run

USAGE_ERROR = 2
DEFAULT_THRESHOLDS = early_exit.CALIBRATION_THRESHOLDS

_OUTPUT = flags.DEFINE_string("output", None,
                              "Where to write; default WORKDIR/analysis.")
_MAX_ACCURACY_DROP = flags.DEFINE_float(
    "max_accuracy_drop", early_exit.DEFAULT_MAX_ACCURACY_DROP, "Calibrate the threshold that saves the most FLOPs "
    "on the validation split within this accuracy drop (a fraction) from the last "
    "exit; negative: skip.")
_FLOPS_BUDGET = flags.DEFINE_float(
    "flops_budget", None, "Also calibrate the most accurate threshold spending at "
    "most this fraction of the backbone's FLOPs.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per inference call.")


# ----------------------------------------------------------------------------
# The numbers.


def class_order(class_counts: Sequence[int]) -> np.ndarray:
  """``[C]`` class indices by training count, largest first (ties by index)."""
  return np.argsort(-np.asarray(class_counts), kind="stable")


def exit_fraction_by_class(exit_index: np.ndarray, labels: np.ndarray, num_classes: int,
                           num_exits: int) -> np.ndarray:
  """``[C, E]``: of the examples of class c, the fraction leaving at exit e.

  A class without examples has a row of NaN.
  """
  counts = np.zeros((num_classes, num_exits))
  np.add.at(counts, (np.asarray(labels), np.asarray(exit_index)), 1.0)
  with np.errstate(invalid="ignore"):
    return counts / counts.sum(axis=1, keepdims=True)


def exit_fraction_by_group(exit_index: np.ndarray, labels: np.ndarray,
                           groups: np.ndarray, num_exits: int) -> np.ndarray:
  """``[3, E]``: of the examples whose class is in shot group g, the fraction at exit e.

  Pooled over the group's examples (not averaged over its classes); a group
  without examples has a row of NaN.
  """
  example_group = np.asarray(groups)[np.asarray(labels)]
  return exit_fraction_by_class(exit_index, example_group, 3, num_exits)


def _curve_dict(curve) -> dict:
  return {"thresholds": curve.thresholds.tolist(), "accuracy": curve.accuracy.tolist(),
          "flops_saving": curve.flops_saving.tolist(),
          "exit_fraction": curve.exit_fraction.tolist(),
          "final_exit_accuracy": curve.final_exit_accuracy}


def _nan_to_none(values: np.ndarray) -> list:
  """JSON has no NaN: empty classes or groups become null."""
  return [None if np.isnan(v) else float(v) for v in np.ravel(values)]


def analysis_numbers(test_logits: np.ndarray, test_labels: np.ndarray, *,
                     validation_logits: Optional[np.ndarray],
                     validation_labels: Optional[np.ndarray],
                     class_counts: Sequence[int], shot_many: int, shot_few: int,
                     exit_flops: Sequence[float], backbone_flops: float,
                     threshold: float, logit_scale: float,
                     margins: Optional[Sequence[float]] = None,
                     class_names: Optional[Sequence[str]] = None,
                     thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                     max_accuracy_drop: Optional[float] = (
                         early_exit.DEFAULT_MAX_ACCURACY_DROP),
                     flops_budget: Optional[float] = None) -> dict:
  """Everything the report shows, from the exit logits of the evaluation splits.

  Args:
    test_logits: ``[E, N, C]`` every exit's logits on the test split.
    test_labels: ``[N]``.
    validation_logits: ``[E, M, C]`` on the validation split (thresholds are
      calibrated there, never on the test split), or None.
    validation_labels: ``[M]`` or None.
    class_counts: ``[C]`` training examples per class.
    shot_many, shot_few: the shot-group bounds (``data.shot_groups``).
    exit_flops: ``[E]`` cumulative MACs per image to leave at each exit.
    backbone_flops: MACs of the plain backbone.
    threshold: the run's inference exit threshold.
    logit_scale: the softmax scale of confidences.
    margins: the class margins of confidences (``TrainedRun.confidence``), or None.
    class_names: ``[C]`` names of the classes; None names them by index.
    thresholds: ``[T]`` thresholds of the accuracy-FLOPs curves.
    max_accuracy_drop, flops_budget: calibration targets; None skips one.

  Returns:
    A JSON-ready dict; per-class lists are in class-index order, and
    ``class_order`` lists the classes from the most to the least trained.
  """
  test_logits = np.asarray(test_logits)
  test_labels = np.asarray(test_labels)
  num_exits, _, num_classes = test_logits.shape
  groups = long_tail.shot_groups(class_counts, shot_many, shot_few)
  predictions, exit_index = (np.asarray(a) for a in early_exit.predict(
      test_logits, threshold=threshold, logit_scale=logit_scale, margins=margins))
  class_accuracy = per_class_accuracy(predictions, test_labels, num_classes)
  by_group = exit_fraction_by_group(exit_index, test_labels, groups, num_exits)
  group_accuracy = metrics.shot_group_accuracy(class_accuracy, groups)

  numbers = {
      "threshold": float(threshold),
      "logit_scale": float(logit_scale),
      "margins": None if margins is None else [float(m) for m in np.asarray(margins)],
      "num_exits": int(num_exits),
      "exit_flops": [float(f) for f in exit_flops],
      "backbone_flops": float(backbone_flops),
      "class_counts": [int(n) for n in class_counts],
      "class_names": ([str(name) for name in class_names] if class_names is not None
                      else [str(c) for c in range(num_classes)]),
      "class_order": class_order(class_counts).tolist(),
      "shot_groups": [long_tail.SHOT_GROUP_NAMES[g] for g in groups],
      "test": {
          "examples": int(test_labels.size),
          "accuracy": float(np.mean(predictions == test_labels)),
          "flops_saving": early_exit.flops_saving(exit_index, exit_flops,
                                                  backbone_flops),
          "exit_fraction": [float(np.mean(exit_index == i)) for i in range(num_exits)],
          "per_exit_accuracy": per_exit_accuracy(test_logits, test_labels).tolist(),
          "per_class_accuracy": _nan_to_none(class_accuracy),
          "group_accuracy": group_accuracy,
          "exit_fraction_by_class": [
              _nan_to_none(row) for row in exit_fraction_by_class(
                  exit_index, test_labels, num_classes, num_exits)],
          "exit_fraction_by_group": {
              name: _nan_to_none(by_group[group])
              for group, name in enumerate(long_tail.SHOT_GROUP_NAMES)},
      },
  }

  def curve_on(logits, labels, at):
    return early_exit.threshold_curve(logits, labels, at, exit_flops, backbone_flops,
                                      logit_scale=logit_scale, margins=margins)

  numbers["test_curve"] = _curve_dict(curve_on(test_logits, test_labels, thresholds))
  numbers["validation_curve"] = None
  numbers["calibration"] = []
  if validation_logits is None:
    return numbers
  validation_curve = curve_on(np.asarray(validation_logits),
                              np.asarray(validation_labels), thresholds)
  numbers["validation_curve"] = _curve_dict(validation_curve)
  targets = []
  if max_accuracy_drop is not None:
    targets.append(("max_accuracy_drop", max_accuracy_drop))
  if flops_budget is not None:
    targets.append(("flops_budget", flops_budget))
  for name, value in targets:
    entry = {"target": name, "value": float(value)}
    try:
      chosen = early_exit.calibrate_threshold(validation_curve, **{name: value})
    except ValueError as error:
      entry["error"] = str(error)
    else:
      on_test = curve_on(test_logits, test_labels, [chosen.threshold])
      entry.update(threshold=chosen.threshold,
                   validation={"accuracy": chosen.accuracy,
                               "flops_saving": chosen.flops_saving},
                   test={"accuracy": float(on_test.accuracy[0]),
                         "flops_saving": float(on_test.flops_saving[0])})
    numbers["calibration"].append(entry)
  return numbers


# ----------------------------------------------------------------------------
# Plots and the report: drawing only.


def _exit_colors(num_exits: int):
  return matplotlib.colormaps["viridis"](np.linspace(0.15, 0.9, num_exits))


def _stacked_bars(ax, fractions: np.ndarray, labels: Sequence[str]) -> None:
  """One bar per row of ``fractions [K, E]``, stacked by exit."""
  bottom = np.zeros(len(fractions))
  fractions = np.nan_to_num(fractions)
  for exit_, color in enumerate(_exit_colors(fractions.shape[1])):
    ax.bar(labels, fractions[:, exit_], bottom=bottom, color=color,
           label=f"exit {exit_}")
    bottom += fractions[:, exit_]
  ax.set_ylim(0, 1)
  ax.set_ylabel("fraction of test examples")
  ax.legend(loc="lower right", fontsize="small")


def plot_all(numbers: dict, output: str) -> list[str]:
  """Draws the report's plots into ``output``; returns their file names."""
  test = numbers["test"]
  order = numbers["class_order"]
  counts = numbers["class_counts"]
  names = numbers["class_names"]
  written = []

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(output, name), dpi=110)
    plt.close(fig)
    written.append(name)

  def as_array(rows):
    return np.array([[np.nan if v is None else v for v in row] for row in rows])

  fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(order)), 4))
  by_class = as_array(test["exit_fraction_by_class"])[order]
  _stacked_bars(ax, by_class, [f"{names[c]}\n({counts[c]})" for c in order])
  if max(len(name) for name in names) > 3:  # longer names would overlap
    ax.tick_params(axis="x", labelrotation=90)
  ax.set_xlabel("class (training images), most to least trained")
  ax.set_title("Exit taken, per class")
  save(fig, "exit_by_class.png")

  fig, ax = plt.subplots(figsize=(5, 4))
  _stacked_bars(ax, as_array(test["exit_fraction_by_group"].values()),
                list(test["exit_fraction_by_group"]))
  ax.set_title("Exit taken, per shot group")
  save(fig, "exit_by_group.png")

  fig, ax = plt.subplots(figsize=(5, 4))
  accuracy = test["per_exit_accuracy"]
  ax.bar([f"exit {i}" for i in range(len(accuracy))], accuracy,
         color=_exit_colors(len(accuracy)))
  ax.axhline(test["accuracy"], color="black", linestyle="--",
             label=f"early exit at {numbers['threshold']:g}")
  ax.set_ylim(0, 1)
  ax.set_ylabel("test accuracy")
  ax.legend(loc="lower right", fontsize="small")
  ax.set_title("Accuracy of each exit alone")
  save(fig, "per_exit_accuracy.png")

  fig, ax = plt.subplots(figsize=(6, 4.5))
  for name, style in (("validation_curve", ":"), ("test_curve", "-")):
    curve = numbers[name]
    if curve is not None:
      spent = 1.0 - np.asarray(curve["flops_saving"])
      ax.plot(spent, curve["accuracy"], style, marker=".", markersize=3,
              label=name.replace("_curve", ""))
  ax.plot(1.0 - test["flops_saving"], test["accuracy"], "k*", markersize=12,
          label=f"run threshold {numbers['threshold']:g} (test)")
  for entry in numbers["calibration"]:
    if "threshold" in entry:
      ax.plot(1.0 - entry["test"]["flops_saving"], entry["test"]["accuracy"], "o",
              markersize=9, fillstyle="none",
              label=f"{entry['target']} {entry['value']:g}: "
                    f"threshold {entry['threshold']:.4g} (test)")
  ax.set_xlabel("FLOPs spent / plain backbone")
  ax.set_ylabel("accuracy")
  ax.legend(fontsize="small")
  ax.set_title("Accuracy against compute over exit thresholds")
  save(fig, "accuracy_flops.png")

  fig, ax = plt.subplots(figsize=(6, 4.5))
  class_accuracy = np.array([np.nan if a is None else a
                             for a in test["per_class_accuracy"]])
  groups = numbers["shot_groups"]
  for name, color in zip(long_tail.SHOT_GROUP_NAMES, ("tab:blue", "tab:orange", "tab:red")):
    members = [c for c in range(len(counts)) if groups[c] == name]
    if members:
      ax.scatter([counts[c] for c in members], class_accuracy[members], color=color,
                 label=name)
      for c in members:
        ax.annotate(names[c], (counts[c], class_accuracy[c]), fontsize="x-small",
                    xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("training images of the class")
  ax.set_ylabel("test accuracy (early exit)")
  ax.legend(fontsize="small")
  ax.set_title("Per-class accuracy against class size")
  save(fig, "class_accuracy.png")
  return written


def _percent(value: Optional[float]) -> str:
  return "–" if value is None else f"{100 * value:.1f}%"


def report_markdown(numbers: dict, workdir: str, step: int, plots: Sequence[str]) -> str:
  """The Markdown report of ``numbers``."""
  test = numbers["test"]
  num_exits = numbers["num_exits"]
  exits_header = " | ".join(f"exit {i}" for i in range(num_exits))
  rule = "|---" * (num_exits + 2) + "|"
  lines = [
      f"# Early-exit analysis of {workdir}",
      "",
      f"Checkpoint of step {step}; test split of {test['examples']} examples; run "
      f"threshold {numbers['threshold']:g} (softmax scale {numbers['logit_scale']:g}"
      f"{', LDAM class margins' if numbers.get('margins') else ''}).",
      "",
      f"- accuracy {_percent(test['accuracy'])}, FLOPs saving "
      f"{_percent(test['flops_saving'])} against the plain backbone "
      f"({numbers['backbone_flops']:.0f} MACs per image)",
      "- shot-group accuracy (mean over classes): " + ", ".join(
          f"{name} {_percent(value)}" for name, value in test["group_accuracy"].items()),
      "",
      "## Which examples exit early",
      "",
      "Fraction of the test examples of each class leaving at each exit; classes "
      "from the most to the least trained.",
      "",
      f"| class (train images) | group | {exits_header} | accuracy |",
      rule + "---|",
  ]
  for c in numbers["class_order"]:
    row = " | ".join(_percent(f) for f in test["exit_fraction_by_class"][c])
    name = numbers["class_names"][c].replace("|", "\\|")  # a cell, not a column
    lines.append(f"| {name} ({numbers['class_counts'][c]}) | {numbers['shot_groups'][c]} "
                 f"| {row} | {_percent(test['per_class_accuracy'][c])} |")
  lines += ["", f"| shot group | {exits_header} |", "|---" * (num_exits + 1) + "|"]
  for name, fractions in test["exit_fraction_by_group"].items():
    lines.append(f"| {name} | " + " | ".join(_percent(f) for f in fractions) + " |")
  lines += ["", "## Exits", "", f"| | {exits_header} |", "|---" * (num_exits + 1) + "|",
            "| accuracy of the exit alone | "
            + " | ".join(_percent(a) for a in test["per_exit_accuracy"]) + " |",
            "| fraction leaving there | "
            + " | ".join(_percent(f) for f in test["exit_fraction"]) + " |",
            "| cumulative MACs per image | "
            + " | ".join(f"{f:.0f}" for f in numbers["exit_flops"]) + " |",
            "", "## Threshold calibration", ""]
  if numbers["validation_curve"] is None:
    lines.append("The data set has no validation split; no threshold was calibrated.")
  else:
    lines += ["Chosen on the validation split, shown on the test split.", "",
              "| target | threshold | validation accuracy | validation FLOPs saving "
              "| test accuracy | test FLOPs saving |", "|---|---|---|---|---|---|"]
    for entry in numbers["calibration"]:
      target = f"{entry['target']} {entry['value']:g}"
      if "error" in entry:
        lines.append(f"| {target} | none: {entry['error']} | | | | |")
        continue
      lines.append(
          f"| {target} | {entry['threshold']:.6g} | "
          f"{_percent(entry['validation']['accuracy'])} | "
          f"{_percent(entry['validation']['flops_saving'])} | "
          f"{_percent(entry['test']['accuracy'])} | "
          f"{_percent(entry['test']['flops_saving'])} |")
    lines.append(f"| (run threshold) | {numbers['threshold']:g} | | | "
                 f"{_percent(test['accuracy'])} | {_percent(test['flops_saving'])} |")
  curve = numbers["test_curve"]
  lines += ["", "Test accuracy and FLOPs saving at some thresholds "
            "(the whole curve is in analysis.json):", "",
            "| threshold | accuracy | FLOPs saving |", "|---|---|---|"]
  for t, a, s in zip(curve["thresholds"], curve["accuracy"], curve["flops_saving"]):
    if np.isclose(t, np.round(t, 1)) or t > 0.99:
      lines.append(f"| {t:.6g} | {_percent(a)} | {_percent(s)} |")
  lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# The command.


def _progress(message: str) -> None:
  print(f"analyze: {message}", file=sys.stderr, flush=True)


def split_logits(logits_fn, variables, images: np.ndarray, batch_size: int,
                 name: str) -> np.ndarray:
  """``[E, N, C]`` exit logits of uint8 ``images``, in batches of one size.

  Args:
    logits_fn: ``TrainedRun.exit_logits_fn()``.
    variables: the run's variables, on the device ``logits_fn`` runs on.
  """
  parts = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    count = len(batch)
    # Padding the last batch keeps one compiled program.
    batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]),
                                            batch.dtype)])
    parts.append(np.asarray(logits_fn(variables, batch))[:, :count])
    _progress(f"exit logits of the {name} split: {start + count}/{len(images)} images")
  return np.concatenate(parts, axis=1)


def run_analysis(workdir: str, output: Optional[str] = None, *, batch_size: int = 256,
                 max_accuracy_drop: Optional[float] = 0.01,
                 flops_budget: Optional[float] = None) -> dict:
  """Restores ``workdir``, computes the numbers, writes the report and plots.

  Raises:
    trained_run.RunError: the workdir cannot be studied.
  """
  output = output or os.path.join(workdir, "analysis")
  _progress(f"restoring the latest checkpoint of {workdir}")
  run = trained_run.load_run(workdir)
  data = run.data
  logits_fn = run.exit_logits_fn()
  variables = jax.device_put(run.variables, jax.local_devices()[0])
  test_logits = split_logits(logits_fn, variables, data.test.images, batch_size, "test")
  validation_logits = None
  if data.validation is not None:
    validation_logits = split_logits(logits_fn, variables, data.validation.images,
                                     batch_size, "validation")
  flops = models.exit_flops(run.model, data.image_shape)
  _progress("computing the numbers")
  numbers = analysis_numbers(
      test_logits, data.test.labels, validation_logits=validation_logits,
      validation_labels=None if data.validation is None else data.validation.labels,
      class_counts=data.class_counts, shot_many=run.config.shot_many,
      shot_few=run.config.shot_few, exit_flops=flops.per_exit,
      backbone_flops=flops.backbone, threshold=run.threshold,
      **run.confidence, class_names=data.class_names,
      max_accuracy_drop=max_accuracy_drop,
      flops_budget=flops_budget)
  numbers["step"] = run.step
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, "analysis.json"), "w", encoding="utf-8") as f:
    json.dump(numbers, f, indent=1, sort_keys=True)
  _progress("drawing the plots")
  plots = plot_all(numbers, output)
  with open(os.path.join(output, "report.md"), "w", encoding="utf-8") as f:
    f.write(report_markdown(numbers, workdir, run.step, plots))
  _progress(f"wrote {output}/report.md, analysis.json and {len(plots)} plots")
  return numbers


def _usage_error(message: str) -> None:
  print(f"analyze: error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def main(argv):
  if len(argv) != 2:
    _usage_error("give one WORKDIR: python experiments/analyze.py WORKDIR [--flags]")
  workdir = argv[1]
  # Orbax logs every step of a restore at INFO; the progress here is printed.
  logging.set_verbosity(logging.WARNING)
  drop = _MAX_ACCURACY_DROP.value
  try:
    trained_run.check_workdir(workdir)  # one line, before any progress
    run_analysis(workdir, _OUTPUT.value, batch_size=_BATCH_SIZE.value,
                 max_accuracy_drop=None if drop < 0 else drop,
                 flops_budget=_FLOPS_BUDGET.value)
  except trained_run.RunError as error:
    _usage_error(str(error))


if __name__ == "__main__":
  app.run(main)
