"""HAR with LDAM: which exit confidence keeps the deep exits trained (issue 19).

  python experiments/har_ldam_study.py --workdir=runs/har_ldam \
      [--settings=digits,digits_r100_resnet20] [--variants=...] [--seeds=0,1,2]

Trains every (setting, variant, seed) of the grid (each setting's variants in
GRID, or ``--variants``) in this process with ``har_jax.train``
(a finished run is reused, an interrupted one resumes), in
``WORKDIR/<setting>/<variant>/seed<k>``, then reads each run back: its summary
(early-exit accuracy, each exit alone, test exit fractions, FLOPs saving), the
training exit fractions it logged to TensorBoard over training, and, from the
restored weights, the test split's early exits under other inference rules
(another confidence, a temperature or a threshold calibrated on the validation
split). Writes ``WORKDIR/results.md`` (also printed) and ``WORKDIR/results.json``.

Variants are config overrides on a setting; the controls are HAR(CE)+DRW (the
CE path, unchanged by the LDAM choice) and LDAM+DRW without early exits.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from har_jax import config as config_lib
from har_jax import early_exit
from har_jax import losses
from har_jax import metrics
from har_jax import models
from har_jax import train
import analyze
import trained_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Settings: overrides of configs/default.py (digits, resnet8 CBEBEBE, 700 steps).
SETTINGS = {
    "digits": {},
    # Harder: a deeper network (3 residual blocks a stage, not 1) and a 100x
    # tail (classes of 114 down to 1 image); the default's 100 epochs.
    "digits_r100_resnet20": dict(imbalance_factor=100.0, model="resnet20"),
}


def _har_ldam(confidence: str, scale: float, **overrides) -> dict:
  return dict(loss="ldam", exit_confidence=confidence, exit_confidence_scale=scale,
              **overrides)


VARIANTS = {
    "HAR(CE)+DRW": dict(loss="ce"),
    "LDAM+DRW": dict(loss="ldam", exits="CBBBE"),
    "HAR(LDAM)+DRW softmax s=30": _har_ldam("softmax", 30.0),
    "HAR(LDAM)+DRW softmax s=10": _har_ldam("softmax", 10.0),
    "HAR(LDAM)+DRW softmax s=1": _har_ldam("softmax", 1.0),
    "HAR(LDAM)+DRW margin s=30": _har_ldam("margin", 30.0),
    "HAR(LDAM)+DRW margin s=10": _har_ldam("margin", 10.0),
    "HAR(LDAM) margin s=30 no DRW": _har_ldam("margin", 30.0, drw_start_epoch=-1),
    "HAR(LDAM) margin s=10 no DRW": _har_ldam("margin", 10.0, drw_start_epoch=-1),
    "LDAM no DRW": dict(loss="ldam", exits="CBBBE", drw_start_epoch=-1),
}
# The variants run on each setting by default: every one on the default run,
# the controls, the former definition and the two margin scales on the harder one.
GRID = {
    "digits": list(VARIANTS),
    "digits_r100_resnet20": ["HAR(CE)+DRW", "LDAM+DRW", "HAR(LDAM)+DRW softmax s=30",
                             "HAR(LDAM)+DRW margin s=30", "HAR(LDAM)+DRW margin s=10"],
}
# Temperatures tried when calibrating an exit's softmax on the validation split.
TEMPERATURES = np.geomspace(1.0, 100.0, 81)
_CALIBRATED = "softmax, T per exit from validation NLL"

FLAGS = flags.FLAGS


def run_config(setting: str, variant: str, seed: int):
  """configs/default.py with the setting's and the variant's overrides."""
  path = os.path.join(REPO, "configs", "default.py")
  module_spec = importlib.util.spec_from_file_location("default_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config()
  config.update(SETTINGS[setting])
  config.update(VARIANTS[variant])
  config.seed = seed
  return config


def run_dir(root: str, setting: str, variant: str, seed: int) -> str:
  slug = "".join(c if c.isalnum() else "_" for c in variant).strip("_")
  return os.path.join(root, setting, slug, f"seed{seed}")


def train_exit_fractions(workdir: str) -> dict:
  """``{step: [E] fraction of training examples exiting at each exit}`` as logged
  (the mean over each logging window) to the run's TensorBoard events."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  # pylint: enable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  events.Reload()
  # train/exit_fraction_<exit>; the per-shot-group ones
  # (train/exit_fraction_<group>_<exit>) are not read here.
  tags = sorted((tag for tag in events.Tags()["tensors"]
                 if re.fullmatch(r"train/exit_fraction_\d+", tag)),
                key=lambda tag: int(tag.rsplit("_", 1)[1]))
  fractions = {}
  for index, tag in enumerate(tags):
    for event in events.Tensors(tag):
      row = fractions.setdefault(int(event.step), [np.nan] * len(tags))
      row[index] = float(tensor_util.make_ndarray(event.tensor_proto))
  return dict(sorted(fractions.items()))


def calibrated_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
  """The softmax scale ``T`` minimising the negative log-likelihood of
  ``softmax(T * logits)`` on ``labels`` (a grid search over TEMPERATURES)."""
  logits = np.asarray(logits, np.float64)
  best, best_nll = None, np.inf
  for temperature in TEMPERATURES:
    scaled = temperature * logits
    scaled -= scaled.max(axis=-1, keepdims=True)
    log_probs = scaled - np.log(np.exp(scaled).sum(axis=-1, keepdims=True))
    nll = -log_probs[np.arange(len(labels)), labels].mean()
    if nll < best_nll:
      best, best_nll = float(temperature), nll
  return best


def inference_rules(run, test_logits, validation_logits) -> dict:
  """Early-exit accuracy and FLOPs saving on the test split under other rules."""
  data, config = run.data, run.config
  flops = models.exit_flops(run.model, data.image_shape)
  counts = data.class_counts
  threshold = config_lib.inference_threshold(config)

  def evaluate(logits, **confidence):
    predictions, exit_index = early_exit.predict(logits, threshold=threshold,
                                                 **confidence)
    return {"accuracy": float(np.mean(np.asarray(predictions) == data.test.labels)),
            "flops_saving": early_exit.flops_saving(exit_index, flops.per_exit,
                                                    flops.backbone),
            "exit_fraction": np.bincount(np.asarray(exit_index),
                                         minlength=len(logits)).tolist()}

  rules = {}
  if config.loss == "ldam":
    scale = float(config.ldam_scale)
    margins = np.asarray(losses.ldam_margins(counts, config.ldam_max_margin))
    rules[f"softmax s={scale:g}"] = evaluate(test_logits, logit_scale=scale)
    rules[f"margin s={scale:g}"] = evaluate(test_logits, logit_scale=scale,
                                            margins=margins)
    temperatures = [calibrated_temperature(z, data.validation.labels)
                    for z in validation_logits]
    scaled = test_logits * np.asarray(temperatures)[:, None, None]
    rules[_CALIBRATED] = dict(evaluate(scaled), temperatures=temperatures)
  # The run's own confidence, the threshold calibrated on validation for at
  # most one point below the last exit (analyze.py's default).
  confidence = config_lib.exit_confidence(config, counts)
  curve = early_exit.threshold_curve(
      validation_logits, data.validation.labels, analyze.DEFAULT_THRESHOLDS,
      flops.per_exit, flops.backbone, **confidence)
  calibration = early_exit.calibrate_threshold(curve, max_accuracy_drop=0.01)
  predictions, exit_index = early_exit.predict(
      test_logits, threshold=calibration.threshold, **confidence)
  rules["own confidence, threshold calibrated on validation (1 point)"] = {
      "threshold": calibration.threshold,
      "accuracy": float(np.mean(np.asarray(predictions) == data.test.labels)),
      "flops_saving": early_exit.flops_saving(exit_index, flops.per_exit,
                                              flops.backbone)}
  return rules


def study_run(workdir: str, starved_drop: float = metrics.STARVED_EXIT_DROP) -> dict:
  """Everything the table shows about one finished run (of a data set with a
  validation split)."""
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  run = trained_run.load_run(workdir)
  logits_fn = run.exit_logits_fn()
  variables = jax.device_put(run.variables, jax.local_devices()[0])
  test_logits = np.asarray(logits_fn(variables, run.data.test.images))
  validation_logits = np.asarray(logits_fn(variables, run.data.validation.images))
  record = {key: summary[key] for key in ("accuracy", "many", "medium", "few",
                                          "per_exit_accuracy", "exit_fraction",
                                          "flops_saving", "exit_threshold")}
  record["train_exit_fraction"] = train_exit_fractions(workdir)
  record["starved_warning"] = metrics.starved_exits_warning(
      summary["per_exit_accuracy"], drop=starved_drop) if run.config.har else None
  if len(summary["per_exit_accuracy"]) > 1:
    record["inference"] = inference_rules(run, test_logits, validation_logits)
  return record


def _mean(values) -> str:
  values = [v for v in values if v is not None]
  return f"{100 * np.mean(values):.1f}" if values else "—"


def _mean_vector(rows) -> str:
  return " / ".join(f"{100 * v:.0f}" if len(rows[0]) > 1 else f"{100 * v:.1f}"
                    for v in np.mean(np.asarray(rows, np.float64), axis=0))


def markdown(results: dict, grid: dict, seeds) -> str:
  """One table per setting (means over seeds, in %), then the inference rules."""
  lines = []
  for setting, variants in grid.items():
    lines += [f"### {setting} (`{_overrides_text(setting)}`), mean of seeds {seeds}", "",
              "| variant | early-exit acc | few | each exit alone | test exit fractions "
              "| FLOPs saving | train exit fractions: first log / middle / last | "
              "starved warnings |",
              "|---|---|---|---|---|---|---|---|"]
    for variant in variants:
      records = results.get(setting, {}).get(variant, [])
      if not records:
        lines.append(f"| {variant} | (no finished run) | | | | | | |")
        continue
      trains = [list(r["train_exit_fraction"].values()) for r in records]
      picks = [0, len(trains[0]) // 2, len(trains[0]) - 1]
      over_training = " ; ".join(_mean_vector([t[p] for t in trains]) for p in picks)
      warned = sum(r["starved_warning"] is not None for r in records)
      lines.append(
          f"| {variant} | {_mean(r['accuracy'] for r in records)} "
          f"| {_mean(r['few'] for r in records)} "
          f"| {_mean_vector([r['per_exit_accuracy'] for r in records])} "
          f"| {_mean_vector([r['exit_fraction'] for r in records])} "
          f"| {_mean(r['flops_saving'] for r in records)} "
          f"| {over_training} | {warned}/{len(records)} |")
    lines.append("")
    lines += ["Inference rules on the same trained HAR(LDAM) networks (test split; "
              "threshold 0.9 unless calibrated): early-exit accuracy / FLOPs "
              "saving, %", "",
              "| trained with | " + " | ".join(_rule_names(results, setting, variants)) +
              " | validation-calibrated T of each exit |",
              "|---|" + "---|" * (len(_rule_names(results, setting, variants)) + 1)]
    for variant in variants:
      records = results.get(setting, {}).get(variant, [])
      if VARIANTS[variant].get("loss") != "ldam" or not records or (
          "inference" not in records[0]):
        continue
      cells = []
      for rule in _rule_names(results, setting, variants):
        values = [r["inference"][rule] for r in records if rule in r["inference"]]
        cells.append(f"{_mean(v['accuracy'] for v in values)} / "
                     f"{_mean(v['flops_saving'] for v in values)}" if values else "—")
      temperatures = [r["inference"][_CALIBRATED]["temperatures"] for r in records
                      if _CALIBRATED in r["inference"]]
      cells.append(" / ".join(f"{t:.1f}" for t in np.mean(temperatures, axis=0))
                   if temperatures else "—")
      lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def _rule_names(results, setting, variants):
  names = []
  for variant in variants:
    for record in results.get(setting, {}).get(variant, []):
      if VARIANTS[variant].get("loss") == "ldam":
        names += [n for n in record.get("inference", {}) if n not in names]
  return names


def _overrides_text(setting: str) -> str:
  overrides = SETTINGS[setting]
  return "configs/default.py" + "".join(
      f" --config.{name}={value}" for name, value in overrides.items())


def main(argv):
  del argv
  unknown = ([s for s in FLAGS.settings if s not in SETTINGS] +
             [v for v in FLAGS.variants if v not in VARIANTS])
  grid = {s: FLAGS.variants or GRID[s] for s in FLAGS.settings if s in SETTINGS}
  if unknown:
    print(f"har_ldam_study: error: unknown settings/variants {unknown}; the settings are "
          f"{list(SETTINGS)}, the variants {list(VARIANTS)}.", file=sys.stderr)
    sys.exit(2)
  seeds = [int(s) for s in FLAGS.seeds]
  # Runs that differ only in their seed compile the same programs: keep them.
  jax.config.update("jax_compilation_cache_dir", os.path.join(FLAGS.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  results = {}
  started = time.time()
  cells = [(s, v, k) for s, variants in grid.items() for v in variants for k in seeds]
  for index, (setting, variant, seed) in enumerate(cells):
    directory = run_dir(FLAGS.workdir, setting, variant, seed)
    label = f"[{index + 1}/{len(cells)}] {setting} / {variant} / seed {seed}"
    run_started = time.time()
    if not os.path.exists(os.path.join(directory, "summary.json")):
      print(f"{label}: training in {directory}", flush=True)
      train.train_and_evaluate(run_config(setting, variant, seed), directory)
    record = study_run(directory, FLAGS.starved_drop)
    results.setdefault(setting, {}).setdefault(variant, []).append(record)
    print(f"{label}: accuracy {record['accuracy']:.3f}, exits alone "
          f"{[round(a, 3) for a in record['per_exit_accuracy']]}, FLOPs saving "
          f"{record['flops_saving']:.3f} ({time.time() - run_started:.0f} s)", flush=True)
  table = markdown(results, grid, seeds)
  command = " ".join(["python", *sys.argv])
  text = f"`{command}` ({time.time() - started:.0f} s)\n\n{table}"
  with open(os.path.join(FLAGS.workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(text)
  with open(os.path.join(FLAGS.workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  print(text)


def _define_flags() -> None:
  """The command line's flags; here, not at import, so that tests import this
  module beside other scripts that define --workdir and --seeds."""
  flags.DEFINE_string("workdir", None, "Root folder of the study's runs.")
  flags.DEFINE_list("settings", list(SETTINGS), f"Settings, of {list(SETTINGS)}.")
  flags.DEFINE_list("variants", [], f"Variants, of {list(VARIANTS)}; default each "
                    "setting's in GRID.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every (setting, variant).")
  flags.DEFINE_float("starved_drop", metrics.STARVED_EXIT_DROP,
                     "The drop (a fraction) from a shallower exit that flags a "
                     "starved deeper one.")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("workdir")
  logging.set_verbosity(logging.WARNING)
  app.run(main)
