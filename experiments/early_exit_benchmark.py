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
``block_until_ready``, and medians over the repeats are reported
(``timing.time_cascade``, beside this file). The last
line of output is one JSON object: ``flops_saving``, ``wall_saving`` (``1 -
median cascade time / median full time``), ``images_per_sec_full``,
``images_per_sec_cascade``, their ratio ``wall_over_flops``, compiles and the
setting.
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from har_jax.data import augment
import timing
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
  result = timing.time_cascade(
      run.model, variables, batches, threshold=threshold, confidence=run.confidence,
      image_shape=run.data.image_shape, min_bucket=_MIN_BUCKET.value,
      repeats=_REPEATS.value, warmup=_WARMUP.value, device=device, progress=_progress)
  result.update(model=run.config.model, exits=run.config.exits)
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
