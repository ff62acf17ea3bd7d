"""Tests of the data_pipelines.preview CLI and spade_jax.visualize."""
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from data_pipelines import build
from data_pipelines import preview
from data_pipelines import records
from spade_jax import input_pipeline
from spade_jax import layers
from spade_jax import visualize

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(name='coco_dir')
def fixture_coco_dir(coco_sample_dir, tmp_path):
  out = tmp_path / 'coco'
  build.build_dataset('coco_stuff', str(coco_sample_dir), str(out),
                      num_shards=2, num_workers=2)
  return out


def test_cli_writes_pngs_and_the_model_arrays(coco_dir, tmp_path):
  output = tmp_path / 'preview'
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run(
      [sys.executable, '-m', 'data_pipelines.preview',
       f'--data_dir={coco_dir}', '--dataset=coco_stuff', '--split=val',
       '--num=3', f'--output={output}', '--preprocess_mode=resize_and_crop',
       '--load_size=72', '--crop_size=64'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  arrays = np.load(output / 'examples.npz')
  assert arrays['image'].shape == (3, 64, 64, 3)
  assert arrays['image'].dtype == np.float32
  assert arrays['label'].shape == (3, 64, 64)
  assert arrays['label'].dtype == np.int32
  assert arrays['instance_edges'].shape == (3, 64, 64)
  assert arrays['instance_edges'].dtype == np.float32

  # The arrays are exactly what the evaluation pipeline gives the model.
  config = preview.config_for_dataset(
      str(coco_dir), preprocess_mode='resize_and_crop', load_size=72,
      crop_size=64)
  assert config.label_nc == 182 and config.contain_dontcare_label
  batches = list(input_pipeline.create_split(
      config, str(coco_dir), 'val', train=False, batch_size=1,
      process_index=0, process_count=1).take(3).as_numpy_iterator())
  names = [b['file_name'][0].decode() for b in batches]
  assert list(arrays['file_name']) == names
  for key in ('image', 'label', 'instance'):
    np.testing.assert_array_equal(
        arrays[key], np.concatenate([b[key] for b in batches]))
  np.testing.assert_array_equal(
      arrays['instance_edges'],
      layers.instance_edges(jnp.asarray(arrays['instance'])))

  colors = records.DatasetInfo.load(str(coco_dir)).colors
  for i, name in enumerate(names):
    stem = output / f'{i:03d}_{name}'
    np.testing.assert_array_equal(
        np.array(Image.open(f'{stem}_image.png')),
        visualize.image_to_uint8(arrays['image'][i]))
    np.testing.assert_array_equal(
        np.array(Image.open(f'{stem}_label.png')),
        visualize.colorize_labels(arrays['label'][i], colors))
    np.testing.assert_array_equal(
        np.array(Image.open(f'{stem}_edges.png')) > 0,
        arrays['instance_edges'][i] > 0)


def test_variable_sizes_are_stored_per_example(coco_dir, tmp_path):
  config = preview.config_for_dataset(str(coco_dir), 'coco_stuff',
                                      preprocess_mode='none')
  examples = preview.collect_examples(config, str(coco_dir), 'val', 2)
  assert examples[0]['image'].shape != examples[1]['image'].shape
  path = preview.write_examples(examples, str(tmp_path / 'out'))
  arrays = np.load(path)
  for i, ex in enumerate(examples):
    np.testing.assert_array_equal(arrays[f'label_{i}'], ex['label'])
    np.testing.assert_array_equal(arrays[f'image_{i}'], ex['image'])
  assert list(arrays['file_name']) == [e['file_name'] for e in examples]


def test_dataset_name_must_match(coco_dir):
  with pytest.raises(ValueError, match='holds coco_stuff'):
    preview.config_for_dataset(str(coco_dir), 'ade20k')


def test_colorize_labels_uses_given_colors_then_palette():
  label = np.array([[0, 1], [2, 3]])
  out = visualize.colorize_labels(label, [[1, 2, 3], [4, 5, 6]])
  assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
  np.testing.assert_array_equal(out[0], [[1, 2, 3], [4, 5, 6]])
  np.testing.assert_array_equal(out[1], visualize.default_palette()[[2, 3]])


def test_default_palette_colors_are_distinct():
  palette = visualize.default_palette(256)
  assert len({tuple(c) for c in palette}) == 256
  np.testing.assert_array_equal(palette[0], [0, 0, 0])


def test_image_and_edges_to_uint8():
  np.testing.assert_array_equal(
      visualize.image_to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])),
      [0, 128, 255, 255])
  np.testing.assert_array_equal(
      visualize.edges_to_uint8(np.array([0.0, 1.0])), [0, 255])
