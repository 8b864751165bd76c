"""Times the compiled train step on synthetic data of the configured shape.

  python experiments/benchmark.py --config=configs/default.py --steps=20 \
      [--config.FIELD=VALUE ...] [--against=FIELD=VALUE[,FIELD=VALUE]]

The step is ``har_jax.train.make_steps(...).train``, the one a run compiles
(built and timed by ``timing.py``, beside this file), fed random uint8 images
of the data set's shape (``har_jax.data.specs``, or
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

The persistent compilation cache is on (``har_jax.runtime``): ``compile_s`` of
a step found there is the time to load it (``compile_cache_hit``).
``--compile_repeats=N`` measures both: the step is compiled N more times cold
and N times warm, in a temporary cache of this run's own
(``timing.compile_cold_warm``), and the medians are reported.

FLOPs: ``6 * MACs * batch`` per step (timing.py says why).

The last line of stdout is one JSON object: ``images_per_sec``, ``step_ms``,
``compile_s``, ``devices``, ``batch_size``, ``images_per_sec_per_device``,
``flops_per_sec``, ``last_loss``, ... and with ``--against`` its figures and
the ratio. TensorFlow is never imported.
"""

from __future__ import annotations

import ast
import json
import shutil
import statistics
import tempfile
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

import timing  # experiments/timing.py, beside this file

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
    "largest_class", timing.LARGEST_CLASS, "Examples in the largest class of the "
    "long-tailed counts (5000 for CIFAR-LT's training split with --gather).")
_COMPILE_REPEATS = flags.DEFINE_integer(
    "compile_repeats", 0, "Also compile the step this many times cold and warm, in a "
    "temporary persistent compilation cache, and report the medians.")


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  from har_jax import runtime  # pylint: disable=g-import-not-at-top
  fresh_cache = None
  if _COMPILE_REPEATS.value > 0:  # emptied between compiles: never the user's
    fresh_cache = tempfile.mkdtemp(prefix="har_jax_compile_")
    jax.config.update("jax_compilation_cache_dir", fresh_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  cache = runtime.enable_compilation_cache()
  config = _CONFIG.value
  image_shape, num_classes = input_spec(config)
  print(f"{config.model} exits {config.exits}, loss {config.loss}, har {config.har}, "
        f"sampler {config.sampler}, mixing {config.mixing}, dtype {config.dtype}, "
        f"conv_impl {config.conv_impl}, batch {config.batch_size} of {image_shape}, "
        f"{num_classes} classes, {jax.device_count()} {jax.default_backend()} "
        f"device(s){', gathered on the devices' if _GATHER.value else ''}", flush=True)
  step_options = dict(gather=_GATHER.value, largest_class=_LARGEST_CLASS.value)
  compiled = {"config": timing.compile_train_step(config, image_shape, num_classes,
                                                  name="config", **step_options)}
  if _AGAINST.value:
    name = ",".join(_AGAINST.value)
    compiled[name] = timing.compile_train_step(parse_overrides(config, _AGAINST.value),
                                               image_shape, num_classes, name=name,
                                               **step_options)
  seconds = timing.time_interleaved({name: step.run for name, step in compiled.items()},
                                    _STEPS.value, _WARMUP.value)
  devices = jax.device_count()
  reports = {name: timing.step_report(step, seconds[name], devices)
             for name, step in compiled.items()}
  result = dict(reports["config"], image_shape=list(image_shape),
                num_classes=num_classes, model=config.model, exits=config.exits,
                loss=config.loss, har=config.har, sampler=config.sampler,
                mixing=config.mixing, gather=_GATHER.value, dtype=config.dtype,
                conv_impl=config.conv_impl, compilation_cache=cache,
                machine=timing.machine())
  if fresh_cache:
    result["compile_cold_warm"] = timing.compile_cold_warm(
        compiled["config"], _COMPILE_REPEATS.value, fresh_cache)
    shutil.rmtree(fresh_cache, ignore_errors=True)
    print("compile cold {cold_median_s:.2f} s, warm {warm_median_s:.2f} s (medians of "
          "{repeats}; {warm_cache_hits} warm cache hits)".format(**result["compile_cold_warm"]))
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
