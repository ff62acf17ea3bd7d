"""CMP Facades (13 classes, no instance maps).

  python -m data_pipelines.build --dataset facades --manual_dir SRC --data_dir DATA
  python -m spade_jax.main --config configs/facades.py --workdir DIR \
      --config.data_dir=DATA --config.vgg_weights=vgg19-dcbb9e9d.pth
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'facades'
  config.label_nc = 13
  config.contain_dontcare_label = False
  config.no_instance = True
  config.preprocess_mode = 'resize_and_crop'
  config.load_size = 286
  config.crop_size = 256
  config.aspect_ratio = 1.0
  config.ngf = 64
  config.ndf = 64
  config.lambda_vgg = 10.0
  config.batch_size = 32
  config.niter = 100
  config.niter_decay = 100
  config.num_train_steps = -1  # From the epochs.
  config.log_every_steps = 20
  config.image_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
