"""Writes the long-tailed digits as class folders, the layout of dataset=image_folder.

  python experiments/digits_folder.py --folder=/tmp/digits_folder [--imbalance_factor=10]

A real, small, offline example of one's own data: the splits of the offline
default data set (``har_jax.data.digits``: scikit-learn's 8x8 handwritten
digits, a long-tailed training split, balanced validation and test splits) as
grayscale PNG files in ``FOLDER/{train,validation,test}/<digit name>/<n>.png``,
the classes named ``zero`` ... ``nine`` (so their sorted order, the class
order of image_folder, is not the digits' order).
"""

import os

from absl import app
from absl import flags
from PIL import Image

from har_jax.data import digits

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
         "nine")

_FOLDER = flags.DEFINE_string("folder", None, "The folder to write (ROOT).")
_IMBALANCE = flags.DEFINE_float("imbalance_factor", 10.0,
                                "n_max / n_min of the training split.")
_SEED = flags.DEFINE_integer("seed", 0, "Selects the splits.")


def write_digits_folder(root: str, *, imbalance_factor: float, seed: int) -> dict:
  """Writes the folder; returns ``{split: [images per class, in digit order]}``."""
  data = digits.load_digits(imbalance_factor=imbalance_factor, seed=seed)
  counts = {}
  for split in ("train", "validation", "test"):
    dataset = getattr(data, split)
    counts[split] = [0] * len(NAMES)
    for image, label in zip(dataset.images, dataset.labels):
      directory = os.path.join(root, split, NAMES[label])
      os.makedirs(directory, exist_ok=True)
      Image.fromarray(image[..., 0]).save(
          os.path.join(directory, f"{counts[split][label]:04d}.png"))
      counts[split][label] += 1
  return counts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  counts = write_digits_folder(_FOLDER.value, imbalance_factor=_IMBALANCE.value,
                               seed=_SEED.value)
  for split, per_class in counts.items():
    print(f"{split}: {sum(per_class)} images, " + ", ".join(
        f"{name} {n}" for name, n in zip(NAMES, per_class)))


if __name__ == "__main__":
  flags.mark_flags_as_required(["folder"])
  app.run(main)
