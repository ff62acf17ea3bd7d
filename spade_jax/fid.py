"""Fréchet Inception Distance: pool features, float64 statistics, distance.

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
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from spade_jax import inception


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


def compute_fid(extractor: FeatureExtractor, images1: np.ndarray,
                images2: np.ndarray) -> float:
  """FID between two image sets held in memory."""
  return fid_from_features(extractor(images1), extractor(images2))
