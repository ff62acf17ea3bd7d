"""Inference: label maps in, images out, from a model folder.

  from spade_jax import Synthesizer
  synth = Synthesizer.load('converted_model')
  images = synth(labels, instances)   # (N, H, W, 3) float32 in [-1, 1]
"""
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spade_jax import generation
from spade_jax import label_maps
from spade_jax import model_io
from spade_jax import models

def class_ids(labels: np.ndarray, config: ml_collections.ConfigDict,
              what: str = 'labels') -> np.ndarray:
  """`label_maps.class_ids` with the model's label_nc and don't-care class."""
  return label_maps.class_ids(
      labels, label_nc=int(config.label_nc),
      contain_dontcare_label=bool(config.contain_dontcare_label), what=what)


class Synthesizer:
  """The generator in eval mode, with input checks.

  Attributes:
    config: the model's config (reference option names).
    image_size: (H, W) the generator produces and the label maps must have.
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: Dict,
               compiler_options: Optional[Dict] = None):
    """Builds the networks; `compiler_options` go to `jax.jit` (XLA)."""
    if 'generator' not in variables:
      raise ValueError('The model variables hold no generator.')
    self.config = config
    self.image_size = models.output_size(config)
    self._g_vars = variables['generator']
    self._encoder = None
    if config.use_vae and 'encoder' in variables:
      self._encoder = models.make_encoder(config)
      self._e_vars = variables['encoder']
    self._generate = jax.jit(generation.make_generate_fn(config),
                             compiler_options=compiler_options)
    self._encode = jax.jit(self._encode_fn, compiler_options=compiler_options)

  @classmethod
  def load(cls, model_dir: str,
           compiler_options: Optional[Dict] = None) -> 'Synthesizer':
    """Loads a model folder written by `convert` or `export`."""
    config, variables = model_io.load_model(model_dir)
    return cls(config, variables, compiler_options)

  @property
  def num_classes(self) -> int:
    return models.num_classes(self.config)

  @property
  def has_encoder(self) -> bool:
    """Whether style images can be encoded (a VAE model with its encoder)."""
    return self._encoder is not None

  # -------------------------------------------------------------------------
  def _encode_fn(self, e_vars, image):
    return self._encoder.apply(e_vars, image, train=False)

  def encode(self, style_images, rng: Optional[jax.Array] = None,
             sample: bool = True) -> np.ndarray:
    """Style codes of images through the VAE encoder (eval mode).

    Args:
      style_images: (N, H, W, 3) float images in [-1, 1], H and W the model's.
      rng: PRNG key for the sample; defaults to PRNGKey(0).
      sample: draw z = mu + exp(logvar / 2) * N(0, 1) like the reference;
        False returns the mean mu.

    Returns:
      (N, z_dim) float32 latent codes, to pass as `z`.
    """
    if self._encoder is None:
      raise ValueError('This model folder has no encoder (use_vae='
                       f'{self.config.use_vae}): style images need one.')
    style_images = np.asarray(style_images)
    want = self.image_size + (3,)
    if style_images.ndim != 4 or tuple(style_images.shape[1:]) != want:
      raise ValueError(f'style_images has shape {style_images.shape}: '
                       f'expected (N, {want[0]}, {want[1]}, 3).')
    if not np.issubdtype(style_images.dtype, np.floating):
      raise ValueError(f'style_images has dtype {style_images.dtype}: '
                       'expected float images in [-1, 1].')
    mu, logvar = self._encode(self._e_vars, style_images.astype(np.float32))
    if not sample:
      return np.asarray(mu, np.float32)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    z = mu + jax.random.normal(rng, mu.shape) * jnp.exp(0.5 * logvar)
    return np.asarray(z, np.float32)

  def __call__(self, labels, instances=None, z=None, style_images=None,
               rng: Optional[jax.Array] = None) -> np.ndarray:
    """Generates images from integer label maps.

    Args:
      labels: (N, H, W) integer class ids 0..label_nc-1; when the model has a
        don't-care class, label_nc or 255 mean don't-care.
      instances: (N, H, W) integer instance ids; required unless the model was
        trained with no_instance.
      z: (N, z_dim) latent codes (VAE models only).
      style_images: (N, H, W, 3) float images in [-1, 1] whose style the VAE
        encoder extracts (VAE models with an encoder only).
      rng: PRNG key for sampling z (VAE models); defaults to PRNGKey(0).

    Returns:
      (N, H, W, 3) float32 images in [-1, 1].
    """
    labels = self._check_labels(labels)
    n = labels.shape[0]
    instances = self._check_instances(instances, labels.shape)
    z = self._latent(z, style_images, n, rng)
    out = self._generate(self._g_vars, labels, instances, z)
    return np.asarray(out, np.float32)

  # -------------------------------------------------------------------------
  def _check_labels(self, labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2:
      raise ValueError(f'labels has shape {labels.shape}: expected a batch '
                       '(N, H, W); add a leading axis for one map.')
    if labels.ndim != 3 or tuple(labels.shape[1:]) != self.image_size:
      raise ValueError(
          f'labels has shape {labels.shape}: this model takes (N, '
          f'{self.image_size[0]}, {self.image_size[1]}) label maps.')
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'labels has dtype {labels.dtype}: expected integer '
                       'class ids.')
    return class_ids(labels, self.config)

  def _check_instances(self, instances, shape):
    if self.config.no_instance:
      return None
    if instances is None:
      raise ValueError('This model uses instance maps (no_instance=False): '
                       'pass instances=(N, H, W) integer instance ids (use '
                       'the label map itself when there are no instances).')
    instances = np.asarray(instances)
    if instances.shape != shape:
      raise ValueError(f'instances has shape {instances.shape}; the labels '
                       f'have {shape}.')
    if not np.issubdtype(instances.dtype, np.integer):
      raise ValueError(f'instances has dtype {instances.dtype}: expected '
                       'integer instance ids.')
    return instances.astype(np.int32)

  def _latent(self, z, style_images, n, rng):
    if not self.config.use_vae:
      if z is not None or style_images is not None:
        raise ValueError('This model has no VAE (use_vae=False): z and '
                         'style_images are not used.')
      return None
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if z is not None and style_images is not None:
      raise ValueError('Pass z or style_images, not both.')
    if style_images is not None:
      z = self.encode(style_images, rng)
      if z.shape[0] != n:
        raise ValueError(f'style_images has {z.shape[0]} images for {n} '
                         'label maps.')
      return z
    if z is None:
      return jax.random.normal(rng, (n, self.config.z_dim))
    z = np.asarray(z, np.float32)
    if z.shape != (n, self.config.z_dim):
      raise ValueError(f'z has shape {z.shape}: expected '
                       f'{(n, self.config.z_dim)}.')
    return z
