"""Tests of scripts/benchmark.py (input mode on a tiny built data set)."""
import importlib.util
import io
import pathlib

import jax
import numpy as np
from PIL import Image
import pytest

import tensorflow as tf

from configs import default as default_config
from data_pipelines import records

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_benchmark():
  spec = importlib.util.spec_from_file_location(
      'spade_benchmark', REPO_ROOT / 'scripts' / 'benchmark.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def tiny_dataset(data_dir: pathlib.Path, n: int = 6) -> str:
  data_dir.mkdir()
  rng = np.random.default_rng(0)
  (path,) = records.shard_paths(str(data_dir), 'train', 1)
  with tf.io.TFRecordWriter(path) as w:
    for i in range(n):
      label = rng.integers(0, 8, (20, 20)).astype(np.uint8)
      image = rng.integers(0, 256, (20, 20, 3)).astype(np.uint8)
      w.write(records.encode_example(png(image), png(label), png(label),
                                     f'x{i}', 20, 20))
  records.DatasetInfo('custom', 8, False, True,
                      {'train': {'num_examples': n, 'num_shards': 1}}).save(
                          str(data_dir))
  return str(data_dir)


def test_input_mode_record(tmp_path):
  benchmark = load_benchmark()
  config = default_config.get_config()
  config.dataset = 'custom'
  config.data_dir = tiny_dataset(tmp_path / 'd')
  config.load_size = 18
  config.crop_size = 16
  config.batch_size = 2
  record = benchmark.run('input', config, str(tmp_path), steps=4, warmup=1)
  assert record['mode'] == 'input'
  assert record['backend'] == jax.default_backend()
  assert record['steps'] == 4
  assert (record['height'], record['width']) == (16, 16)
  assert record['images_per_s'] > 0
  assert record['ms_per_step_median'] > 0


def test_unknown_mode_is_an_error(tmp_path):
  benchmark = load_benchmark()
  with pytest.raises(ValueError, match='Unknown --mode'):
    benchmark.run('train', default_config.get_config(), str(tmp_path))
