"""Your own label/image folders (built with `--dataset custom`).

  python -m data_pipelines.build --dataset custom --label_dir L --image_dir I \
      [--instance_dir N] --label_nc K --data_dir DATA
  python -m spade_jax.main --config configs/custom.py --workdir DIR \
      --config.data_dir=DATA --config.label_nc=K \
      --config.vgg_weights=vgg19-dcbb9e9d.pth
Set --config.no_instance=False when instance maps were given and
--config.contain_dontcare_label=True when labels use 255 for "unknown".
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'custom'
  config.label_nc = 13  # Set to your class count.
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
  config.log_every_steps = 50
  config.image_every_steps = 1000
  config.checkpoint_every_steps = 1000
  return config
