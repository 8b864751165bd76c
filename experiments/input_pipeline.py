"""Input-pipeline throughput beside the train step's, in one run.

  python experiments/input_pipeline.py --mode=streaming --batch_size=256 --steps=20
  python experiments/input_pipeline.py --mode=in_memory --batch_size=128 --steps=20

streaming: ImageNet-LT's tf.data pipeline (JPEG decode, random-resized crop to
224, flip, batching) on tfds mock data with ImageNet-sized JPEGs (375 x 500),
in images per second of this host, and per core.
in_memory: the CIFAR path. The training split stays on the devices and the
train step gathers its batch; the same step fed batches gathered on the host
is timed beside it, so the ratio shows what keeping the data on the device
saves. ResNet-32, HAR, batch 128 on 32 x 32 mock CIFAR-10-LT.

Last line: one JSON object.
"""

import json
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

from har_jax import config as config_lib
from har_jax import sharding
from har_jax import train
from har_jax.data import mock
from har_jax.data import pipeline
from har_jax.data import streaming

flags.DEFINE_enum("mode", "streaming", ["streaming", "in_memory"], "What to time.")
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_integer("steps", 20, "Timed batches (after 3 warm-up ones).")
FLAGS = flags.FLAGS
WARMUP = 3


def _median_rate(times, batch_size):
  return batch_size / float(np.median(np.diff(times)))


def time_streaming(batch_size: int, steps: int) -> dict:
  with mock.mock_tfds(num_examples=batch_size * (steps + WARMUP + 1),
                      jpeg_size=(375, 500)):
    data = streaming.load_streaming("imagenet_lt", image_size=224,
                                    shuffle_buffer=1000, class_counts=(1,) * 1000)
    batches = data.train_batches(start_step=0, global_batch_size=batch_size, seed=0)
    for _ in range(WARMUP):
      next(batches)
    times = [time.perf_counter()]
    for _ in range(steps):
      next(batches)
      times.append(time.perf_counter())
  rate = _median_rate(times, batch_size)
  return {"mode": "streaming", "pipeline_images_per_sec": rate,
          "pipeline_images_per_sec_per_core": rate / os.cpu_count(),
          "cores": os.cpu_count(), "batch_size": batch_size, "steps": steps}


def time_in_memory(batch_size: int, steps: int) -> dict:
  config = config_lib.cifar_lt_config("cifar10")
  config.update(batch_size=batch_size, loss="ce", tfds_download=False)
  with mock.mock_tfds(train_per_class=500):
    data = train.load_data(config)
  mesh = sharding.create_mesh()
  model = config_lib.create_model(config, data.num_classes)
  per_epoch = pipeline.steps_per_epoch(data.num_train, batch_size)
  schedule = train.learning_rate_fn(config, per_epoch, 10 * per_epoch)
  tx = train.create_optimizer(config, schedule)
  steps_fns = train.make_steps(config, model, tx, data, mesh, per_epoch, schedule)
  resident = train.resident_training_split(data, config, mesh)
  state = train.create_train_state(config, model, tx, data.image_shape, mesh)

  def resident_step(state, step):
    del step
    return steps_fns.train_resident(state, resident)

  def host_step(state, step):
    local = pipeline.train_batch(data.train, step=step, global_batch_size=batch_size,
                                 seed=config.seed)
    return steps_fns.train(state, sharding.global_batch(local, mesh))

  # Compile both, then alternate them so that load changes hit both alike.
  for fn in (resident_step, host_step):
    state, _ = fn(state, 0)
  jax.block_until_ready(state)
  durations = {"resident": [], "host": []}
  for step in range(steps):
    for name, fn in (("resident", resident_step), ("host", host_step)):
      start = time.perf_counter()
      state, _ = fn(state, step)
      jax.block_until_ready(state)
      durations[name].append(time.perf_counter() - start)
  rates = {name: batch_size / float(np.median(d)) for name, d in durations.items()}
  return {"mode": "in_memory", "images_per_sec_resident": rates["resident"],
          "images_per_sec_host_fed": rates["host"],
          "resident_over_host": rates["resident"] / rates["host"],
          "devices": jax.device_count(), "batch_size": batch_size, "steps": steps}


def main(argv):
  del argv
  if FLAGS.mode == "streaming":
    result = time_streaming(FLAGS.batch_size, FLAGS.steps)
  else:
    result = time_in_memory(FLAGS.batch_size, FLAGS.steps)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
