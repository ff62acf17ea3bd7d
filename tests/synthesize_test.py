"""spade_jax.synthesize: label PNGs in, PNGs and index.html out, bad files."""
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from export_test import fake_train_state
from export_test import tiny_config
from spade_jax import label_maps
from spade_jax import model_io
from spade_jax import synthesize
from spade_jax import train_state
from spade_jax import visualize
from spade_jax.synthesizer import Synthesizer


def save_model(folder, config, seed=0):
  state = fake_train_state(config, seed)
  model_io.save_model(folder, config, train_state.inference_variables(state))
  return folder


def blocky_label(h, w, seed, label_nc=8):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, label_nc, (h // 8 + 1, w // 8 + 1))
  return np.repeat(np.repeat(small, 8, 0), 8, 1)[:h, :w]


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  root = tmp_path_factory.mktemp('synth')
  config = tiny_config(dataset='synthetic')
  return save_model(str(root / 'model'), config), root


@pytest.fixture(scope='module')
def inputs(model):
  _, root = model
  labels = root / 'labels'
  labels.mkdir()
  # A 48x40 8-bit map, a 32x32 16-bit one, and bad files.
  a = blocky_label(40, 48, 1).astype(np.uint8)
  Image.fromarray(a).save(labels / 'a.png')
  b = blocky_label(32, 32, 2).astype(np.uint16)
  Image.fromarray(b).save(labels / 'b.png')
  (labels / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\nthis is not a png')
  # A colour that is no class colour of the synthetic set.
  Image.fromarray(np.full((16, 16, 3), (1, 2, 3), np.uint8)).save(
      labels / 'rgb.png')
  Image.fromarray(np.full((16, 16), 200, np.uint8)).save(
      labels / 'range.png')
  images = root / 'images'
  images.mkdir()
  real = np.random.default_rng(3).integers(0, 256, (40, 48, 3), np.uint8)
  Image.fromarray(real).save(images / 'a.jpg', quality=95)
  return labels, images, {'a': a, 'b': b}


def pil_nearest(x, h, w):
  return label_maps.resize_nearest(x, (h, w))


def test_cli_writes_pngs_and_page_and_reports_bad_files(model, inputs,
                                                        tmp_path):
  folder, _ = model
  labels, images, maps = inputs
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'spade_jax.synthesize', '--model', folder,
       '--labels', str(labels), '--images', str(images), '--output',
       str(out)], capture_output=True, text=True, timeout=240)
  text = proc.stdout + proc.stderr
  assert proc.returncode == 1, text[-3000:]
  assert 'Synthesized 2 of 5 label maps' in proc.stdout
  for bad in ('corrupt.png', 'rgb.png', 'range.png'):
    assert f'ERROR {labels / bad}' in proc.stderr
  assert '(1, 2, 3): 256 pixels, first at (row 0, col 0)' in proc.stderr
  assert 'class ids [200]' in proc.stderr

  synth = Synthesizer.load(folder)
  h, w = synth.image_size
  for name, raw in maps.items():
    got = np.asarray(Image.open(out / 'synthesized' / f'{name}.png'))
    assert got.shape == (h, w, 3)
    label = pil_nearest(raw.astype(np.int32), h, w)
    want = visualize.image_to_uint8(synth(label[None], label[None])[0])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    colours = np.asarray(Image.open(out / 'label' / f'{name}.png'))
    assert colours.shape == (h, w, 3)
  assert (out / 'real' / 'a.png').exists()
  assert not (out / 'real' / 'b.png').exists()
  assert not (out / 'synthesized' / 'corrupt.png').exists()
  page = (out / 'index.html').read_text()
  for needle in ('synthesized/a.png', 'synthesized/b.png', 'label/a.png',
                 'real/a.png', 'real_image', 'input_label', 'corrupt.png',
                 'Failed'):
    assert needle in page, needle


def test_colour_label_maps_in_the_class_colours(tmp_path):
  # The synthetic set's colours (dataset 'synthetic'); read_map gives the
  # raw ids the gray map holds, so everything after it is the same.
  config = tiny_config(dataset='synthetic')
  palette = synthesize.model_palette(config, synthesize.label_colors(config))
  ids = blocky_label(40, 48, 1)
  Image.fromarray(label_maps.colorize(ids, palette)).save(tmp_path / 'c.png')
  Image.fromarray(ids.astype(np.uint8)).save(tmp_path / 'g.png')
  by_colour = synthesize.read_map(str(tmp_path / 'c.png'), 'label map',
                                  palette, config)
  np.testing.assert_array_equal(by_colour, ids)
  np.testing.assert_array_equal(
      synthesize.read_map(str(tmp_path / 'g.png'), 'label map', palette,
                          config), ids)
  # Class colours become the raw ids of the model's data set.
  ade = tiny_config(dataset='ade20k', label_nc=8, contain_dontcare_label=True)
  pal = synthesize.model_palette(ade, None)
  ids[0, 0] = 8  # The don't-care class: raw 0 in ADE20K.
  Image.fromarray(label_maps.colorize(ids, pal)).save(tmp_path / 'a.png')
  np.testing.assert_array_equal(
      synthesize.read_map(str(tmp_path / 'a.png'), 'label map', pal, ade),
      np.where(ids == 8, 0, ids + 1))
  # A model folder's classes.json colours are used.
  folder = tmp_path / 'm'
  folder.mkdir()
  model_io.save_classes(str(folder), None, [[9, 9, 9], [1, 200, 3]])
  assert synthesize.label_colors(
      tiny_config(), model_dir=str(folder))[:2] == [[9, 9, 9], [1, 200, 3]]


def test_vae_samples_and_style(tmp_path):
  config = tiny_config(use_vae=True, no_instance=True)
  folder = save_model(str(tmp_path / 'vae'), config, seed=4)
  labels = tmp_path / 'labels'
  labels.mkdir()
  Image.fromarray(blocky_label(32, 32, 5).astype(np.uint8)).save(
      labels / 'x.png')
  style = tmp_path / 'style.png'
  Image.fromarray(np.random.default_rng(6).integers(
      0, 256, (50, 60, 3), np.uint8)).save(style)
  synth = Synthesizer.load(folder)

  out = tmp_path / 'samples'
  results = synthesize.synthesize(folder, str(labels), str(out),
                                  num_samples=3, seed=1, synth=synth)
  assert results[0].error is None
  assert results[0].synthesized == [f'synthesized/x_{i}.png'
                                    for i in range(3)]
  imgs = [np.asarray(Image.open(out / p), np.int32)
          for p in results[0].synthesized]
  assert np.abs(imgs[0] - imgs[1]).mean() > 1  # Different z, new images.
  again = synthesize.synthesize(folder, str(labels), str(tmp_path / 'again'),
                                num_samples=3, seed=1, synth=synth)
  np.testing.assert_array_equal(
      np.asarray(Image.open(tmp_path / 'again' / again[0].synthesized[0])),
      imgs[0])

  styled = synthesize.synthesize(folder, str(labels), str(tmp_path / 'st'),
                                 style=str(style), synth=synth)
  assert styled[0].error is None
  assert (tmp_path / 'st' / 'synthesized' / 'x.png').exists()


def test_errors_that_concern_every_file(model, inputs, tmp_path):
  folder, _ = model
  labels, _, _ = inputs
  synth = Synthesizer.load(folder)
  with pytest.raises(ValueError, match='needs a VAE model'):
    synthesize.synthesize(folder, str(labels), str(tmp_path / 'o'),
                          num_samples=2, synth=synth)
  with pytest.raises(synthesize.InputError, match='does not exist'):
    synthesize.synthesize(folder, str(tmp_path / 'none'), str(tmp_path / 'o'),
                          synth=synth)
  # An instance folder without a match fails that file only.
  inst = tmp_path / 'inst'
  inst.mkdir()
  Image.fromarray(np.zeros((40, 48), np.uint8)).save(inst / 'a.png')
  results = synthesize.synthesize(folder, str(labels / 'b.png'),
                                  str(tmp_path / 'o'), instances=str(inst),
                                  synth=synth)
  assert 'no instance map named b.png' in results[0].error
