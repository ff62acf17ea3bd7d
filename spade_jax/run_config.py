"""A run's config checked and resolved before anything heavy starts.

`validate_config` stops at start-up with a clear message on settings that
cannot work (model shapes, devices, weight files the losses need);
`resolve_data_dir` finds the built data set, generating the synthetic set
on first use. Training and evaluation both start with them.
"""
import json
import os

from absl import logging
from jax.experimental import multihost_utils
import jax
import ml_collections

from data_pipelines import records
from data_pipelines import synthetic
from data_pipelines import tfds_builders
from spade_jax import data_order
from spade_jax import diffaugment
from spade_jax import inception
from spade_jax import losses
from spade_jax import models
from spade_jax import sharding
from spade_jax import vgg as vgg_lib


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Stops at start-up with a clear message on settings that cannot work."""
  try:
    models.make_generator(config)
    models.make_discriminator(config)
    if config.use_vae:
      models.make_encoder(config)
  except ValueError as e:
    raise ValueError(f'Invalid model config: {e}') from None
  want = (round(config.crop_size / config.aspect_ratio), config.crop_size)
  got = models.output_size(config)
  if got != want or min(got) < 1:
    n = {'normal': 5, 'more': 6, 'most': 7}[config.num_upsampling_layers]
    raise ValueError(
        f'crop_size={config.crop_size} with aspect_ratio='
        f'{config.aspect_ratio} needs a {want[0]}x{want[1]} image, but '
        f'num_upsampling_layers={config.num_upsampling_layers!r} '
        f'({n} upsamplings) produces {got[0]}x{got[1]}: use a crop_size that '
        f'is a multiple of {2**n} (and an aspect ratio that keeps the height '
        'one), or another num_upsampling_layers.')
  diffaugment.parse_policy(config.diffaugment)
  models.remat(config)
  _check_partitioning(config)
  if config.fid_every_steps > 0 and not config.inception_weights:
    raise ValueError(
        f'fid_every_steps={config.fid_every_steps} computes FID during '
        'training and needs config.inception_weights (or set '
        'fid_every_steps=0). ' + inception.HOW_TO_GET)
  if not config.adam_eps > 0:
    raise ValueError(f'adam_eps={config.adam_eps} must be positive.')
  if config.gan_mode not in losses.GAN_MODES:
    raise ValueError(f'gan_mode={config.gan_mode!r}: expected one of '
                     f'{losses.GAN_MODES}.')
  if config.lambda_vgg > 0 and not config.vgg_weights:
    raise ValueError(
        f'lambda_vgg={config.lambda_vgg} needs pretrained VGG19 weights: set '
        '--config.vgg_weights to torchvision\'s ImageNet vgg19 state-dict file '
        f'({vgg_lib.WEIGHTS_FILE_NAME}, from the torchvision model zoo) or an '
        '.npz made from it with `python -m spade_jax.vgg IN.pth OUT.npz`; or '
        'turn the perceptual loss off with --config.lambda_vgg=0.')


def _check_partitioning(config: ml_collections.ConfigDict) -> None:
  """The batch and the images split evenly over the (data, spatial) mesh."""
  num_devices = len(sharding.mesh_devices(config))
  k = sharding.spatial_partitions(config)
  groups = num_devices // k
  if config.batch_size % groups:
    over = (f'{groups} devices' if k == 1 else
            f'{groups} data-parallel groups ({num_devices} devices / '
            f'spatial_partitions={k})')
    raise ValueError(
        f'batch_size={config.batch_size} is not divisible by the {over}: the '
        'batch is split evenly over them.')
  if k == 1:
    return
  h = models.output_size(config)[0]
  if config.netG == 'spade':
    n = models.NUM_UPSAMPLINGS[config.num_upsampling_layers]
    rows = models.latent_size(config.num_upsampling_layers, config.crop_size,
                              config.aspect_ratio)[0]
    where = (f'the generator starts from {rows} rows (image height {h} / '
             f'2^{n} upsamplings)')
  else:
    n = config.resnet_n_downsample
    rows = h // 2**n
    where = (f'the generator\'s coarsest map has {rows} rows (image height '
             f'{h} / 2^{n} downsamplings)')
  # One row per device at the 3x3 convolutions' halo size gave wrong
  # values (XLA CPU, GSPMD; docs/performance.md): at least two.
  if rows % k or rows // k < 2:
    raise ValueError(
        f'spatial_partitions={k} splits every feature map\'s rows over {k} '
        f'devices, but {where}: that needs a multiple of {k} and at least 2 '
        f'rows per device ({2 * k}, {3 * k}, ...). Use a spatial_partitions '
        f'that divides {rows} and is at most {max(rows // 2, 1)}, or a larger '
        'crop_size / a smaller aspect_ratio.')


def resolve_data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The built data set's folder; the synthetic set is generated if needed.

  Synthetic: the build of the config's parameters under config.data_dir
  (default WORKDIR/data/synthetic), else the one build config.data_dir
  holds, else one generated there (by process 0; the others wait).
  """
  if config.dataset == 'synthetic':
    data_dir = config.data_dir or os.path.join(workdir, 'data', 'synthetic')
    params = (config.synthetic_num_train, config.synthetic_num_val,
              config.synthetic_size)
    built = tfds_builders.is_prepared(synthetic.builder(data_dir, *params))
    if not built and config.data_dir:
      try:
        return records.DatasetInfo.load(config.data_dir).folder
      except FileNotFoundError:
        pass
    if jax.process_index() == 0:
      synthetic.ensure_synthetic(data_dir, *params, seed=0)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('synthetic data ready')
    return synthetic.ensure_synthetic(data_dir, *params, seed=0,
                                      build=False).folder
  if not config.data_dir:
    raise ValueError(
        f'dataset={config.dataset!r} needs --config.data_dir: the folder '
        'written by `python -m data_pipelines.build --dataset '
        f'{config.dataset} --manual_dir SRC --data_dir OUT`.')
  return records.DatasetInfo.load(config.data_dir, config.dataset).folder

INPUT_ORDER_FILE = 'input_order.json'


def input_order(config: ml_collections.ConfigDict, num_devices: int) -> dict:
  """What a run's data order and summation order depend on."""
  return {'data_order_processes': (int(config.data_order_processes)
                                   or jax.process_count()),
          'process_count': jax.process_count(),
          'num_devices': int(num_devices),
          'global_batch': int(config.batch_size)}


def note_input_order(workdir: str, now: dict, resumed: bool) -> None:
  """Warns what a resumed run's order keeps when it changed; records `now`.

  `now` is `input_order(...)`; the earlier run's is read from
  INPUT_ORDER_FILE in `workdir` (process 0 writes it, atomically).
  """
  path = os.path.join(workdir, INPUT_ORDER_FILE)
  if resumed and os.path.isfile(path):
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      logging.warning('Cannot read %s (%s): the data order is not compared '
                      "with the earlier run's.", path, e)
    else:
      message = data_order.describe_change(saved, now)
      if message:
        logging.warning('%s', message)
  if jax.process_index() == 0:
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
      json.dump(now, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
