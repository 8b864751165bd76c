"""The second stage (har_jax.decouple) on one small trained digits run.

Every test decouples the session's small run (conftest.small_run, which the
analyses share): cRT and LWS for a few steps each on one device, the post-hoc
methods on its logits. References are NumPy formulas and the run's checkpoint.

The behaviour check (does cRT raise few-shot accuracy on the default digits run?)
is experiments/decouple_digits.py, with its numbers in README ("Decoupling"): at
this cost, 4 steps from re-initialised classifiers on a 24-step run, no direction
holds (measured: cRT for 14 steps lowered the few-shot accuracy from 0.49 to 0.29,
the LWS scales moved by up to 0.37 with no order by class size), so none is
asserted here.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from har_jax import config as config_lib
from har_jax import decouple
from har_jax import sharding
from har_jax import train
from har_jax import workdir as workdir_lib
from har_jax.data import mock
from har_jax.data import pipeline

import runs

sys.path.insert(0, os.path.join(runs.REPO, "experiments"))
import analyze  # pylint: disable=g-import-not-at-top,wrong-import-position

# cRT / LWS: 4 steps, a checkpoint every 2 (the resume test cuts at step 2).
SHORT = {"num_train_steps": 4, "checkpoint_every_steps": 2, "log_every_steps": 2}


@pytest.fixture(scope="module")
def mesh():
  return sharding.create_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def run_dir(small_run):
  return small_run


def _restored(directory, config, num_classes, image_shape, mesh):
  model = config_lib.create_model(config, num_classes)
  state, _ = train.restore_trained_state(config, directory, model, image_shape, mesh)
  return sharding.to_host(state)


@pytest.fixture(scope="module")
def trained(run_dir, mesh):
  """cRT and LWS run on the shared run: {method: (summary, stage config)}."""
  results = {}
  for method in decouple.TRAINED_METHODS:
    summary = decouple.run(run_dir, method, SHORT, mesh=mesh)
    config = decouple.stage_config(runs.small_config(), method)
    config.update(SHORT)
    results[method] = (summary, config)
  return results


def test_tau_normalize_and_adjust_logits_match_numpy():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(7, 5)).astype(np.float32)
  logits = rng.normal(size=(3, 4, 5)).astype(np.float32)
  counts = [50, 20, 9, 3, 1]
  for tau in (0.0, 0.5, 1.0, 2.0):
    norms = np.sqrt(np.sum(kernel.astype(np.float64) ** 2, axis=0))
    np.testing.assert_allclose(decouple.tau_normalize(kernel, tau), kernel / norms ** tau,
                               rtol=1e-5, err_msg=f"tau {tau}")
    prior = np.array(counts, np.float64) / np.sum(counts)
    np.testing.assert_allclose(decouple.adjust_logits(logits, counts, tau),
                               logits - tau * np.log(prior), rtol=1e-5, atol=1e-6)
  # tau 0 is the identity, bit for bit; tau 1 gives unit-norm columns.
  np.testing.assert_array_equal(decouple.tau_normalize(kernel, 0.0), kernel)
  np.testing.assert_array_equal(decouple.adjust_logits(logits, counts, 0.0), logits)
  np.testing.assert_allclose(np.linalg.norm(decouple.tau_normalize(kernel, 1.0), axis=0),
                             1.0, rtol=1e-6)


@pytest.mark.parametrize("method", decouple.TRAINED_METHODS)
def test_crt_and_lws_train_only_the_classifiers(run_dir, trained, mesh, method):
  summary, config = trained[method]
  assert summary["steps"] == 4 and summary["train_step_compiles"] == 1
  data = train.load_data(config)
  run_config = runs.small_config()
  before = _restored(run_dir, run_config, data.num_classes, data.image_shape, mesh)
  after = _restored(decouple.stage_directory(run_dir, method), config, data.num_classes,
                    data.image_shape, mesh)
  flat = lambda tree: {"/".join(path): value for path, value in  # noqa: E731
                       __import__("flax").traverse_util.flatten_dict(tree).items()}
  before_params, after_params = flat(before.params), flat(after.params)
  changed = {path for path, value in after_params.items()
             if path not in before_params or not np.array_equal(value, before_params[path])}
  if method == "crt":
    classifiers = {path for path in before_params if "classifier" in path.split("/")}
    assert len(classifiers) == 6  # kernel and bias of 3 exits
    assert changed == classifiers, sorted(changed ^ classifiers)
  else:
    scales = {f"logit_affine{i}/scale" for i in range(3)}
    offsets = {f"logit_affine{i}/offset" for i in range(3)}
    assert set(after_params) == set(before_params) | scales | offsets
    assert changed == scales | offsets  # new: scales trained, offsets at zero
    for path in offsets:
      np.testing.assert_array_equal(after_params[path], 0.0)
    for path in scales:
      assert not np.allclose(after_params[path], 1.0), path
  for path, value in flat(before.batch_stats).items():
    np.testing.assert_array_equal(flat(after.batch_stats)[path], value, err_msg=path)
  decoupling = summary["decoupling"]
  assert decoupling["method"] == method and decoupling["chosen_on"] == "validation"
  assert summary["exit_threshold"] == decoupling["exit_threshold"]["threshold"]
  np.testing.assert_allclose(np.sum(summary["exit_fraction"]), 1.0, rtol=1e-6)


def test_crt_killed_after_a_checkpoint_resumes_to_the_same_end(run_dir, trained, mesh,
                                                              tmp_path):
  whole = decouple.stage_directory(run_dir, "crt")
  # A second copy of the run whose cRT stopped after its checkpoint of step 2.
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)
  cut = copy / "decoupled" / "crt"
  shutil.rmtree(cut / "checkpoints" / "4")
  os.remove(cut / "summary.json")
  resumed = decouple.run(str(copy), "crt", SHORT, mesh=mesh)
  finished = workdir_lib.read_json(os.path.join(whole, "summary.json"))
  for summary in (resumed, finished):
    summary.pop("images_per_sec")
    summary["decoupling"].pop("run")
  assert resumed == finished
  # Once finished, the same command returns the summary; another config is refused.
  again = decouple.run(str(copy), "crt", SHORT, mesh=mesh)
  again.pop("images_per_sec"), again["decoupling"].pop("run")
  assert again == finished
  with pytest.raises(workdir_lib.WorkdirError, match="learning_rate 0.025 there, 0.1 now"):
    decouple.run(str(copy), "crt", {**SHORT, "learning_rate": 0.1}, mesh=mesh)


def _planted_data(real, num_tail_classes=4):
  """The real splits, but a validation split of the rarest classes' test images:
  a split whose best logit adjustment is stronger than the test split's."""
  tail = np.argsort(real.class_counts)[:num_tail_classes]
  rows = np.isin(real.test.labels, tail)
  validation = pipeline.ArrayDataset(images=real.test.images[rows],
                                     labels=real.test.labels[rows])
  return pipeline.InMemoryData(train=real.train, validation=validation, test=real.test,
                               num_classes=real.num_classes, mean=real.mean,
                               std=real.std)


def _balanced_accuracy_by_tau(logits, labels, counts, taus):
  """A loop reference: [E, T] mean per-class accuracy of argmax(z - tau log pi)."""
  log_prior = np.log(np.asarray(counts, np.float64) / np.sum(counts))
  curve = np.zeros((logits.shape[0], len(taus)))
  for exit_ in range(logits.shape[0]):
    for t, tau in enumerate(taus):
      predictions = np.argmax(logits[exit_] - tau * log_prior, axis=-1)
      curve[exit_, t] = np.mean([np.mean(predictions[labels == c] == c)
                                 for c in np.unique(labels)])
  return curve


def test_logit_adjustment_chooses_tau_on_the_validation_split(run_dir, mesh, monkeypatch):
  config = runs.small_config()
  real = train.load_data(config)
  planted = _planted_data(real)
  monkeypatch.setattr(train, "load_data", lambda *args, **kwargs: planted)
  summary = decouple.run(run_dir, "logit_adjust", mesh=mesh)
  # The run's logits, computed here from its checkpoint.
  state = _restored(run_dir, config, real.num_classes, real.image_shape, mesh)
  model = config_lib.create_model(config, real.num_classes)

  def logits_of(split):
    images = (split.images / 255.0 - np.asarray(real.mean)) / np.asarray(real.std)
    return np.asarray(model.apply({"params": state.params,
                                   "batch_stats": state.batch_stats},
                                  images.astype(np.float32), train=False))

  taus = np.asarray(config.decouple_tau_grid)
  on_validation = _balanced_accuracy_by_tau(logits_of(planted.validation),
                                            planted.validation.labels,
                                            real.class_counts, taus)
  on_test = _balanced_accuracy_by_tau(logits_of(real.test), real.test.labels,
                                      real.class_counts, taus)
  chosen = summary["decoupling"]
  np.testing.assert_allclose(chosen["tau_curve"], on_validation, atol=1e-6)
  expected = [float(taus[np.argmax(row)]) for row in on_validation]
  assert chosen["tau"] == expected and chosen["chosen_on"] == "validation"
  best_on_test = [float(taus[np.argmax(row)]) for row in on_test]
  assert expected != best_on_test, "the planted split must disagree with the test split"
  # The test split was evaluated with the chosen offsets: its last exit is the
  # adjusted argmax of the reference.
  log_prior = np.log(np.asarray(real.class_counts) / np.sum(real.class_counts))
  last = np.argmax(logits_of(real.test)[-1] - expected[-1] * log_prior, axis=-1)
  np.testing.assert_allclose(summary["per_exit_accuracy"][-1],
                             np.mean(last == real.test.labels), atol=1e-6)


def test_tau_norm_feeds_analyze_as_a_run(run_dir, mesh, tmp_path):
  summary = decouple.run(run_dir, "tau_norm", mesh=mesh)
  assert summary["steps"] == 0 and len(summary["decoupling"]["tau"]) == 3
  directory = decouple.stage_directory(run_dir, "tau_norm")
  numbers = analyze.run_analysis(directory, str(tmp_path / "analysis"))
  # analyze computes its numbers on its own, at the stage's re-calibrated threshold.
  assert numbers["threshold"] == summary["exit_threshold"]
  np.testing.assert_allclose(numbers["test"]["accuracy"], summary["accuracy"], atol=1e-6)
  np.testing.assert_allclose(numbers["test"]["per_exit_accuracy"],
                             summary["per_exit_accuracy"], atol=1e-6)
  # Biases dropped: the saved classifiers are the tau-normalised kernels.
  config = runs.small_config()
  data = train.load_data(config)
  before = _restored(run_dir, config, data.num_classes, data.image_shape, mesh)
  after = _restored(directory, config, data.num_classes, data.image_shape, mesh)
  tau = summary["decoupling"]["tau"][-1]
  kernel = np.asarray(before.params["classifier"]["kernel"], np.float64)
  np.testing.assert_allclose(after.params["classifier"]["kernel"],
                             kernel / np.linalg.norm(kernel, axis=0) ** tau, rtol=1e-5)
  np.testing.assert_array_equal(after.params["classifier"]["bias"], 0.0)


def test_bad_input_is_one_line_and_writes_nothing(run_dir, tmp_path, mesh):
  with pytest.raises(decouple.DecoupleError, match=r"unknown method 'crt2'; the methods"):
    decouple.run(run_dir, "crt2", mesh=mesh)
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  shutil.copy(os.path.join(run_dir, "config.json"), unfinished)
  with pytest.raises(decouple.DecoupleError, match="holds no finished run"):
    decouple.run(str(unfinished), "crt", mesh=mesh)
  # A finished run whose data set is not there (CIFAR-10, no download allowed).
  missing = tmp_path / "missing"
  shutil.copytree(run_dir, missing, ignore=shutil.ignore_patterns("decoupled"))
  recorded = workdir_lib.read_json(str(missing / "config.json"))
  recorded.update(dataset="cifar10", tfds_download=False, data_dir=str(tmp_path / "no"))
  workdir_lib.write_json(str(missing / "config.json"), recorded)
  with pytest.raises(decouple.DecoupleError, match="cifar10, the data set of") as error:
    decouple.run(str(missing), "tau_norm", mesh=mesh)
  assert "\n" not in str(error.value)
  for folder in (unfinished, missing):
    assert not (folder / "decoupled").exists()
  # The command: one line, exit status 2.
  result = subprocess.run(
      [sys.executable, "-m", "har_jax.decouple", f"--workdir={run_dir}", "--method=cRT"],
      capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, "PYTHONPATH": runs.REPO})
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "har_jax: error: --method must be one of ['crt', 'lws', 'tau_norm', "
      "'logit_adjust'], got 'cRT'.")


def test_crt_and_tau_norm_on_mock_imagenet_lt_streamed(tmp_path):
  # ImageNet-LT's config: the cosine head of HAR(LDAM), streamed from tfds.
  config = runs.paper_config("imagenet_lt")
  config.update(model="resnet8", exits="CBEBEBE", tfds_download=False, image_size=32,
                shuffle_buffer=64, batch_size=16, eval_batch_size=64, num_train_steps=2,
                log_every_steps=1, checkpoint_every_steps=2, eval_every_epochs=1000)
  mesh = sharding.create_mesh(jax.devices()[:1])
  run = str(tmp_path / "run")
  with mock.mock_tfds(train_per_class=2, test_per_class=1):
    train.train_and_evaluate(config, run, mesh=mesh)
    crt = decouple.run(run, "crt", {"num_train_steps": 2, "batch_size": 16}, mesh=mesh)
    tau_norm = decouple.run(run, "tau_norm", mesh=mesh)
  assert crt["steps"] == 2 and crt["train_step_compiles"] == 1
  assert np.isfinite(crt["train_loss"]) and len(crt["per_exit_accuracy"]) == 3
  stage = workdir_lib.read_json(os.path.join(decouple.stage_directory(run, "crt"),
                                             "config.json"))
  assert (stage["sampler"], stage["loss"], stage["trainable"]) == (
      "class_balanced", "ldam", "classifiers")
  # A cosine head: tau-normalisation is the identity, and says so.
  assert tau_norm["decoupling"]["tau"] is None and "identity" in tau_norm["decoupling"]
  np.testing.assert_allclose(tau_norm["per_exit_accuracy"],
                             workdir_lib.read_json(os.path.join(run, "summary.json"))[
                                 "per_exit_accuracy"], atol=1e-6)


def test_a_run_recorded_before_a_field_existed_reads_with_its_default(tmp_path):
  # A run trained before the second stages existed records no logit_affine
  # (nor trainable); it ran with their defaults, which the stage must assume.
  recorded = config_lib.base_config().to_dict()
  for added in ("logit_affine", "trainable"):
    recorded.pop(added)
  recorded["lr_decay_epochs"] = [80, 90]  # as JSON holds a tuple
  workdir_lib.write_json(str(tmp_path / "config.json"), recorded)
  workdir_lib.write_json(str(tmp_path / "summary.json"), {"accuracy": 0.5})

  config, summary = decouple._finished_run(str(tmp_path))  # pylint: disable=protected-access

  defaults = config_lib.base_config()
  assert (config.logit_affine, config.trainable) == (defaults.logit_affine,
                                                     defaults.trainable)
  assert config.lr_decay_epochs == (80, 90) and summary == {"accuracy": 0.5}
