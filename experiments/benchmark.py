"""Times the compiled train step on synthetic data of the configured shape.

  python experiments/benchmark.py --config=configs/default.py --steps=20 \
      [--config.FIELD=VALUE ...] [--against=FIELD=VALUE[,FIELD=VALUE]]

The step is ``har_jax.train.make_steps(...).train``, the one a run compiles,
fed random uint8 images of the data set's shape (``har_jax.data.specs``, or
``--image_shape``/``--num_classes``). Compilation (trace, lower, compile) is
timed apart; then ``--warmup`` steps, then ``--steps`` steps, each waited for
with ``block_until_ready``; the figure is the median step.

An ``image_folder`` config takes its class count from the folder's
``train/`` and its shape from ``image_size``, without reading an image.

``--against`` compiles a second step from the same config with the given
fields changed (e.g. ``har=False``, ``dtype=float32`` or ``mixing=none``) and
times both in the same process, alternating step by step, so that the ratio
does not depend on what else the machine is doing.

``--gather`` times ``Steps.train_resident`` instead: the step that gathers its
batch from a training split kept on the devices (synthetic images of the
long-tailed class counts, ``--largest_class`` in the largest class), as an
in-memory run does, so that the samplers' draws (``--against=sampler=instance``)
and the on-device crop and flip are timed too.

FLOPs convention: the model's forward multiply-accumulates per image
(``models.exit_flops``: convolutions and dense layers, every exit head
included), 2 FLOPs per MAC, and a training step costs 3 forward passes
(forward, input gradients, weight gradients): ``6 * MACs * batch`` per step.

The last line of stdout is one JSON object: ``images_per_sec``, ``step_ms``,
``compile_s``, ``devices``, ``batch_size``, ``images_per_sec_per_device``,
``flops_per_sec``, ... and with ``--against`` its figures and the ratio.
TensorFlow is never imported.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (each config).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_IMAGE_SHAPE = flags.DEFINE_list(
    "image_shape", None, "H,W,C of the synthetic images; default: the shape of "
    "config.dataset (har_jax/data/specs.py).")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "Classes; default: those of config.dataset.")
_AGAINST = flags.DEFINE_list(
    "against", None, "FIELD=VALUE pairs: also time the config with these fields "
    "changed, interleaved with it, and report the ratio.")
_GATHER = flags.DEFINE_bool(
    "gather", False, "Time the step that gathers its batch from a training split on "
    "the devices (in-memory runs; re-sampling, crop and flip included).")
_LARGEST_CLASS = flags.DEFINE_integer(
    "largest_class", 500, "Examples in the largest class of the long-tailed counts "
    "(5000 for CIFAR-LT's training split with --gather).")

@dataclasses.dataclass(frozen=True)
class SyntheticStatistics:
  """What ``train.make_steps`` reads of a data set, for a data set never loaded."""
  class_counts: tuple[int, ...]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]


@dataclasses.dataclass
class CompiledStep:
  """One compiled train step, its state and a fixed batch, ready to time."""
  name: str
  run: Callable[[], None]   # one step, waited for
  compile_s: float
  macs_per_image: int
  batch_size: int
  xla_flops: float | None   # XLA's own count of the step, when it gives one
  native_convolutions: bool = False  # har_jax's CPU kernels (config.conv_impl)


def parse_overrides(config, pairs: Sequence[str]):
  """A copy of ``config`` with ``FIELD=VALUE`` pairs applied (values as literals)."""
  changed = config.copy_and_resolve_references()
  changed.unlock()
  for pair in pairs:
    field, sep, text = pair.partition("=")
    if not sep or field not in changed:
      raise ValueError(f"--against takes FIELD=VALUE with a config field, got {pair!r}")
    current = changed[field]
    if isinstance(current, bool):
      if text.lower() not in ("true", "false"):
        raise ValueError(f"{field} is a bool; got {text!r}")
      value = text.lower() == "true"
    elif isinstance(current, str):
      value = text
    else:
      value = type(current)(ast.literal_eval(text))
    changed[field] = value
  changed.lock()
  return changed


def input_spec(config) -> tuple[tuple[int, int, int], int]:
  """``(image_shape, num_classes)`` from the flags, else from ``config.dataset``."""
  from har_jax.data import specs  # pylint: disable=g-import-not-at-top
  shape, classes = None, None
  if config.dataset in specs.DATASET_SPECS:
    shape, classes = specs.dataset_spec(config.dataset)
  elif config.dataset == "image_folder" and config.data_dir:
    from har_jax.data import folder_index  # pylint: disable=g-import-not-at-top
    try:
      shape, classes = folder_index.dataset_spec(config.data_dir, config.image_size)
    except folder_index.FolderError as error:
      raise app.UsageError(str(error)) from None
  if _IMAGE_SHAPE.value:
    shape = tuple(int(size) for size in _IMAGE_SHAPE.value)
  if _NUM_CLASSES.value:
    classes = _NUM_CLASSES.value
  if shape is None or classes is None or len(shape) != 3:
    raise app.UsageError(
        f"data set {config.dataset!r} has no spec in har_jax/data/specs.py; pass "
        "--image_shape=H,W,C and --num_classes.")
  return shape, classes


def class_counts(config, num_classes: int) -> tuple[int, ...]:
  """Long-tailed class counts with the config's imbalance factor. Without
  ``--gather`` they set only numbers (LDAM margins, DRW weights), not the work."""
  from har_jax.data import long_tail  # pylint: disable=g-import-not-at-top
  return tuple(long_tail.long_tail_counts(_LARGEST_CLASS.value, num_classes,
                                          config.imbalance_factor))


def synthetic_split(counts, image_shape, seed: int):
  """An ``InMemoryData`` of random uint8 images with these class counts."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from har_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  split = pipeline.ArrayDataset(
      images=rng.integers(0, 256, (len(labels), *image_shape), np.uint8), labels=labels)
  channels = image_shape[-1]
  return pipeline.InMemoryData(train=split, validation=None, test=split,
                               num_classes=len(counts), mean=(0.5,) * channels,
                               std=(0.25,) * channels)


def compile_train_step(config, image_shape, num_classes, *, name: str = "step",
                       gather: bool = False) -> CompiledStep:
  """Compiles ``train.make_steps(...).train`` for synthetic data of this shape
  (with ``gather``, ``.train_resident`` and a synthetic training split)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from har_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from har_jax import models  # pylint: disable=g-import-not-at-top
  from har_jax import sharding  # pylint: disable=g-import-not-at-top
  from har_jax import train  # pylint: disable=g-import-not-at-top

  mesh = sharding.create_mesh()
  config_lib.validate(config, num_devices=mesh.size, num_processes=jax.process_count())

  counts = class_counts(config, num_classes)
  channels = image_shape[-1]
  if gather:
    data = synthetic_split(counts, image_shape, config.seed)
  else:
    data = SyntheticStatistics(counts, num_classes, (0.5,) * channels, (0.25,) * channels)
  steps_per_epoch = max(sum(counts) // config.batch_size, 1)
  model = config_lib.create_model(config, num_classes)
  schedule = train.learning_rate_fn(config, steps_per_epoch, 10 * steps_per_epoch)
  tx = train.create_optimizer(config, schedule)
  steps = train.make_steps(config, model, tx, data, mesh, steps_per_epoch, schedule)
  state = train.create_train_state(config, model, tx, image_shape, mesh)
  if gather:
    step, batch = steps.train_resident, train.resident_training_split(data, config, mesh)
  else:
    rng = np.random.default_rng(config.seed)
    step, batch = steps.train, sharding.global_batch(
        {"images": rng.integers(0, 256, (config.batch_size, *image_shape), np.uint8),
         "labels": rng.integers(0, num_classes, (config.batch_size,), np.int32)}, mesh)

  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost["flops"]) if cost and "flops" in cost else None

  holder = [state]  # the step donates its state: keep only the newest

  def run():
    holder[0], step_metrics = compiled(holder[0], batch)
    jax.block_until_ready((holder[0], step_metrics))

  return CompiledStep(name=name, run=run, compile_s=compile_s,
                      macs_per_image=models.exit_flops(model, image_shape).per_exit[-1],
                      batch_size=config.batch_size, xla_flops=xla_flops,
                      native_convolutions=steps.native_convolutions)


def time_interleaved(runs: dict[str, Callable[[], None]], steps: int,
                     warmup: int) -> dict[str, list[float]]:
  """Seconds of each of ``steps`` calls of every run, the runs alternating."""
  for _ in range(warmup):
    for run in runs.values():
      run()
  seconds = {name: [] for name in runs}
  for _ in range(steps):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      seconds[name].append(time.perf_counter() - start)
  return seconds


def step_figures(seconds: Sequence[float], batch_size: int, devices: int,
                 flops_per_image: float | None = None) -> dict:
  """Median step time and the rates it implies."""
  step_s = statistics.median(seconds)
  figures = {
      "step_ms": 1e3 * step_s,
      "step_ms_min": 1e3 * min(seconds),
      "step_ms_max": 1e3 * max(seconds),
      "timed_steps": len(seconds),
      "images_per_sec": batch_size / step_s,
      "images_per_sec_per_device": batch_size / step_s / devices,
      "batch_size": batch_size,
      "devices": devices,
  }
  if flops_per_image is not None:
    figures["flops_per_sec"] = flops_per_image * batch_size / step_s
  return figures


def machine() -> dict:
  """The CPU, its cores and the library versions, for the record."""
  import jax  # pylint: disable=g-import-not-at-top
  model = platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next(line.split(":", 1)[1].strip() for line in f
                   if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": model, "cpu_count": os.cpu_count(), "load_1min": os.getloadavg()[0],
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind}


def describe(step: CompiledStep, figures: dict) -> str:
  return (f"{step.name}: compile {step.compile_s:.1f} s, step {figures['step_ms']:.1f} ms "
          f"(min {figures['step_ms_min']:.1f}, max {figures['step_ms_max']:.1f}), "
          f"{figures['images_per_sec']:.1f} images/s "
          f"({figures['images_per_sec_per_device']:.1f} per device), "
          f"{figures.get('flops_per_sec', 0) / 1e9:.1f} GFLOP/s, "
          f"{'har_jax CPU kernels' if step.native_convolutions else 'XLA'} convolutions")


def step_report(step: CompiledStep, seconds: Sequence[float], devices: int) -> dict:
  flops_per_image = 6 * step.macs_per_image
  figures = step_figures(seconds, step.batch_size, devices, flops_per_image)
  figures.update(compile_s=step.compile_s, macs_per_image=step.macs_per_image,
                 train_flops_per_step=flops_per_image * step.batch_size,
                 xla_flops_per_step=step.xla_flops,
                 native_convolutions=step.native_convolutions)
  print(describe(step, figures), flush=True)
  return figures


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  image_shape, num_classes = input_spec(config)
  print(f"{config.model} exits {config.exits}, loss {config.loss}, har {config.har}, "
        f"sampler {config.sampler}, mixing {config.mixing}, dtype {config.dtype}, "
        f"conv_impl {config.conv_impl}, batch {config.batch_size} of {image_shape}, "
        f"{num_classes} classes, {jax.device_count()} {jax.default_backend()} "
        f"device(s){', gathered on the devices' if _GATHER.value else ''}", flush=True)
  compiled = {"config": compile_train_step(config, image_shape, num_classes,
                                           name="config", gather=_GATHER.value)}
  if _AGAINST.value:
    name = ",".join(_AGAINST.value)
    compiled[name] = compile_train_step(parse_overrides(config, _AGAINST.value),
                                        image_shape, num_classes, name=name,
                                        gather=_GATHER.value)
  seconds = time_interleaved({name: step.run for name, step in compiled.items()},
                             _STEPS.value, _WARMUP.value)
  devices = jax.device_count()
  reports = {name: step_report(step, seconds[name], devices)
             for name, step in compiled.items()}
  result = dict(reports["config"], image_shape=list(image_shape),
                num_classes=num_classes, model=config.model, exits=config.exits,
                loss=config.loss, har=config.har, sampler=config.sampler,
                mixing=config.mixing, gather=_GATHER.value, dtype=config.dtype,
                conv_impl=config.conv_impl,
                machine=machine())
  if _AGAINST.value:
    against = reports[name]
    paired = statistics.median(
        a / b for a, b in zip(seconds["config"], seconds[name]))
    result.update(against=dict(against, overrides=_AGAINST.value),
                  step_ratio=result["step_ms"] / against["step_ms"],
                  paired_step_ratio=paired)
    print(f"step time ratio config / {name}: {result['step_ratio']:.3f} "
          f"(median of paired ratios {paired:.3f})")
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
