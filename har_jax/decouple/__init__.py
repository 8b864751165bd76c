"""The second stage on a trained run: decoupled classifier learning, for every exit.

  python -m har_jax.decouple --workdir=RUN --method=crt|lws|tau_norm|logit_adjust \
      [--config.FIELD=VALUE ...]

Kang et al. (ICLR 2020) train a network once, then re-balance only its
classifier; with early exits every exit has its own. On the finished run in
``RUN`` (any model, exits and loss) the stage writes ``RUN/decoupled/METHOD/``,
a run folder like any other (config.json, checkpoints, summary.json; analyze.py
and early_exit_benchmark.py read it as a run):

- ``crt``: classifier re-training. The classifier of every exit (the layer from
  pooled features to logits) is re-initialised and trained alone, with
  class-balanced sampling; every other parameter and the BatchNorm statistics
  stay those of the run, bit for bit (``config.trainable = "classifiers"``).
- ``lws``: learnable weight scaling. Every exit's classifier is kept and one
  scale per class and exit, ``f_j (w_j . x + b_j)``, initialised to 1, is
  trained alone with class-balanced sampling (``config.logit_affine``,
  ``config.trainable = "logit_scales"``).
- ``tau_norm``: every exit's classifier becomes ``w_j / ||w_j||^tau``, bias
  dropped (:func:`tau_normalize`). A cosine head's class weights are unit-norm
  already: it stays as it is.
- ``logit_adjust``: post-hoc logit adjustment, ``z - tau log pi``
  (:func:`adjust_logits`), as the offsets of ``config.logit_affine``.

cRT and LWS are training runs of ``har_jax.train`` (checkpoints, exact resume,
SIGTERM saves, TensorBoard, several devices and processes) on a config derived
from the run's (:func:`stage_config`: the recipes of Kang et al.), started from
the run's latest checkpoint. For tau_norm and logit_adjust each exit's tau is the
one of ``config.decouple_tau_grid`` with the best balanced accuracy of that exit on
the validation split, and the test split is evaluated once, with the chosen taus.
Afterwards every method re-calibrates the early-exit threshold on the
validation split (the threshold saving the most FLOPs within
``config.decouple_max_accuracy_drop`` of the last exit's accuracy, analyze.py's
rule), or keeps the run's (a negative drop). A data set without a validation
split (iNaturalist) chooses on its test split, and the summary says so.

The folder follows the workdir rules (har_jax/workdir.py): the same command
again resumes cRT / LWS or returns the finished summary; another config in the
folder, or a live stage in it, is refused.
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Any, Callable, Optional, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from har_jax import checkpoint
from har_jax import config as config_lib
from har_jax import cpu_conv
from har_jax import early_exit
from har_jax import losses
from har_jax import metrics
from har_jax import models
from har_jax import sharding
from har_jax import train
from har_jax import workdir as workdir_lib
from har_jax.data import augment
from har_jax.data import long_tail

METHODS = ("crt", "lws", "tau_norm", "logit_adjust")
# The methods that train (a run of har_jax.train); the others are post-hoc.
TRAINED_METHODS = ("crt", "lws")
# Kang et al.'s recipe holds for these as published; the other data sets scale it.
KANG_RECIPE_DATASETS = ("imagenet_lt", "i_naturalist2018")
KANG_BATCH_SIZE = 512
KANG_LEARNING_RATE = 0.2
EPOCHS = {"crt": 10, "lws": 5}
STAGE_WEIGHT_DECAY = 5e-4
# What a run reports of itself and the stage reports again, for comparison.
_COMPARED = ("accuracy", "many", "medium", "few", "per_exit_accuracy", "exit_fraction",
             "flops_saving", "exit_threshold")


class DecoupleError(config_lib.ConfigError):
  """The stage cannot run on this folder or with this method; one line says why."""


def tau_normalize(kernel: jax.Array, tau: float) -> jax.Array:
  """``w_j / ||w_j||^tau`` for every class column ``w_j`` of ``kernel [D, C]``.

  tau 0 leaves the kernel as it is, tau 1 gives unit-norm columns; an all-zero
  column stays zero.
  """
  norms = jnp.linalg.norm(kernel, axis=0, keepdims=True)
  return kernel / jnp.where(norms > 0, norms, 1.0) ** tau


def adjust_logits(logits: jax.Array, class_counts: Sequence[int], tau: float) -> jax.Array:
  """``z - tau log pi`` on ``logits [..., C]``, ``pi_j = n_j / N`` the training
  share of class j (Menon et al. 2021, post-hoc); every count must be positive."""
  return logits - tau * losses.log_prior(class_counts)


def stage_config(run_config: ml_collections.ConfigDict,
                 method: str) -> ml_collections.ConfigDict:
  """The config of ``method`` on a run trained with ``run_config``.

  Everything that defines the data and the network stays the run's. cRT and
  LWS train with class-balanced sampling, no HAR (each exit's classifier learns
  from every example; they are independent once the features are frozen), no
  DRW and no mixing, cross-entropy (LDAM for a cosine head, which needs its
  scale), SGD with momentum and a cosine schedule without warm-up, weight decay
  5e-4, for 10 epochs (cRT) or 5 (LWS). ImageNet-LT and iNaturalist use Kang et
  al.'s batch 512 and learning rate 0.2; the other data sets keep the run's
  batch and scale the learning rate linearly, ``0.2 * batch / 512`` (CIFAR-LT:
  0.05 at 128, digits: 0.025 at 64). The stage validates once, after training.
  """
  config = config_lib.base_config()
  config.update(run_config)
  if method == "logit_adjust":
    config.logit_affine = True
  if method not in TRAINED_METHODS:
    return config
  config.trainable = "classifiers" if method == "crt" else "logit_scales"
  config.logit_affine = method == "lws"
  config.sampler = "class_balanced"
  config.sampler_start_epoch = -1
  config.mixing = "none"
  config.har = False
  config.drw_start_epoch = -1
  config.loss = "ldam" if config_lib.resolved_head(run_config) == "normed" else "ce"
  config.num_epochs = EPOCHS[method]
  config.num_train_steps = -1
  if config.dataset in KANG_RECIPE_DATASETS:
    config.batch_size = KANG_BATCH_SIZE
  config.learning_rate = KANG_LEARNING_RATE * config.batch_size / KANG_BATCH_SIZE
  config.schedule = "cosine"
  config.warmup_epochs = 0
  config.weight_decay = STAGE_WEIGHT_DECAY
  config.eval_every_epochs = config.num_epochs + 1
  return config


def stage_directory(run_dir: str, method: str) -> str:
  """Where ``method`` writes on the run in ``run_dir``: ``RUN/decoupled/METHOD``."""
  return os.path.join(run_dir, "decoupled", method)


def run(run_dir: str, method: str, overrides: Optional[dict] = None, *,
        mesh: Optional[jax.sharding.Mesh] = None) -> dict:
  """Runs ``method`` on the finished run in ``run_dir``; returns its summary.

  Args:
    run_dir: a finished run's folder (``python -m har_jax.main`` wrote it).
    method: one of ``METHODS``.
    overrides: config fields set on :func:`stage_config`'s.
    mesh: the devices to use; default every device of every process.

  Returns:
    The summary, also in ``RUN/decoupled/METHOD/summary.json``: a run's fields
    (DESIGN.md) for the stage's model and threshold, and ``decoupling``: what
    the stage chose, on which split, and the run's own numbers beside.

  Raises:
    DecoupleError: an unknown method, no finished run in ``run_dir``, its data
      set unavailable; config.ConfigError: a config the stage cannot run;
      workdir.WorkdirError: the stage's folder holds another config or a live
      stage. Nothing is written before these.
    train.Preempted, train.NonFiniteLossError: as a training run.
  """
  if method not in METHODS:
    raise DecoupleError(f"unknown method {method!r}; the methods are {list(METHODS)}.")
  run_config, run_summary = _finished_run(run_dir)
  config = stage_config(run_config, method)
  try:
    config.update(overrides or {})
  except (KeyError, TypeError, ValueError) as error:
    raise config_lib.ConfigError(f"overrides {overrides}: {error}") from None
  mesh = sharding.create_mesh() if mesh is None else mesh
  config_lib.validate(config, num_devices=mesh.size, num_processes=jax.process_count())
  try:
    data = train.load_data(run_config, workdir=run_dir)
  except ValueError as error:
    raise DecoupleError(f"{run_config.dataset}, the data set of {run_dir}: "
                        f"{error}") from None
  directory = stage_directory(run_dir, method)
  with workdir_lib.claim(directory, config) as claimed:
    finished = workdir_lib.read_json(os.path.join(directory, "summary.json"))
    if finished is not None and "decoupling" in finished:
      logging.info("%s on %s is finished; its summary stands.", method, run_dir)
      return finished
    stage = _Stage(run_dir, run_config, config, method, data, mesh)
    if method in TRAINED_METHODS:
      trained, chosen = stage.train(claimed), {}
    else:
      claimed.record_start()
      trained, chosen = stage.post_hoc()
    summary = stage.summary(run_summary, trained, chosen)
    if jax.process_index() == 0:
      workdir_lib.write_json(os.path.join(directory, "summary.json"), summary)
  return summary


def _finished_run(run_dir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The config and summary of the finished run in ``run_dir``."""
  if not os.path.isdir(run_dir):
    raise DecoupleError(f"--workdir {run_dir} does not exist; give a finished run's "
                        "folder (python -m har_jax.main --workdir=... wrote it).")
  recorded = workdir_lib.read_json(os.path.join(run_dir, workdir_lib.CONFIG_FILE))
  summary = workdir_lib.read_json(os.path.join(run_dir, "summary.json"))
  if recorded is None or summary is None:
    raise DecoupleError(f"{run_dir} holds no finished run (no "
                        f"{'config.json' if recorded is None else 'summary.json'}); "
                        "finish it first with python -m har_jax.main --config=... "
                        f"--workdir={run_dir}, which resumes from its checkpoints.")
  if "decoupling" in summary:
    raise DecoupleError(f"{run_dir} is a second stage's folder; decouple the run it "
                        f"was made from ({summary['decoupling']['run']}).")
  # A run recorded before a field existed ran with that field's default.
  config = config_lib.base_config()
  config.update(recorded)
  return config, summary


class _Stage:
  """What a stage needs of its run: the data, both models, the run's weights."""

  def __init__(self, run_dir: str, run_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, method: str, data: Any,
               mesh: jax.sharding.Mesh):
    self.run_dir, self.run_config, self.config = run_dir, run_config, config
    self.method, self.data, self.mesh = method, data, mesh
    self.directory = stage_directory(run_dir, method)
    self.run_model = config_lib.create_model(run_config, data.num_classes)
    self.model = config_lib.create_model(config, data.num_classes)
    self.native = train.native_convolutions(config, mesh)
    self.flops = models.exit_flops(self.model, data.image_shape)
    # Every choice is made on the validation split, where there is one.
    self.chosen_on = "validation" if data.has_validation else "test"
    try:
      self.run_state, self.run_step = train.restore_trained_state(
          run_config, run_dir, self.run_model, data.image_shape, mesh)
    except RuntimeError as error:  # IncompatibleCheckpointError among them
      raise DecoupleError(f"{run_dir}: {error}") from None
    if self.run_state is None:
      raise DecoupleError(f"{run_dir} holds no checkpoint of its run; finish it "
                          f"with python -m har_jax.main --workdir={run_dir}.")

  # -- cRT and LWS: a training run from the run's weights.

  def train(self, claimed: workdir_lib.Claim) -> dict:
    """Trains the classifiers (cRT) or the logit scales (LWS); returns the
    trainer's summary fields."""
    cache = os.path.join(self.run_dir, "class_counts.json")
    if os.path.exists(cache) and jax.process_index() == 0:
      # A streaming set's counts: the resumed stage's analyses skip a pass.
      shutil.copyfile(cache, os.path.join(self.directory, "class_counts.json"))
    trained = train.train_and_evaluate_claimed(
        self.config, claimed, self.mesh, data=self.data,
        initial_state=functools.partial(
            from_run, self.run_state,
            reinitialised=self.config.trainable == "classifiers"))
    return {name: trained[name] for name in ("train_loss", "train_step_compiles",
                                             "steps", "images_per_sec")}

  # -- tau_norm and logit_adjust: post hoc.

  def post_hoc(self) -> tuple[dict, dict]:
    """Chooses every exit's tau on the validation split, writes the adjusted
    state as the stage's checkpoint; returns (trainer fields, choices)."""
    params = sharding.to_host(self.run_state.params)
    num_exits = self.model.num_exits
    if self.method == "tau_norm" and config_lib.resolved_head(self.config) == "normed":
      logging.info("tau_norm leaves the cosine head of %s as it is: its class weights "
                   "are unit-norm already, so w / ||w||^tau = w for every tau.",
                   self.run_dir)
      chosen = {"tau": None, "identity": "a cosine head's class weights are unit-norm: "
                                        "tau-normalisation leaves them as they are"}
    else:
      taus = np.sort(np.asarray(self.config.decouple_tau_grid, np.float64))
      logits, labels = self.split_logits(self.run_model, self.run_state, self.chosen_on)
      adjusted = (self._tau_normalized(params) if self.method == "tau_norm"
                  else self._logit_adjusted())
      curve = tau_curve(logits, labels, taus, adjusted)
      best = [float(taus[np.argmax(row)]) for row in curve]  # ties: the smaller tau
      logging.info("%s: tau of each exit %s (balanced accuracy on the %s split %s).",
                   self.method, best, self.chosen_on,
                   [f"{row.max():.4f}" for row in curve])
      params = (tau_normalized_params(params, best, num_exits) if self.method == "tau_norm"
                else logit_adjusted_params(params, best, self.data.class_counts,
                                           _score_scale(self.config),
                                           self.data.num_classes))
      chosen = {"tau": best, "tau_grid": taus.tolist(),
                "tau_curve": [row.tolist() for row in curve]}
    self._save(params)
    return {"train_loss": None, "train_step_compiles": 0, "steps": 0,
            "images_per_sec": None}, chosen

  def _tau_normalized(self, params) -> Callable:
    # The logits of the tau-normalised classifier from the run's:
    # (w_j.x + b_j - b_j) / ||w_j||^tau, so the grid needs one pass over the split.
    layers = [_get(params, path) for path in classifier_paths(self.model.num_exits)]
    norms = [np.linalg.norm(layer["kernel"], axis=0) for layer in layers]
    biases = [layer.get("bias", np.zeros_like(n)) for layer, n in zip(layers, norms)]
    return lambda exit_, z, tau: (z - biases[exit_]) / norms[exit_] ** tau

  def _logit_adjusted(self) -> Callable:
    scale, counts = _score_scale(self.config), self.data.class_counts
    return lambda exit_, z, tau: adjust_logits(scale * z, counts, tau)

  def _save(self, params) -> None:
    """The post-hoc model as the stage's checkpoint (step 0), as a run's state."""
    run_state = sharding.to_host(self.run_state)
    tx = train.create_optimizer(self.config, train.learning_rate_fn(self.config, 1, 1))
    state = train.TrainState(step=np.zeros((), np.int32), params=params,
                             batch_stats=run_state.batch_stats,
                             opt_state=jax.tree.map(np.asarray, tx.init(params)),
                             key=run_state.key)
    checkpointer = checkpoint.Checkpointer(os.path.join(self.directory, "checkpoints"))
    try:
      checkpointer.save(0, sharding.replicate_host_data(state, self.mesh), wait=True)
    finally:
      checkpointer.close()

  # -- Every method: the threshold, the test split, the summary.

  def summary(self, run_summary: dict, trained: dict, chosen: dict) -> dict:
    """Re-calibrates the exit threshold and evaluates the test split."""
    state, _ = train.restore_trained_state(self.config, self.directory, self.model,
                                           self.data.image_shape, self.mesh)
    confidence = config_lib.exit_confidence(self.config, self.data.class_counts)
    flops = self.flops
    logits = {}
    drop = self.config.decouple_max_accuracy_drop
    if drop < 0:
      threshold = config_lib.inference_threshold(self.config)
      threshold_choice = {"threshold": threshold, "rule": "the run's threshold, kept"}
    else:
      logits[self.chosen_on] = self.split_logits(self.model, state, self.chosen_on)
      curve = early_exit.threshold_curve(*logits[self.chosen_on],
                                         early_exit.CALIBRATION_THRESHOLDS,
                                         flops.per_exit, flops.backbone, **confidence)
      calibration = early_exit.calibrate_threshold(curve, max_accuracy_drop=drop)
      threshold = calibration.threshold
      threshold_choice = {
          "threshold": threshold, "chosen_on": self.chosen_on,
          "rule": f"the most FLOPs saved within an accuracy drop of {drop} from the "
                  "last exit",
          "accuracy": calibration.accuracy, "flops_saving": calibration.flops_saving}
    if "test" not in logits:
      logits["test"] = self.split_logits(self.model, state, "test")
    groups = long_tail.shot_groups(self.data.class_counts, self.config.shot_many,
                                   self.config.shot_few)
    summary = metrics.logits_summary(
        *logits["test"], threshold=threshold, shot_groups=groups,
        exit_flops=flops.per_exit, backbone_flops=flops.backbone, **confidence)
    summary.update(trained, exit_threshold=threshold, exit_flops=list(flops.per_exit),
                   backbone_flops=flops.backbone,
                   class_counts=list(self.data.class_counts))
    summary["decoupling"] = {
        "method": self.method, "run": os.path.abspath(self.run_dir),
        "run_step": self.run_step, "chosen_on": self.chosen_on,
        "exit_threshold": threshold_choice, **chosen,
        "run_summary": {name: run_summary.get(name) for name in _COMPARED}}
    logging.info("%s on %s: accuracy %.4f (run %.4f), few %s (run %s), FLOPs saving "
                 "%.3f at threshold %g.", self.method, self.run_dir, summary["accuracy"],
                 run_summary["accuracy"], summary["few"], run_summary.get("few"),
                 summary["flops_saving"], threshold)
    return summary

  def split_logits(self, model: models.ResNet, state: train.TrainState,
                   which: str) -> tuple[np.ndarray, np.ndarray]:
    """``(exit logits [E, N, C], labels [N])`` of split ``which``, on the host."""
    mesh, mean, std, native = self.mesh, self.data.mean, self.data.std, self.native

    def logits_of(variables, batch):
      with cpu_conv.native_convolutions(native):
        exit_logits = model.apply(variables, augment.normalize(batch["images"], mean, std),
                                  train=False)
      return exit_logits, batch["labels"], batch["mask"]

    batched = sharding.batch_sharding(mesh)
    apply = jax.jit(logits_of, in_shardings=(sharding.replicated(mesh), batched),
                    out_shardings=(jax.sharding.NamedSharding(
                        mesh, jax.sharding.PartitionSpec(None, sharding.DATA_AXIS)),
                                   batched, batched))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    parts, labels = [], []
    for local in train.eval_local_batches(self.data, which, self.config):
      exit_logits, batch_labels, mask = sharding.to_host(
          apply(variables, sharding.global_batch(local, mesh)))
      parts.append(exit_logits[:, mask])
      labels.append(batch_labels[mask])
    logging.info("%s: the exit logits of the %d images of the %s split.", self.method,
                 sum(map(len, labels)), which)
    return np.concatenate(parts, axis=1), np.concatenate(labels)


def _score_scale(config: ml_collections.ConfigDict) -> float:
  """The scale of the class scores the training loss saw: LDAM's on its cosine
  logits, 1 for the raw logits of linear heads."""
  return float(config.ldam_scale) if config.loss == "ldam" else 1.0


def from_run(run_state: train.TrainState, fresh: train.TrainState, *,
             reinitialised: bool) -> train.TrainState:
  """The state a cRT / LWS run starts from: the run's parameters and BatchNorm
  statistics, except the freshly initialised classifiers (``reinitialised``,
  cRT) and the parameters the run lacks (LWS's scales, at 1); the optimiser
  starts afresh (momentum zero, as the fresh state's)."""
  fresh_params = flax.traverse_util.flatten_dict(fresh.params)
  run_params = flax.traverse_util.flatten_dict(run_state.params)
  renewed = (flax.traverse_util.flatten_dict(train.trainable_mask(fresh.params,
                                                                  "classifiers"))
             if reinitialised else {})
  params = {path: value if path not in run_params or renewed.get(path) else run_params[path]
            for path, value in fresh_params.items()}
  return fresh.replace(params=flax.traverse_util.unflatten_dict(params),
                       batch_stats=run_state.batch_stats)


def classifier_paths(num_exits: int) -> list[tuple[str, ...]]:
  """Where each exit's classifier sits in a ``models.ResNet``'s parameters."""
  return [(f"exit{index}", "classifier") for index in range(num_exits - 1)] + [
      ("classifier",)]


def _get(tree: dict, path: tuple[str, ...]) -> dict:
  for name in path:
    tree = tree[name]
  return tree


def tau_normalized_params(params: dict, taus: Sequence[float], num_exits: int) -> dict:
  """``params`` with the classifier of exit i tau-normalised with ``taus[i]``
  (:func:`tau_normalize`), its bias zero."""
  params = jax.tree.map(np.asarray, params)  # a copy, changed in place below
  for path, tau in zip(classifier_paths(num_exits), taus):
    layer = _get(params, path)
    layer["kernel"] = np.asarray(tau_normalize(layer["kernel"], tau))
    if "bias" in layer:
      layer["bias"] = np.zeros_like(layer["bias"])
  return params


def logit_adjusted_params(params: dict, taus: Sequence[float], class_counts: Sequence[int],
                          score_scale: float, num_classes: int) -> dict:
  """``params`` with every exit's ``logit_affine`` offsets set so that exit i's
  class scores ``s z`` (``s``: ``score_scale``, LDAM's on cosine logits) become
  ``adjust_logits(s z, class_counts, taus[i])``: offset ``-tau log pi / s``,
  scale 1."""
  params = dict(params)
  log_prior = np.asarray(losses.log_prior(class_counts))
  for index, tau in enumerate(taus):
    params[f"logit_affine{index}"] = {
        "scale": np.ones(num_classes, np.float32),
        "offset": (-tau * log_prior / score_scale).astype(np.float32)}
  return params


def balanced_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Mean over the classes present in ``labels [N]`` of the accuracy of
  ``argmax logits [N, C]`` on that class (plain accuracy on a balanced split)."""
  predictions = np.asarray(jnp.argmax(logits, axis=-1))
  return float(np.nanmean(metrics.per_class_accuracy(predictions, labels,
                                                     logits.shape[-1])))


def tau_curve(exit_logits: np.ndarray, labels: np.ndarray, taus: Sequence[float],
              adjusted: Callable[[int, np.ndarray, float], np.ndarray]) -> np.ndarray:
  """``[E, T]`` balanced accuracy of every exit at every tau.

  Args:
    exit_logits: ``[E, N, C]`` the run's logits of a split.
    labels: ``[N]``.
    taus: ``[T]``.
    adjusted: ``(exit, logits [N, C], tau) -> logits [N, C]``, the method.
  """
  return np.array([[balanced_accuracy(adjusted(index, logits, tau), labels)
                    for tau in taus] for index, logits in enumerate(exit_logits)])
