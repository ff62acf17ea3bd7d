"""The procedurally generated landscapes of the synthetic data set.

Each scene is a square label map of eight classes (ids in this order):

  0 sky       vertical blue gradient (hue varies per scene)
  1 cloud     white-grey puffs, lit from above              (instances)
  2 mountain  one or two ranges, shaded slopes, far ones hazier (instances)
  3 water     below the horizon: mirrored sky/mountains, ripples
  4 grass     green, blade-like vertical texture, lighter far away
  5 sand      beige speckled beach between water and grass
  6 tree      conifers or round crowns on trunks, leafy texture (instances)
  7 rock      grey irregular boulders lit from the upper left (instances)

and an image that looks like it, so a generator can learn a colour and texture
per class. Instance maps (8-bit) give the stuff classes their class id and each
cloud, mountain range, tree and rock its own id from 8 up.

Scenes are a pure function of (seed, split, index) through numpy's RNG.
numpy only (no TensorFlow): the web app draws sample scenes from here;
`synthetic.py` writes them as a data set.
"""
import functools
import math
from typing import Optional, Tuple

import numpy as np

from data_pipelines import metadata

CLASS_NAMES = ('sky', 'cloud', 'mountain', 'water', 'grass', 'sand', 'tree',
               'rock')
SKY, CLOUD, MOUNTAIN, WATER, GRASS, SAND, TREE, ROCK = range(8)
# Colours of the colourised label maps.
CLASS_COLORS = ((110, 170, 240), (235, 235, 235), (125, 100, 85),
                (30, 80, 170), (90, 170, 60), (230, 210, 140), (20, 90, 30),
                (128, 128, 128))
LABEL_NC = len(CLASS_NAMES)
# First instance id of the object instances (stuff keeps its class id).
_FIRST_OBJECT_ID = 8
SPLITS = ('train', 'val')


def dataset_info() -> metadata.DatasetInfo:
  """The set's metadata: its classes, names and colours (no splits)."""
  return metadata.DatasetInfo(
      dataset='synthetic', label_nc=LABEL_NC, contain_dontcare_label=False,
      has_instance=True, splits={}, class_names=list(CLASS_NAMES),
      colors=[list(c) for c in CLASS_COLORS])


# ---------------------------------------------------------------------------
# Noise.


@functools.lru_cache(maxsize=128)
def _interpolation_matrix(n_out: int, cells: int) -> np.ndarray:
  """(n_out, cells + 2) weights sampling a 1-D grid with smoothstep blends."""
  pos = (np.arange(n_out) + 0.5) / n_out * cells
  i0 = np.floor(pos).astype(np.int64)
  f = pos - i0
  f = f * f * (3 - 2 * f)
  m = np.zeros((n_out, cells + 2), np.float32)
  m[np.arange(n_out), i0] = 1 - f
  m[np.arange(n_out), i0 + 1] = f
  return m


def value_noise(rng: np.random.Generator, h: int, w: int, cells_y: float,
                cells_x: float) -> np.ndarray:
  """Smooth random field in [0, 1] of shape (h, w), ~cells features a side."""
  my = _interpolation_matrix(h, max(1, int(math.ceil(cells_y))))
  mx = _interpolation_matrix(w, max(1, int(math.ceil(cells_x))))
  grid = rng.random((my.shape[1], mx.shape[1]), dtype=np.float32)
  return my @ grid @ mx.T


def fractal_noise(rng: np.random.Generator, h: int, w: int, cells: float,
                  octaves: int = 3) -> np.ndarray:
  """Sum of value-noise octaves, normalised to about [0, 1]."""
  total = np.zeros((h, w), np.float32)
  amp, norm = 1.0, 0.0
  for o in range(octaves):
    c = cells * 2**o
    total += amp * value_noise(rng, h, w, c * h / max(h, w), c * w / max(h, w))
    norm += amp
    amp *= 0.5
  return total / norm


def ridge_line(rng: np.random.Generator, w: int, cells: float) -> np.ndarray:
  """A 1-D fractal profile in [0, 1] of length w (mountain ridges)."""
  line = fractal_noise(rng, 1, w, cells, octaves=4)[0]
  lo, hi = line.min(), line.max()
  return (line - lo) / max(hi - lo, 1e-6)


# ---------------------------------------------------------------------------
# Scene parts. Each paints `img` (float32 RGB in [0, 1]), `label` and `inst`.


class _Canvas:
  """The image, label and instance arrays of one scene being painted."""

  def __init__(self, size: int, rng: np.random.Generator):
    self.size = size
    self.img = np.zeros((size, size, 3), np.float32)
    self.label = np.zeros((size, size), np.uint8)
    self.inst = np.zeros((size, size), np.uint8)
    self.next_id = _FIRST_OBJECT_ID
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    self.yy, self.xx = yy, xx
    # Shared per-scene textures: fine leafy noise and per-pixel speckle.
    self.leaves = fractal_noise(rng, size, size, size / 6, octaves=2)
    self.speckle = rng.random((size, size), dtype=np.float32)

  def paint(self, mask: np.ndarray, cls: int, colors: np.ndarray,
            instance: bool, box: Tuple[slice, slice] = (slice(None),
                                                        slice(None))) -> None:
    """Sets `mask` pixels (of `box`) to class `cls` with per-pixel `colors`."""
    np.copyto(self.img[box], colors, where=mask[..., None])
    np.copyto(self.label[box], cls, where=mask)
    if instance:
      np.copyto(self.inst[box], min(self.next_id, 255), where=mask)
      self.next_id += 1
    else:
      np.copyto(self.inst[box], cls, where=mask)

  def box(self, y0: float, y1: float, x0: float,
          x1: float) -> Tuple[slice, slice]:
    """Slices of the pixels in [y0, y1] x [x0, x1], clipped to the canvas."""
    clip = lambda v: int(min(max(v, 0), self.size))
    return (slice(clip(math.floor(y0)), clip(math.ceil(y1) + 1)),
            slice(clip(math.floor(x0)), clip(math.ceil(x1) + 1)))


def _jitter(rng: np.random.Generator, color, amount: float) -> np.ndarray:
  return np.clip(np.asarray(color, np.float32) +
                 rng.uniform(-amount, amount, 3), 0, 1)


def _sky(c: _Canvas, rng: np.random.Generator, horizon: float) -> None:
  top = _jitter(rng, (0.20, 0.42, 0.80), 0.07)
  low = _jitter(rng, (0.68, 0.82, 0.95), 0.05)
  t = np.clip(c.yy / max(horizon, 1.0), 0, 1)[..., None] ** 0.8
  colors = top * (1 - t) + low * t
  c.paint(np.ones_like(c.label, bool), SKY, colors, instance=False)


def _clouds(c: _Canvas, rng: np.random.Generator, horizon: float) -> None:
  """Puffy clouds made of overlapping ellipses, darker underneath."""
  s = c.size
  for _ in range(rng.integers(0, 5)):
    cy = rng.uniform(0.05, 0.75) * horizon
    cx = rng.uniform(-0.1, 1.1) * s
    width = rng.uniform(0.12, 0.35) * s
    height = width * rng.uniform(0.25, 0.45)
    box = c.box(cy - 1.2 * height, cy + 0.35 * height, cx - 0.9 * width,
                cx + 0.9 * width)
    xx, yy = c.xx[box], c.yy[box]
    mask = np.zeros(xx.shape, bool)
    for _ in range(rng.integers(3, 7)):
      bx = cx + rng.uniform(-0.5, 0.5) * width
      by = cy + rng.uniform(-0.3, 0.2) * height
      rx = width * rng.uniform(0.2, 0.4)
      ry = height * rng.uniform(0.45, 0.8)
      mask |= ((xx - bx) / rx)**2 + ((yy - by) / ry)**2 <= 1
    mask &= yy < cy + 0.35 * height  # Flat-ish bottoms.
    if not mask.any():
      continue
    shade = np.clip((yy - (cy - height)) / (2 * height), 0, 1)[..., None]
    base = _jitter(rng, (0.97, 0.97, 0.98), 0.02)
    colors = base * (1 - 0.28 * shade) + 0.04 * (
        c.leaves[box][..., None] - 0.5)
    c.paint(mask, CLOUD, colors, instance=True, box=box)


def _mountains(c: _Canvas, rng: np.random.Generator, horizon: float) -> None:
  s = c.size
  n = rng.choice([0, 1, 1, 2, 2])
  for r in range(n):
    far = r == 0 and n == 2
    height = rng.uniform(0.15, 0.45 if far else 0.35) * horizon
    ridge = horizon - 2 - height * (0.25 + 0.75 * ridge_line(
        rng, s, rng.uniform(2, 5)))
    mask = (c.yy >= ridge[None, :]) & (c.yy <= horizon + 1)
    if not mask.any():
      continue
    slope = np.gradient(ridge)[None, :]
    depth = np.clip((c.yy - ridge[None, :]) /
                    np.maximum(horizon - ridge[None, :], 1), 0, 1)
    rock = fractal_noise(rng, s, s, 8)
    # Slopes rising to the right face the light (from the left).
    light = 1 + 0.35 * np.tanh(-slope * 1.5) * (1 - 0.5 * depth) + \
        0.25 * (rock - 0.5)
    if far:
      base = _jitter(rng, (0.52, 0.55, 0.66), 0.04)
    else:
      base = _jitter(rng, (0.45, 0.38, 0.32), 0.05)
    colors = base * light[..., None] * (1 - 0.25 * depth[..., None])
    c.paint(mask, MOUNTAIN, colors, instance=True)


def _ground(c: _Canvas, rng: np.random.Generator,
            horizon: float) -> Optional[np.ndarray]:
  """Grass, water and a beach below the horizon; returns the shore line."""
  s = c.size
  below = c.yy >= horizon
  dist = np.clip((c.yy - horizon) / max(s - horizon, 1), 0, 1)
  # Grass: low-frequency patches and vertical blade streaks, hazier far.
  blades = rng.random((s, s), dtype=np.float32)
  blades = (blades + np.roll(blades, 1, 0) + np.roll(blades, 2, 0)) / 3
  patches = fractal_noise(rng, s, s, 4)
  base = _jitter(rng, (0.30, 0.58, 0.20), 0.05)
  light = 0.75 + 0.35 * patches + 0.35 * (blades - 0.5) * (0.3 + dist)
  colors = base * light[..., None]
  haze = (1 - dist)[..., None] ** 3 * 0.25
  colors = colors * (1 - haze) + np.array([0.6, 0.7, 0.6], np.float32) * haze
  c.paint(below, GRASS, colors, instance=False)
  if rng.random() >= 0.65:
    return None
  # Water down to a (possibly slanted) shore line, then maybe a beach.
  d0, d1 = rng.uniform(-0.15, 0.45, 2) * (s - horizon)
  wobble = (ridge_line(rng, s, 3) - 0.5) * 0.08 * s
  shore = horizon + d0 + (d1 - d0) * (c.xx[0] / s) + wobble
  water = below & (c.yy < shore[None, :])
  if water.any():
    _water(c, rng, horizon, water, dist)
  if rng.random() < 0.6:
    width = rng.uniform(0.03, 0.1) * s * (1 + (ridge_line(rng, s, 4) - 0.5))
    beach = below & ~water & (c.yy < (shore + width)[None, :])
    if beach.any():
      speckle = c.speckle
      dunes = fractal_noise(rng, s, s, 5)
      sand = _jitter(rng, (0.86, 0.77, 0.55), 0.04)
      colors = sand * (0.85 + 0.15 * dunes + 0.12 *
                       (speckle - 0.5))[..., None]
      c.paint(beach, SAND, colors, instance=False)
  return shore


def _water(c: _Canvas, rng: np.random.Generator, horizon: float,
           mask: np.ndarray, dist: np.ndarray) -> None:
  s = c.size
  ripple_noise = fractal_noise(rng, s, s, 5)
  phase = c.yy * rng.uniform(1.2, 2.0) * (1 + 2 * dist) + 6 * ripple_noise
  ripples = np.sin(phase)
  # Mirror the scene above the horizon, shifted sideways by the ripples.
  src_y = np.clip(np.round(2 * horizon - c.yy), 0, s - 1).astype(np.int32)
  src_x = np.clip(np.round(c.xx + 1.5 * ripples * (0.5 + dist)), 0,
                  s - 1).astype(np.int32)
  reflection = c.img[src_y, src_x]
  deep = _jitter(rng, (0.08, 0.25, 0.45), 0.04)
  mix = (0.55 - 0.3 * dist)[..., None]
  colors = reflection * mix + deep * (1 - mix)
  colors = colors * (1 + 0.12 * ripples[..., None])
  c.paint(mask, WATER, colors, instance=False)


def _tree(c: _Canvas, rng: np.random.Generator, bx: float, by: float,
          height: float) -> None:
  """A conifer or a round-crowned tree standing at (bx, by)."""
  crown_color = _jitter(rng, (0.10, 0.33, 0.14), 0.04)
  trunk_color = _jitter(rng, (0.35, 0.22, 0.12), 0.04)
  trunk_w = max(1.0, 0.1 * height)
  box = c.box(by - height, by, bx - 0.4 * height, bx + 0.4 * height)
  xx, yy = c.xx[box], c.yy[box]
  if rng.random() < 0.5:  # Conifer: a triangle.
    trunk_h = 0.18 * height
    half = 0.25 * height
    frac = (yy - (by - height)) / max(height - trunk_h, 1)
    crown = (frac >= 0) & (frac <= 1) & (np.abs(xx - bx) <= half * frac)
    light = 1 + 0.3 * np.clip((bx - xx) / half, -1, 1)
  else:  # Round crown.
    trunk_h = 0.35 * height
    r = 0.36 * height
    cy = by - height + r
    crown = ((xx - bx)**2 + (yy - cy)**2) <= r * r
    light = 1 + 0.3 * np.clip(((bx - xx) + (cy - yy)) / (1.4 * r), -1, 1)
  trunk = (np.abs(xx - bx) <= trunk_w / 2) & (yy >= by - trunk_h - 1)
  colors = crown_color * (light * (0.6 + 0.8 * c.leaves[box]))[..., None]
  colors = np.where(crown[..., None], colors, trunk_color)
  c.paint(crown | trunk, TREE, colors, instance=True, box=box)


def _rock(c: _Canvas, rng: np.random.Generator, bx: float, by: float,
          radius: float) -> None:
  """An irregular boulder resting at (bx, by), lit from the upper left."""
  box = c.box(by - 1.5 * radius, by + 0.2 * radius, bx - 2 * radius,
              bx + 2 * radius)
  dx, dy = c.xx[box] - bx, c.yy[box] - by
  angle = np.arctan2(dy, dx)
  bumps = sum(rng.uniform(0, 0.15) * np.cos(k * angle + rng.uniform(0, 6.3))
              for k in (2, 3, 5))
  dist = np.hypot(dx / 1.3, dy) / (radius * (1 + bumps))
  mask = (dist <= 1) & (dy <= 0.15 * radius)
  light = 0.8 - 0.35 * dx / (1.3 * radius) - 0.35 * dy / radius - \
      0.25 * np.clip(dist, 0, 1)**4
  base = _jitter(rng, (0.52, 0.51, 0.50), 0.05)
  colors = base * (light + 0.15 * (c.speckle[box] - 0.5))[..., None]
  c.paint(mask, ROCK, colors, instance=True, box=box)


def _objects(c: _Canvas, rng: np.random.Generator, horizon: float) -> None:
  """Trees on grass and rocks on grass or sand, far ones first."""
  s = c.size
  ground = np.argwhere(np.isin(c.label, (GRASS, SAND)))
  if not len(ground):
    return
  objects = []
  for kind, count in ((TREE, rng.integers(0, 7)), (ROCK, rng.integers(0, 4))):
    for _ in range(count):
      y, x = ground[rng.integers(len(ground))]
      if kind == TREE and c.label[y, x] != GRASS:
        continue
      near = (y - horizon) / max(s - horizon, 1)
      objects.append((y, x, kind, near))
  for y, x, kind, near in sorted(objects, key=lambda o: o[0]):
    if kind == TREE:
      _tree(c, rng, float(x), float(y), s * (0.08 + 0.3 * near) *
            rng.uniform(0.8, 1.2))
    else:
      _rock(c, rng, float(x), float(y), s * (0.02 + 0.06 * near) *
            rng.uniform(0.7, 1.3))


def generate_scene(rng: np.random.Generator,
                   size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One scene: (uint8 RGB image, uint8 label, uint8 instance map)."""
  c = _Canvas(size, rng)
  horizon = rng.uniform(0.38, 0.62) * size
  _sky(c, rng, horizon)
  _clouds(c, rng, horizon)
  _mountains(c, rng, horizon)
  _ground(c, rng, horizon)
  _objects(c, rng, horizon)
  # Slight sensor noise everywhere.
  c.img += rng.normal(0, 0.01, c.img.shape).astype(np.float32)
  image = np.clip(np.round(c.img * 255), 0, 255).astype(np.uint8)
  return image, c.label, c.inst


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, SPLITS.index(split)
                                if split in SPLITS else len(SPLITS), index])
