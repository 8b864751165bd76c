"""The training-time baselines end to end on digits: each trains with one flag,
alone and with HAR + DRW, evaluates, and compiles its step once; a resumed run
with re-sampling and mixup ends where an uninterrupted one ends; bad settings
are refused before anything runs.

The method runs share what does not depend on the method (the data, the initial
state, the compiled evaluation) and run a few steps each on one device, so that
the module stays cheap; the step of each is the one ``train.make_steps`` builds.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from har_jax import config as config_lib
from har_jax import early_exit
from har_jax import sharding
from har_jax import train
from har_jax.data import mock
from har_jax.data import pipeline

import runs

STEPS = 8  # 7 steps an epoch: DRW and deferred re-sampling switch on at step 7
ONE_FLAG = {
    "cdt": {"loss": "cdt"},
    "logit_adjusted": {"loss": "logit_adjusted"},
    "class_balanced": {"sampler": "class_balanced"},
    "square_root": {"sampler": "square_root"},
    "progressive": {"sampler": "progressive"},
    "effective_number": {"sampler": "effective_number"},
    "mixup": {"mixing": "mixup"},
    "manifold": {"mixing": "manifold"},
    "mfw": {"mixing": "mfw"},
}
ALONE = {"har": False, "drw_start_epoch": -1}
# With HAR + DRW, one member of each family at a time, so every method meets the
# others: these 3 runs and the resumed run's (RESUMED) cover the 9 methods.
WITH_HAR_DRW = {
    "logit_adjusted+square_root+manifold": {"loss": "logit_adjusted",
                                            "sampler": "square_root",
                                            "mixing": "manifold"},
    "progressive+mfw": {"sampler": "progressive", "mixing": "mfw"},
    "effective_number": {"sampler": "effective_number"},
}
RESUMED = {"loss": "cdt", "sampler": "class_balanced", "sampler_start_epoch": 1,
           "mixing": "mixup"}
HAR_DRW = {"har": True, "drw_start_epoch": 1}


def _config(**overrides):
  return runs.small_config(num_train_steps=STEPS, **overrides)


@pytest.fixture(scope="module")
def shared():
  """Data, mesh, the initial state (host copy) and one compiled evaluation."""
  config = _config()
  mesh = sharding.create_mesh(jax.devices()[:1])
  data = train.load_data(config)
  per_epoch = pipeline.steps_per_epoch(data.num_train, config.batch_size)
  model = config_lib.create_model(config, data.num_classes)
  schedule = train.learning_rate_fn(config, per_epoch, STEPS)
  tx = train.create_optimizer(config, schedule)
  initial = sharding.to_host(train.create_train_state(config, model, tx,
                                                      data.image_shape, mesh))
  evaluation = train.make_steps(config, model, tx, data, mesh, per_epoch, schedule)
  return dict(mesh=mesh, data=data, per_epoch=per_epoch, initial=initial,
              evaluation=evaluation)


def _train(shared, config):
  """STEPS steps of the config's compiled step from the shared initial state."""
  mesh, data, per_epoch = shared["mesh"], shared["data"], shared["per_epoch"]
  config_lib.validate(config, num_devices=mesh.size)
  model = config_lib.create_model(config, data.num_classes)
  schedule = train.learning_rate_fn(config, per_epoch, STEPS)
  tx = train.create_optimizer(config, schedule)
  steps = train.make_steps(config, model, tx, data, mesh, per_epoch, schedule)
  state = jax.device_put(shared["initial"], sharding.replicated(mesh))
  resident = train.resident_training_split(data, config, mesh)
  step_losses = []
  for _ in range(STEPS):
    state, step_metrics = steps.train_resident(state, resident)
    step_losses.append(float(step_metrics.loss.compute()))
  result = train.evaluate(shared["evaluation"], state,
                          train.eval_local_batches(data, "test", config), mesh)
  return steps, state, step_losses, result


def _check_trained(steps, step_losses, result, initial_accuracy):
  assert steps.train_step_compiles == 1
  assert np.all(np.isfinite(step_losses)), step_losses
  # From the initial state, the loss falls over the first epoch (DRW and deferred
  # re-sampling raise it at step 7) and the test accuracy rises.
  assert np.mean(step_losses[5:7]) < np.mean(step_losses[:2]), step_losses
  assert result["accuracy"] > initial_accuracy + 0.05, (result["accuracy"], initial_accuracy)
  np.testing.assert_allclose(np.sum(result["exit_fraction"]), 1.0, rtol=1e-5)


@pytest.fixture(scope="module")
def initial_accuracy(shared):
  mesh = shared["mesh"]
  state = jax.device_put(shared["initial"], sharding.replicated(mesh))
  return train.evaluate(shared["evaluation"], state, train.eval_local_batches(
      shared["data"], "test", _config()), mesh)["accuracy"]


@pytest.mark.parametrize("method", list(ONE_FLAG))
def test_each_method_alone_trains_evaluates_and_compiles_once(shared, initial_accuracy,
                                                              method):
  steps, _, step_losses, result = _train(shared, _config(**ALONE, **ONE_FLAG[method]))
  _check_trained(steps, step_losses, result, initial_accuracy)


@pytest.mark.parametrize("methods", list(WITH_HAR_DRW))
def test_each_method_with_har_and_drw_trains_evaluates_and_compiles_once(
    shared, initial_accuracy, methods):
  config = _config(**HAR_DRW, **WITH_HAR_DRW[methods])
  steps, state, step_losses, result = _train(shared, config)
  _check_trained(steps, step_losses, result, initial_accuracy)
  if config.loss == "logit_adjusted":
    # Inference judges the raw logits: the evaluation equals early exit on them.
    test = shared["data"].test
    images = (test.images / 255.0 - np.asarray(shared["data"].mean)) / np.asarray(
        shared["data"].std)
    model = config_lib.create_model(config, shared["data"].num_classes)
    exit_logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                              images.astype(np.float32), train=False)
    predictions, _ = early_exit.predict(exit_logits, threshold=config.har_threshold)
    np.testing.assert_allclose(result["accuracy"],
                               np.mean(np.asarray(predictions) == test.labels), rtol=1e-6)


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  del summary["images_per_sec"]  # a timing
  return summary


def test_resumed_run_with_resampling_and_mixup_ends_where_an_uninterrupted_one_ends(
    tmp_path, initial_accuracy):
  # CDT, deferred class-balanced re-sampling and mixup with HAR + DRW, through the
  # loop; the resumed part crosses the switch of DRW and re-sampling at step 7.
  config = _config(**HAR_DRW, **RESUMED, checkpoint_every_steps=4)
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  summary = train.train_and_evaluate(config, str(whole))
  assert summary["train_step_compiles"] == 1 and np.isfinite(summary["train_loss"])
  assert summary["accuracy"] > initial_accuracy + 0.05
  # What a run killed between steps 4 and 8 leaves: the checkpoint of step 4.
  shutil.copytree(whole, resumed)
  shutil.rmtree(resumed / "checkpoints" / str(STEPS))
  os.remove(resumed / "summary.json")
  train.train_and_evaluate(config, str(resumed))
  assert _summary(resumed) == _summary(whole)


@pytest.mark.parametrize("overrides, message", [
    ({"sampler": "balanced"}, r"sampler must be one of \['instance', 'class_balanced', "
                              r"'square_root', 'progressive', 'effective_number'\], "
                              r"got 'balanced'"),
    ({"mixing": "cutmix"}, r"mixing must be one of \['none', 'mixup', 'manifold', "
                           r"'mfw'\], got 'cutmix'"),
    ({"mixup_alpha": 0.0}, r"mixup_alpha must be > 0"),
    ({"cdt_gamma": -0.1}, r"cdt_gamma must be >= 0, got -0.1"),
    ({"loss": "cdt", "head": "normed"}, r"loss 'ldam' goes with the cosine head"),
    ({"mixing": "manifold", "mixing_stages": (0, 4)},
     r"mixing_stages must be a non-empty subset of \[0, 1, 2, 3\]"),
    ({"mixing": "mfw", "mfw_strength": 0.7}, r"mfw_strength must be in \(0, 0.5\]"),
    ({"mixing": "mfw", "mfw_max_probability": 1.5}, r"mfw_max_probability"),
], ids=["sampler", "mixing", "mixup_alpha", "cdt_gamma", "cdt_head", "mixing_stages",
        "mfw_strength", "mfw_probability"])
def test_bad_settings_are_one_line_naming_the_field(tmp_path, overrides, message):
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError, match=message) as error:
    train.train_and_evaluate(_config(**overrides), str(workdir))
  assert "\n" not in str(error.value)
  assert not workdir.exists(), "nothing is written before the check"


# The tfds paths: CIFAR-10-LT in memory and ImageNet-LT streamed, on tfds mock data.
# One run each with a loss, a deferred sampler and a mixing at once, with HAR + DRW.
@pytest.mark.parametrize("dataset, overrides", [
    ("cifar10", {"imbalance_factor": 5.0, "validation_per_class": 0}),
    ("imagenet_lt", {"image_size": 32, "shuffle_buffer": 64}),
], ids=["cifar10_lt_in_memory", "imagenet_lt_streamed"])
def test_methods_run_on_mock_tfds_sets(tmp_path, dataset, overrides):
  config = runs.small_config(
      dataset=dataset, model="resnet8", exits="CBEBEBE", tfds_download=False,
      batch_size=16, eval_batch_size=64, num_train_steps=4, log_every_steps=2,
      checkpoint_every_steps=4, eval_every_epochs=1000, **HAR_DRW,
      loss="logit_adjusted", sampler="class_balanced", sampler_start_epoch=0,
      mixing="manifold", **overrides)
  with mock.mock_tfds(train_per_class=10, test_per_class=1):
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["steps"] == 4 and summary["train_step_compiles"] == 1
  assert np.isfinite(summary["train_loss"])
  assert len(summary["per_exit_accuracy"]) == 3
  np.testing.assert_allclose(np.sum(summary["exit_fraction"]), 1.0, rtol=1e-5)
