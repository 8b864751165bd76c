"""Your own long-tailed data: class folders ROOT/train/<class>/* and ROOT/test/<class>/*
(optionally ROOT/validation/<class>/*), with the CIFAR-LT recipe: ResNet-32 with
exits after stages 1 and 2, HAR(LDAM) + DRW, 200 epochs of SGD (batch 128, lr 0.1,
lr x0.01 at epochs 160 and 180, DRW from 160), images resized to 32x32.

  python -m har_jax.main --config=configs/image_folder.py --config.data_dir=ROOT \
      --workdir=runs/mine

The folder's own training split is used as it is (imbalance_factor 1); a factor
rho > 1 subsamples it by the LDAM-DRW rule. Useful flags:
  --config.validation_per_class=K    (no ROOT/validation: hold K per class out of train)
  --config.image_size=64             (and e.g. --config.model=resnet50
                                      --config.exits=CBBEBEBE --config.image_size=224
                                      for photos)
  --config.image_folder_memory_mb=M  (a training split over M MiB decoded streams)
  --config.shot_many=100 --config.shot_few=20   (the many/medium/few bounds)
"""

from har_jax import config as config_lib


def get_config():
  config = config_lib.cifar_lt_config("image_folder")
  config.imbalance_factor = 1.0     # the folder's split as it is
  config.image_size = 32
  return config
