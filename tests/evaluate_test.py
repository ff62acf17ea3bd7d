"""--mode eval: FID of a checkpoint on the synthetic val split, TensorBoard."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import torch

from export_test import make_workdir
from export_test import tiny_config
from spade_jax import evaluate
from spade_jax import export
from spade_jax import fid
from spade_jax import inception
from spade_jax import input_pipeline
from spade_jax import run_config
from spade_jax import segmentation_metrics
from spade_jax import segmenters
from spade_jax import train
from spade_jax import train_state
from spade_jax import visualize
import segmenter_torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_random_inception(path, seed=0):
  """Random weights in the published file's key format, saved with torch."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in inception.expected_torch_shapes().items():
    if key.endswith('conv.weight'):
      fan_in = int(np.prod(shape[1:]))
      value = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
    elif key.endswith('running_var'):
      value = rng.uniform(0.5, 1.5, shape)
    elif key.endswith('bn.weight'):
      value = rng.uniform(0.8, 1.2, shape)
    else:
      value = rng.normal(0, 0.1, shape)
    state[key] = torch.from_numpy(value.astype(np.float32))
  state['fc.weight'] = torch.zeros(1008, 2048)
  state['fc.bias'] = torch.zeros(1008)
  torch.save(state, path)
  return str(path)


def eval_config(**overrides):
  config = tiny_config(dataset='synthetic', synthetic_num_train=4,
                       synthetic_num_val=6, synthetic_size=40, batch_size=4,
                       fid_num_images=3, **overrides)
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('eval')
  weights = write_random_inception(root / inception.WEIGHTS_FILE_NAME)
  config = eval_config(inception_weights=weights)
  workdir = str(root / 'run')
  state = make_workdir(workdir, config)
  return config, workdir, state


def read_scalars(workdir, tag):
  out = []
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          out.append((event.step, float(tf.make_ndarray(value.tensor))))
  return out


def test_fid_written_printed_and_right(run, capsys):
  config, workdir, state = run
  score = evaluate.evaluate(config, workdir)['fid']
  printed = capsys.readouterr().out
  assert f'FID {score:.4f}' in printed
  assert '3 generated vs 3 real images' in printed and 'step 3' in printed
  assert np.isfinite(score) and score > 0
  assert read_scalars(workdir, 'eval/fid') == [(3, pytest.approx(score))]

  # The same number from the training-side generator (EMA weights) and the
  # first 3 real images, computed independently.
  data_dir = run_config.resolve_data_dir(config, workdir)
  batches = list(input_pipeline.numpy_batches(input_pipeline.create_split(
      config, data_dir, 'val', train=False, process_index=0,
      process_count=1)))
  label, real, instance = (batches[0][k][:3]
                           for k in ('label', 'image', 'instance'))
  generate = train.make_generate_fn(config)
  g_vars = train_state.generator_variables(state, use_ema=True)
  fake = np.asarray(generate(g_vars, label, instance))
  extractor = fid.FeatureExtractor(inception.load_inception_params(
      config.inception_weights), batch_size=4)
  want = fid.fid_from_features(
      extractor(visualize.image_to_uint8(real)),
      extractor(visualize.image_to_uint8(fake)))
  assert score == pytest.approx(want, rel=1e-5)


def test_without_weights_a_clear_error(run, tmp_path):
  config, workdir, _ = run
  no_weights = eval_config(inception_weights='')
  with pytest.raises(FileNotFoundError,
                     match=inception.WEIGHTS_FILE_NAME):
    evaluate.evaluate(no_weights, workdir)
  # Through the entry point: a one-line error, non-zero exit.
  proc = subprocess.run(
      [sys.executable, '-m', 'spade_jax.main', '--config',
       os.path.join(REPO, 'configs', 'default.py'), '--workdir', workdir,
       '--mode', 'eval', '--config.inception_weights',
       str(tmp_path / 'missing.pth')],
      capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode != 0
  assert 'ERROR: Inception weights file not found' in proc.stderr
  assert inception.WEIGHTS_URL in proc.stderr


def test_other_architecture_refused(run):
  config, workdir, _ = run
  other = eval_config(inception_weights=config.inception_weights, ngf=16)
  with pytest.raises(ValueError, match='ngf=8 there vs 16 here'):
    evaluate.evaluate(other, workdir)


def test_segmentation_scores_written_and_printed(run, tmp_path, monkeypatch,
                                                capsys):
  """--mode eval with a segmenter: FID, mIoU, accuracy printed and written.

  The synthetic set has no segmenter of its own; here it is scored with
  DRN-D-105 (its ids read as Cityscapes label ids), which exercises the
  same path as coco_stuff / ade20k / cityscapes. The model evaluated is a
  model folder (as `spade_jax.convert` makes of a reference checkpoint).
  """
  config, workdir, _ = run
  inception = config.inception_weights
  model_dir = str(tmp_path / 'model')
  export.export(workdir, model_dir, with_jax_export=False)
  drn_weights = segmenter_torch.write_random_drn(tmp_path / 'drn.pth')
  with pytest.raises(ValueError, match='no segmenter'):
    evaluate.evaluate(eval_config(inception_weights=inception,
                                  segmenter_weights=drn_weights), workdir)
  monkeypatch.setitem(segmenters.DATASET_SEGMENTER, 'synthetic',
                      'drn105_cityscapes')
  seg_config = eval_config(inception_weights=inception,
                           segmenter_weights=drn_weights,
                           segmenter_single_scale=True,
                           data_dir=run_config.resolve_data_dir(config, workdir))
  added = []
  real_add = segmentation_metrics.ConfusionMatrix.add

  def spy(self, label, pred):
    added.append((np.asarray(label), np.asarray(pred)))
    real_add(self, label, pred)
  monkeypatch.setattr(segmentation_metrics.ConfusionMatrix, 'add', spy)
  results = evaluate.evaluate(seg_config, model_dir)
  printed = capsys.readouterr().out
  assert f'model folder {model_dir}' in printed
  # The fid_num_images generated images, against their own label maps
  # (spade ids as Cityscapes label ids -> train ids, others don't-care).
  labels = np.concatenate([a[0] for a in added])
  preds = np.concatenate([a[1] for a in added])
  batch = next(input_pipeline.numpy_batches(input_pipeline.create_split(
      config, run_config.resolve_data_dir(config, workdir), 'val', train=False,
      process_index=0, process_count=1)))
  np.testing.assert_array_equal(labels, segmenters.labels_from_spade(
      'drn105_cityscapes', batch['label'][:3]))
  assert preds.shape == (3, 32, 32)
  want = segmentation_metrics.scores(segmentation_metrics.confusion_matrix(
      labels, preds, 19))
  assert results['miou'] == pytest.approx(want['miou'])
  assert set(results) == {'fid', 'miou', 'accuracy'}
  assert f'mIoU {100 * results["miou"]:.2f}' in printed
  assert f'accuracy {100 * results["accuracy"]:.2f}' in printed
  for key in ('fid', 'miou', 'accuracy'):
    assert read_scalars(model_dir, f'eval/{key}') == [
        (0, pytest.approx(results[key]))]


def test_missing_segmenter_weights_name_the_file(run, tmp_path):
  config, workdir, _ = run
  config = eval_config(inception_weights=config.inception_weights,
                       segmenter_weights=str(tmp_path / 'missing.pth'))
  config.dataset = 'coco_stuff'
  with pytest.raises(FileNotFoundError, match=segmenters.DEEPLAB_FILE):
    evaluate.evaluate(config, workdir)
