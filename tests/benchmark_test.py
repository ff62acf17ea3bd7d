"""Tests of scripts/benchmark.py: every mode's JSON record, on tiny configs."""
import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

import tensorflow as tf

from configs import default as default_config
from data_pipelines import records
from data_pipelines import synthetic

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
  json.dumps(record)
  assert record['mode'] == 'input'
  assert record['backend'] == jax.default_backend()
  assert record['steps'] == 4
  assert (record['height'], record['width']) == (16, 16)
  assert record['images_per_s'] > 0
  assert record['ms_per_step_median'] > 0


def test_input_mode_reads_one_process_share(tmp_path):
  """bytes_read: a process of 4 reads its quarter of the split's bytes."""
  benchmark = load_benchmark()
  config = default_config.get_config()
  config.dataset = 'synthetic'
  config.data_dir = str(tmp_path / 'synthetic')
  synthetic.build_synthetic(config.data_dir, 64, 0, 32, num_shards=8)
  config.load_size = config.crop_size = 32
  config.batch_size = 4
  config.shuffle_buffer_size = 8
  whole = benchmark.run('input', config, str(tmp_path), one_epoch=True,
                        process_count=1)
  part = benchmark.run('input', config, str(tmp_path), one_epoch=True,
                       process_count=4, process_index=2)
  assert whole['epoch_batches'] == 16 and part['epoch_batches'] == 16
  assert whole['bytes_read'] >= 0.9 * whole['split_bytes']
  assert part['bytes_read'] <= 0.25 * whole['split_bytes'] + (
      part['shard_bytes_max'])
  assert part['bytes_read'] <= 0.26 * whole['bytes_read']
  # Resuming in the last shard (of 2; a window is a whole shard) reads that
  # shard: the 24 records left in its window after the first batch keep the
  # pipeline's read-ahead inside it.
  config.data_dir = str(tmp_path / 'two_shards')
  config.shuffle_buffer_size = 64
  synthetic.build_synthetic(config.data_dir, 64, 0, 32, num_shards=2)
  resumed = benchmark.run('input', config, str(tmp_path), steps=1, warmup=0,
                          process_count=1, start_step=9)
  assert resumed['bytes_read_first_batch'] <= 1.5 * resumed['shard_bytes_max']
  assert resumed['bytes_read_first_batch'] >= resumed['shard_bytes_max']


def test_unknown_mode_is_an_error(tmp_path):
  benchmark = load_benchmark()
  with pytest.raises(ValueError, match='Unknown --mode'):
    benchmark.run('fit', default_config.get_config(), str(tmp_path))


def tiny_model_config(**overrides):
  """crop 32, ngf 8, batch 2 and the smallest networks, for fast compiles.

  The pix2pixHD generator with one block compiles and initialises in seconds
  where even a tiny SPADE generator takes half a minute on 2 cores; the
  records do not depend on which generator runs (fast_paths_test covers the
  SPADE generator).
  """
  config = default_config.get_config()
  config.update(crop_size=32, ngf=8, ndf=8, batch_size=2, num_D=1,
                n_layers_D=1, label_nc=5, contain_dontcare_label=True,
                netG='pix2pixhd', norm_G='instance', resnet_n_blocks=1,
                resnet_n_downsample=1)
  config.update(overrides)
  return config


# Fields every train / generate record has (the list and more).
COMPUTE_FIELDS = ('mode', 'ms_per_step_median', 'ms_per_step_min',
                  'ms_per_step_max', 'images_per_s', 'compile_s',
                  'peak_memory_bytes', 'flops_per_step',
                  'achieved_flops_per_s', 'backend', 'device_kind', 'steps',
                  'cpu_model', 'cpu_simd')


def check_compute_record(record, mode):
  json.dumps(record)  # JSON-able.
  missing = [k for k in COMPUTE_FIELDS if k not in record]
  assert not missing, missing
  assert record['mode'] == mode
  assert record['backend'] == jax.default_backend()
  assert record['steps'] == 2 and record['images_per_step'] == 2
  for key in ('ms_per_step_median', 'images_per_s', 'compile_s',
              'peak_memory_bytes', 'flops_per_step', 'achieved_flops_per_s'):
    assert record[key] > 0, key
  assert (record['ms_per_step_min'] <= record['ms_per_step_median'] <=
          record['ms_per_step_max'])
  assert record['crop_size'] == 32 and record['ngf'] == 8
  assert record['batch_size'] == 2
  assert record['images_per_s_per_device'] == pytest.approx(
      record['images_per_s'] / record['device_count'])


def test_vgg_loss_needs_weights_or_the_timing_flag(tmp_path):
  benchmark = load_benchmark()
  config = tiny_model_config(lambda_vgg=10.0)
  with pytest.raises(ValueError, match='vgg_weights'):
    benchmark.run('train', config, str(tmp_path), steps=2, warmup=0)
  options = benchmark.Options(str(tmp_path), random_vgg_for_timing=True)
  benchmark.validate(config, options)  # Accepted with the flag.
  assert not config.vgg_weights  # The caller's config is left alone.


def test_train_mode_record(tmp_path):
  benchmark = load_benchmark()
  record = benchmark.run('train', tiny_model_config(), str(tmp_path),
                         steps=2, warmup=1)
  check_compute_record(record, 'train')
  assert not record['random_vgg_for_timing']


def test_train_mode_saving_every_k_steps(tmp_path):
  benchmark = load_benchmark()
  with pytest.raises(ValueError, match='save_every=1'):
    benchmark.run_saving(tiny_model_config(), str(tmp_path), 1, steps=4)
  record = benchmark.run_saving(tiny_model_config(), str(tmp_path), 2,
                                steps=4, warmup=1)
  assert record['mode'] == 'train' and record['save_every'] == 2
  assert record['save_steps'] == 2 and record['steps'] == 2  # Normal steps.
  assert 0 < record['ms_save_call_median'] <= record[
      'ms_per_save_step_max']
  assert record['save_step_ratio'] == pytest.approx(
      record['ms_per_save_step_median'] / record['ms_per_step_median'])
  assert record['checkpoint_bytes'] > 0 and record['ms_final_wait'] >= 0
  assert record['ms_per_step_after_save_median'] > 0  # Step 3.
  json.dumps(record)
  table = benchmark.format_table(record)
  assert 'save step median (every 2)' in table
  assert 'save step / step' in table


def test_generate_mode_record(tmp_path):
  benchmark = load_benchmark()
  record = benchmark.run('generate', tiny_model_config(), str(tmp_path),
                         steps=2, warmup=1)
  check_compute_record(record, 'generate')
  # Inference does far less work than a training step would.
  assert record['flops_per_step'] < 1e10


def test_num_devices_picks_the_devices_timed(tmp_path):
  """The CLI, 2 visible CPU devices, --config.num_devices=1: a 1-device run."""
  out = tmp_path / 'runs.jsonl'
  overrides = {k: v for k, v in tiny_model_config().items()
               if v != default_config.get_config()[k]}
  cmd = [sys.executable, str(REPO_ROOT / 'scripts' / 'benchmark.py'),
         '--mode=generate', '--steps=1', '--warmup=0', f'--json={out}',
         '--config.num_devices=1',
         f'--workdir={tmp_path}'] + [f'--config.{k}={v}'
                                     for k, v in overrides.items()]
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'images/s' in proc.stdout  # The table.
  (record,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert record['device_count'] == 1 and record['num_devices'] == 1
  assert record['devices_visible'] == 2
  assert record['images_per_s_per_device'] == record['images_per_s']
  assert record['mode'] == 'generate' and record['ngf'] == 8


def test_table_shows_the_headline_numbers():
  benchmark = load_benchmark()
  record = {'mode': 'train', 'backend': 'cpu', 'device_kind': 'cpu',
            'images_per_step': 2, 'ms_per_step_median': 12.5,
            'ms_per_step_min': 12.0, 'ms_per_step_max': 13.0,
            'images_per_s': 160.0, 'compile_s': 3.0, 'flops_per_step': 2e9,
            'achieved_flops_per_s': 1.6e11, 'peak_memory_bytes': 2**30,
            'peak_memory_source': 'process peak RSS'}
  table = benchmark.format_table(record)
  for text in ('ms/step median', '12.5', 'images/s', '160', '1024'):
    assert text in table


def test_variants_alternate_in_one_process(tmp_path):
  benchmark = load_benchmark()
  records = benchmark.run_variants('generate', tiny_model_config(),
                                   str(tmp_path), ['sparse', 'dense'],
                                   steps=2, warmup=0)
  assert [r['variant'] for r in records] == ['sparse', 'dense']
  assert [r['spade_sparse'] for r in records] == [True, False]
  for record in records:
    check_compute_record(record, 'generate')
    assert 'variant' in benchmark.format_table(record)
  with pytest.raises(ValueError, match='Unknown variant'):
    benchmark.run_variants('generate', tiny_model_config(), str(tmp_path),
                           ['sparse', 'fast'], steps=1, warmup=0)
  config = tiny_model_config()
  for name in ('float32', 'bfloat16'):
    variant = benchmark.variant_config(config, name)
    assert variant.compute_dtype == name
  assert config.compute_dtype == 'float32'  # The base config is untouched.
  with pytest.raises(ValueError, match='--variants needs --mode'):
    benchmark.run_variants('input', tiny_model_config(), str(tmp_path),
                           ['dense'], steps=1, warmup=0)


def test_label_statistics_of_a_known_map():
  """One class, no edges: only the 2-pixel border is not uniform."""
  benchmark = load_benchmark()
  config = tiny_model_config(netG='spade', norm_G='spectralspadebatch3x3')
  batch = {'label': np.zeros((2, 32, 32), np.int32),
           'instance': np.zeros((2, 32, 32), np.int32)}
  stats = benchmark.label_statistics(config, batch)
  assert stats['labels'].startswith('random')
  pixels = stats['boundary_pixel_fraction']
  assert list(pixels) == ['32x32', '16x16', '8x8']
  assert pixels['32x32'] == pytest.approx(1 - 28**2 / 32**2)
  assert pixels['16x16'] == pytest.approx(1 - 12**2 / 16**2)
  tiles = stats['boundary_tile_fraction_8x8']
  assert tiles['32x32'] == pytest.approx(12 / 16)  # The 4 inner tiles are
  assert tiles['8x8'] == 1.0  # uniform; at 8x8 the one tile is not.
  # One pixel of another instance: it and its 4 neighbours are edges, whose
  # 5x5 neighbourhoods cover 7x5 + 2x5 pixels.
  batch['instance'][:, 16, 16] = 1
  assert benchmark.label_statistics(config, batch)[
      'boundary_pixel_fraction']['32x32'] == pytest.approx(
          1 - (28**2 - 45) / 32**2)


def test_generate_on_a_data_set_reports_its_labels(tmp_path):
  benchmark = load_benchmark()
  config = tiny_model_config(dataset='custom', load_size=36, label_nc=8,
                             contain_dontcare_label=False)
  config.data_dir = tiny_dataset(tmp_path / 'd')
  record = benchmark.run('generate', config, str(tmp_path), steps=1,
                         warmup=0)
  assert record['labels'] == 'data set ' + config.data_dir
  # Random 8-class pixels: every pixel is on a boundary.
  assert record['boundary_pixel_fraction'] == {'32x32': 1.0}
