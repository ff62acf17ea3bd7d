"""COCO-Stuff with the paper's settings (182 classes + don't-care, instances).

Build the data first:
  python -m data_pipelines.build --dataset coco_stuff --manual_dir SRC \
      --data_dir DATA
then train:
  python -m spade_jax.main --config configs/coco_stuff.py --workdir DIR \
      --config.data_dir=DATA --config.vgg_weights=vgg19-dcbb9e9d.pth
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'coco_stuff'
  config.label_nc = 182
  config.contain_dontcare_label = True
  config.no_instance = False
  config.preprocess_mode = 'resize_and_crop'
  config.load_size = 286
  config.crop_size = 256
  config.aspect_ratio = 1.0
  config.ngf = 64
  config.ndf = 64
  config.lambda_vgg = 10.0
  # Paper: batch 32 on 8 GPUs, 100 epochs (50 constant, 50 linear decay).
  config.batch_size = 32
  config.niter = 50
  config.niter_decay = 50
  config.num_train_steps = -1  # From the epochs.
  config.log_every_steps = 100
  config.image_every_steps = 2000
  config.checkpoint_every_steps = 2000
  return config
