"""Shared by the trainer tests: a small, fast version of the default config."""

import importlib.util
import json
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.py")


def paper_config(name):
  """The config of ``configs/<name>.py``."""
  spec = importlib.util.spec_from_file_location(
      f"{name}_config", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def default_config():
  return paper_config("default")


# Overrides that shrink the default run to seconds (7 steps make an epoch).
SMALL = {
    "num_train_steps": 24,
    "warmup_epochs": 1,
    "drw_start_epoch": 2,
    "lr_decay_epochs": (3,),
    "log_every_steps": 8,
    "eval_every_epochs": 2,
    "checkpoint_every_steps": 8,
}


def small_config(**overrides):
  config = default_config()
  config.update({**SMALL, **overrides})
  return config


def config_flags(**overrides):
  """The same small config as --config.FIELD=VALUE flags."""
  def text(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
  return [f"--config={DEFAULT_CONFIG}"] + [
      f"--config.{name}={text(value)}" for name, value in {**SMALL, **overrides}.items()]


def block_imports(*packages: str) -> str:
  """Source to prepend to a script run with `python -c`: hides these packages, as
  on an accelerator image without them. Every import finder is wrapped so that it
  finds nothing of theirs: an import fails and ``importlib.util.find_spec``
  returns None, as for a package that is not installed."""
  return f"""
import sys

class Hide:
  def __init__(self, finder):
    self.finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {tuple(sorted(packages))!r}:
      return None
    return self.finder.find_spec(name, path, target)

  def __getattr__(self, name):
    return getattr(self.finder, name)

sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
"""


BLOCK_TENSORFLOW = block_imports("tensorflow")
# What the library install lacks: the trainer's packages ([train] in setup.py).
BLOCK_TRAINER = block_imports("tensorflow", "tensorflow_datasets", "clu", "ml_collections",
                              "sklearn", "matplotlib")


def logged_scalars(workdir, tag):
  """``{step: value}`` of scalar ``tag`` as the run logged it to TensorBoard
  (``"train/loss"``: every ``log_every_steps``, the mean over the steps since
  the last record; ``"test/accuracy"``: at the end)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  return {event.step: float(tensor_util.make_ndarray(event.tensor_proto))
          for event in events.Tensors(tag)}


def assert_runs_agree(a, b, *, agreeing_steps=2, flips=10, test_examples=500,
                      smallest_class=50, loss_rtol=2e-2):
  """Asserts that two runs (workdirs of the same config, run with
  ``log_every_steps=1``) did the same training in another summation order.

  Runs that split the same global batch over other devices or processes reduce
  their sums (gradients, BatchNorm statistics) in another order, and XLA fuses
  the work of one device differently from that of eight, so their floats differ
  in the last bits. HAR's exit masks are a step function of the confidences:
  once a confidence lies that close to the threshold, an example changes exit in
  one run and not in the other, and from that step on the runs drift apart.
  Measured on the small digits run, 1 against 8 devices and 2 processes
  against 1: per-step losses within 2e-7 of each other until the first such
  step (step 3, step 10 or none in 14, by seed), then 1e-5 to 1e-3 apart; at the
  end up to 5 of 500 test images on another exit or prediction. What that
  guarantees, and what is asserted:
  - the losses of the first ``agreeing_steps`` steps agree to 1e-5: the first
    is of the same batch on the same initial state, the second after the same
    update. Another batch, a missing all-reduce or a learning rate 1% off
    change them by 1e-4 and more (the last: 8e-4 at step 2);
  - the final summaries agree up to ``flips`` test images changing their
    prediction or exit (``test_examples`` in all, at least ``smallest_class``
    of each class), and the last step's loss to ``loss_rtol``.
  """
  losses = [logged_scalars(workdir, "train/loss") for workdir in (a, b)]
  early = range(1, agreeing_steps + 1)
  assert all(step in losses[0] and step in losses[1] for step in early), (
      "log every step", sorted(losses[0]), sorted(losses[1]))
  np.testing.assert_allclose([losses[0][s] for s in early],
                             [losses[1][s] for s in early], rtol=1e-5,
                             err_msg="per-step training losses of the first steps")
  a, b = (read_summary(workdir) for workdir in (a, b))
  np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=loss_rtol,
                             err_msg="train_loss")
  one_flip = 1 / test_examples
  for field in ("accuracy", "per_exit_accuracy", "exit_fraction"):
    np.testing.assert_allclose(a[field], b[field], rtol=0,
                               atol=flips * one_flip + 1e-9, err_msg=field)
  # A shot group's accuracy is a mean of per-class accuracies: one flip moves
  # one class by 1 / its test images, and the group's mean by at most that.
  for field in ("many", "medium", "few"):
    if a[field] is None or b[field] is None:
      assert a[field] is b[field], field
    else:
      assert abs(a[field] - b[field]) <= flips / smallest_class + 1e-9, (
          field, a[field], b[field])
  costliest_exit = max(a["exit_flops"]) / a["backbone_flops"]
  assert abs(a["flops_saving"] - b["flops_saving"]) <= (
      flips * one_flip * costliest_exit + 1e-9), ("flops_saving", a["flops_saving"],
                                                  b["flops_saving"])
  assert a["steps"] == b["steps"]
  assert a["train_step_compiles"] == b["train_step_compiles"] == 1
  return a, b


def read_summary(workdir):
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    return json.load(f)
