"""iNaturalist 2018: ResNet-50 with exits after stages 2 and 3, HAR(LDAM) + DRW,
90 epochs of SGD (batch 512, lr 0.2 with cosine decay, momentum 0.9, weight decay
1e-4, 5 warm-up epochs, DRW from epoch 60), 224x224 random-resized crops.

  python -m har_jax.main --config=configs/inat18.py --workdir=runs/inat18

tfds downloads and prepares i_naturalist2018 on first use (about 200 GB; or run
`tfds build i_naturalist2018` beforehand). The test labels of iNaturalist are
withheld, so the test split here is its validation split, as in the literature.
Variants: --config.loss=ce|focal, --config.har=False, --config.drw_start_epoch=-1,
--config.exits=CBBBBE ... CEBEBEBEBE.
"""

from har_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = "i_naturalist2018"
  config.image_size = 224
  config.shuffle_buffer = 10_000
  config.model = "resnet50"
  config.exits = "CBBEBEBE"
  config.loss = "ldam"
  config.har = True
  config.har_threshold = 0.9
  config.num_epochs = 90
  config.batch_size = 512
  config.eval_batch_size = 512
  config.learning_rate = 0.2
  config.weight_decay = 1e-4
  config.schedule = "cosine"
  config.warmup_epochs = 5
  config.drw_start_epoch = 60
  config.shot_many = 100
  config.shot_few = 20
  config.checkpoint_every_steps = 1000
  return config
