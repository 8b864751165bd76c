"""Offline default: long-tailed handwritten digits (scikit-learn's, no download).

A small ResNet with exits after stages 1 and 2, HAR on, trained with the CIFAR-LT
recipe (warm-up, DRW and step decays) scaled to the short run. Finishes in a few
minutes on 2 CPU cores:

  python -m har_jax.main --config=configs/default.py --workdir=/tmp/har_default
"""

from har_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = "digits"
  config.imbalance_factor = 10.0   # train classes 114 ... 11 images
  config.augment_pad = 1           # 8x8 digits: a one-pixel shift
  config.augment_flip = False      # mirrored digits are other digits
  config.shot_many = 60
  config.shot_few = 20
  config.model = "resnet8"
  config.exits = "CBEBEBE"
  config.loss = "ce"
  config.har = True
  config.har_threshold = 0.9
  config.batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = 100
  config.warmup_epochs = 5
  config.drw_start_epoch = 80
  config.lr_decay_epochs = (80, 90)
  config.weight_decay = 5e-4
  config.log_every_steps = 100
  config.eval_every_epochs = 10
  config.checkpoint_every_steps = 200
  return config
