"""CIFAR-10-LT, the paper's setting: ResNet-32 with exits after stages 1 and 2,
HAR(LDAM) + DRW, 200 epochs of SGD (batch 128, lr 0.1, momentum 0.9, weight decay
2e-4, 5 warm-up epochs, lr x0.01 at epoch 160 and again at 180, DRW from epoch 160).

  python -m har_jax.main --config=configs/cifar10_lt.py --workdir=runs/c10_r100

The rows of the paper's tables differ only in flags:
  --config.imbalance_factor=100|50|10
  --config.loss=ce|focal|ldam         (ldam pairs with the cosine head)
  --config.har=False                  (every exit trains on every example)
  --config.drw_start_epoch=-1         (no deferred re-weighting)
  --config.exits=CBBBE                (the single-exit baseline), CBEBEBE, CEBEBEBE
tfds downloads CIFAR-10 on first use (--config.tfds_download=False forbids it).
"""

from har_jax import config as config_lib


def get_config():
  return config_lib.cifar_lt_config("cifar10")
