"""Differentiable augmentation of the discriminator's inputs (DiffAugment).

Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training"
(NeurIPS 2020): augmenting real AND generated images with the same kind of
differentiable transforms, in both the generator's and the discriminator's
updates, keeps the discriminator from memorising a small training set. Set
`config.diffaugment` to a comma-separated policy, e.g.
'color,translation,cutout' ('' = off, the default):

  color        brightness + U(-0.5, 0.5); saturation x U(0, 2); contrast
               x U(0.5, 1.5) (the paper's ranges, images in [-1, 1]);
  translation  integer shifts of up to 1/8 of the height and width, zero
               filled;
  cutout       one zeroed square of half the height and width at a random
               centre.

Here the discriminator sees concat(semantics, image) for a fake half and a
real half of the batch. Each example draws its own transform, and the fake
and the real image of the same label map get the SAME draw, so the pair stays
comparable (the feature-matching loss compares their features). Colour
transforms touch only the image channels; translation and cutout move or cut
the label channels with the image, so they stay aligned.
"""
from typing import Tuple

import jax
import jax.numpy as jnp

OPS = ('color', 'translation', 'cutout')
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def parse_policy(policy: str) -> Tuple[str, ...]:
  """'color,translation' -> ('color', 'translation'); '' -> ()."""
  ops = tuple(p.strip() for p in (policy or '').split(',') if p.strip())
  unknown = [p for p in ops if p not in OPS]
  if unknown:
    raise ValueError(f'diffaugment={policy!r}: unknown op(s) {unknown}; '
                     f'use a comma-separated subset of {", ".join(OPS)} '
                     "('' = off).")
  if len(set(ops)) != len(ops):
    raise ValueError(f'diffaugment={policy!r}: an op is listed twice.')
  return ops


def color_draw(rng: jax.Array, num: int, dtype) -> Tuple[jax.Array, ...]:
  """(brightness, saturation, contrast) factors, each (num, 1, 1, 1)."""
  r1, r2, r3 = jax.random.split(rng, 3)
  u = lambda r: jax.random.uniform(r, (num, 1, 1, 1), dtype)
  return u(r1) - 0.5, u(r2) * 2, u(r3) + 0.5


def color(x: jax.Array, brightness: jax.Array, saturation: jax.Array,
          contrast: jax.Array) -> jax.Array:
  """Brightness, saturation, contrast of (N, H, W, 3) images."""
  x = x + brightness
  mean = x.mean(axis=-1, keepdims=True)
  x = (x - mean) * saturation + mean
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - mean) * contrast + mean


def translate(x: jax.Array, shift_h: jax.Array,
              shift_w: jax.Array) -> jax.Array:
  """Shifts each example by integer (shift_h, shift_w), zero filled."""
  _, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = jnp.clip(jnp.arange(h)[None, :] + shift_h[:, None] + 1, 0, h + 1)
  cols = jnp.clip(jnp.arange(w)[None, :] + shift_w[:, None] + 1, 0, w + 1)
  out = jnp.take_along_axis(padded, rows[:, :, None, None], axis=1)
  return jnp.take_along_axis(out, cols[:, None, :, None], axis=2)


def translation_draw(rng: jax.Array, num: int, h: int,
                     w: int) -> Tuple[jax.Array, jax.Array]:
  sh, sw = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
  r1, r2 = jax.random.split(rng)
  return (jax.random.randint(r1, (num,), -sh, sh + 1),
          jax.random.randint(r2, (num,), -sw, sw + 1))


def cutout_mask(rng: jax.Array, num: int, h: int, w: int,
                dtype) -> jax.Array:
  """(num, H, W, 1): 0 inside one square per example, 1 elsewhere."""
  ch, cw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
  r1, r2 = jax.random.split(rng)
  top = jax.random.randint(r1, (num, 1, 1), 0, h + (1 - ch % 2)) - ch // 2
  left = jax.random.randint(r2, (num, 1, 1), 0, w + (1 - cw % 2)) - cw // 2
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  inside = ((rows >= top) & (rows < top + ch) & (cols >= left) &
            (cols < left + cw))
  return (~inside).astype(dtype)[..., None]


def augment(x: jax.Array, rng: jax.Array, policy: str, *,
            image_channels: int = 3, paired: bool = True) -> jax.Array:
  """Augments discriminator inputs (N, H, W, C); policy '' returns x as is.

  Args:
    x: the inputs; the last `image_channels` channels are the image.
    rng: the draw.
    policy: see the module docstring.
    image_channels: how many trailing channels colour transforms touch.
    paired: example i and example i + N/2 (the fake and the real image of
      one label map) share their draw; N must be even.

  Returns:
    The augmented inputs, same shape and dtype.
  """
  ops = parse_policy(policy)
  if not ops:
    return x
  n, h, w, c = x.shape
  if paired and n % 2:
    raise ValueError(f'paired augmentation needs an even batch, got {n}.')
  num = n // 2 if paired else n
  tile = (lambda a: jnp.concatenate([a, a], axis=0)) if paired else (
      lambda a: a)
  keys = dict(zip(OPS, jax.random.split(rng, len(OPS))))
  for op in ops:
    if op == 'color':
      draws = [tile(d) for d in color_draw(keys[op], num, x.dtype)]
      image = color(x[..., c - image_channels:], *draws)
      x = jnp.concatenate([x[..., :c - image_channels], image], axis=-1)
    elif op == 'translation':
      sh, sw = translation_draw(keys[op], num, h, w)
      x = translate(x, tile(sh), tile(sw))
    elif op == 'cutout':
      x = x * tile(cutout_mask(keys[op], num, h, w, x.dtype))
  return x
