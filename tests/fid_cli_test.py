"""python -m spade_jax.fid: folders and pytorch-fid .npz statistics; the
precomputed real statistics of --mode eval and training FID."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from evaluate_test import write_random_inception
from fid_test import smooth_images
from spade_jax import evaluate
from spade_jax import fid
from spade_jax import inception
from train_test import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESIZE = 139  # The same network on smaller inputs: faster in tests.


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  return write_random_inception(
      tmp_path_factory.mktemp('inc') / inception.WEIGHTS_FILE_NAME)


def _folder(path, images, ext='png'):
  path.mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im).save(path / f'{i:03d}.{ext}')
  (path / 'notes.txt').write_text('not an image')
  return str(path)


def _random_stats(seed, dim=inception.NUM_FEATURES):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(dim, 40))
  return rng.normal(size=dim), a @ a.T / 40


def test_folders_and_saved_statistics_give_the_same_fid(weights, tmp_path):
  real_images, fake_images = smooth_images(6, seed=1), smooth_images(5, seed=2)
  real = _folder(tmp_path / 'real', real_images)
  fake = _folder(tmp_path / 'fake', fake_images, 'jpg')
  stats = str(tmp_path / 'real_stats.npz')
  score = fid.run(real, fake, inception_weights=weights, save_stats=stats,
                  batch_size=4, resize_to=RESIZE)
  # Independently: the features of the images as files hold them.
  extractor = fid.FeatureExtractor(inception.load_inception_params(weights),
                                   batch_size=4, resize_to=RESIZE)
  read = lambda folder: np.stack([
      np.asarray(Image.open(os.path.join(folder, f)).convert('RGB'))
      for f in sorted(os.listdir(folder)) if not f.endswith('.txt')])
  want = fid.fid_from_features(extractor(read(real)), extractor(read(fake)))
  assert score == pytest.approx(want, rel=1e-6) and score > 0
  feats = extractor(read(real))
  with np.load(stats) as f:  # pytorch-fid's format: np.mean, np.cov.
    assert sorted(f.files) == ['mu', 'sigma']
    assert f['mu'].shape == (2048,) and f['sigma'].shape == (2048, 2048)
    np.testing.assert_allclose(f['mu'], feats.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(f['sigma'], np.cov(feats, rowvar=False),
                               rtol=1e-5, atol=1e-9)
  # A statistics file needs no images (nor an extractor).
  mu, sigma, count = fid.statistics_of(stats, None)
  np.testing.assert_array_equal(mu, fid.load_statistics(stats)[0])
  assert count is None and sigma.shape == (2048, 2048)
  with pytest.raises(fid.StatisticsError, match='--overwrite'):
    fid.run(real, None, inception_weights=weights, save_stats=stats)
  assert fid.run(stats, None, save_stats=stats, overwrite=True) is None


def test_cli_with_statistics_files(tmp_path):
  a, b = tmp_path / 'a.npz', tmp_path / 'b.npz'
  # Equal covariances: the FID is |mu1 - mu2|^2.
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=2048), rng.normal(size=2048)
  s1 = s2 = np.eye(2048) * 0.3
  np.savez_compressed(a, mu=mu1, sigma=s1)
  np.savez_compressed(b, mu=mu2, sigma=s2)
  cmd = [sys.executable, '-m', 'spade_jax.fid', '--real', str(a), '--fake']
  proc = subprocess.run(cmd + [str(b)], capture_output=True, text=True,
                        timeout=240, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed = float(proc.stdout.strip().splitlines()[-1].split('FID: ')[1])
  assert printed == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-9)
  np.savez(tmp_path / 'bad.npz', mu=mu1)
  with pytest.raises(fid.StatisticsError, match='bad.npz has no sigma'):
    fid.run(str(a), str(tmp_path / 'bad.npz'))


def test_statistics_errors(tmp_path):
  np.savez(tmp_path / 's.npz', mu=np.zeros(3), sigma=np.eye(3))
  with pytest.raises(fid.StatisticsError, match=r'\(2048,\) and'):
    fid.load_statistics(str(tmp_path / 's.npz'))
  (tmp_path / 'one').mkdir()
  Image.fromarray(smooth_images(1)[0]).save(tmp_path / 'one' / 'x.png')
  with pytest.raises(fid.StatisticsError, match='1 image'):
    fid.list_images(str(tmp_path / 'one'))
  with pytest.raises(fid.StatisticsError, match='neither a folder'):
    fid.list_images(str(tmp_path / 'missing'))


class _Stats:

  def __init__(self, mu, sigma, count=5):
    self._ms, self.count = (mu, sigma), count

  def mean_cov(self):
    return self._ms


def test_eval_and_training_fid_use_the_real_statistics_file(
    weights, tmp_path, monkeypatch):
  mu_r, s_r = _random_stats(2)
  mu_f, s_f = _random_stats(3)
  path = str(tmp_path / 'real.npz')
  fid.save_statistics(path, mu_r, s_r)
  calls = []

  def fake_fid_statistics(config, g_vars, data_dir, extractor, num_images=0,
                          with_real=True, on_generated=None):
    del on_generated  # No segmenter in this test.
    calls.append(with_real)
    return _Stats(mu_f, s_f), (_Stats(mu_f, s_f) if with_real else None)

  monkeypatch.setattr(evaluate, 'fid_statistics', fake_fid_statistics)
  distances = []

  def frechet(*args):
    distances.append(args)
    return 1.5

  monkeypatch.setattr(evaluate.fid, 'frechet_distance', frechet)
  want = 1.5
  config = tiny_config(inception_weights=weights, fid_real_stats=path)
  training = evaluate.TrainingFID(config, 'unused')
  assert training({}) == pytest.approx(want) and calls == [False]
  monkeypatch.setattr(evaluate.train_state, 'load_inference_variables',
                      lambda *a, **k: (None, {'generator': {}}, 7))
  monkeypatch.setattr(evaluate.run_config, 'resolve_data_dir',
                      lambda *a: 'unused')
  assert evaluate.evaluate(config, str(tmp_path)) == {
      'fid': pytest.approx(want)}
  assert calls == [False, False]
  # Both measured the fakes against the file's statistics.
  for args in distances:
    for got, expected in zip(args, (mu_r, s_r, mu_f, s_f)):
      np.testing.assert_array_equal(got, expected)
  assert len(distances) == 2
  bad = tiny_config(inception_weights=weights,
                    fid_real_stats=str(tmp_path / 'missing.npz'))
  with pytest.raises(fid.StatisticsError, match='missing.npz'):
    evaluate.TrainingFID(bad, 'unused')
