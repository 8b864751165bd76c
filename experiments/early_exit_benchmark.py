"""Wall-clock speed of cascaded early-exit inference against the full network.

  python experiments/early_exit_benchmark.py --workdir=DIR --batch_size=256 \
      [--threshold=T] [--repeats=21]

Restores the latest checkpoint of a trained workdir onto one device and times,
on the test images in batches of ``batch_size``:

- full: the plain backbone with only its final classifier (the reference of
  FLOPs saving);
- cascade: ``early_exit.Cascade`` at the threshold (default: the run's);
- all_exits: every exit's logits and ``early_exit.predict``, for information.

The methods alternate within each repeat (in rotating order, after warm-up
passes that also compile every program), each pass ends with
``block_until_ready``, and medians over the repeats are reported. The last
line of output is one JSON object: ``flops_saving``, ``wall_saving`` (``1 -
median cascade time / median full time``), ``images_per_sec_full``,
``images_per_sec_cascade``, their ratio ``wall_over_flops``, compiles and the
setting.
"""

import json
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from har_jax import early_exit
from har_jax import models
from har_jax.data import augment
import trained_run

USAGE_ERROR = 2

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's directory.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per inference call.")
_THRESHOLD = flags.DEFINE_float("threshold", None,
                                "Exit confidence; default the run's exit threshold.")
_REPEATS = flags.DEFINE_integer("repeats", 21, "Timed passes of each method.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed passes of each method first.")
_MIN_BUCKET = flags.DEFINE_integer("min_bucket", 8,
                                   "Smallest padded batch of the cascade.")


def test_batches(run: trained_run.TrainedRun, batch_size: int, device) -> list:
  """The normalised test images in full batches (wrapping around), on ``device``."""
  data = run.data
  images = np.asarray(augment.normalize(data.test.images, data.mean, data.std))
  count = -(-len(images) // batch_size) * batch_size
  images = np.resize(images, (count, *images.shape[1:]))
  return [jax.device_put(images[start:start + batch_size], device)
          for start in range(0, count, batch_size)]


def plain_backbone(model):
  """Jitted predictions of the backbone alone: every segment, the final classifier."""
  last = model.num_exits - 1

  def run(variables, x):
    for index in range(model.num_exits):
      x = model.apply(variables, x, index, train=False, method=model.segment)
    logits = model.apply(variables, x, last, train=False, method=model.exit_head)
    return jnp.argmax(logits, axis=-1)
  return jax.jit(run)


def all_exits(model, threshold, confidence):
  """Jitted ``early_exit.predict`` on every exit's logits.

  Args:
    confidence: ``logit_scale`` and ``margins`` (``TrainedRun.confidence``).
  """
  def run(variables, x):
    return early_exit.predict(model.apply(variables, x, train=False),
                              threshold=threshold, **confidence)
  return jax.jit(run)


def padded_flops_saving(exit_index: np.ndarray, flops: models.ExitFlops,
                        min_bucket: int) -> float:
  """FLOPs saving counting the padding rows the cascade computes as well.

  Args:
    exit_index: ``[K, B]`` exit of every example of K batches.
  """
  spent = 0.0
  costs = np.add(flops.segments, flops.heads)
  for exits in exit_index:
    for segment, cost in enumerate(costs):
      going_on = int(np.sum(exits >= segment))
      if going_on:
        spent += early_exit.power_of_two_bucket(going_on, min_bucket) * cost
  return 1.0 - spent / (exit_index.size * flops.backbone)


def timed_pass(method, batches) -> float:
  start = time.perf_counter()
  for batch in batches:
    jax.block_until_ready(method(batch))
  return time.perf_counter() - start


def _progress(message: str) -> None:
  print(f"early_exit_benchmark: {message}", file=sys.stderr, flush=True)


def main(argv):
  if len(argv) > 1:
    print(f"early_exit_benchmark: error: unexpected arguments {argv[1:]}",
          file=sys.stderr)
    sys.exit(USAGE_ERROR)
  if _WORKDIR.value is None:
    print("early_exit_benchmark: error: --workdir is required.", file=sys.stderr)
    sys.exit(USAGE_ERROR)
  # Orbax logs every step of a restore at INFO; the progress here is printed.
  logging.set_verbosity(logging.WARNING)
  try:
    run = trained_run.load_run(_WORKDIR.value)
  except trained_run.RunError as error:
    print(f"early_exit_benchmark: error: {error}", file=sys.stderr)
    sys.exit(USAGE_ERROR)
  _progress(f"restored step {run.step} of {_WORKDIR.value}")
  threshold = run.threshold if _THRESHOLD.value is None else _THRESHOLD.value
  device = jax.local_devices()[0]
  variables = jax.device_put(run.variables, device)
  batches = test_batches(run, _BATCH_SIZE.value, device)
  model = run.model
  flops = models.exit_flops(model, run.data.image_shape)

  cascade = early_exit.Cascade(model, variables, **run.confidence,
                               min_bucket=_MIN_BUCKET.value, device=device)
  plain = plain_backbone(model)
  every_exit = all_exits(model, threshold, run.confidence)
  methods = {
      "full": lambda x: plain(variables, x),
      "cascade": lambda x: cascade(x, threshold=threshold),
      "all_exits": lambda x: every_exit(variables, x),
  }

  # The cascade's decisions: FLOPs saving, and a check against predict.
  exit_index, agree = [], True
  for batch in batches:
    predictions, exits = cascade(batch, threshold=threshold)
    want_predictions, want_exits = jax.device_get(methods["all_exits"](batch))
    agree &= bool(np.array_equal(predictions, want_predictions)
                  and np.array_equal(exits, want_exits))
    exit_index.append(exits)
  exit_index = np.stack(exit_index)

  _progress(f"warming up: {_WARMUP.value} passes of {len(batches)} batches of "
            f"{_BATCH_SIZE.value}")
  for _ in range(_WARMUP.value):
    for method in methods.values():
      timed_pass(method, batches)
  compiles_before = cascade.compiles
  names = list(methods)
  seconds = {name: [] for name in names}
  for repeat in range(_REPEATS.value):
    # Rotating the order spreads any drift of a shared machine over every method.
    first = repeat % len(names)
    for name in names[first:] + names[:first]:
      seconds[name].append(timed_pass(methods[name], batches))
    if (repeat + 1) % 5 == 0 or repeat + 1 == _REPEATS.value:
      _progress(f"repeat {repeat + 1}/{_REPEATS.value}: " + ", ".join(
          f"{name} {1e3 * np.median(s):.2f} ms" for name, s in seconds.items()))
  median = {name: float(np.median(s)) for name, s in seconds.items()}
  images = len(batches) * _BATCH_SIZE.value
  flops_saving = early_exit.flops_saving(exit_index, flops.per_exit, flops.backbone)
  wall_saving = 1.0 - median["cascade"] / median["full"]
  # The two passes of a repeat ran seconds apart; their ratio is less exposed
  # to the machine's load changing over the run than the ratio of medians.
  paired = 1.0 - np.median(np.asarray(seconds["cascade"]) / np.asarray(seconds["full"]))
  result = {
      "flops_saving": flops_saving,
      "wall_saving": wall_saving,
      "wall_over_flops": wall_saving / flops_saving if flops_saving > 0 else None,
      "wall_saving_paired": float(paired),
      # What the buckets' padding leaves of the FLOPs saving.
      "flops_saving_padded": padded_flops_saving(exit_index, flops, _MIN_BUCKET.value),
      "images_per_sec_full": images / median["full"],
      "images_per_sec_cascade": images / median["cascade"],
      "images_per_sec_all_exits": images / median["all_exits"],
      "median_ms": {name: 1e3 * value for name, value in median.items()},
      "exit_fraction": [float(np.mean(exit_index == i)) for i in range(model.num_exits)],
      "cascade_matches_predict": agree,
      "compiles": cascade.compiles,
      "compiles_while_timed": cascade.compiles - compiles_before,
      "compiled_shapes": cascade.compiled_shapes,
      "threshold": threshold,
      "batch_size": _BATCH_SIZE.value,
      "batches": len(batches),
      "repeats": _REPEATS.value,
      "device": str(device),
      "model": run.config.model,
      "exits": run.config.exits,
  }
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
