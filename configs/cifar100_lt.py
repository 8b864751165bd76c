"""CIFAR-100-LT, the paper's setting: that of configs/cifar10_lt.py (which lists
the flags for every row of the tables) on CIFAR-100.

  python -m har_jax.main --config=configs/cifar100_lt.py --workdir=runs/c100_r100
"""

from har_jax import config as config_lib


def get_config():
  return config_lib.cifar_lt_config("cifar100")
