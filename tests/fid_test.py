"""FID: the Inception network against a PyTorch model, statistics, distance.

The PyTorch model below is written from pytorch-fid's description of its
network (torchvision's Inception-v3 with the FID blocks: average pools that
ignore padding, a max pool in Mixed_7c; bilinear resize to 299, [0, 1] ->
[-1, 1], pool features). Its random weights are saved under the published
file's key names and loaded by `inception.load_inception_params`.
"""
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from torch import nn as tnn
from torch.nn import functional as F

from spade_jax import fid
from spade_jax import inception

# ---------------------------------------------------------------------------
# PyTorch reference (pytorch-fid's FID Inception-v3, random weights).
# ---------------------------------------------------------------------------


class TConv(tnn.Module):

  def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, kernel_size, stride=stride,
                           padding=padding, bias=False)
    self.bn = tnn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class TA(tnn.Module):

  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = TConv(cin, 64, 1)
    self.branch5x5_1 = TConv(cin, 48, 1)
    self.branch5x5_2 = TConv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = TConv(cin, 64, 1)
    self.branch3x3dbl_2 = TConv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = TConv(96, 96, 3, padding=1)
    self.branch_pool = TConv(cin, pool_features, 1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg(x))], 1)


class TB(tnn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = TConv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = TConv(cin, 64, 1)
    self.branch3x3dbl_2 = TConv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = TConv(96, 96, 3, stride=2)

  def forward(self, x):
    return torch.cat([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        F.max_pool2d(x, 3, stride=2)], 1)


class TC(tnn.Module):

  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = TConv(cin, 192, 1)
    self.branch7x7_1 = TConv(cin, c7, 1)
    self.branch7x7_2 = TConv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = TConv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = TConv(cin, c7, 1)
    self.branch7x7dbl_2 = TConv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = TConv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = TConv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = TConv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = TConv(cin, 192, 1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f'branch7x7dbl_{i}')(bd)
    return torch.cat([self.branch1x1(x), b7, bd,
                      self.branch_pool(_avg(x))], 1)


class TD(tnn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = TConv(cin, 192, 1)
    self.branch3x3_2 = TConv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = TConv(cin, 192, 1)
    self.branch7x7x3_2 = TConv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = TConv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = TConv(192, 192, 3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f'branch7x7x3_{i}')(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                      F.max_pool2d(x, 3, stride=2)], 1)


class TE(tnn.Module):

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = TConv(cin, 320, 1)
    self.branch3x3_1 = TConv(cin, 384, 1)
    self.branch3x3_2a = TConv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = TConv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = TConv(cin, 448, 1)
    self.branch3x3dbl_2 = TConv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = TConv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = TConv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = TConv(cin, 192, 1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    pooled = (F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool
              else _avg(x))
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(tnn.Module):

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = TConv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = TConv(32, 32, 3)
    self.Conv2d_2b_3x3 = TConv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = TConv(64, 80, 1)
    self.Conv2d_4a_3x3 = TConv(80, 192, 3)
    self.Mixed_5b = TA(192, 32)
    self.Mixed_5c = TA(256, 64)
    self.Mixed_5d = TA(288, 64)
    self.Mixed_6a = TB(288)
    self.Mixed_6b = TC(768, 128)
    self.Mixed_6c = TC(768, 160)
    self.Mixed_6d = TC(768, 160)
    self.Mixed_6e = TC(768, 192)
    self.Mixed_7a = TD(768)
    self.Mixed_7b = TE(1280, max_pool=False)
    self.Mixed_7c = TE(2048, max_pool=True)
    self.fc = tnn.Linear(2048, 1008)

  def forward(self, x):  # NCHW in [0, 1] -> (N, 2048)
    x = F.interpolate(x, size=(299, 299), mode='bilinear',
                      align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, 3, stride=2)
    for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b',
                 '7c'):
      x = getattr(self, f'Mixed_{name}')(x)
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def random_torch_inception(seed=0):
  """Random weights that keep activations O(1) through the network."""
  torch.manual_seed(seed)
  net = TorchFIDInception()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, tnn.Conv2d):
        fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
      elif isinstance(m, tnn.BatchNorm2d):
        m.weight.uniform_(0.8, 1.2)
        m.bias.normal_(0.0, 0.1)
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return net.eval()


@pytest.fixture(scope='module')
def torch_net():
  return random_torch_inception()


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory, torch_net):
  """A .pth in the published file's key format (fc and counters included)."""
  path = tmp_path_factory.mktemp('inception') / inception.WEIGHTS_FILE_NAME
  torch.save(torch_net.state_dict(), path)
  return str(path)


@pytest.fixture(scope='module')
def variables(weights_file):
  return inception.load_inception_params(weights_file)


@pytest.fixture(scope='module')
def extractor(variables):
  return fid.FeatureExtractor(variables, batch_size=8)


@pytest.fixture(scope='module')
def small_extractor(variables):
  """Inputs resized to 139 instead of 299: the same network, 4x faster."""
  return fid.FeatureExtractor(variables, batch_size=16, resize_to=139)


def smooth_images(n, size=32, seed=0):
  """uint8 images with some spatial structure (blurred random fields)."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (n, size // 4, size // 4, 3))
  x = np.repeat(np.repeat(x, 4, 1), 4, 2)
  x = (x + np.roll(x, 2, 1) + np.roll(x, 2, 2)) / 3
  return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# The network and its weights.
# ---------------------------------------------------------------------------
def test_key_table_matches_the_torch_model(torch_net):
  state = torch_net.state_dict()
  want = {k: tuple(v.shape) for k, v in state.items()
          if not k.startswith('fc.') and 'num_batches_tracked' not in k}
  assert inception.expected_torch_shapes() == want


def test_features_match_torch(torch_net, extractor):
  images = smooth_images(2, size=40, seed=3)[:, :, :36]  # 40x36, not square
  with torch.no_grad():
    want = torch_net(torch.from_numpy(
        images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)).numpy()
  got = extractor(images)
  assert got.shape == (2, 2048) and got.dtype == np.float64
  assert want.std() > 1e-2  # Activations did not die out.
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())


def test_resize_matches_torch_bilinear():
  x = np.random.default_rng(0).uniform(0, 1, (1, 23, 31, 3)).astype(
      np.float32)
  for size in (299, 17):
    want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                         size=(size, size), mode='bilinear',
                         align_corners=False).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(inception.resize_bilinear(x, size))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_npz_conversion_round_trip(weights_file, variables, tmp_path):
  out = str(tmp_path / 'fid.npz')
  proc = subprocess.run([sys.executable, '-m', 'spade_jax.inception',
                         weights_file, out], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  again = inception.load_inception_params(out)
  for a, b in zip(jax.tree_util.tree_leaves(variables),
                  jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_missing_and_wrong_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match=inception.WEIGHTS_FILE_NAME):
    inception.load_inception_params(str(tmp_path / 'nope.pth'))
  with pytest.raises(FileNotFoundError, match='pytorch-fid'):
    inception.load_inception_params('')
  bad = tmp_path / 'bad.pth'
  torch.save({'features.0.weight': torch.zeros(3)}, bad)
  with pytest.raises(ValueError, match='lack 470 of the 470.*Conv2d_1a_3x3'):
    inception.load_inception_params(str(bad))
  state = {k: np.zeros(s, np.float32)
           for k, s in inception.expected_torch_shapes().items()}
  state['Mixed_7c.branch_pool.conv.weight'] = np.zeros((192, 2048, 3, 3))
  with pytest.raises(ValueError, match='Mixed_7c.branch_pool.conv.weight: '
                     'expected \\(192, 2048, 1, 1\\)'):
    inception.variables_from_state_dict(state)


# ---------------------------------------------------------------------------
# Statistics and the distance.
# ---------------------------------------------------------------------------
def test_running_statistics_match_numpy():
  x = np.random.default_rng(1).normal(3.0, 2.0, (37, 5))
  stats = fid.RunningStatistics(5)
  for part in np.split(x, [1, 10, 11, 30]):
    stats.add(part)
  mean, cov = stats.mean_cov()
  np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-11)
  assert mean.dtype == np.float64 and stats.count == 37


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(2)
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
  assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == (
      pytest.approx(4.0 + 1.0))
  # Commuting (same eigenvectors): sum (sqrt(a) - sqrt(b))^2 + |dmu|^2.
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
  assert got == pytest.approx(want, rel=1e-10)
  # Non-commuting 2x2: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 S2)).
  s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
  s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
  tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1 @ s2)))
  want = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
  assert fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == (
      pytest.approx(want, rel=1e-12))
  # Singular covariances (fewer samples than dimensions) stay finite.
  x = rng.normal(size=(5, 40))
  y = rng.normal(size=(5, 40)) + 0.5
  value = fid.fid_from_features(x, y)
  assert np.isfinite(value) and value > 0
  # The low-rank route of fid_from_features gives the full route's value.
  full = fid.frechet_distance(*fid.statistics(x), *fid.statistics(y))
  assert value == pytest.approx(full, rel=1e-7)
  assert fid.fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
  stats = fid.statistics(x)
  assert fid.frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_a_set_with_itself_is_zero(small_extractor):
  images = smooth_images(20, seed=4)
  feats = small_extractor(images)
  assert fid.fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-6)
  # Batching does not change the features.
  np.testing.assert_allclose(small_extractor(images[:5]), feats[:5],
                             rtol=1e-5, atol=1e-6)


def test_fid_grows_as_images_are_degraded(small_extractor):
  extractor = small_extractor
  images = smooth_images(16, seed=5)
  real = extractor(smooth_images(16, seed=6))
  rng = np.random.default_rng(7)
  scores = []
  for sigma in (0.0, 20.0, 60.0, 120.0):
    noisy = images.astype(np.float64) + rng.normal(0, sigma, images.shape)
    noisy = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    scores.append(fid.fid_from_features(real, extractor(noisy)))
  assert all(a < b for a, b in zip(scores, scores[1:])), scores
