"""The accelerator figures in one command: train steps, HAR's cost, the cascade, compiles.

  PYTHONPATH=. python3 experiments/gpu_benchmark.py --out=$OUT      # about 7 minutes on an H200
  PYTHONPATH=. python experiments/gpu_benchmark.py --tiny --out=/tmp/gpu_check  # the script, on a CPU

Needs only JAX, Flax, optax and orbax-checkpoint (the library install; no
TensorFlow, tfds, clu or ml_collections, which accelerator images often lack).
In order of priority, each item skipped once ``--budget_s`` has passed:

1. The roofline: the device's measured matrix-product rate (bfloat16; float32
   at JAX's default precision and at ``HIGHEST``) and memory bandwidth (one
   elementwise pass over a large array, bytes read plus written).
2. Train steps (``har_jax.train.make_steps(...).train``, LDAM, on fixed random
   batches, ``timing.compile_train_step``): ResNet-50 at 224x224 (1000 classes,
   exits after stages 2 and 3, batch 256) and ResNet-32 at 32x32 (10 classes,
   exits after stages 1 and 2, batch 2048), bfloat16 then float32, each with
   HAR and with ``har=False`` (every exit's plain loss) timed in alternation:
   step time, images/s, FLOP/s against the roofline, XLA's memory estimate,
   the HAR / plain ratio, and compile times cold (the first compile in this
   process, into an empty persistent cache) and warm (again after
   ``jax.clear_caches()``, loaded from that cache).
3. The cascade (``timing.time_cascade``) against the plain backbone, bfloat16,
   on a synthetic model: an untrained network whose exit classifiers are
   rescaled so that given fractions of random images (``--exit_fractions``)
   leave at each exit at threshold 0.9. Timing does not depend on the weights'
   values, only on how many images each segment computes, which this fixes.
4. Larger and smaller batches, to see whether the default ones fill the device.

Writes ``OUT/gpu_benchmark.json`` (every figure) and ``OUT/gpu_benchmark.md``
(the tables) after each item, so a run stopped at its time limit keeps what it
measured, and prints the tables last.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from typing import Callable

from absl import app
from absl import flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from har_jax import config as config_lib
from har_jax import models
from har_jax import runtime
from har_jax.data import specs
import timing  # experiments/timing.py, beside this file

_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "gpu_benchmark_out"),
                           "Folder for gpu_benchmark.json and gpu_benchmark.md.")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny shapes and few steps: checks the "
                          "script on a CPU in a minute.")
_BUDGET_S = flags.DEFINE_float("budget_s", 400, "Start no item after this many seconds.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Train-step dtypes.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps of each variant.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_EXIT_FRACTIONS = flags.DEFINE_list(
    "exit_fractions", ["0.5", "0.25", "0.25"],
    "Cascade: fraction of images leaving at each exit (the last takes the rest).")
_CASCADE_THRESHOLD = 0.9


@dataclasses.dataclass(frozen=True)
class Setting:
  """A network at an input shape and the batch sizes it is measured at."""
  model: str
  dataset: str   # har_jax/data/specs.py: image shape and classes
  exits: str
  batch_size: int
  cascade_batch_size: int
  sweep_batch_sizes: tuple[int, ...]   # item 4, bfloat16 with HAR only


FULL = (Setting("resnet50", "imagenet_lt", "CBBEBEBE", 256, 256, (128, 512)),
        Setting("resnet32", "cifar10", "CBEBEBE", 2048, 1024, (512, 8192)))
TINY = (Setting("resnet8", "digits", "CBEBEBE", 16, 32, ()),)


def _timed(fn: Callable, args, repeats: int) -> float:
  """Median seconds of ``fn(*args)`` over ``repeats`` calls, after one to compile."""
  jax.block_until_ready(fn(*args))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def roofline(size: int, bandwidth_bytes: int) -> dict:
  """Measured matrix-product rates (FLOP/s) and memory bandwidth (bytes/s)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  rates = {}
  for name, dtype, precision in (("bfloat16", jnp.bfloat16, None),
                                 ("float32", jnp.float32, None),
                                 ("float32_highest", jnp.float32, lax.Precision.HIGHEST)):
    a = jax.random.normal(keys[0], (size, size), dtype)
    b = jax.random.normal(keys[1], (size, size), dtype)
    product = jax.jit(lambda x, y, p=precision: jnp.matmul(x, y, precision=p))
    rates[name] = 2 * size ** 3 / _timed(product, (a, b), repeats=10)
    del a, b
  # One fused elementwise pass: every byte read once and written once.
  x = jax.random.uniform(keys[2], (bandwidth_bytes // 4,), jnp.float32)
  bandwidth = 2 * x.nbytes / _timed(jax.jit(lambda v: v * 0.999 + 0.001), (x,), repeats=10)
  return {"matmul_flops_per_sec": rates, "matmul_size": size,
          "bandwidth_bytes_per_sec": bandwidth, "bandwidth_array_bytes": x.nbytes}


def step_config(setting: Setting, *, dtype: str, har: bool, batch_size: int):
  """The paper's LDAM-DRW setting (config.cifar_lt_config) on this network."""
  config = config_lib.cifar_lt_config(setting.dataset)
  config.model, config.exits = setting.model, setting.exits
  config.dtype, config.har, config.batch_size = dtype, har, batch_size
  return config


def time_step_pair(setting: Setting, dtype: str, batch_size: int, *, steps: int,
                   warmup: int, roofline_figures: dict | None, compare_har: bool) -> list:
  """Compiles (cold, then warm) and times the HAR step (and ``har=False``)."""
  image_shape, num_classes = specs.dataset_spec(setting.dataset)
  variants = {"har": True, "plain": False} if compare_har else {"har": True}
  compiled = {}
  for name, har in variants.items():
    step = timing.compile_train_step(
        step_config(setting, dtype=dtype, har=har, batch_size=batch_size),
        image_shape, num_classes, name=f"{setting.model} {dtype} b{batch_size} {name}")
    compiled[name] = (step, *step.recompile())  # the warm compile
  seconds = timing.time_interleaved({name: c[0].run for name, c in compiled.items()},
                                    steps, warmup)
  rows = []
  for name, (step, warm_s, warm_hit) in compiled.items():
    figures = timing.step_report(step, seconds[name], jax.device_count())
    figures.update(model=setting.model, image_shape=list(image_shape), dtype=dtype,
                   har=variants[name], exits=setting.exits, warm_compile_s=warm_s,
                   warm_compile_cache_hit=warm_hit)
    if roofline_figures:
      peak = roofline_figures["matmul_flops_per_sec"][dtype]
      bytes_floor = (step.xla_bytes or 0) / roofline_figures["bandwidth_bytes_per_sec"]
      floor_s = max(figures["train_flops_per_step"] / peak, bytes_floor)
      figures.update(fraction_of_matmul_peak=figures["flops_per_sec"] / peak,
                     roofline_floor_ms=1e3 * floor_s,
                     fraction_of_roofline=1e3 * floor_s / figures["step_ms"])
    rows.append(figures)
  if compare_har:
    paired = statistics.median(h / p for h, p in zip(seconds["har"], seconds["plain"]))
    rows[0]["har_over_plain"] = rows[0]["step_ms"] / rows[1]["step_ms"]
    rows[0]["har_over_plain_paired"] = paired
  return rows


def exit_scales(exit_logits: np.ndarray, fractions, threshold: float) -> list:
  """Per-exit factors ``a_k`` for the logits of exits ``k < E - 1`` such that,
  with exit k's logits multiplied by ``a_k``, ``fractions[k]`` of the examples
  leave at exit k (confidence above ``threshold``, the earlier exits first).

  Args:
    exit_logits: ``[E, N, C]`` float logits of every exit.
  """
  num_exits, count, _ = exit_logits.shape
  remaining = np.ones(count, bool)
  scales = []
  for index in range(num_exits - 1):
    wanted = int(round(fractions[index] * count))
    logits = exit_logits[index][remaining]
    margins = logits - logits.max(-1, keepdims=True)

    def leaving(scale, margins=margins):
      confidence = 1.0 / np.exp(scale * margins).sum(-1)
      return confidence > threshold

    low, high = 1e-3, 1e6  # confidence rises with the scale: bisect on the count
    for _ in range(100):
      middle = np.sqrt(low * high)
      if leaving(middle).sum() < wanted:
        low = middle
      else:
        high = middle
    scales.append(float(high))
    left = np.flatnonzero(remaining)
    remaining[left[leaving(high)]] = False
  return scales


def cascade_item(setting: Setting, fractions, *, batches: int, repeats: int,
                 warmup: int) -> dict:
  """The cascade on a synthetic bfloat16 model with the given exit fractions."""
  image_shape, num_classes = specs.dataset_spec(setting.dataset)
  # The linear head: its logits scale with its weights, which fixes the exits.
  model = models.get_model(setting.model, num_classes=num_classes, exits=setting.exits,
                           head="linear", dtype=jnp.bfloat16)
  device = jax.local_devices()[0]
  rng = np.random.default_rng(0)
  images = [jax.device_put(rng.normal(size=(setting.cascade_batch_size, *image_shape))
                           .astype(np.float32), device) for _ in range(batches)]
  variables = model.init(jax.random.PRNGKey(0), images[0][:1], train=False)
  logits_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  exit_logits = np.concatenate([np.asarray(logits_fn(variables, x)) for x in images], 1)
  scales = exit_scales(exit_logits, fractions, _CASCADE_THRESHOLD)
  params = dict(variables["params"])
  for index, scale in enumerate(scales):
    head = f"exit{index}"
    params[head] = dict(params[head], classifier=jax.tree.map(
        lambda w, s=scale: w * s, params[head]["classifier"]))
  variables = {**variables, "params": params}
  result = timing.time_cascade(
      model, variables, images, threshold=_CASCADE_THRESHOLD,
      confidence={"logit_scale": 1.0},  # the linear head's: softmax of its logits
      image_shape=image_shape, min_bucket=8, repeats=repeats, warmup=warmup,
      device=device)
  result.update(model=setting.model, exits=setting.exits, dtype="bfloat16",
                image_shape=list(image_shape), target_exit_fractions=list(fractions),
                exit_scales=scales)
  return result


def environment(cache_dir: str) -> dict:
  """The machine, the device and the software, for the record."""
  device = jax.devices()[0]
  record = {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "device_kind": device.device_kind,
            "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
            "compilation_cache": cache_dir, "machine": timing.machine()}
  for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    try:
      record[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      record[name] = None
  try:
    record["memory_stats"] = {k: v for k, v in (device.memory_stats() or {}).items()
                              if k in ("bytes_limit", "bytes_reservable_limit")}
  except Exception:  # pylint: disable=broad-except
    pass
  if shutil.which("nvidia-smi"):
    query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                            "clocks.max.sm,power.limit", "--format=csv,noheader"],
                           capture_output=True, text=True, check=False, timeout=60)
    record["nvidia_smi"] = query.stdout.strip()
  return record


def markdown(results: dict) -> str:
  """The tables of gpu_benchmark.md."""
  lines = ["# GPU figures (experiments/gpu_benchmark.py)", ""]
  env = results.get("environment", {})
  lines += [f"Device: {env.get('device_kind')} ({env.get('nvidia_smi', '')}); JAX "
            f"{env.get('jax')}, jaxlib {env.get('jaxlib')}, Flax {env.get('flax')}.", ""]
  roof = results.get("roofline")
  if roof:
    rates = roof["matmul_flops_per_sec"]
    lines += ["| roofline | measured |", "|---|---|"]
    lines += [f"| matmul {name} ({roof['matmul_size']}^3) | {rate / 1e12:.1f} TFLOP/s |"
              for name, rate in rates.items()]
    lines += [f"| memory bandwidth (read + write) | "
              f"{roof['bandwidth_bytes_per_sec'] / 1e9:.0f} GB/s |", ""]
  steps = results.get("train_steps", [])
  if steps:
    lines += ["| model | dtype | batch | HAR | step ms | images/s | TFLOP/s | of matmul "
              "peak | of roofline | memory GB | compile cold s | warm s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in steps:
      lines.append(
          f"| {row['model']} | {row['dtype']} | {row['batch_size']} | {row['har']} | "
          f"{row['step_ms']:.1f} | {row['images_per_sec']:.0f} | "
          f"{row['flops_per_sec'] / 1e12:.1f} | {row.get('fraction_of_matmul_peak', 0):.2f} | "
          f"{row.get('fraction_of_roofline', 0):.2f} | "
          f"{(row['memory_bytes'] or 0) / 2**30:.1f} | {row['compile_s']:.1f} | "
          f"{row['warm_compile_s']:.1f}{'' if row['warm_compile_cache_hit'] else ' (miss)'} |")
    lines.append("")
    lines += ["| model | dtype | batch | HAR / plain step (paired) | goal |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['dtype']} | {r['batch_size']} | {r['har_over_plain']:.3f} "
              f"({r['har_over_plain_paired']:.3f}) | <= 1.05 |"
              for r in steps if "har_over_plain" in r]
    lines.append("")
  cascades = results.get("cascade", [])
  if cascades:
    lines += ["| cascade | batch | exits taken | FLOPs saving (padded) | wall saving "
              "(paired) | wall / FLOPs | goal |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {c['model']} {c['dtype']} | {c['batch_size']} x {c['batches']} | "
              f"{' / '.join(f'{f:.2f}' for f in c['exit_fraction'])} | "
              f"{c['flops_saving']:.3f} ({c['flops_saving_padded']:.3f}) | "
              f"{c['wall_saving']:.3f} ({c['wall_saving_paired']:.3f}) | "
              f"{c['wall_over_flops']:.2f} | >= 0.8 |" for c in cascades]
    lines.append("")
  for name in ("skipped", "errors"):
    if results.get(name):
      lines += [f"{name}:", *[f"- {entry}" for entry in results[name]], ""]
  lines.append(f"{results.get('elapsed_s', 0):.0f} s in all.")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  started = time.perf_counter()
  fractions = [float(f) for f in _EXIT_FRACTIONS.value]
  os.makedirs(_OUT.value, exist_ok=True)
  # A cache of this run's own, empty: the first compile of each step is cold.
  cache_dir = tempfile.mkdtemp(prefix="har_jax_gpu_cache_")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  # Every step is written, however fast it compiled, so every warm compile loads.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  runtime.enable_compilation_cache()
  tiny = _TINY.value
  settings = TINY if tiny else FULL
  steps, warmup = (2, 1) if tiny else (_STEPS.value, _WARMUP.value)
  results = {"environment": environment(cache_dir), "train_steps": [], "cascade": [],
             "skipped": [], "errors": [], "settings": [dataclasses.asdict(s) for s in settings]}

  def save():
    results["elapsed_s"] = time.perf_counter() - started
    with open(os.path.join(_OUT.value, "gpu_benchmark.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, sort_keys=True, default=str)
    with open(os.path.join(_OUT.value, "gpu_benchmark.md"), "w", encoding="utf-8") as f:
      f.write(markdown(results))

  def attempt(name: str, measure: Callable[[], None]) -> None:
    elapsed = time.perf_counter() - started
    if elapsed > _BUDGET_S.value:
      results["skipped"].append(f"{name}: {elapsed:.0f} s had passed (--budget_s)")
    else:
      print(f"[{elapsed:5.0f} s] {name}", flush=True)
      try:
        measure()
      except Exception as error:  # pylint: disable=broad-except
        results["errors"].append(f"{name}: {type(error).__name__}: {error}")
        traceback.print_exc()
    save()

  attempt("roofline", lambda: results.update(
      roofline=roofline(128, 1 << 20) if tiny else roofline(16384, 4 << 30)))

  def train_steps(setting, dtype, batch_size, compare_har=True):
    results["train_steps"].extend(time_step_pair(
        setting, dtype, batch_size, steps=steps, warmup=warmup,
        roofline_figures=results.get("roofline"), compare_har=compare_har))

  def cascade(setting):
    results["cascade"].append(cascade_item(
        setting, fractions, batches=2 if tiny else 4, repeats=2 if tiny else 10,
        warmup=1 if tiny else 2))

  # The first dtype's steps, the cascades, the other dtypes, the batch sweeps.
  first, *others = _DTYPES.value
  for setting in settings:
    attempt(f"{setting.model} {first} train steps",
            lambda s=setting: train_steps(s, first, s.batch_size))
  for setting in reversed(settings):  # the small network's first
    attempt(f"{setting.model} cascade", lambda s=setting: cascade(s))
  for dtype in others:
    for setting in settings:
      attempt(f"{setting.model} {dtype} train steps",
              lambda s=setting, d=dtype: train_steps(s, d, s.batch_size))
  for setting in settings:
    for batch_size in setting.sweep_batch_sizes:
      attempt(f"{setting.model} {first} batch {batch_size}",
              lambda s=setting, b=batch_size: train_steps(s, first, b, compare_har=False))
  shutil.rmtree(cache_dir, ignore_errors=True)
  save()
  with open(os.path.join(_OUT.value, "gpu_benchmark.md"), encoding="utf-8") as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main)
