"""What the benchmarks measure, without flags: importable by each of them.

- Train steps (``benchmark.py``, ``compare_torch.py``, ``gpu_benchmark.py``):
  :func:`compile_train_step` compiles ``har_jax.train.make_steps(...).train``
  for synthetic batches of a shape (or ``.train_resident`` for a synthetic
  training split on the devices); :func:`time_interleaved` times steps in
  alternation; :func:`step_report` turns the seconds into rates.
- Cascaded inference (``early_exit_benchmark.py``, ``gpu_benchmark.py``):
  :func:`time_cascade` times ``early_exit.Cascade`` against the plain backbone.

FLOPs convention: the model's forward multiply-accumulates per image
(``models.exit_flops``: convolutions and dense layers, every exit head
included), 2 FLOPs per MAC, and a training step costs 3 forward passes
(forward, input gradients, weight gradients): ``6 * MACs * batch`` per step.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from har_jax import config as config_lib
from har_jax import early_exit
from har_jax import models
from har_jax import runtime
from har_jax import sharding
from har_jax import train
from har_jax.data import long_tail
from har_jax.data import pipeline

# Examples in the largest of the long-tailed classes. For a step given its
# batch they set only numbers (LDAM margins, DRW weights), not the work done.
LARGEST_CLASS = 500


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
  compile_s: float          # trace, lower and compile (or load from the cache)
  macs_per_image: int
  batch_size: int
  xla_flops: float | None   # XLA's own count of the step, when it gives one
  xla_bytes: float | None   # and of the bytes it reads and writes
  native_convolutions: bool  # har_jax's CPU kernels (config.conv_impl)
  # Whether the compile found the step in the persistent compilation cache
  # (None: the cache is off, runtime.enable_compilation_cache).
  compile_cache_hit: bool | None
  loss: Callable[[], float]  # the training loss of the latest step run
  # Clears JAX's in-memory caches and compiles the step again:
  # (seconds, whether it came from the persistent cache).
  recompile: Callable[[], tuple[float, bool | None]]
  memory_bytes: int | None   # XLA's estimate: arguments, outputs and temporaries


def class_counts(config, num_classes: int,
                 largest_class: int = LARGEST_CLASS) -> tuple[int, ...]:
  """Long-tailed class counts with the config's imbalance factor."""
  return tuple(long_tail.long_tail_counts(largest_class, num_classes,
                                          config.imbalance_factor))


def synthetic_split(counts, image_shape, seed: int) -> pipeline.InMemoryData:
  """An ``InMemoryData`` of random uint8 images with these class counts."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  split = pipeline.ArrayDataset(
      images=rng.integers(0, 256, (len(labels), *image_shape), np.uint8), labels=labels)
  channels = image_shape[-1]
  return pipeline.InMemoryData(train=split, validation=None, test=split,
                               num_classes=len(counts), mean=(0.5,) * channels,
                               std=(0.25,) * channels)


def compile_train_step(config, image_shape, num_classes, *, name: str = "step",
                       gather: bool = False,
                       largest_class: int = LARGEST_CLASS) -> CompiledStep:
  """Compiles ``train.make_steps(...).train`` for synthetic data of this shape
  (with ``gather``, ``.train_resident`` and a synthetic training split of
  :func:`class_counts`, as an in-memory run gathers, re-samples and augments)."""
  mesh = sharding.create_mesh()
  config_lib.validate(config, num_devices=mesh.size, num_processes=jax.process_count())

  counts = class_counts(config, num_classes, largest_class)
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

  # Lowered from shapes: the step donates the state, so the arrays go.
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (state, batch))

  def compile_step():
    """(executable, seconds, whether it came from the persistent cache or None)."""
    loaded = runtime.compilation_cache_events()["loaded"]
    start = time.perf_counter()
    executable = step.lower(*abstract).compile()
    seconds = time.perf_counter() - start
    hit = (runtime.compilation_cache_events()["loaded"] > loaded
           if runtime.compilation_cache_dir() else None)
    return executable, seconds, hit

  compiled, compile_s, hit = compile_step()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
  xla_bytes = (float(cost["bytes accessed"]) if cost and "bytes accessed" in cost
               else None)

  holder = [state, None]  # the step donates its state: keep only the newest

  def run():
    holder[0], holder[1] = compiled(holder[0], batch)
    jax.block_until_ready(holder)

  def recompile():
    jax.clear_caches()
    return compile_step()[1:]

  return CompiledStep(name=name, run=run, compile_s=compile_s,
                      macs_per_image=models.exit_flops(model, image_shape).per_exit[-1],
                      batch_size=config.batch_size, xla_flops=xla_flops,
                      xla_bytes=xla_bytes, native_convolutions=steps.native_convolutions,
                      compile_cache_hit=hit,
                      loss=lambda: float(jax.device_get(holder[1].loss.compute())),
                      recompile=recompile, memory_bytes=_memory_bytes(compiled))


def _memory_bytes(compiled) -> int | None:
  try:
    memory = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # not every backend reports it
  if memory is None:
    return None
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def compile_cold_warm(step: CompiledStep, repeats: int, cache_dir: str) -> dict:
  """Compiles ``step`` again ``repeats`` times cold and warm, each after
  ``jax.clear_caches()``: cold with the persistent cache ``cache_dir`` emptied
  first, warm from what the cold compile wrote there.

  ``cache_dir`` must be the directory JAX's cache is using and hold nothing
  else of value: it is emptied. Returns the seconds of each, their medians and
  the cache hits of the warm compiles (one each when the cache works).
  """
  cold, warm, hits = [], [], 0
  for _ in range(repeats):
    for entry in os.listdir(cache_dir):
      path = os.path.join(cache_dir, entry)
      if os.path.isdir(path):  # e.g. XLA's GPU autotuning results
        shutil.rmtree(path)
      else:
        os.remove(path)
    cold.append(step.recompile()[0])
    seconds, hit = step.recompile()
    warm.append(seconds)
    hits += bool(hit)
  return {"cold_s": cold, "warm_s": warm, "cold_median_s": statistics.median(cold),
          "warm_median_s": statistics.median(warm), "warm_cache_hits": hits,
          "repeats": repeats}


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
  cached = " (from the compilation cache)" if step.compile_cache_hit else ""
  return (f"{step.name}: compile {step.compile_s:.1f} s{cached}, "
          f"step {figures['step_ms']:.1f} ms "
          f"(min {figures['step_ms_min']:.1f}, max {figures['step_ms_max']:.1f}), "
          f"{figures['images_per_sec']:.1f} images/s "
          f"({figures['images_per_sec_per_device']:.1f} per device), "
          f"{figures.get('flops_per_sec', 0) / 1e9:.1f} GFLOP/s, "
          f"{'har_jax CPU kernels' if step.native_convolutions else 'XLA'} convolutions")


def step_report(step: CompiledStep, seconds: Sequence[float], devices: int) -> dict:
  flops_per_image = 6 * step.macs_per_image
  figures = step_figures(seconds, step.batch_size, devices, flops_per_image)
  figures.update(compile_s=step.compile_s, compile_cache_hit=step.compile_cache_hit,
                 macs_per_image=step.macs_per_image,
                 train_flops_per_step=flops_per_image * step.batch_size,
                 xla_flops_per_step=step.xla_flops, xla_bytes_per_step=step.xla_bytes,
                 native_convolutions=step.native_convolutions,
                 last_loss=step.loss(), memory_bytes=step.memory_bytes)
  print(describe(step, figures), flush=True)
  return figures


def plain_backbone(model):
  """Jitted predictions of the backbone alone: every segment, the final classifier."""
  last = model.num_exits - 1

  def run(variables, x):
    for index in range(model.num_exits):
      x = model.apply(variables, x, index, train=False, method=model.segment)
    logits = model.apply(variables, x, last, train=False, method=model.exit_head)
    return jnp.argmax(logits, axis=-1)
  return jax.jit(run)


def all_exits(model, threshold, confidence: dict):
  """Jitted ``early_exit.predict`` on every exit's logits.

  Args:
    confidence: ``logit_scale`` and ``margins`` (``har_jax.config.exit_confidence``).
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


def time_cascade(model, variables, batches: list, *, threshold: float,
                 confidence: dict, image_shape, min_bucket: int, repeats: int,
                 warmup: int, device, progress: Callable[[str], None] = lambda _: None
                 ) -> dict:
  """Times the cascade against the plain backbone (and every exit, for
  information) on ``batches``, the methods alternating in rotating order.

  Returns ``flops_saving``, ``wall_saving`` (``1 - median cascade time /
  median full time``), their ratio ``wall_over_flops``, ``images_per_sec_*``,
  the exits taken, whether the cascade agreed with ``early_exit.predict`` and
  how many programs it compiled (while timed: none, after the warm-up).
  ``confidence``: how the exits measure it, ``logit_scale`` and ``margins``
  (``har_jax.config.exit_confidence``).
  """
  flops = models.exit_flops(model, image_shape)
  cascade = early_exit.Cascade(model, variables, **confidence,
                               min_bucket=min_bucket, device=device)
  plain = plain_backbone(model)
  every_exit = all_exits(model, threshold, confidence)
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

  batch_size = batches[0].shape[0]
  progress(f"warming up: {warmup} passes of {len(batches)} batches of {batch_size}")
  for _ in range(warmup):
    for method in methods.values():
      timed_pass(method, batches)
  compiles_before = cascade.compiles
  names = list(methods)
  seconds = {name: [] for name in names}
  for repeat in range(repeats):
    # Rotating the order spreads any drift of a shared machine over every method.
    first = repeat % len(names)
    for name in names[first:] + names[:first]:
      seconds[name].append(timed_pass(methods[name], batches))
    if (repeat + 1) % 5 == 0 or repeat + 1 == repeats:
      progress(f"repeat {repeat + 1}/{repeats}: " + ", ".join(
          f"{name} {1e3 * np.median(s):.2f} ms" for name, s in seconds.items()))
  median = {name: float(np.median(s)) for name, s in seconds.items()}
  images = len(batches) * batch_size
  flops_saving = early_exit.flops_saving(exit_index, flops.per_exit, flops.backbone)
  wall_saving = 1.0 - median["cascade"] / median["full"]
  # The two passes of a repeat ran seconds apart; their ratio is less exposed
  # to the machine's load changing over the run than the ratio of medians.
  paired = 1.0 - np.median(np.asarray(seconds["cascade"]) / np.asarray(seconds["full"]))
  return {
      "flops_saving": flops_saving,
      "wall_saving": wall_saving,
      "wall_over_flops": wall_saving / flops_saving if flops_saving > 0 else None,
      "wall_saving_paired": float(paired),
      # What the buckets' padding leaves of the FLOPs saving.
      "flops_saving_padded": padded_flops_saving(exit_index, flops, min_bucket),
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
      "batch_size": batch_size,
      "batches": len(batches),
      "repeats": repeats,
      "device": str(device),
  }
