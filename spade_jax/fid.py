r"""Fréchet Inception Distance: pool features, float64 statistics, distance.

  python -m spade_jax.fid --real DIR_OR_NPZ --fake DIR_OR_NPZ \
      --inception_weights pt_inception-2015-12-05-6726825d.pth \
      [--save_stats REAL.npz] [--batch_size 50]

The command line works as pytorch-fid: a folder's images (bmp, jpg, jpeg,
pgm, png, ppm, tif, tiff, webp; not recursive; converted to RGB), or a
statistics file in pytorch-fid's format (`.npz` with `mu` (2048,) and
`sigma` (2048, 2048)), for either side; it prints the FID. `--save_stats`
writes the real side's statistics in that format (alone when --fake is not
given), so a data set's are computed once; `--overwrite` replaces an
existing file. Training and `--mode eval` take such a file as
`config.fid_real_stats`.

In code:

  extractor = fid.FeatureExtractor(inception.load_inception_params(path))
  real, fake = fid.RunningStatistics(), fid.RunningStatistics()
  real.add(extractor(real_uint8_images)); fake.add(extractor(fake_images))
  score = fid.frechet_distance(*real.mean_cov(), *fake.mean_cov())

As the standard pytorch-fid code: images in [0, 1] (uint8 images / 255) go
through the FID Inception-v3 (see `inception.py`); the statistics are the
mean and the unbiased (N - 1) covariance of the 2048 pool features. They are
accumulated here in float64 batch by batch (Chan et al.'s pairwise update, so
no feature needs to be kept). The distance

  d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

uses tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i), lambda_i the eigenvalues of the
symmetric positive semi-definite matrix S1^(1/2) S2 S1^(1/2), which has the
same spectrum as S1 S2. Two symmetric eigen-decompositions (numpy only) make
this exact for singular covariances too, where a general matrix square root
of S1 S2 would need the usual epsilon regularisation.
"""
import functools
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from spade_jax import inception

# pytorch-fid's image file types.
IMAGE_EXTENSIONS = ('bmp', 'jpg', 'jpeg', 'pgm', 'png', 'ppm', 'tif', 'tiff',
                    'webp')


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] images -> float32 [0, 1]; float images pass unchanged."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return images.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted_apply(resize_to: int):
  """One jitted network per input size, shared by all extractors."""
  return jax.jit(inception.FIDInceptionV3(resize_to=resize_to).apply)


class FeatureExtractor:
  """Jitted FID Inception pool features, for batches of any size.

  Images are fed `batch_size` at a time (the last batch padded), so the
  network compiles once.
  """

  def __init__(self, variables: Dict, batch_size: int = 50,
               resize_to: int = inception.INPUT_SIZE):
    self.batch_size = int(batch_size)
    self._variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self._apply = _jitted_apply(int(resize_to))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 or [0, 1] float images -> (N, 2048) float64."""
    images = to_unit_range(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'Expected (N, H, W, 3) RGB images, got shape '
                       f'{images.shape}.')
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:
        pad = np.zeros((self.batch_size - n,) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      feats = self._apply(self._variables, chunk)
      out.append(np.asarray(feats, np.float64)[:n])
    if not out:
      return np.zeros((0, inception.NUM_FEATURES), np.float64)
    return np.concatenate(out)


class RunningStatistics:
  """Mean and covariance of feature vectors, accumulated in float64."""

  def __init__(self, dim: int = inception.NUM_FEATURES):
    self.count = 0
    self._mean = np.zeros(dim, np.float64)
    self._m2 = np.zeros((dim, dim), np.float64)  # Sum of centred outer prods.

  def add(self, features: np.ndarray) -> None:
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self._mean.shape[0]:
      raise ValueError(f'Expected (N, {self._mean.shape[0]}) features, got '
                       f'{x.shape}.')
    n = x.shape[0]
    if n == 0:
      return
    mean = x.mean(axis=0)
    centred = x - mean
    m2 = centred.T @ centred
    total = self.count + n
    delta = mean - self._mean
    self._mean += delta * (n / total)
    self._m2 += m2 + np.outer(delta, delta) * (self.count * n / total)
    self.count = total

  def mean_cov(self) -> Tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance), as np.mean / np.cov(rowvar=False)."""
    if self.count < 2:
      raise ValueError(f'FID needs at least 2 images per set, got '
                       f'{self.count}.')
    return self._mean.copy(), self._m2 / (self.count - 1)


def statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of (N, D) features in one go."""
  stats = RunningStatistics(np.shape(features)[1])
  stats.add(features)
  return stats.mean_cov()


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Square root of a symmetric positive semi-definite matrix."""
  w, v = np.linalg.eigh((matrix + matrix.T) / 2.0)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 sigma2)^(1/2)) for symmetric PSD matrices, stably."""
  root = _psd_sqrt(np.asarray(sigma1, np.float64))
  middle = root @ np.asarray(sigma2, np.float64) @ root
  eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
  return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or (
      sigma1.shape != (mu1.shape[0],) * 2):
    raise ValueError(f'Mismatched statistics: means {mu1.shape} and '
                     f'{mu2.shape}, covariances {sigma1.shape} and '
                     f'{sigma2.shape}.')
  diff = mu1 - mu2
  value = (diff @ diff + np.trace(sigma1) + np.trace(sigma2)
           - 2.0 * trace_sqrt_product(sigma1, sigma2))
  # Rounding can leave a tiny negative number for identical statistics.
  return float(max(value, 0.0))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two feature sets held in memory.

  With fewer vectors than dimensions in the first set (S1 = A^T A, A its
  centred features / sqrt(N - 1)), tr((S1 S2)^(1/2)) comes from the small
  matrix A S2 A^T, which has the same non-zero spectrum as S1 S2: the same
  value as `frechet_distance`, without decomposing D x D matrices.
  """
  f1 = np.asarray(features1, np.float64)
  mu1, sigma1 = statistics(f1)
  mu2, sigma2 = statistics(features2)
  if len(f1) - 1 >= f1.shape[1]:
    return frechet_distance(mu1, sigma1, mu2, sigma2)
  a = (f1 - mu1) / np.sqrt(len(f1) - 1)
  small = a @ sigma2 @ a.T
  eig = np.linalg.eigvalsh((small + small.T) / 2.0)
  tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
  diff = mu1 - mu2
  value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt
  return float(max(value, 0.0))


# ---------------------------------------------------------------------------
# Statistics files (pytorch-fid's format) and image folders.
# ---------------------------------------------------------------------------
class StatisticsError(ValueError):
  """A statistics file or image folder that cannot be used."""


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray,
                    overwrite: bool = False) -> None:
  """Writes `mu`, `sigma` as pytorch-fid does (np.savez_compressed)."""
  if os.path.exists(path) and not overwrite:
    raise StatisticsError(f'{path} exists; pass --overwrite to replace it.')
  tmp = path + '.tmp.npz'
  np.savez_compressed(tmp, mu=np.asarray(mu, np.float64),
                      sigma=np.asarray(sigma, np.float64))
  os.replace(tmp, path)


def load_statistics(path: str,
                    dim: int = inception.NUM_FEATURES
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from a pytorch-fid statistics file, checked."""
  try:
    with np.load(path) as f:
      missing = [k for k in ('mu', 'sigma') if k not in f.files]
      if missing:
        raise StatisticsError(
            f'{path} has no {" or ".join(missing)} (it holds '
            f'{sorted(f.files)}): expected a pytorch-fid statistics file.')
      mu, sigma = np.asarray(f['mu'], np.float64), np.asarray(
          f['sigma'], np.float64)
  except StatisticsError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise StatisticsError(f'cannot read the statistics file {path}: '
                          f'{e}') from None
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise StatisticsError(
        f'{path}: mu {mu.shape} and sigma {sigma.shape}; FID statistics of '
        f'the {dim} Inception pool features are ({dim},) and ({dim}, {dim}).')
  return mu, sigma


def list_images(folder: str) -> List[str]:
  """The image files of `folder` (not recursive), sorted, as pytorch-fid."""
  if not os.path.isdir(folder):
    raise StatisticsError(f'{folder} is neither a folder of images nor a '
                          '.npz statistics file.')
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                 if f.rsplit('.', 1)[-1].lower() in IMAGE_EXTENSIONS and
                 os.path.isfile(os.path.join(folder, f)))
  if len(files) < 2:
    raise StatisticsError(f'{folder} holds {len(files)} image(s) '
                          f'({", ".join(IMAGE_EXTENSIONS)}); FID needs at '
                          'least 2.')
  return files


def _read_rgb(path: str) -> np.ndarray:
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except Exception as e:  # pylint: disable=broad-except
    raise StatisticsError(f'cannot read the image {path}: {e}') from None


def folder_statistics(folder: str, extractor: FeatureExtractor
                      ) -> Tuple[np.ndarray, np.ndarray, int]:
  """(mu, sigma, number of images) of a folder's images."""
  stats = RunningStatistics()
  batch: List[np.ndarray] = []

  def flush():
    if batch:
      stats.add(extractor(np.stack(batch)))
      batch.clear()

  for path in list_images(folder):
    image = _read_rgb(path)
    if batch and (image.shape != batch[0].shape or
                  len(batch) >= extractor.batch_size):
      flush()  # Same-size batches; each size compiles once.
    batch.append(image)
  flush()
  mu, sigma = stats.mean_cov()
  return mu, sigma, stats.count


def is_statistics_file(path: str) -> bool:
  return path.lower().endswith('.npz') and os.path.isfile(path)


def statistics_of(path: str, make_extractor
                  ) -> Tuple[np.ndarray, np.ndarray, Optional[int]]:
  """(mu, sigma, images or None) of a statistics file or an image folder."""
  if is_statistics_file(path):
    return load_statistics(path) + (None,)
  return folder_statistics(path, make_extractor())


def run(real: str, fake: Optional[str], *, inception_weights: str = '',
        save_stats: Optional[str] = None, overwrite: bool = False,
        batch_size: int = 50,
        resize_to: int = inception.INPUT_SIZE) -> Optional[float]:
  """The command line's work; returns the FID (None when only saving)."""
  if not fake and not save_stats:
    raise StatisticsError('give --fake (to compute FID) and/or --save_stats.')
  if save_stats and os.path.exists(save_stats) and not overwrite:
    raise StatisticsError(f'{save_stats} exists; pass --overwrite to '
                          'replace it.')
  extractor = []

  def make_extractor():
    if not extractor:
      extractor.append(FeatureExtractor(
          inception.load_inception_params(inception_weights),
          batch_size=batch_size, resize_to=resize_to))
    return extractor[0]

  mu1, sigma1, n1 = statistics_of(real, make_extractor)
  if save_stats:
    save_statistics(save_stats, mu1, sigma1, overwrite=overwrite)
    print(f'Saved the statistics of {real}'
          f'{f" ({n1} images)" if n1 else ""} to {save_stats}.')
  if not fake:
    return None
  mu2, sigma2, _ = statistics_of(fake, make_extractor)
  return frechet_distance(mu1, sigma1, mu2, sigma2)


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('real', None, 'Folder of real images, or a .npz of '
                      'their statistics (pytorch-fid format).')
  flags.DEFINE_string('fake', None, 'Folder of generated images (or .npz).')
  flags.DEFINE_string('save_stats', None,
                      "Write the real side's statistics here (.npz).")
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --save_stats.')
  flags.DEFINE_string('inception_weights', '',
                      "pytorch-fid's Inception weights (.pth, or the .npz of "
                      '`python -m spade_jax.inception`); needed for folders.')
  flags.DEFINE_integer('batch_size', 50, 'Images per Inception batch.')


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    score = run(FLAGS.real, FLAGS.fake,
                inception_weights=FLAGS.inception_weights,
                save_stats=FLAGS.save_stats, overwrite=FLAGS.overwrite,
                batch_size=FLAGS.batch_size)
  except (StatisticsError, FileNotFoundError, ValueError) as e:
    print(f'ERROR: {e}', file=sys.stderr)
    return 2
  if score is not None:
    print(f'FID: {score}')
  return 0


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['real'])
  app.run(main)
