"""Shared by the trainer tests: a small, fast version of the default config."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.py")


def default_config():
  spec = importlib.util.spec_from_file_location("default_config", DEFAULT_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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
