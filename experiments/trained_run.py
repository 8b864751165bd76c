"""Loads what a trained workdir holds: its config, data, model and latest weights.

Shared by the scripts in this folder that study a finished run
(``early_exit_benchmark.py``, ``analyze.py``). The run's config is the
``config.json`` that ``har_jax.main`` writes into every workdir. A second stage's
folder (``RUN/decoupled/METHOD``, har_jax/decouple.py) is a run like any other.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import ml_collections

from har_jax import config as config_lib
from har_jax import models
from har_jax import sharding
from har_jax import train
from har_jax.data import augment
from har_jax.data import pipeline


class RunError(Exception):
  """The workdir cannot be studied; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A trained run, restored on one device.

  Attributes:
    config: the run's configuration.
    data: its data set (the same splits as in training).
    model: the multi-exit network.
    variables: ``{"params", "batch_stats"}`` of the latest checkpoint.
    step: the training step of that checkpoint.
    summary: the run's ``summary.json``, or None for an unfinished run.
  """
  config: ml_collections.ConfigDict
  data: pipeline.InMemoryData
  model: models.ResNet
  variables: Any
  step: int
  summary: Optional[dict]

  @property
  def confidence(self) -> dict:
    """How the exits measure confidence: ``logit_scale`` and ``margins``, the
    keyword arguments of ``early_exit.predict`` / ``Cascade`` / ``threshold_curve``."""
    return config_lib.exit_confidence(self.config, self.data.class_counts)

  @property
  def threshold(self) -> float:
    """The run's inference exit threshold: its summary's (a second stage
    re-calibrates it, har_jax/decouple.py), else its config's."""
    if self.summary is not None and "exit_threshold" in self.summary:
      return float(self.summary["exit_threshold"])
    return config_lib.inference_threshold(self.config)

  def exit_logits_fn(self):
    """Jitted ``(variables, uint8 images [B, H, W, C]) -> exit logits [E, B, C]``.

    Normalises inside the program, as the trainer's evaluation step does, so
    the logits (and decisions near a threshold) are those of the evaluation.
    """
    mean, std, model = self.data.mean, self.data.std, self.model
    return jax.jit(lambda variables, images: model.apply(
        variables, augment.normalize(images, mean, std), train=False))


def check_workdir(workdir: str) -> None:
  """Raises RunError unless ``workdir`` has a config and a checkpoint directory."""
  if not os.path.isdir(workdir):
    raise RunError(f"workdir {workdir} does not exist.")
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(checkpoints) or not os.listdir(checkpoints):
    raise RunError(f"{workdir} holds no checkpoint; train first with "
                   f"python -m har_jax.main --config=... --workdir={workdir}")
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise RunError(f"{workdir} has no config.json; har_jax.main writes it when a "
                   "run starts (run the training command again in this workdir: "
                   "it resumes from the checkpoints).")


def load_run(workdir: str) -> TrainedRun:
  """Restores the latest checkpoint of ``workdir`` onto the first local device.

  Raises:
    RunError: the workdir is missing, has no config or no readable checkpoint.
  """
  check_workdir(workdir)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    # A run recorded before a field existed ran with that field's default.
    config = config_lib.base_config()
    config.update(json.load(f))
  try:
    data = train.load_data(config, workdir=workdir)
  except ValueError as error:
    raise RunError(f"{config.dataset}: {error}") from None
  if not isinstance(data, pipeline.InMemoryData):
    raise RunError(f"{config.dataset} streams; the analyses and the inference "
                   f"benchmark hold a split in memory and support the in-memory "
                   f"data sets {list(config_lib.IN_MEMORY_DATASETS)} and image "
                   f"folders whose training split fits image_folder_memory_mb.")
  model = config_lib.create_model(config, data.num_classes)
  mesh = sharding.create_mesh(jax.local_devices()[:1])
  checkpoints = os.path.join(workdir, "checkpoints")
  try:
    state, step = train.restore_trained_state(config, workdir, model, data.image_shape,
                                              mesh)
  except RuntimeError as error:
    raise RunError(str(error)) from None
  if state is None:
    raise RunError(f"{checkpoints} holds no checkpoint; train first with "
                   f"python -m har_jax.main --config=... --workdir={workdir}")
  summary_path = os.path.join(workdir, "summary.json")
  summary = None
  if os.path.isfile(summary_path):
    with open(summary_path, encoding="utf-8") as f:
      summary = json.load(f)
  return TrainedRun(config=config, data=data, model=model,
                    variables={"params": state.params, "batch_stats": state.batch_stats},
                    step=step, summary=summary)
