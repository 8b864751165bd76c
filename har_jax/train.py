"""Train state, the jitted train and eval steps, and the training loop.

The steps are pure ``(state, batch) -> (state, metrics)`` functions compiled once
per run: the learning rate, the DRW class weights, the re-sampled examples, the
augmentation and the mixing draws are all derived from ``state.step`` inside the
step. The train step is composed of pieces chosen once from the config
(:class:`StepPieces`: gather -> augment -> mix -> forward -> loss -> update). The
state is replicated over a one-axis mesh and the batch is split over it; the
state is donated.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from har_jax import checkpoint
from har_jax import config as config_lib
from har_jax import cpu_conv
from har_jax import early_exit
from har_jax import losses
from har_jax import metrics as metrics_lib
from har_jax import mixing as mixing_lib
from har_jax import models
from har_jax import runtime
from har_jax import sharding
from har_jax import workdir as workdir_lib
from har_jax.data import augment
from har_jax.data import digits
from har_jax.data import long_tail
from har_jax.data import pipeline
from har_jax.data import sampling

if TYPE_CHECKING:  # the annotations; the train step runs without ml_collections
  import ml_collections

# Exit status of a run stopped by SIGTERM after saving its checkpoint (128 + 15).
PREEMPTED_EXIT_CODE = 143
# Folded into a step's key for the draws of mixing.
_MIXING_STREAM = 1


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue: all arrays, so orbax saves it whole."""

  step: jax.Array         # int32 scalar: number of updates applied
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  key: jax.Array          # uint32 [2]; folded with the step for each step's randomness


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class Steps:
  """The compiled steps of a run and how often the train step was traced."""

  train: Callable[[TrainState, dict], tuple[TrainState, metrics_lib.TrainMetrics]]
  evaluate: Callable[[TrainState, dict], metrics_lib.EvalMetrics]
  train_traces: list
  # (state, resident) -> (state, metrics): the step that gathers its own batch
  # from the training split kept on the devices; None for streaming data.
  train_resident: Optional[Callable] = None
  # Whether the convolutions run on har_jax's CPU kernels (config.conv_impl).
  native_convolutions: bool = False

  @property
  def train_step_compiles(self) -> int:
    return len(self.train_traces)


def learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int,
                     total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """The learning rate at a step.

  ``step``: LDAM-DRW's schedule, per epoch: ``lr * (epoch + 1) / warmup`` during
  the warm-up epochs, then ``lr``, times ``lr_decay_factor`` once for every
  epoch of ``lr_decay_epochs`` reached (x0.01 at 160 and x0.0001 at 180).
  ``cosine``: linear warm-up per step, then cosine decay to 0 at the last step.
  """
  base = config.learning_rate
  warmup_epochs = config.warmup_epochs
  if config.schedule == "step":
    def schedule(step):
      epoch = step // steps_per_epoch
      warm = jnp.minimum(1.0, (epoch + 1) / max(warmup_epochs, 1))
      decays = sum((epoch >= boundary).astype(jnp.float32)
                   for boundary in config.lr_decay_epochs)
      return base * warm * config.lr_decay_factor ** decays
    return schedule

  warmup_steps = warmup_epochs * steps_per_epoch
  def schedule(step):
    warm = (step + 1) / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1),
                        0.0, 1.0)
    return jnp.where(step < warmup_steps, base * warm,
                     base * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
  return schedule


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: Callable) -> optax.GradientTransformation:
  """SGD with momentum and weight decay, as PyTorch's SGD, on the parameters
  ``config.trainable`` selects (:func:`trainable_mask`). The others get a zero
  update, weight decay included, so they stay what they were bit for bit."""
  sgd = optax.chain(optax.add_decayed_weights(config.weight_decay),
                    optax.sgd(schedule, momentum=config.momentum))
  if config.trainable == "all":
    return sgd
  return optax.multi_transform(
      {"trained": sgd, "frozen": optax.set_to_zero()},
      lambda params: jax.tree.map(lambda trained: "trained" if trained else "frozen",
                                  trainable_mask(params, config.trainable)))


def trainable_mask(params: Any, trainable: str) -> Any:
  """Which parameters the optimiser updates, a tree of bools like ``params``.

  Args:
    params: a ``models.ResNet``'s parameters.
    trainable: ``"all"``; ``"classifiers"``, the layer from pooled features to
      logits of every exit (``classifier`` and ``exit{i}/classifier``: not the
      exit heads' conv and BatchNorm); ``"logit_scales"``, the per-class scales
      of ``logit_affine{i}`` (not their offsets).
  """
  def trained(path, _):
    names = [key.key for key in path]
    if trainable == "classifiers":
      return "classifier" in names
    if trainable == "logit_scales":
      return names[0].startswith("logit_affine") and names[-1] == "scale"
    return True
  return jax.tree_util.tree_map_with_path(trained, params)


def base_loss_fn(config: ml_collections.ConfigDict, class_counts) -> losses.LossFn:
  """The per-example loss ``(logits [B, C], labels [B]) -> [B]`` of the config."""
  if config.loss == "focal":
    return functools.partial(losses.focal, gamma=config.focal_gamma)
  if config.loss == "ldam":
    margins = losses.ldam_margins(class_counts, config.ldam_max_margin)
    return functools.partial(losses.ldam, margins=margins, scale=config.ldam_scale)
  if config.loss == "cdt":
    return functools.partial(
        losses.cdt, temperatures=losses.cdt_temperatures(class_counts, config.cdt_gamma))
  if config.loss == "logit_adjusted":
    return functools.partial(losses.logit_adjusted, log_prior=losses.log_prior(class_counts),
                             tau=config.logit_adjust_tau)
  return losses.cross_entropy


def create_train_state(config: ml_collections.ConfigDict, model: models.ResNet,
                       tx: optax.GradientTransformation, image_shape: tuple,
                       mesh: jax.sharding.Mesh, *, abstract: bool = False):
  """The initial state, created directly in its (replicated) sharding.

  Args:
    image_shape: ``(H, W, C)`` of one input image.
    abstract: return only the ``jax.ShapeDtypeStruct`` tree (with shardings),
      as a restore target for checkpoints.
  """
  def init(seed):
    key = jax.random.PRNGKey(seed)
    init_key, state_key = jax.random.split(key)
    variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32),
                           train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), key=state_key)

  replicated = sharding.replicated(mesh)
  # A traced seed: runs that differ only in it share the compiled program.
  seed = np.int32(config.seed)
  shapes = jax.eval_shape(init, seed)
  if abstract:
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
  out_shardings = jax.tree.map(lambda _: replicated, shapes)
  return jax.jit(init, out_shardings=out_shardings)(seed)


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The run's length in steps: ``num_train_steps`` when positive, else the epochs'."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * steps_per_epoch


@dataclasses.dataclass(frozen=True)
class StepPieces:
  """The methods a train step is made of, each chosen once when the step is built.

  The step reads ``gather -> augment -> mix -> forward -> loss -> update``;
  every piece is a pure function of arrays, and everything that changes during
  a run (the step, the key, what mixing draws) is an argument, so the step
  compiles once whichever methods the pieces are. :func:`step_pieces` chooses
  them from a config; another stage may replace one with ``dataclasses.replace``.
  """

  # (images [B, H, W, C] uint8 or float, key) -> normalised float32 images.
  augment: Callable[[jax.Array, jax.Array], jax.Array]
  # (key, labels [B]) -> how the batch is mixed (a mixing.Mixing), or None.
  mix: mixing_lib.MixFn
  # (params, batch_stats, images, mixing) -> (exit logits [E, B, C], new batch_stats).
  forward: Callable[[Any, Any, jax.Array, Optional[mixing_lib.Mixing]],
                    tuple[jax.Array, Any]]
  # (exit logits [E, B, C], labels [B], mixing, step) -> (scalar loss, exit index [B]).
  loss: Callable[[jax.Array, jax.Array, Optional[mixing_lib.Mixing], jax.Array],
                 tuple[jax.Array, jax.Array]]
  # (resident training split, step) -> {'images', 'labels'} of global batch
  # ``step``; None when the data streams from the host.
  gather: Optional[Callable[[dict, jax.Array], dict]] = None


def make_augment(config: ml_collections.ConfigDict, data: Any) -> Callable:
  """In-memory sets: crop and flip on the device, then normalise; streaming
  sets (cropped and flipped on the host): normalise only."""
  mean, std = data.mean, data.std
  if not isinstance(data, pipeline.InMemoryData):
    return lambda images, key: augment.normalize(images, mean, std)

  def crop_flip_normalize(images, key):
    # Pad with black before normalising, as torchvision's RandomCrop does.
    images = augment.random_crop_flip(images.astype(jnp.float32), key,
                                      pad=config.augment_pad, flip=config.augment_flip)
    return augment.normalize(images, mean, std)
  return crop_flip_normalize


def make_resampling(config: ml_collections.ConfigDict, class_counts,
                    steps_per_epoch: int) -> Optional[sampling.Resampling]:
  """The config's re-sampling, or None for instance sampling from the start
  (the in-memory epoch permutation, the streaming shuffle)."""
  if config.sampler == "instance":
    return None
  return sampling.Resampling(
      config.sampler, tuple(class_counts), steps_per_epoch,
      total_train_steps(config, steps_per_epoch), start_epoch=config.sampler_start_epoch,
      beta=config.drw_beta)


def make_gather(config: ml_collections.ConfigDict, data: pipeline.InMemoryData,
                steps_per_epoch: int) -> Callable[[dict, jax.Array], dict]:
  """``(resident, step) -> batch``: global batch ``step`` gathered from the
  training split on the devices (:func:`resident_training_split`), its
  examples a function of the data seed and the step alone."""
  resampling = make_resampling(config, data.class_counts, steps_per_epoch)
  if resampling is None:
    num_train = data.num_train

    def indices_at(resident, step):
      # The epoch's permutation is redrawn every step so that the step stays a
      # function of state.step alone: 14 ms on 2 CPU cores for CIFAR-10-LT's
      # 12,406 images, under 1% of that step.
      return pipeline.train_indices(num_train, step=step,
                                    global_batch_size=config.batch_size,
                                    seed=resident["seed"])
  else:
    def indices_at(resident, step):
      return resampling.train_indices(resident["class_order"], step=step,
                                      seed=resident["seed"],
                                      global_batch_size=config.batch_size)

  def gather(resident, step):
    indices = indices_at(resident, step)
    return {"images": resident["images"][indices], "labels": resident["labels"][indices]}
  return gather


def make_mix(config: ml_collections.ConfigDict, class_counts) -> mixing_lib.MixFn:
  """``(key, labels) -> Mixing``: the config's mixing method (None for none)."""
  return mixing_lib.mixing_fn(
      config.mixing, alpha=config.mixup_alpha, boundaries=tuple(config.mixing_stages),
      class_counts=class_counts, mfw_max_probability=config.mfw_max_probability,
      mfw_power=config.mfw_power, mfw_strength=config.mfw_strength)


def make_forward(model: models.ResNet, *, frozen_statistics: bool = False) -> Callable:
  """The training forward pass: batch statistics from the batch, updated; the
  features mixed at the boundary the mixing drew. With ``frozen_statistics``
  (a stage that trains only classifiers on frozen features), BatchNorm
  normalises with the running statistics and keeps them as they are."""
  def forward(params, batch_stats, images, mixing):
    exit_logits, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                       images, train=True, mix=mixing,
                                       mutable=["batch_stats"])
    return exit_logits, updates["batch_stats"]

  def frozen(params, batch_stats, images, mixing):
    exit_logits = model.apply({"params": params, "batch_stats": batch_stats}, images,
                              train=False, mix=mixing)
    return exit_logits, batch_stats
  return frozen if frozen_statistics else forward


def make_loss(config: ml_collections.ConfigDict, class_counts, steps_per_epoch: int,
              exit_positions: tuple[int, ...]) -> Callable:
  """``(exit_logits, labels, mixing, step) -> (loss, exit_index)``: HAR over the
  base loss of the config, with the DRW weights from their epoch on; with
  mixup or manifold mixup, over the mixed targets (``losses.mixed_har_loss``:
  each exit judged by the dominant label, the exits before the mixing
  boundary by the clean one). MFW keeps every label: the plain loss."""
  base = base_loss_fn(config, class_counts)
  # How an exit's confidence is measured (LDAM: its scale and margins).
  confidence = config_lib.exit_confidence(config, class_counts)
  # A threshold of 1 never qualifies an exit: every exit trains on everything.
  threshold = config.har_threshold if config.har else 1.0
  class_weights_at = make_drw_weights(config, class_counts, steps_per_epoch)

  def plain(exit_logits, labels, mixing, step):
    del mixing  # none, or MFW's, which keeps the labels
    value = losses.har_loss(exit_logits, labels, threshold=threshold, loss_fn=base,
                            class_weights=class_weights_at(step), **confidence)
    _, exit_index = losses.exit_masks(exit_logits, labels, threshold=threshold,
                                      **confidence)
    return value, exit_index

  def mixed(exit_logits, labels, mixing, step):
    partner_labels = labels[mixing.partners]
    label_weights = mixing.exit_label_weights(exit_positions)
    value = losses.mixed_har_loss(exit_logits, labels, partner_labels, label_weights,
                                  threshold=threshold, loss_fn=base,
                                  class_weights=class_weights_at(step), **confidence)
    _, exit_index = losses.exit_masks(
        exit_logits, losses.dominant_labels(labels, partner_labels, label_weights),
        threshold=threshold, **confidence)
    return value, exit_index
  return mixed if config.mixing in mixing_lib.LABEL_MIXINGS else plain


def make_drw_weights(config: ml_collections.ConfigDict, class_counts,
                     steps_per_epoch: int) -> Callable[[jax.Array], Optional[jax.Array]]:
  """``step -> [C]`` class weights: ones before ``drw_start_epoch``, the
  class-balanced ones from it on (a traced switch); None without DRW."""
  if config.drw_start_epoch < 0:
    return lambda step: None
  drw_weights = losses.class_balanced_weights(class_counts, config.drw_beta)

  def class_weights_at(step):
    deferred = step // steps_per_epoch >= config.drw_start_epoch
    return jnp.where(deferred, drw_weights, jnp.ones_like(drw_weights))
  return class_weights_at


def step_pieces(config: ml_collections.ConfigDict, model: models.ResNet, data: Any,
                steps_per_epoch: int) -> StepPieces:
  """The pieces of the config's train step (see :class:`StepPieces`)."""
  in_memory = isinstance(data, pipeline.InMemoryData)
  return StepPieces(
      augment=make_augment(config, data),
      mix=make_mix(config, data.class_counts),
      forward=make_forward(model, frozen_statistics=config.trainable != "all"),
      loss=make_loss(config, data.class_counts, steps_per_epoch, model.exit_positions),
      gather=make_gather(config, data, steps_per_epoch) if in_memory else None)


def make_train_step(pieces: StepPieces, tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array],
                    class_groups: Any) -> Callable:
  """``(state, batch) -> (state, TrainMetrics)``: one update from the pieces;
  ``class_groups [C]`` (``data.shot_groups``) sorts the exits by shot group."""
  class_groups = jnp.asarray(class_groups, jnp.int32)
  def train_step(state: TrainState, batch: dict):
    key = jax.random.fold_in(state.key, state.step)
    images = pieces.augment(batch["images"], key)
    labels = batch["labels"]
    # Its own stream: the augmentation draws stay those of a run without mixing.
    mixing = pieces.mix(jax.random.fold_in(key, _MIXING_STREAM), labels)

    def objective(params):
      exit_logits, batch_stats = pieces.forward(params, state.batch_stats, images, mixing)
      loss, exit_index = pieces.loss(exit_logits, labels, mixing, state.step)
      return loss, (exit_logits, exit_index, batch_stats)

    (loss, (exit_logits, exit_index, batch_stats)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    new_state = apply_gradients(tx, state, grads, batch_stats)
    # The loss is of the parameters before the update; the loop must also know
    # whether the state it may checkpoint next is finite.
    finite = jnp.isfinite(loss)
    for leaf in jax.tree.leaves(new_state.params):
      finite &= jnp.all(jnp.isfinite(leaf))
    step_metrics = metrics_lib.TrainMetrics.single_from_model_output(
        loss=loss, finite=finite.astype(jnp.float32), learning_rate=schedule(state.step),
        exit_onehot=jax.nn.one_hot(exit_index, exit_logits.shape[0]),
        exit_correct=(jnp.argmax(exit_logits, -1) == labels[None]).T,
        group_onehot=jax.nn.one_hot(class_groups[labels], len(long_tail.SHOT_GROUP_NAMES)))
    return new_state, step_metrics
  return train_step


def apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads: Any,
                    batch_stats: Any) -> TrainState:
  """The state after one optimiser update, with the new batch statistics."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1,
                       params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state)


def make_eval_step(config: ml_collections.ConfigDict, model: models.ResNet,
                 data: Any) -> Callable:
  """``(state, batch) -> EvalMetrics``: early-exit inference on the raw logits
  with the run's exit confidence (``config.exit_confidence``)."""
  mean, std, num_classes = data.mean, data.std, data.num_classes
  confidence = config_lib.exit_confidence(config, data.class_counts)
  exit_threshold = config_lib.inference_threshold(config)

  def eval_step(state: TrainState, batch: dict):
    images = augment.normalize(batch["images"], mean, std)
    exit_logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                              images, train=False)
    labels, mask = batch["labels"], batch["mask"]
    predictions, exit_index = early_exit.predict(
        exit_logits, threshold=exit_threshold, **confidence)
    return metrics_lib.EvalMetrics.single_from_model_output(
        correct=predictions == labels, mask=mask,
        labels_onehot=jax.nn.one_hot(labels, num_classes),
        exit_correct=(jnp.argmax(exit_logits, -1) == labels[None]).T,
        exit_onehot=jax.nn.one_hot(exit_index, exit_logits.shape[0]))
  return eval_step


def native_convolutions(config: ml_collections.ConfigDict,
                        mesh: jax.sharding.Mesh) -> bool:
  """Whether the steps on ``mesh`` compute their convolutions on har_jax's CPU
  kernels (``config.conv_impl``, har_jax/cpu_conv.py)."""
  try:
    return cpu_conv.resolve(config.conv_impl, list(mesh.devices.flat), config.dtype)
  except ValueError as error:
    raise config_lib.ConfigError(str(error)) from None


def make_steps(config: ml_collections.ConfigDict, model: models.ResNet,
               tx: optax.GradientTransformation, data: Any,
               mesh: jax.sharding.Mesh, steps_per_epoch: int,
               schedule: Callable[[jax.Array], jax.Array]) -> Steps:
  """Builds the jitted train and eval steps of a run.

  Args:
    data: an ``InMemoryData`` (the step pads, crops and flips on the device,
      and ``Steps.train_resident`` gathers the batch itself) or a
      ``StreamingData`` (the host already cropped and flipped); only its
      statistics are used here.
    schedule: the learning-rate function ``tx`` uses; the step reports it.
  """
  native = native_convolutions(config, mesh)
  pieces = step_pieces(config, model, data, steps_per_epoch)
  step = make_train_step(pieces, tx, schedule, long_tail.shot_groups(
      data.class_counts, config.shot_many, config.shot_few))
  traces = []

  def train_step(state: TrainState, batch: dict):
    traces.append(None)  # runs only while tracing
    with cpu_conv.native_convolutions(native):
      return step(state, batch)

  eval_step = make_eval_step(config, model, data)

  def evaluate_step(state: TrainState, batch: dict):
    with cpu_conv.native_convolutions(native):
      return eval_step(state, batch)

  replicated = sharding.replicated(mesh)
  batched = sharding.batch_sharding(mesh)
  train = jax.jit(train_step, in_shardings=(replicated, batched),
                  out_shardings=(replicated, replicated), donate_argnums=0)
  evaluate = jax.jit(evaluate_step, in_shardings=(replicated, batched),
                     out_shardings=replicated)
  train_resident = None
  if pieces.gather is not None:
    def train_step_resident(state: TrainState, resident: dict):
      # The seed is an argument, not a constant, so runs that differ only in
      # their seed compile to the same program (and share a compilation cache).
      # Each device gathers only its own rows of the global batch.
      batch = jax.lax.with_sharding_constraint(pieces.gather(resident, state.step),
                                               batched)
      return train_step(state, batch)

    train_resident = jax.jit(train_step_resident, in_shardings=(replicated, replicated),
                             out_shardings=(replicated, replicated), donate_argnums=0)
  return Steps(train=train, evaluate=evaluate, train_traces=traces,
               train_resident=train_resident, native_convolutions=native)


def resident_training_split(data: pipeline.InMemoryData,
                            config: ml_collections.ConfigDict,
                            mesh: jax.sharding.Mesh) -> dict:
  """The training split, its examples in class order (what re-sampling draws
  from) and the data seed on every device: the second argument of
  ``Steps.train_resident``."""
  return sharding.replicate_host_data(
      {"images": data.train.images, "labels": data.train.labels,
       "class_order": sampling.class_order(data.train.labels),
       "seed": np.int32(config.seed)}, mesh)


class Preempted(Exception):
  """SIGTERM arrived; the state was checkpointed at ``step``."""

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}; the checkpoint of step {step} "
                     "is saved. Run the same command again to resume.")
    self.step = step


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None

  def __enter__(self):
    # In multi-process runs jax.distributed watches SIGTERM itself, and the
    # processes agree on the step to save at (Checkpointer.reached_preemption).
    if (threading.current_thread() is threading.main_thread()
        and jax.process_count() == 1):
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
    return self

  def __exit__(self, *_):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def load_data(config: ml_collections.ConfigDict, *, workdir: Optional[str] = None):
  """The configured data set: an ``InMemoryData`` or a ``StreamingData``.

  Streaming sets count their training labels in one pass over the data; with
  ``workdir`` the counts are kept in ``workdir/class_counts.json`` so that a
  resumed run skips the pass.

  Raises:
    ValueError: the data set cannot be loaded as configured (a
      ``DataNotPreparedError`` says how to prepare it).
  """
  if config.dataset == "digits":
    return digits.load_digits(imbalance_factor=config.imbalance_factor,
                               seed=config.seed)
  if config.dataset == "image_folder":
    from har_jax.data import image_folder  # pylint: disable=g-import-not-at-top
    return image_folder.load_from_config(config, workdir=workdir)
  # TensorFlow is imported only for the tfds sources.
  from har_jax.data import streaming  # pylint: disable=g-import-not-at-top
  from har_jax.data import tfds_sources  # pylint: disable=g-import-not-at-top
  data_dir = config.data_dir or None
  if config.dataset in config_lib.IN_MEMORY_DATASETS:
    return tfds_sources.load_cifar_lt(
        config.dataset, imbalance_factor=config.imbalance_factor, seed=config.seed,
        validation_per_class=config.validation_per_class, data_dir=data_dir,
        download=config.tfds_download)
  cache = os.path.join(workdir, "class_counts.json") if workdir else None
  cached = workdir_lib.read_json(cache) if cache else None
  if cached is not None and cached.get("dataset") != config.dataset:
    cached = None
  data = streaming.load_streaming(
      config.dataset, image_size=config.image_size,
      shuffle_buffer=config.shuffle_buffer, data_dir=data_dir,
      download=config.tfds_download, process_index=jax.process_index(),
      process_count=jax.process_count(),
      class_counts=cached["class_counts"] if cached else None)
  if cache and cached is None and jax.process_index() == 0:
    workdir_lib.write_json(cache, {"dataset": config.dataset,
                                   "class_counts": list(data.class_counts)})
  return data


def eval_local_batches(data, which: str, config: ml_collections.ConfigDict):
  """This process's evaluation batches of split ``which`` (``"validation"`` or
  ``"test"``) of an ``InMemoryData`` or a ``StreamingData``."""
  kwargs = dict(global_batch_size=config.eval_batch_size,
                process_index=jax.process_index(), process_count=jax.process_count())
  if isinstance(data, pipeline.InMemoryData):
    return pipeline.eval_batches(getattr(data, which), **kwargs)
  return data.eval_batches(which, **kwargs)


def evaluate(steps: Steps, state: TrainState, local_batches,
             mesh: jax.sharding.Mesh) -> dict:
  """EvalMetrics over this process's evaluation batches
  (:func:`eval_local_batches`), which together cover every example once."""
  merged = None
  for local in local_batches:
    batch_metrics = steps.evaluate(state, sharding.global_batch(local, mesh))
    merged = batch_metrics if merged is None else merged.merge(batch_metrics)
  return sharding.to_host(merged).compute()


def restore_trained_state(config: ml_collections.ConfigDict, workdir: str,
                          model: models.ResNet, image_shape: tuple,
                          mesh: jax.sharding.Mesh):
  """``(state, step)`` of the latest readable checkpoint of the run ``config``
  trained in ``workdir``, replicated over ``mesh``; ``(None, None)`` without one.

  Raises:
    checkpoint.IncompatibleCheckpointError: the checkpoints are of another model.
    RuntimeError: none of the checkpoints can be read.
  """
  # The optimiser's structure, not its schedule's values, must match the saved one.
  tx = create_optimizer(config, learning_rate_fn(config, 1, 1))
  abstract = create_train_state(config, model, tx, image_shape, mesh, abstract=True)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return checkpointer.restore_latest(abstract)
  finally:
    checkpointer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       mesh: Optional[jax.sharding.Mesh] = None,
                       initial_state: Optional[Callable[[TrainState], TrainState]] = None
                       ) -> dict:
  """Trains (resuming from ``workdir`` when it holds checkpoints), evaluates, and
  writes ``workdir/summary.json``, TensorBoard events and orbax checkpoints.

  The workdir holds one run (har_jax/workdir.py): a config that differs from
  the recorded one outside ``config.RESTART_SAFE_FIELDS``, checkpoints of
  another model, or another live run in it stop the run before it writes.

  Args:
    config: see ``har_jax/config.py``.
    workdir: the run's directory.
    mesh: the devices to use; default every device of every process.
    initial_state: maps the freshly initialised state to the one a run without
      checkpoints starts from (a second stage loads its first stage's
      parameters into it, har_jax/decouple.py); the optimiser state it keeps
      must fit the parameters it returns.

  Returns:
    The summary (see DESIGN.md for its fields).

  Raises:
    config.ConfigError: the configuration cannot run.
    workdir.WorkdirError (a ConfigError): the workdir holds another config's
      run or checkpoints, or a live run.
    NonFiniteLossError: the loss became NaN or infinite (checkpoints kept).
    Preempted: SIGTERM arrived; the state was saved first.
  """
  mesh = sharding.create_mesh() if mesh is None else mesh
  config_lib.validate(config, num_devices=mesh.size, num_processes=jax.process_count())
  runtime.log_platform(list(mesh.devices.flat))
  with workdir_lib.claim(workdir, config) as claimed:
    return train_and_evaluate_claimed(config, claimed, mesh, initial_state=initial_state)


def train_and_evaluate_claimed(
    config: ml_collections.ConfigDict, claimed: workdir_lib.Claim,
    mesh: jax.sharding.Mesh, *, data: Any = None,
    initial_state: Optional[Callable[[TrainState], TrainState]] = None) -> dict:
  """:func:`train_and_evaluate` in a workdir claimed by the caller (a stage
  that does more in the folder under the same claim), on a validated config;
  ``data``: the config's data set (:func:`load_data`) when the caller has it."""
  workdir = claimed.directory
  try:
    if data is None:
      data = load_data(config, workdir=workdir)
    steps_per_epoch = pipeline.steps_per_epoch(data.num_train, config.batch_size)
  except ValueError as error:
    raise config_lib.ConfigError(f"{config.dataset}: {error}") from None
  model = config_lib.create_model(config, data.num_classes)
  image_shape = data.image_shape
  total_steps = total_train_steps(config, steps_per_epoch)
  schedule = learning_rate_fn(config, steps_per_epoch, total_steps)
  tx = create_optimizer(config, schedule)
  steps = make_steps(config, model, tx, data, mesh, steps_per_epoch, schedule)
  flops = models.exit_flops(model, image_shape)
  groups = long_tail.shot_groups(data.class_counts, config.shot_many, config.shot_few)

  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=config.max_checkpoints)
  try:
    state, restored_step = checkpointer.restore_latest(
        create_train_state(config, model, tx, image_shape, mesh, abstract=True))
  except checkpoint.IncompatibleCheckpointError as error:
    checkpointer.close()
    raise workdir_lib.WorkdirError(
        f"{workdir} holds checkpoints of another model, exits or data set than this "
        f"config asks for ({config.model}, exits {config.exits}, "
        f"{data.num_classes} classes of {config.dataset}): {error}. Give this config "
        "a new workdir.") from None
  claimed.record_start()
  summary_path = os.path.join(workdir, "summary.json")
  best_path = os.path.join(workdir, "best_validation.json")
  if state is None:
    state = create_train_state(config, model, tx, image_shape, mesh)
    if initial_state is not None:
      state = initial_state(state)
    best = None  # a fresh run never inherits a stale record
  else:
    logging.info("Resumed from the checkpoint of step %d in %s.", restored_step, workdir)
    if restored_step >= total_steps and os.path.exists(summary_path):
      logging.info("The run in %s is finished; its summary stands.", workdir)
      checkpointer.close()
      return workdir_lib.read_json(summary_path)
    best = workdir_lib.read_json(best_path)
  writer = _create_writer(workdir)
  logging.info("%s: %d train images, class counts %s, %d steps of %d "
               "(%d per epoch), %d device(s).", config.dataset, data.num_train,
               _abbreviated(data.class_counts), total_steps, config.batch_size,
               steps_per_epoch, jax.device_count())

  start_step = int(sharding.to_host(state.step))
  if steps.train_resident is not None:
    resident = resident_training_split(data, config, mesh)
    batches = None
  else:
    batches = sharding.prefetch_to_mesh(data.train_batches(
        start_step=start_step, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        resampling=make_resampling(config, data.class_counts, steps_per_epoch)), mesh)
  last_step_metrics = None
  window = None
  timed_from = None  # (step, time) after the first (compiling) step of this process
  window_start = (start_step, time.time())
  try:
    with _SigtermFlag() as sigterm:
      for step in range(start_step, total_steps):
        if batches is None:
          state, step_metrics = steps.train_resident(state, resident)
        else:
          state, step_metrics = steps.train(state, next(batches))
        # Checking the previous step's loss while this one runs keeps the
        # device busy; a bad loss still stops the run before any save.
        if last_step_metrics is not None:
          _check_finite(*last_step_metrics)
        done = step + 1
        last_step_metrics = (done, step_metrics)
        window = step_metrics if window is None else window.merge(step_metrics)
        if timed_from is None:
          jax.block_until_ready(state.step)
          timed_from = window_start = (done, time.time())

        if done % config.log_every_steps == 0 or done == total_steps:
          _check_finite(*last_step_metrics)
          _log_progress(writer, window, done, total_steps, steps_per_epoch,
                        config.batch_size, window_start)
          window, window_start = None, (done, time.time())
        if (data.has_validation
            and done % (config.eval_every_epochs * steps_per_epoch) == 0):
          best = _validate(steps, state, data, config, mesh, writer, done, best,
                           best_path, groups, flops)
        preempted = (checkpointer.reached_preemption(done) if jax.process_count() > 1
                     else sigterm.event.is_set())
        if done % config.checkpoint_every_steps == 0 or done == total_steps or preempted:
          _check_finite(*last_step_metrics)
          checkpointer.save(done, state, wait=preempted)
        if preempted:
          raise Preempted(done)
  except BaseException:
    writer.close()
    raise
  finally:
    checkpointer.close()

  jax.block_until_ready(state)
  elapsed = time.time() - timed_from[1] if timed_from else 0.0
  timed_steps = total_steps - timed_from[0] if timed_from else 0
  summary = metrics_lib.evaluation_summary(
      evaluate(steps, state, eval_local_batches(data, "test", config), mesh),
      groups, flops.per_exit, flops.backbone)
  final_loss = (float(sharding.to_host(last_step_metrics[1].loss.compute()))
                if last_step_metrics else None)
  summary.update(
      train_loss=final_loss,
      train_step_compiles=steps.train_step_compiles,
      steps=total_steps,
      images_per_sec=(timed_steps * config.batch_size / elapsed
                      if timed_steps > 0 and elapsed > 0 else None),
      exit_threshold=config_lib.inference_threshold(config),
      exit_flops=list(flops.per_exit),
      backbone_flops=flops.backbone,
      class_counts=list(data.class_counts))
  if best is not None:
    summary["validation"] = best
  writer.write_scalars(total_steps, _evaluation_scalars("test", summary))
  writer.close()
  if jax.process_index() == 0:
    workdir_lib.write_json(summary_path, summary)
    warn_if_exits_starved(config, summary)
  return summary


def warn_if_exits_starved(config: ml_collections.ConfigDict,
                          summary: dict) -> Optional[str]:
  """Logs one warning line, and returns it, when a HAR run's deeper exit alone is
  much worse than a shallower one (``metrics.starved_exits_warning``)."""
  if not config.har:
    return None
  warning = metrics_lib.starved_exits_warning(
      summary["per_exit_accuracy"], advice=config_lib.starved_exits_advice(config))
  if warning:
    logging.warning("%s", warning)
  return warning


def _check_finite(step: int, step_metrics: metrics_lib.TrainMetrics) -> None:
  fetched = sharding.to_host(step_metrics)
  if fetched.finite.compute() < 1:
    raise NonFiniteLossError(
        f"the training loss ({float(fetched.loss.compute())}) or the parameters "
        f"it produced are not finite at step {step}; the run stops and keeps its "
        "last good checkpoint. Lower the learning rate or check the data.")


def _log_progress(writer, window, done, total_steps, steps_per_epoch, batch_size,
                  window_start) -> None:
  computed = sharding.to_host(window).compute()
  seconds = max(time.time() - window_start[1], 1e-9)
  steps_per_sec = (done - window_start[0]) / seconds
  remaining = (total_steps - done) / max(steps_per_sec, 1e-9)
  if jax.process_index() == 0:
    logging.info("step %d/%d (epoch %.1f): loss %.4f, lr %.3g, exits %s | %.1f steps/s, "
                 "%.0f images/s, %s left", done, total_steps, done / steps_per_epoch,
                 computed["loss"], computed["learning_rate"],
                 "/".join(f"{f:.2f}" for f in computed["exit_fraction"]), steps_per_sec,
                 steps_per_sec * batch_size, _duration(remaining))
  scalars = {"train/loss": computed["loss"],
             "train/learning_rate": computed["learning_rate"],
             "train/steps_per_sec": steps_per_sec}
  for name in ("exit_fraction", "exit_accuracy"):
    for index, value in enumerate(computed[name]):
      scalars[f"train/{name}_{index}"] = value
  # experiments/training_exits.py plots these: the exits of each shot group.
  by_group = np.reshape(computed["exit_fraction_by_group"],
                        (len(long_tail.SHOT_GROUP_NAMES), -1))
  for group, fractions in zip(long_tail.SHOT_GROUP_NAMES, by_group):
    for index, value in enumerate(fractions):
      scalars[f"train/exit_fraction_{group}_{index}"] = value
  writer.write_scalars(done, scalars)


def _validate(steps, state, data, config, mesh, writer, done, best, best_path,
              groups, flops):
  """Evaluates the validation split; on a new best, records the test result too."""
  validation_summary = metrics_lib.evaluation_summary(
      evaluate(steps, state, eval_local_batches(data, "validation", config), mesh),
      groups, flops.per_exit, flops.backbone)
  accuracy = validation_summary["accuracy"]
  logging.info("step %d: validation accuracy %.4f", done, accuracy)
  writer.write_scalars(done, _evaluation_scalars("validation", validation_summary))
  if best is not None and accuracy <= best["best_accuracy"]:
    return best
  # Selection uses the validation split alone; the test numbers only ride along.
  test = metrics_lib.evaluation_summary(
      evaluate(steps, state, eval_local_batches(data, "test", config), mesh),
      groups, flops.per_exit, flops.backbone)
  best = {"best_accuracy": accuracy, "best_step": done, "test_at_best": test}
  if jax.process_index() == 0:
    workdir_lib.write_json(best_path, best)
  return best


def _evaluation_scalars(prefix: str, summary: dict) -> dict:
  """The evaluation numbers of a summary as TensorBoard scalars, lists per exit."""
  scalars = {}
  for name in ("accuracy", "many", "medium", "few", "flops_saving"):
    if summary.get(name) is not None:
      scalars[f"{prefix}/{name}"] = summary[name]
  for name in ("per_exit_accuracy", "exit_fraction"):
    for index, value in enumerate(summary[name]):
      scalars[f"{prefix}/{name}_{index}"] = value
  return scalars


def _create_writer(workdir: str):
  # clu's TensorBoard writer imports TensorFlow; the steps above do not need it.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)


def _abbreviated(values, shown: int = 12) -> str:
  values = list(values)
  if len(values) <= shown:
    return str(values)
  head = ", ".join(map(str, values[:shown // 2]))
  tail = ", ".join(map(str, values[-shown // 2:]))
  return f"[{head}, ... ({len(values)} classes) ..., {tail}]"


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
