"""Evaluation: FID of a checkpoint's generator on a split.

  python -m spade_jax.main --config CONFIG --workdir DIR --mode eval \
      --config.inception_weights=pt_inception-2015-12-05-6726825d.pth

Generates one image per label map of `config.eval_split` (the first
`config.fid_num_images`, or all) with the latest checkpoint's eval-mode
generator (EMA weights when training kept them; VAE models draw z from the
prior, seeded by config.seed), and computes the FID between the generated and
the real images with the standard pytorch-fid Inception features (see
`fid.py`). Both sets are quantised to uint8 first, as image files would be.
With config.fid_real_stats (a pytorch-fid .npz, e.g. from `python -m
spade_jax.fid --real DIR --save_stats F.npz`) the real images' statistics
come from that file instead. The score goes to TensorBoard (`eval/fid` at
the checkpoint's step, in the workdir) and is printed.
"""
import os
from typing import Dict, Optional, Tuple

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np

from spade_jax import export
from spade_jax import fid
from spade_jax import inception
from spade_jax import input_pipeline
from spade_jax import models
from spade_jax import visualize


def load_inception(config: ml_collections.ConfigDict) -> Dict:
  """The FID Inception variables named by config.inception_weights."""
  path = config.get('inception_weights', '')
  if not path:
    raise FileNotFoundError(
        'Evaluation computes FID and needs config.inception_weights. '
        + inception.HOW_TO_GET)
  return inception.load_inception_params(path)


def check_same_architecture(config, workdir: str) -> None:
  """The run's saved config and this one must build the same networks."""
  from spade_jax import train  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    return
  saved = export.workdir_config(workdir)
  diff = [k for k in train.ARCHITECTURE_KEYS
          if k in saved and k in config and saved[k] != config[k]]
  # Whether the checkpoints hold EMA weights changes their structure.
  if (saved.get('ema_decay', 0) > 0) != (config.get('ema_decay', 0) > 0):
    diff.append('ema_decay')
  if diff:
    raise ValueError(
        f'{workdir} was trained with another architecture than this config: '
        + ', '.join(f'{k}={saved[k]!r} there vs {config[k]!r} here'
                    for k in diff)
        + '. Evaluate with the config the run was trained with.')


def make_generate_fn(config):
  """jit(eval-mode generator); VAE models draw z ~ N(0, 1) from `rng`."""
  gen = models.make_generator(config)
  use_vae = config.use_vae and config.netG == 'spade'

  @jax.jit
  def generate(g_vars, label, edges, rng):
    z = (jax.random.normal(rng, (label.shape[0], config.z_dim)) if use_vae
         else None)
    return gen.apply(g_vars, label, None if config.no_instance else edges,
                     z=z, train=False)
  return generate


def real_statistics_file(config) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """config.fid_real_stats as (mu, sigma), or None when not set."""
  path = config.get('fid_real_stats', '')
  return fid.load_statistics(path) if path else None


def fid_statistics(config, g_vars, data_dir: str,
                   extractor: fid.FeatureExtractor,
                   num_images: int = 0, with_real: bool = True
                   ) -> Tuple[fid.RunningStatistics,
                              Optional[fid.RunningStatistics]]:
  """Inception statistics of (generated, real) images of the eval split.

  `with_real=False` skips the real images (returns None for them): training
  computes their statistics once and reuses them.
  """
  generate = make_generate_fn(config)
  dataset = input_pipeline.create_split(
      config, data_dir, config.eval_split, train=False, process_index=0,
      process_count=1)
  fake_stats, real_stats = fid.RunningStatistics(), fid.RunningStatistics()
  rng = jax.random.PRNGKey(config.seed)
  for i, batch in enumerate(input_pipeline.numpy_batches(dataset)):
    keep = np.array(batch['valid'], bool)
    if num_images:
      keep &= np.cumsum(keep) <= num_images - fake_stats.count
    if not keep.any():
      break
    fake = np.asarray(generate(g_vars, batch['label'],
                               batch['instance_edges'],
                               jax.random.fold_in(rng, i)))
    fake_stats.add(extractor(visualize.image_to_uint8(fake[keep])))
    if with_real:
      real_stats.add(extractor(visualize.image_to_uint8(
          batch['image'][keep])))
    if num_images and fake_stats.count >= num_images:
      break
  return fake_stats, real_stats if with_real else None


class TrainingFID:
  """FID every `config.fid_every_steps` training steps (process 0 only).

  Loads the Inception weights once, computes the real images' statistics at
  the first call and reuses them; each call generates the eval images with
  the current generator variables.
  """

  def __init__(self, config: ml_collections.ConfigDict, data_dir: str):
    self._config = config
    self._data_dir = data_dir
    self._num_images = int(config.get('fid_num_images', 0))
    self._extractor = fid.FeatureExtractor(load_inception(config),
                                           batch_size=config.batch_size)
    self._real = real_statistics_file(config)

  def __call__(self, g_vars) -> float:
    fake, real = fid_statistics(self._config, g_vars, self._data_dir,
                                self._extractor, self._num_images,
                                with_real=self._real is None)
    if self._real is None:
      self._real = real.mean_cov()
    return fid.frechet_distance(*self._real, *fake.mean_cov())


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             step: Optional[int] = None) -> float:
  """FID of checkpoint `step` (default the latest); written and printed."""
  from spade_jax import train  # pylint: disable=g-import-not-at-top
  inception_vars = load_inception(config)  # Fails early without weights.
  real_file = real_statistics_file(config)  # And with a bad statistics file.
  train.validate_config(config)
  check_same_architecture(config, workdir)
  _, variables, step = export.load_inference_variables(
      workdir, step=step, use_ema=True, config=config)
  data_dir = train.resolve_data_dir(config, workdir)
  extractor = fid.FeatureExtractor(inception_vars,
                                   batch_size=config.batch_size)
  fake_stats, real_stats = fid_statistics(
      config, variables['generator'], data_dir, extractor,
      int(config.get('fid_num_images', 0)), with_real=real_file is None)
  real = real_file or real_stats.mean_cov()
  score = fid.frechet_distance(*real, *fake_stats.mean_cov())
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  with metric_writers.ensure_flushes(writer):
    writer.write_scalars(step, {'eval/fid': score})
  real_what = (f'the real statistics {config.fid_real_stats}' if real_file
               else f'{real_stats.count} real images')
  message = (f'FID {score:.4f}: {fake_stats.count} generated vs '
             f'{real_what} of split {config.eval_split!r}, checkpoint step '
             f'{step}.')
  logging.info(message)
  if jax.process_index() == 0:
    print(message)
  return score
