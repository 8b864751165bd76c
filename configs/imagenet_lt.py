"""ImageNet-LT: ResNeXt-50 (32x4d) with exits after stages 2 and 3, HAR(LDAM) +
DRW, 90 epochs of SGD (batch 256, lr 0.1 with cosine decay, momentum 0.9, weight
decay 5e-4, 5 warm-up epochs, DRW from epoch 60), 224x224 random-resized crops.

  python -m har_jax.main --config=configs/imagenet_lt.py --workdir=runs/imagenet_lt

tfds builds ImageNet-LT from the ImageNet-2012 archives, which need a manual
download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
~/tensorflow_datasets/downloads/manual/ (or DATA_DIR/downloads/manual/ with
--config.data_dir=DATA_DIR) and run `tfds build imagenet_lt`, or let the first
run prepare it. Variants: --config.model=resnet50, --config.loss=ce|focal,
--config.har=False, --config.drw_start_epoch=-1, --config.exits=CBBBBE ...
CEBEBEBEBE. The validation split (20 images per class) selects the best step;
the test split is ImageNet's validation set.
"""

from har_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = "imagenet_lt"
  config.image_size = 224
  config.shuffle_buffer = 10_000
  config.model = "resnext50_32x4d"
  config.exits = "CBBEBEBE"
  config.loss = "ldam"
  config.har = True
  config.har_threshold = 0.9
  config.num_epochs = 90
  config.batch_size = 256
  config.eval_batch_size = 512
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.schedule = "cosine"
  config.warmup_epochs = 5
  config.drw_start_epoch = 60
  config.eval_every_epochs = 5
  config.checkpoint_every_steps = 1000
  return config
