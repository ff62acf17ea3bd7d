"""Cityscapes with the paper's settings (35 label ids, instances, 512x256).

  python -m data_pipelines.build --dataset cityscapes --manual_dir SRC \
      --data_dir DATA
  python -m spade_jax.main --config configs/cityscapes.py --workdir DIR \
      --config.data_dir=DATA --config.vgg_weights=vgg19-dcbb9e9d.pth
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'cityscapes'
  config.label_nc = 35
  config.contain_dontcare_label = False
  config.no_instance = False
  config.preprocess_mode = 'fixed'
  config.load_size = 512
  config.crop_size = 512
  config.aspect_ratio = 2.0
  config.num_upsampling_layers = 'more'
  config.ngf = 64
  config.ndf = 64
  config.lambda_vgg = 10.0
  # Paper: batch 16, 200 epochs (100 constant, 100 linear decay).
  config.batch_size = 16
  config.niter = 100
  config.niter_decay = 100
  config.num_train_steps = -1  # From the epochs.
  config.log_every_steps = 50
  config.image_every_steps = 1000
  config.checkpoint_every_steps = 1000
  return config
