"""The outcome of early exiting during training: the fraction of each shot
group's training examples that exit at each exit, over the epochs (the talk's
figure), from a run's TensorBoard events.

  python experiments/training_exits.py WORKDIR [--output=FILE.png]

The train step records, per logging window, which exit each training example
left at (HAR's exit index: its first correct and confident exit) by the shot
group of its class; the run logs them as ``train/exit_fraction_<group>_<exit>``.
Writes WORKDIR/training_exits.png (or --output) and prints its path. A workdir
without such events exits with status 2 and one line.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from typing import Optional

from absl import app
from absl import flags
import matplotlib
matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from har_jax import workdir as workdir_lib
from har_jax.data import long_tail
from har_jax.data import pipeline

_TAG = re.compile(r"^train/exit_fraction_(many|medium|few)_(\d+)$")


class NoExitHistory(ValueError):
  """The workdir has no logged exits per shot group."""


def read_exit_history(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """The logged exits of training examples per shot group.

  Returns:
    ``steps [T]`` and ``fractions [T, G, E]``: at each logged step, the fraction
    of group g's training examples of the window that exited at exit e (NaN
    where the window held no example of the group).

  Raises:
    NoExitHistory: no events with these scalars in ``workdir``.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        match = _TAG.match(value.tag)
        if match:
          number = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                    else value.simple_value)
          group = long_tail.SHOT_GROUP_NAMES.index(match.group(1))
          values[(event.step, group, int(match.group(2)))] = number
  if not values:
    raise NoExitHistory(f"{workdir} has no events with train/exit_fraction_<group>_<exit> "
                        "(a run of har_jax's trainer logs them).")
  steps = np.array(sorted({step for step, _, _ in values}))
  exits = 1 + max(exit_ for _, _, exit_ in values)
  fractions = np.full((len(steps), len(long_tail.SHOT_GROUP_NAMES), exits), np.nan)
  for (step, group, exit_), number in values.items():
    fractions[np.searchsorted(steps, step), group, exit_] = number
  return steps, fractions


def plot_exit_history(steps: np.ndarray, fractions: np.ndarray, steps_per_epoch: int,
                      output: str, title: str = "") -> str:
  """Stacked areas per shot group: the share of its examples at each exit."""
  groups = [g for g in range(fractions.shape[1]) if not np.all(np.isnan(fractions[:, g]))]
  fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(4.0 * max(len(groups), 1), 3.2),
                           sharey=True, squeeze=False)
  epochs = steps / max(steps_per_epoch, 1)
  colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.9, fractions.shape[2]))
  for ax, group in zip(axes[0], groups):
    shares = np.nan_to_num(fractions[:, group])
    ax.stackplot(epochs, shares.T, colors=colors,
                 labels=[f"exit {e}" for e in range(fractions.shape[2])])
    ax.set_title(f"{long_tail.SHOT_GROUP_NAMES[group]}-shot classes", fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
  axes[0][0].set_ylabel("fraction of training examples")
  axes[0][-1].legend(fontsize=7, loc="lower right")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output, dpi=110)
  plt.close(fig)
  return output


def plot_run(workdir: str, output: Optional[str] = None) -> str:
  """Reads ``workdir``'s events and config and writes the figure; its path."""
  config = workdir_lib.read_json(os.path.join(workdir, "config.json")) or {}
  summary = workdir_lib.read_json(os.path.join(workdir, "summary.json")) or {}
  steps, fractions = read_exit_history(workdir)
  counts = summary.get("class_counts")
  steps_per_epoch = (pipeline.steps_per_epoch(sum(counts), config["batch_size"])
                     if counts and config.get("batch_size") else 1)
  title = " ".join(os.path.normpath(workdir).split(os.sep)[-3:])
  return plot_exit_history(steps, fractions, steps_per_epoch,
                           output or os.path.join(workdir, "training_exits.png"), title)


def main(argv):
  if len(argv) != 2:
    print("training_exits: error: give one WORKDIR", file=sys.stderr)
    sys.exit(2)
  try:
    print(plot_run(argv[1], flags.FLAGS.output))
  except NoExitHistory as error:
    print(f"training_exits: error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  # Here, not at import: reproduce.py imports this module beside analyze.py,
  # which has an --output of its own.
  flags.DEFINE_string("output", None, "The PNG; default WORKDIR/training_exits.png.")
  app.run(main)
