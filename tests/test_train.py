"""The train step, schedules and the loop, in process."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from har_jax import checkpoint
from har_jax import config as config_lib
from har_jax import cpu_conv
from har_jax import losses
from har_jax import sharding
from har_jax import train
from har_jax.data import augment
from har_jax.data import pipeline

import runs


def test_step_schedule_is_ldam_drw():
  config = runs.default_config()
  config.update(learning_rate=0.1, warmup_epochs=5, lr_decay_epochs=(160, 180),
                lr_decay_factor=0.01, schedule="step")
  schedule = train.learning_rate_fn(config, steps_per_epoch=10, total_steps=2000)

  def reference(epoch):  # LDAM-DRW's adjust_learning_rate, epochs counted from 1
    epoch += 1
    if epoch <= 5:
      return 0.1 * epoch / 5
    if epoch > 180:
      return 0.1 * 0.0001
    if epoch > 160:
      return 0.1 * 0.01
    return 0.1

  for step in [0, 9, 10, 45, 50, 1000, 1599, 1600, 1799, 1800, 1999]:
    np.testing.assert_allclose(schedule(jnp.int32(step)), reference(step // 10),
                               rtol=1e-5, err_msg=f"step {step}")


def test_cosine_schedule_warms_up_and_decays_to_zero():
  config = runs.default_config()
  config.update(learning_rate=0.2, warmup_epochs=1, schedule="cosine")
  schedule = train.learning_rate_fn(config, steps_per_epoch=10, total_steps=110)
  np.testing.assert_allclose(schedule(jnp.int32(4)), 0.2 * 5 / 10, rtol=1e-6)
  np.testing.assert_allclose(schedule(jnp.int32(10)), 0.2, rtol=1e-6)
  np.testing.assert_allclose(schedule(jnp.int32(60)), 0.1, rtol=1e-5)
  assert float(schedule(jnp.int32(110))) == pytest.approx(0.0, abs=1e-7)


def _setup(config, mesh):
  data = train.load_data(config)
  model = config_lib.create_model(config, data.num_classes)
  per_epoch = pipeline.steps_per_epoch(len(data.train), config.batch_size)
  schedule = train.learning_rate_fn(config, per_epoch, config.num_train_steps)
  tx = train.create_optimizer(config, schedule)
  steps = train.make_steps(config, model, tx, data, mesh, per_epoch, schedule)
  state = train.create_train_state(config, model, tx, data.train.images.shape[1:], mesh)
  return data, model, steps, state, per_epoch


@pytest.mark.parametrize("loss", ["ce", "ldam"])
def test_train_step_loss_switches_to_drw_weights_without_recompiling(loss):
  config = runs.small_config(loss=loss, augment_pad=0, drw_start_epoch=1)
  mesh = sharding.create_mesh()
  data, model, steps, state, per_epoch = _setup(config, mesh)
  local = pipeline.train_batch(data.train, step=0, global_batch_size=config.batch_size,
                               seed=config.seed)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  images = augment.normalize(local["images"], data.mean, data.std)
  exit_logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
  if loss == "ldam":
    margins = losses.ldam_margins(data.class_counts)
    loss_fn = functools.partial(losses.ldam, margins=margins)
    # The default exit confidence of a cosine head: exp(-LDAM loss).
    confidence = dict(logit_scale=config.ldam_scale, margins=margins)
  else:
    loss_fn, confidence = losses.cross_entropy, dict(logit_scale=1.0)
  drw = losses.class_balanced_weights(data.class_counts, config.drw_beta)
  expected = {
      step: losses.har_loss(exit_logits, local["labels"], threshold=config.har_threshold,
                            loss_fn=loss_fn,
                            class_weights=drw if step >= per_epoch else None,
                            **confidence)
      for step in (0, per_epoch)}
  for step, want in expected.items():
    # The same parameters at another step: only the schedule-derived values change.
    # A host copy: the step donates (frees) the buffers of the state it is given.
    at_step = jax.device_put(sharding.to_host(state.replace(step=jnp.int32(step))),
                             sharding.replicated(mesh))
    _, step_metrics = steps.train(at_step, sharding.global_batch(local, mesh))
    np.testing.assert_allclose(step_metrics.loss.compute(), want, rtol=2e-5,
                               err_msg=f"loss at step {step}")
  assert not np.isclose(expected[0], expected[per_epoch]), "DRW changes the loss"
  assert steps.train_step_compiles == 1


def test_one_device_and_eight_devices_agree(tmp_path):
  assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
  # XLA's convolutions on both meshes: this compares sharding, not kernels.
  config = runs.small_config(num_train_steps=14, conv_impl="xla", log_every_steps=1)
  train.train_and_evaluate(config, str(tmp_path / "one"),
                           mesh=sharding.create_mesh(jax.devices()[:1]))
  train.train_and_evaluate(config, str(tmp_path / "eight"))
  # The same training in another summation order (see runs.assert_runs_agree).
  runs.assert_runs_agree(tmp_path / "one", tmp_path / "eight")


def test_native_convolutions_train_as_xla_does(tmp_path):
  """One CPU device: conv_impl 'auto' picks the kernels; they train as XLA's do."""
  mesh = sharding.create_mesh(jax.devices()[:1])
  for impl in ("auto", "xla"):
    config = runs.small_config(num_train_steps=14, conv_impl=impl, log_every_steps=1)
    train.train_and_evaluate(config, str(tmp_path / impl), mesh=mesh)
    _, _, steps, _, _ = _setup(config, mesh)
    kernels_build = cpu_conv.unavailable_reason() is None
    assert steps.native_convolutions == (impl == "auto" and kernels_build)
  # Another summation order, as on another device count (runs.assert_runs_agree).
  runs.assert_runs_agree(tmp_path / "auto", tmp_path / "xla")


def test_native_conv_impl_needs_one_device():
  config = runs.small_config(conv_impl="native")
  with pytest.raises(config_lib.ConfigError, match="one CPU device"):
    config_lib.validate(config, num_devices=8)
  config.dtype = "bfloat16"
  with pytest.raises(config_lib.ConfigError, match="computes in float32"):
    config_lib.validate(config, num_devices=1)


@pytest.mark.parametrize("overrides,message", [
    (dict(exit_confidence="cosine"), "exit_confidence must be one of"),
    (dict(exit_confidence_scale=0.0), "exit_confidence_scale.*got 0"),
])
def test_bad_exit_confidence_is_a_config_error(overrides, message):
  config = runs.small_config(loss="ldam", **overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, num_devices=1)


def test_run_writes_summary_with_every_field(tmp_path, monkeypatch):
  config = runs.small_config()
  checked = []  # the end of the run checks its exits for starvation
  monkeypatch.setattr(train, "warn_if_exits_starved",
                      lambda *args: checked.append(args))
  summary = train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "summary.json") as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(summary))
  assert checked == [(config, summary)]
  for field in ("accuracy", "many", "medium", "few", "per_exit_accuracy", "exit_fraction",
                "flops_saving", "train_loss", "train_step_compiles", "steps",
                "images_per_sec", "validation"):
    assert field in written, field
  assert written["steps"] == 24 and written["train_step_compiles"] == 1
  assert len(written["per_exit_accuracy"]) == 3
  assert abs(sum(written["exit_fraction"]) - 1) < 1e-5
  assert written["validation"]["best_step"] == 14  # validated every 2 epochs of 7 steps
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
  saved = {int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit()}
  assert saved == {8, 16, 24}


def test_non_finite_loss_stops_the_run_and_keeps_good_checkpoints(tmp_path):
  config = runs.small_config(learning_rate=1e12, warmup_epochs=0,
                             checkpoint_every_steps=1)
  with pytest.raises(train.NonFiniteLossError, match=r"not finite at step \d+") as error:
    train.train_and_evaluate(config, str(tmp_path))
  failed_at = int(str(error.value).split("at step ")[1].split(";")[0])
  mesh = sharding.create_mesh()
  data, model, _, _, per_epoch = _setup(config, mesh)
  tx = train.create_optimizer(config, train.learning_rate_fn(config, per_epoch, 24))
  abstract = train.create_train_state(config, model, tx, data.train.images.shape[1:],
                                      mesh, abstract=True)
  state, step = checkpoint.Checkpointer(tmp_path / "checkpoints").restore_latest(abstract)
  assert state is not None, "the good steps before the blow-up were checkpointed"
  assert step < failed_at
  host = sharding.to_host(state)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(host.params))


def test_resident_step_trains_on_the_batches_the_host_would_gather():
  config = runs.small_config()
  mesh = sharding.create_mesh()
  data, _, steps, state, _ = _setup(config, mesh)
  resident = train.resident_training_split(data, config, mesh)
  host_state = jax.device_put(sharding.to_host(state), sharding.replicated(mesh))
  # Steps 0 and 7 (the first of epoch 1, a new permutation).
  for step in (0, 7):
    state = state.replace(step=jnp.int32(step))
    host_state = host_state.replace(step=jnp.int32(step))
    local = pipeline.train_batch(data.train, step=step,
                                 global_batch_size=config.batch_size, seed=config.seed)
    state, on_device = steps.train_resident(state, resident)
    host_state, on_host = steps.train(host_state, sharding.global_batch(local, mesh))
    np.testing.assert_allclose(on_device.loss.compute(), on_host.loss.compute(),
                               rtol=1e-6, err_msg=f"loss of step {step}")
    for a, b in zip(jax.tree.leaves(sharding.to_host(state.params)),
                    jax.tree.leaves(sharding.to_host(host_state.params))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss,exit_confidence,advice", [
    ("ldam", "softmax", "exit_confidence=margin"),
    ("ldam", "margin", "exit_confidence_scale"),
    ("ce", "margin", "har_threshold"),
])
def test_end_of_run_warns_of_starved_deep_exits(monkeypatch, loss, exit_confidence,
                                               advice):
  config = runs.default_config()
  config.update(loss=loss, exit_confidence=exit_confidence)
  logged = []
  monkeypatch.setattr(train.logging, "warning", lambda *args: logged.append(args))
  planted = {"per_exit_accuracy": [0.944, 0.708, 0.632]}
  warning = train.warn_if_exits_starved(config, planted)
  assert logged == [("%s", warning)] and "exit 2 alone is 0.632" in warning
  assert advice in warning
  healthy = {"per_exit_accuracy": [0.9, 0.94, 0.95]}
  assert train.warn_if_exits_starved(config, healthy) is None
  config.har = False  # deep supervision: no exit takes examples away from another
  assert train.warn_if_exits_starved(config, planted) is None
  assert len(logged) == 1
