"""`python -m spade_jax.evaluate`: mIoU / accuracy of folders of images.

The segmenter is DRN-D-105 with random weights saved in the published
format (its single-scale pass is the cheapest of the three on small images);
the numbers are checked against the Flax network's own predictions, scored
independently. (--mode eval's segmentation: evaluate_test.py.)
"""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

torch = pytest.importorskip('torch')

from spade_jax import evaluate  # pylint: disable=g-import-not-at-top
from spade_jax import segmentation_metrics  # pylint: disable=g-import-not-at-top
from spade_jax import segmenters  # pylint: disable=g-import-not-at-top
import segmenter_torch  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'drn105_cityscapes'


@pytest.fixture(scope='module')
def drn_weights(tmp_path_factory):
  return segmenter_torch.write_random_drn(
      tmp_path_factory.mktemp('drn') / 'drn_d_105_cityscapes.pth')


def _folders(root, n=3, size=(32, 32)):
  """Generated-like images and Cityscapes labelIds PNGs (2x the size)."""
  rng = np.random.default_rng(0)
  images, labels = root / 'images', root / 'labels'
  images.mkdir()
  labels.mkdir()
  ids = np.array([0, 7, 8, 11, 21, 23, 26])  # Void, road, ..., car.
  for i in range(n):
    stem = f'city_{i:06d}'
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(
        images / f'{stem}_leftImg8bit.png')
    label = ids[rng.integers(0, len(ids), (size[0] * 2, size[1] * 2))]
    Image.fromarray(label.astype(np.uint8)).save(
        labels / f'{stem}_gtFine_labelIds.png')
  return images, labels


def _expected(weights, images, labels, multi_scale):
  seg = segmenters.Segmenter.load(NAME, weights, multi_scale)
  confusion = segmentation_metrics.ConfusionMatrix(19)
  for image_path, label_path in evaluate.pair_images_with_labels(
      str(images), str(labels)):
    image = np.asarray(Image.open(image_path).convert('RGB'))
    # PIL NEAREST halving takes the pixel at 2 i + 1 (pixel centres).
    raw = np.asarray(Image.open(label_path))[1::2, 1::2]
    confusion.add(segmenters.labels_from_annotation(NAME, raw),
                  seg.predict(image[None])[0])
  return confusion.scores()


def test_folders_cli_prints_json_last(drn_weights, tmp_path):
  images, labels = _folders(tmp_path)
  proc = subprocess.run(
      [sys.executable, '-m', 'spade_jax.evaluate', '--segmenter', NAME,
       '--weights', drn_weights, '--images', str(images), '--labels',
       str(labels), '--single_scale'],
      capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['num_images'] == 3 and result['multi_scale'] is False
  want = _expected(drn_weights, images, labels, multi_scale=False)
  assert result['miou'] == pytest.approx(want['miou'])
  assert result['accuracy'] == pytest.approx(want['accuracy'])
  assert 0 < result['num_classes_present'] <= 19


def test_folder_errors_are_clear(drn_weights, tmp_path):
  images, labels = _folders(tmp_path, n=2)
  os.remove(labels / 'city_000001_gtFine_labelIds.png')
  with pytest.raises(ValueError, match='city_000001_leftImg8bit.png'):
    evaluate.pair_images_with_labels(str(images), str(labels))
  with pytest.raises(FileNotFoundError, match='go.yf.io'):
    evaluate.evaluate_folders(NAME, str(tmp_path / 'none.pth'), str(images),
                              str(images))
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
      tmp_path / 'colour.png')
  with pytest.raises(ValueError, match='single-channel'):
    evaluate.read_label_map(str(tmp_path / 'colour.png'))
