"""har_jax's compiled train step against PyTorch eager LDAM-DRW, in one process.

  python experiments/compare_torch.py --config=configs/default.py \
      --config.dataset=cifar10 --config.model=resnet32 --config.exits=CBBBE \
      --config.loss=ldam --config.batch_size=128 --config.augment_pad=4 \
      --config.augment_flip=True --steps=20

Both steps train the same network (CIFAR ResNet-32, cosine head, one exit) with
the same loss (LDAM with DRW weights), optimiser and batch, in float32, on the
same number of CPU threads. PyTorch runs in a worker process of its own (so the
two libraries' thread pools do not compete inside one process) and the two
steps alternate, one at a time, after a warm-up, so a busy machine slows both
alike. The last line of stdout is one JSON object with
each side's figures and ``speedup`` = PyTorch step time / har_jax step time
(above 1: har_jax is faster).

Needs ``pip install torch==2.13.0`` (the ``torch`` extra).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics

from absl import app
from absl import flags
import numpy as np

import benchmark  # experiments/benchmark.py, beside this file: its flags
import timing

_THREADS = flags.DEFINE_integer(
    "threads", None, "PyTorch intra-op threads; default the CPU count, which is "
    "what XLA's CPU backend uses.")
_CHANNELS_LAST = flags.DEFINE_bool(
    "torch_channels_last", False, "Run PyTorch in channels-last memory format.")


def _torch_worker(connection, threads: int, images, labels, counts, options: dict):
  """Runs in its own process: one PyTorch step per request, answering its seconds.

  A process of its own keeps PyTorch's OpenMP threads and XLA's thread pools
  from competing (and spin-waiting) inside one process; the parent alternates
  the two, so both still see the same machine load.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  step = torch_reference.TrainStep(images, labels, counts, **options)
  connection.send(torch.__version__)
  while connection.recv():
    connection.send(step.step())  # the loss; the parent times the round trip


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  from har_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.enable_compilation_cache()
  config = benchmark._CONFIG.value  # pylint: disable=protected-access
  reference = {"model": "resnet32", "exits": "CBBBE", "loss": "ldam",
               "dtype": "float32"}
  differs = {name: config[name] for name, value in reference.items()
             if config[name] != value}
  if differs or config.head not in ("auto", "normed"):
    raise app.UsageError(f"the PyTorch reference is {reference} with the normed "
                         f"head; the config has {differs or {'head': config.head}}")
  if config.drw_start_epoch < 0:
    raise app.UsageError("the PyTorch reference uses DRW weights; set "
                         "drw_start_epoch >= 0")
  image_shape, num_classes = benchmark.input_spec(config)
  threads = _THREADS.value or os.cpu_count()

  rng = np.random.default_rng(config.seed)
  context = multiprocessing.get_context("spawn")
  connection, child_end = context.Pipe()
  worker = context.Process(target=_torch_worker, daemon=True, args=(
      child_end, threads,
      rng.integers(0, 256, (config.batch_size, *image_shape), np.uint8),
      rng.integers(0, num_classes, (config.batch_size,), np.int32),
      timing.class_counts(config, num_classes),
      dict(learning_rate=config.learning_rate, momentum=config.momentum,
           weight_decay=config.weight_decay, seed=config.seed,
           channels_last=_CHANNELS_LAST.value)))
  worker.start()
  torch_version = connection.recv()
  jax_step = timing.compile_train_step(config, image_shape, num_classes,
                                       name="har_jax")

  def torch_step():
    connection.send(True)
    connection.recv()

  seconds = timing.time_interleaved(
      {"har_jax": jax_step.run, "torch": torch_step},
      benchmark._STEPS.value, benchmark._WARMUP.value)  # pylint: disable=protected-access
  connection.send(False)
  worker.join()

  devices = jax.device_count()
  jax_figures = timing.step_report(jax_step, seconds["har_jax"], devices)
  torch_figures = timing.step_figures(seconds["torch"], config.batch_size, 1,
                                      6 * jax_step.macs_per_image)
  torch_figures.update(threads=threads, channels_last=_CHANNELS_LAST.value,
                       version=torch_version)
  print(f"torch: step {torch_figures['step_ms']:.1f} ms "
        f"(min {torch_figures['step_ms_min']:.1f}, max {torch_figures['step_ms_max']:.1f}), "
        f"{torch_figures['images_per_sec']:.1f} images/s")
  speedup = torch_figures["step_ms"] / jax_figures["step_ms"]
  paired = statistics.median(t / j for t, j in zip(seconds["torch"], seconds["har_jax"]))
  print(f"speedup (PyTorch step time / har_jax step time): {speedup:.3f} "
        f"(median of paired ratios {paired:.3f})")
  print(json.dumps({"har_jax": jax_figures, "torch": torch_figures,
                    "speedup": speedup, "paired_speedup": paired,
                    "batch_size": config.batch_size, "image_shape": list(image_shape),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "machine": timing.machine()}, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
