"""SPADE loss terms as small pure functions (reference: models/networks/loss.py).

All losses are computed and returned in float32, whatever the input dtype.

Multiscale discriminator outputs (`preds`, `fake_feats`, `real_feats`) are a
list (or tuple) over scales, each a list of NHWC feature maps whose last
element is the prediction map. A bare array counts as a single prediction map.
"""
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from spade_jax import vgg as vgg_lib

GAN_MODES = ('hinge', 'ls', 'original', 'w')
# Weights of the relu1_1 .. relu5_1 terms of the VGG loss.
VGG_LOSS_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _is_sequence(x: Any) -> bool:
  return isinstance(x, (list, tuple))


def _single_gan_loss(pred: jax.Array, target_is_real: bool,
                     for_discriminator: bool, gan_mode: str) -> jax.Array:
  """GAN loss of one prediction map: a mean over all its elements."""
  pred = _f32(pred)
  if gan_mode == 'hinge':
    if for_discriminator:
      if target_is_real:
        return jnp.mean(jax.nn.relu(1.0 - pred))
      return jnp.mean(jax.nn.relu(1.0 + pred))
    if not target_is_real:
      raise ValueError("The generator's hinge loss must aim for real "
                       '(target_is_real=True).')
    return -jnp.mean(pred)
  if gan_mode == 'ls':
    target = 1.0 if target_is_real else 0.0
    return jnp.mean(jnp.square(pred - target))
  if gan_mode == 'original':
    # Binary cross entropy with logits, numerically stable form:
    # max(x, 0) - x * t + log(1 + exp(-|x|)).
    target = 1.0 if target_is_real else 0.0
    return jnp.mean(jax.nn.relu(pred) - pred * target
                    + jnp.log1p(jnp.exp(-jnp.abs(pred))))
  if gan_mode == 'w':
    return -jnp.mean(pred) if target_is_real else jnp.mean(pred)
  raise ValueError(f'Unknown gan_mode {gan_mode!r}; expected one of '
                   f'{GAN_MODES}.')


def gan_loss(preds: Any, target_is_real: bool, for_discriminator: bool = True,
             gan_mode: str = 'hinge') -> jax.Array:
  """Adversarial loss of (multiscale) discriminator outputs, as the reference.

  Per scale, the loss of the last output (the prediction map) is a mean over
  all its elements; the scales are averaged.

  Args:
    preds: list over scales of lists of feature maps (last = prediction), or a
      list of prediction maps, or one bare prediction array.
    target_is_real: whether the target is "real".
    for_discriminator: hinge only: True for the discriminator losses
      mean(relu(1 - D(real))) / mean(relu(1 + D(fake))); False for the
      generator loss -mean(D(fake)), which needs target_is_real=True.
    gan_mode: 'hinge', 'ls' (MSE to 1 / 0), 'original' (BCE with logits) or
      'w' (Wasserstein: -mean / mean).

  Returns:
    A float32 scalar.
  """
  if gan_mode not in GAN_MODES:
    raise ValueError(f'Unknown gan_mode {gan_mode!r}; expected one of '
                     f'{GAN_MODES}.')
  if not _is_sequence(preds):
    return _single_gan_loss(preds, target_is_real, for_discriminator, gan_mode)
  if not preds:
    raise ValueError('gan_loss got an empty list of predictions.')
  total = jnp.zeros((), jnp.float32)
  for pred in preds:
    if _is_sequence(pred):
      pred = pred[-1]
    total = total + _single_gan_loss(pred, target_is_real, for_discriminator,
                                     gan_mode)
  return total / len(preds)


def feature_matching_loss(fake_feats: Sequence[Sequence[jax.Array]],
                          real_feats: Sequence[Sequence[jax.Array]],
                          lambda_feat: float = 10.0) -> jax.Array:
  """pix2pixHD discriminator feature matching loss.

  Sum over scales and intermediate layers (all but the last output of each
  scale) of mean|fake - stop_gradient(real)| * lambda_feat / num_D.

  Args:
    fake_feats: discriminator outputs on the fake images, list over scales of
      lists of NHWC feature maps (last = prediction, excluded).
    real_feats: the same on the real images; no gradient flows into them.
    lambda_feat: weight of the loss.

  Returns:
    A float32 scalar.
  """
  if len(fake_feats) != len(real_feats):
    raise ValueError(f'feature_matching_loss: {len(fake_feats)} fake scales '
                     f'but {len(real_feats)} real scales.')
  num_d = len(fake_feats)
  total = jnp.zeros((), jnp.float32)
  for fake_scale, real_scale in zip(fake_feats, real_feats):
    if len(fake_scale) != len(real_scale):
      raise ValueError('feature_matching_loss: fake and real scales have '
                       f'{len(fake_scale)} and {len(real_scale)} outputs.')
    for fake, real in zip(fake_scale[:-1], real_scale[:-1]):
      real = jax.lax.stop_gradient(_f32(real))
      total = total + jnp.mean(jnp.abs(_f32(fake) - real)) * (
          lambda_feat / num_d)
  return total


def kl_loss(mu: jax.Array, logvar: jax.Array,
            lambda_kld: float = 1.0) -> jax.Array:
  """VAE KL divergence to N(0, I), summed over all elements (not averaged).

  Returns lambda_kld * -0.5 * sum(1 + logvar - mu^2 - exp(logvar)). The
  default lambda_kld=1 gives the unweighted term; SPADE trains with 0.05
  (pass config.lambda_kld here, or multiply the result).

  Args:
    mu: encoder means, any shape.
    logvar: encoder log-variances, the shape of `mu`.
    lambda_kld: weight of the loss.

  Returns:
    A float32 scalar.
  """
  mu = _f32(mu)
  logvar = _f32(logvar)
  kld = -0.5 * jnp.sum(1.0 + logvar - jnp.square(mu) - jnp.exp(logvar))
  return kld * lambda_kld


def vgg_loss(vgg_params: Any, fake: jax.Array, real: jax.Array,
             dtype: Any = jnp.float32) -> jax.Array:
  """VGG19 perceptual loss, unweighted by lambda_vgg (the caller applies it).

  sum_i w_i * mean|VGG_i(fake) - stop_gradient(VGG_i(real))| over relu1_1 ..
  relu5_1, w = 1/32, 1/16, 1/8, 1/4, 1. Images go in as they are (in
  [-1, 1]), with no ImageNet normalisation, as in the reference. The VGG
  parameters are frozen (no gradient flows into them).

  Args:
    vgg_params: `{'params': ...}` variables of `vgg.VGG19`, e.g. from
      `vgg.load_vgg19_params`.
    fake: generated images, NHWC, 3 channels.
    real: real images, the shape of `fake`.
    dtype: compute dtype of the VGG forward (float32 or bfloat16).

  Returns:
    A float32 scalar.
  """
  if fake.shape != real.shape:
    raise ValueError(f'vgg_loss: fake {fake.shape} and real {real.shape} '
                     'differ in shape.')
  net = vgg_lib.VGG19(dtype=dtype)
  vgg_params = jax.lax.stop_gradient(vgg_params)
  fake_feats = net.apply(vgg_params, fake)
  real_feats = net.apply(vgg_params, jax.lax.stop_gradient(real))
  total = jnp.zeros((), jnp.float32)
  for weight, fake_f, real_f in zip(VGG_LOSS_WEIGHTS, fake_feats, real_feats):
    real_f = jax.lax.stop_gradient(_f32(real_f))
    total = total + weight * jnp.mean(jnp.abs(_f32(fake_f) - real_f))
  return total
