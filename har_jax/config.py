"""Every configuration field, its default, and the checks run when a run starts.

Experiment files under ``configs/`` start from :func:`base_config` and change
what their setting needs, so every experiment understands every field and a
misspelt ``--config.FIELD`` is refused by the flag parser. Where ml_collections
is not installed (the library install without ``[train]``, e.g. an accelerator
image running experiments/gpu_benchmark.py) a config is a :class:`FieldDict`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp

from har_jax import cpu_conv
from har_jax import early_exit
from har_jax import losses
from har_jax import mixing
from har_jax import models
from har_jax.data import sampling
from har_jax.data import specs as data_specs

if TYPE_CHECKING:
  import ml_collections

# image_folder: a user's class folders (har_jax/data/image_folder.py), whose
# shape and classes come from the folder.
DATASETS = (*data_specs.DATASET_SPECS, "image_folder")
# Kept on the devices whole; the others stream from tfds (har_jax.data.streaming),
# and image_folder does either, by the size of its training split.
IN_MEMORY_DATASETS = ("digits", "cifar10", "cifar100")
LOSSES = ("ce", "focal", "ldam", "cdt", "logit_adjusted")
EXIT_CONFIDENCES = ("margin", "softmax")
HEAD_CHOICES = ("auto", *models.HEADS)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULES = ("step", "cosine")
# Which parameters the optimiser updates (train.trainable_mask); every other
# parameter and the BatchNorm statistics stay as they are (a second stage,
# har_jax/decouple.py): all; the classifier of every exit (cRT); the per-class
# logit scales of logit_affine (LWS).
TRAINABLE = ("all", "classifiers", "logit_scales")
# The fields a rerun in a run's workdir may change (har_jax/workdir.py refuses a
# change of any other): they set how often the run logs and saves, how many
# checkpoints it keeps, the size of its evaluation batches, where its data is
# read from and which kernels compute its convolutions, never what it trains or
# reports beyond floating-point rounding. eval_every_epochs is not among them:
# it decides the steps whose validation picks the best model. README.md,
# "Resuming", lists them too.
RESTART_SAFE_FIELDS = frozenset({
    "log_every_steps", "checkpoint_every_steps", "max_checkpoints", "eval_batch_size",
    "data_dir", "tfds_download", "conv_impl",
})


class ConfigError(ValueError):
  """A configuration that cannot run; the message says what to change."""


class FieldDict(dict):
  """The config's fields as attributes, where ml_collections is not installed.

  What the train step, the models and :func:`validate` read of a config; no
  type checks or locking, which ``ml_collections.ConfigDict`` (and so the
  trainer's command line) adds.
  """

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(f"config has no field {name!r}") from None

  def __setattr__(self, name, value):
    self[name] = value


def _empty_config():
  try:
    import ml_collections  # pylint: disable=g-import-not-at-top,redefined-outer-name
  except ImportError:
    return FieldDict()
  return ml_collections.ConfigDict()


def base_config() -> ml_collections.ConfigDict:
  """All fields, with the CIFAR-LT recipe of LDAM-DRW as defaults."""
  config = _empty_config()
  # Data.
  config.dataset = "digits"
  config.imbalance_factor = 100.0   # n_max / n_min of the long-tailed train split
                                    # (digits, CIFAR; ImageNet-LT/iNat have their own;
                                    # image_folder: > 1 subsamples the folder's split
                                    # by the LDAM-DRW rule, 1 keeps it as it is)
  config.validation_per_class = 0   # CIFAR, image_folder: balanced validation held
                                    # out of train
  config.data_dir = ""              # tfds data directory; "": tfds's default;
                                    # image_folder: ROOT of ROOT/{train,test}/<class>/*
  config.image_folder_memory_mb = 2048.0  # image_folder: a training split decoding
                                    # to at most this many MiB at image_size stays in
                                    # memory (on every device), a larger one streams
  config.image_folder_skip_unreadable = False  # image_folder: leave out files that
                                    # do not decode (counted in the log), not stop
  config.tfds_download = True       # prepare a missing tfds set (needs internet)
  config.image_size = 224           # streaming sets, image_folder: network input S x S
  config.shuffle_buffer = 10_000    # streaming sets: examples per process
  config.augment_pad = 4            # in-memory sets: zero padding before the random crop
  config.augment_flip = True        # in-memory sets: random horizontal flips
                                    # (streaming sets: random-resized crop and flip)
  config.shot_many = 100            # many-shot: more than this many train images
  config.shot_few = 20              # few-shot: fewer than this many
  config.sampler = "instance"       # instance | class_balanced | square_root |
                                    # progressive | effective_number (data/sampling.py)
  config.sampler_start_epoch = -1   # deferred re-sampling from this epoch (instance
                                    # before it); negative: from the start
  # Mixing (har_jax/mixing.py).
  config.mixing = "none"            # none | mixup | manifold | mfw
  config.mixup_alpha = 1.0          # mixup / manifold mixup: lam ~ Beta(alpha, alpha)
  config.mixing_stages = (0, 1, 2)  # manifold / mfw: boundaries drawn from per batch,
                                    # 0 the input, k after stage k
  config.mfw_max_probability = 0.5  # mfw: P(weakened) of the largest class ...
  config.mfw_power = 1.0            # ... times (n_j / n_max)^power for class j
  config.mfw_strength = 0.5         # mfw: partner share ~ U[0, strength], <= 1/2
  # Model.
  config.model = "resnet32"
  config.exits = "CBEBEBE"          # C stem, B stage, E exit (the paper's notation)
  config.head = "auto"              # linear | normed | auto (normed for LDAM)
  config.dtype = "float32"          # computation dtype; parameters stay float32
  config.logit_affine = False       # every exit's logits pass through a per-class
                                    # scale * z + offset, initialised to the identity
                                    # (the second stage's LWS scales and logit
                                    # adjustment, har_jax/decouple.py)
  config.conv_impl = "auto"         # auto | native | xla: float32 convolutions on one
                                    # CPU device run on har_jax's kernels (auto: when
                                    # they build), else on XLA's (har_jax/cpu_conv.py)
  # Loss.
  config.loss = "ce"                # ce | focal | ldam | cdt | logit_adjusted
  config.focal_gamma = 1.0
  config.ldam_max_margin = 0.5
  config.ldam_scale = 30.0
  config.cdt_gamma = 0.2            # CDT temperatures (n_max / n_j)^gamma
  config.logit_adjust_tau = 1.0     # logit-adjusted loss ce(z + tau log pi); 1: balanced softmax
  config.har = True                 # False: every exit trains on every example
  config.har_threshold = 0.9        # training exit confidence
  config.exit_threshold = -1.0      # inference exit confidence; < 0: har_threshold
  config.exit_confidence = "margin"  # cosine (LDAM) heads, training and inference:
                                    # margin: exp(-LDAM loss) of the class c,
                                    # softmax(s*(z - m_c*onehot(c)))[c]; softmax:
                                    # softmax(s*z)[c] (README: "HAR with LDAM");
                                    # linear heads (the other losses) always
                                    # softmax(z) of the raw logits
  config.exit_confidence_scale = -1.0  # cosine heads: s above; < 0: ldam_scale
  config.drw_start_epoch = 160      # negative: no deferred re-weighting
  config.drw_beta = 0.9999          # "effective number" beta of the DRW weights and
                                    # of the effective_number sampler
  # Optimisation.
  config.num_epochs = 200
  config.num_train_steps = -1       # > 0 overrides num_epochs
  config.batch_size = 128           # global, over every device of every process
  config.eval_batch_size = 256
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 2e-4
  config.schedule = "step"          # step: LDAM-DRW's; cosine
  config.warmup_epochs = 5
  config.lr_decay_epochs = (160, 180)
  config.lr_decay_factor = 0.01     # step schedule: x factor at each decay epoch
  config.seed = 0
  config.trainable = "all"          # all | classifiers | logit_scales: what the
                                    # optimiser updates; the rest, BatchNorm
                                    # statistics included, stays frozen
  # Second stage on a trained run (python -m har_jax.decouple, README "Decoupling").
  config.decouple_tau_grid = tuple(round(0.1 * i, 1) for i in range(21))  # tau_norm,
                                    # logit_adjust: tau of each exit chosen from these
  # The inference threshold saving the most FLOPs on the validation split within
  # this accuracy drop from the last exit (analyze.py's rule); negative: keep the
  # run's threshold.
  config.decouple_max_accuracy_drop = early_exit.DEFAULT_MAX_ACCURACY_DROP
  # Bookkeeping.
  config.log_every_steps = 100
  config.eval_every_epochs = 10     # validation split, where the data set has one
  config.checkpoint_every_steps = 1000
  config.max_checkpoints = 3
  return config


def cifar_lt_config(dataset: str) -> ml_collections.ConfigDict:
  """The paper's CIFAR-LT setting (configs/cifar10_lt.py, configs/cifar100_lt.py):
  HAR(LDAM) + DRW on :func:`base_config`, whose defaults are already ResNet-32
  with exits after stages 1 and 2, rho 100 and the LDAM-DRW schedule."""
  config = base_config()
  config.dataset = dataset
  config.loss = "ldam"
  return config


def resolved_head(config: ml_collections.ConfigDict) -> str:
  """The classifier head: ``auto`` means the cosine head for LDAM, linear otherwise."""
  if config.head == "auto":
    return "normed" if config.loss == "ldam" else "linear"
  return config.head


def logit_scale(config: ml_collections.ConfigDict) -> float:
  """The softmax scale of exit confidences: 1 for linear heads; for LDAM's cosine
  logits ``exit_confidence_scale``, by default LDAM's own scale."""
  if config.loss != "ldam":
    return 1.0
  if config.exit_confidence_scale < 0:
    return float(config.ldam_scale)
  return float(config.exit_confidence_scale)


def exit_confidence(config: ml_collections.ConfigDict, class_counts) -> dict:
  """How exits measure confidence, as the keyword arguments ``logit_scale`` and
  ``margins`` of ``losses.exit_masks`` / ``har_loss`` and ``early_exit.predict``
  / ``Cascade`` / ``threshold_curve``.

  Linear heads (CE, focal, CDT, logit-adjusted): ``softmax(z)`` of the raw
  logits, whatever the training loss does to them; no margins. LDAM with
  ``exit_confidence`` ``margin`` (the default): its scale and class margins, so
  that a confidence is ``exp(-ldam loss)`` of the class and a rare class, with
  its larger margin, exits later; ``softmax``: the scale alone.

  Args:
    class_counts: ``[C]`` training examples per class (for LDAM's margins).
  """
  margins = None
  if config.loss == "ldam" and config.exit_confidence == "margin":
    margins = losses.ldam_margins(class_counts, config.ldam_max_margin)
  return {"logit_scale": logit_scale(config), "margins": margins}


def starved_exits_advice(config: ml_collections.ConfigDict) -> str:
  """What to change when a run's deep exits starve (``metrics.starved_exits_warning``)."""
  if config.loss == "ldam" and config.exit_confidence != "margin":
    return ("Set exit_confidence=margin (the LDAM loss's own probability), a higher "
            "har_threshold, or har=False.")
  if config.loss == "ldam":
    return (f"Raise har_threshold (now {config.har_threshold:g}) or lower "
            f"exit_confidence_scale (now {logit_scale(config):g}), or set har=False.")
  return (f"Raise har_threshold (now {config.har_threshold:g}) so fewer training "
          "examples leave early, or set har=False.")


def inference_threshold(config: ml_collections.ConfigDict) -> float:
  if config.exit_threshold < 0:
    return float(config.har_threshold)
  return float(config.exit_threshold)


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The configured multi-exit network (validates model, exits, head and dtype)."""
  return models.get_model(config.model, num_classes=num_classes, exits=config.exits,
                          head=resolved_head(config), dtype=DTYPES[config.dtype],
                          logit_affine=config.logit_affine)


def validate(config: ml_collections.ConfigDict, *, num_devices: int,
             num_processes: int = 1) -> None:
  """Raises ConfigError with one clear message for the first problem found."""
  unknown = sorted(set(config.keys()) - set(base_config().keys()))
  if unknown:
    raise ConfigError(f"unknown config field(s) {unknown}; the fields are listed in "
                      "har_jax/config.py:base_config.")
  _one_of("dataset", config.dataset, DATASETS)
  _one_of("loss", config.loss, LOSSES)
  _one_of("exit_confidence", config.exit_confidence, EXIT_CONFIDENCES)
  _one_of("head", config.head, HEAD_CHOICES)
  _one_of("dtype", config.dtype, tuple(DTYPES))
  _one_of("conv_impl", config.conv_impl, cpu_conv.CONV_IMPLS)
  if config.conv_impl == "native" and num_devices != 1:
    raise ConfigError(f"conv_impl 'native' runs on one CPU device, not {num_devices}; "
                      "use conv_impl 'auto' (native where it can) or 'xla'.")
  if config.conv_impl == "native" and config.dtype != "float32":
    raise ConfigError(f"conv_impl 'native' computes in float32, not {config.dtype}; "
                      "use conv_impl 'auto' (native where it can) or 'xla'.")
  _one_of("schedule", config.schedule, SCHEDULES)
  _one_of("sampler", config.sampler, sampling.SAMPLERS)
  _one_of("mixing", config.mixing, mixing.MIXINGS)
  _one_of("trainable", config.trainable, TRAINABLE)
  if config.trainable == "logit_scales" and not config.logit_affine:
    raise ConfigError("trainable 'logit_scales' trains the scales of logit_affine; "
                      "set logit_affine True as well.")
  if not config.decouple_tau_grid or min(config.decouple_tau_grid) < 0:
    raise ConfigError(f"decouple_tau_grid must be a non-empty list of taus >= 0, got "
                      f"{list(config.decouple_tau_grid)}.")
  if not config.imbalance_factor >= 1:
    raise ConfigError(f"imbalance_factor must be >= 1 (largest class size over "
                      f"smallest), got {config.imbalance_factor}.")
  try:
    create_model(config, num_classes=2)
  except ValueError as error:
    raise ConfigError(f"model {config.model!r} with exits {config.exits!r}: "
                      f"{error}") from None
  if (config.loss == "ldam") != (resolved_head(config) == "normed"):
    raise ConfigError("loss 'ldam' goes with the cosine head 'normed', whose "
                      "logits it scales by ldam_scale, and the other losses with "
                      "'linear'; use head 'auto' to pair them.")
  for name in ("focal_gamma", "cdt_gamma"):
    if config[name] < 0:
      raise ConfigError(f"{name} must be >= 0, got {config[name]}.")
  for name in ("batch_size", "eval_batch_size"):
    size = config[name]
    if size <= 0 or size % num_devices:
      raise ConfigError(
          f"{name} {size} must be a positive multiple of the device count "
          f"({num_devices}), since every device takes an equal share; try "
          f"{max(num_devices, size - size % num_devices)}.")
    if size % num_processes:
      raise ConfigError(f"{name} {size} must be divisible by the number of "
                        f"processes ({num_processes}).")
  if config.num_epochs <= 0 and config.num_train_steps <= 0:
    raise ConfigError("set num_epochs or num_train_steps to a positive number.")
  if not 0.0 <= config.har_threshold <= 1.0:
    raise ConfigError(f"har_threshold is a softmax probability in [0, 1], got "
                      f"{config.har_threshold}.")
  if config.exit_threshold > 1.0:
    raise ConfigError(f"exit_threshold is a softmax probability in [0, 1] (or "
                      f"negative for har_threshold), got {config.exit_threshold}.")
  if config.exit_confidence_scale == 0:
    raise ConfigError("exit_confidence_scale is the softmax scale of a cosine head's "
                      "exit confidences: positive, or negative for ldam_scale; got 0.")
  if not config.mixup_alpha > 0:
    raise ConfigError(f"mixup_alpha must be > 0 (lam ~ Beta(alpha, alpha)), got "
                      f"{config.mixup_alpha}.")
  boundaries = create_model(config, num_classes=2).mixing_boundaries
  stages = tuple(config.mixing_stages)
  if not stages or any(stage not in boundaries for stage in stages):
    raise ConfigError(f"mixing_stages must be a non-empty subset of {list(boundaries)} "
                      f"(0 the input, k after stage k of {config.model}), got "
                      f"{list(stages)}.")
  if not 0.0 <= config.mfw_max_probability <= 1.0:
    raise ConfigError(f"mfw_max_probability is a probability in [0, 1], got "
                      f"{config.mfw_max_probability}.")
  if config.mfw_power < 0:
    raise ConfigError(f"mfw_power must be >= 0, got {config.mfw_power}.")
  if not 0.0 < config.mfw_strength <= 0.5:
    raise ConfigError(f"mfw_strength must be in (0, 0.5] (a weakened example keeps "
                      f"the larger share of its features), got {config.mfw_strength}.")
  if config.shot_few > config.shot_many:
    raise ConfigError(f"shot_few ({config.shot_few}) must not exceed shot_many "
                      f"({config.shot_many}).")
  if not 0.0 <= config.drw_beta < 1.0:
    raise ConfigError(f"drw_beta must be in [0, 1), got {config.drw_beta}.")
  if config.learning_rate <= 0:
    raise ConfigError(f"learning_rate must be positive, got {config.learning_rate}.")
  for name in ("log_every_steps", "checkpoint_every_steps", "max_checkpoints",
               "eval_every_epochs"):
    if config[name] <= 0:
      raise ConfigError(f"{name} must be positive, got {config[name]}.")
  if config.augment_pad < 0:
    raise ConfigError(f"augment_pad must be >= 0, got {config.augment_pad}.")
  if config.validation_per_class < 0:
    raise ConfigError(f"validation_per_class must be >= 0, got "
                      f"{config.validation_per_class}.")
  if config.dataset == "image_folder" and not config.data_dir:
    raise ConfigError("dataset 'image_folder' reads the folder --config.data_dir=ROOT "
                      "(ROOT/train/<class>/*, ROOT/test/<class>/*); none was given.")
  if config.image_folder_memory_mb < 0:
    raise ConfigError(f"image_folder_memory_mb must be >= 0, got "
                      f"{config.image_folder_memory_mb}.")
  if config.dataset not in IN_MEMORY_DATASETS:
    if config.image_size < 32:
      raise ConfigError(f"image_size must be at least 32, got {config.image_size}.")
    if config.shuffle_buffer < 1:
      raise ConfigError(f"shuffle_buffer must be positive, got "
                        f"{config.shuffle_buffer}.")


def _one_of(name: str, value: str, allowed: tuple) -> None:
  if value not in allowed:
    raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}.")
