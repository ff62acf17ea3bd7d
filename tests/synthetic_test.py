"""Tests of the embedded synthetic landscape data set."""
import io
import pathlib
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from data_pipelines import build
from data_pipelines import records
from data_pipelines import scenes
from data_pipelines import synthetic

SIZE = 48


def _scenes(n, size=SIZE, seed=0):
  return [scenes.generate_scene(scenes.scene_rng(seed, 'train', i),
                                   size) for i in range(n)]


def _shard_bytes(data_dir: pathlib.Path):
  return {p.name: p.read_bytes() for p in sorted(data_dir.glob('*.tfrecord*'))}


def test_class_names_and_colors():
  info = scenes.dataset_info()
  assert info.class_names == ['sky', 'cloud', 'mountain', 'water', 'grass',
                              'sand', 'tree', 'rock']
  assert (info.label_nc, info.contain_dontcare_label, info.has_instance) == (
      8, False, True)
  assert len(info.colors) == 8 and len({tuple(c) for c in info.colors}) == 8


def test_scene_is_deterministic_per_seed():
  a = scenes.generate_scene(scenes.scene_rng(3, 'train', 5), SIZE)
  b = scenes.generate_scene(scenes.scene_rng(3, 'train', 5), SIZE)
  c = scenes.generate_scene(scenes.scene_rng(4, 'train', 5), SIZE)
  d = scenes.generate_scene(scenes.scene_rng(3, 'val', 5), SIZE)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
  assert synthetic.scene_record(3, 'train', 5, SIZE) == \
      synthetic.scene_record(3, 'train', 5, SIZE)


def test_scene_shapes_classes_and_instances():
  drawn = _scenes(40)
  seen = set()
  for image, label, inst in drawn:
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert label.shape == inst.shape == (SIZE, SIZE)
    assert label.max() < scenes.LABEL_NC
    seen |= set(np.unique(label).tolist())
    # Every instance id covers one class; stuff keeps its class id, objects
    # (cloud, mountain, tree, rock) get their own ids from 8 up.
    for iid in np.unique(inst):
      classes = np.unique(label[inst == iid])
      assert len(classes) == 1, (iid, classes)
      if iid < 8:
        assert classes[0] == iid and iid in (scenes.SKY, scenes.WATER,
                                             scenes.GRASS, scenes.SAND)
      else:
        assert classes[0] in (scenes.CLOUD, scenes.MOUNTAIN,
                              scenes.TREE, scenes.ROCK)
  assert seen == set(range(8))
  # Several trees in one scene are separate instances.
  assert any(len(np.unique(inst[label == scenes.TREE])) > 1
             for _, label, inst in drawn)


def test_image_colours_follow_the_label():
  """A nearest-class-mean colour classifier recovers most labels."""
  drawn = _scenes(40)
  pixels = np.concatenate([s[0].reshape(-1, 3) for s in drawn]) / 255.0
  labels = np.concatenate([s[1].ravel() for s in drawn])
  means = np.stack([pixels[labels == k].mean(0) for k in range(8)])
  r, g, b = means.T
  assert b[scenes.SKY] > r[scenes.SKY] + 0.2
  assert means[scenes.CLOUD].min() > 0.75
  assert g[scenes.GRASS] > r[scenes.GRASS] + 0.1
  assert g[scenes.GRASS] > b[scenes.GRASS] + 0.1
  assert r[scenes.SAND] > b[scenes.SAND] + 0.15
  assert means[scenes.TREE].sum() < means[scenes.GRASS].sum() - 0.3
  assert np.ptp(means[scenes.ROCK]) < 0.05  # Grey.
  dist = ((pixels[:, None, :] - means[None]) ** 2).sum(-1)
  correct = dist.argmin(1) == labels
  assert correct.mean() > 0.85, correct.mean()
  per_class = [correct[labels == k].mean() for k in range(8)]
  assert min(per_class) > 0.4 and np.mean(per_class) > 0.75, per_class
  # Textured, not flat: grass and water vary within a scene.
  image, label, _ = drawn[0]
  assert image[label == scenes.GRASS].std(0).mean() > 3


def test_generation_is_fast():
  scenes.generate_scene(scenes.scene_rng(0, 'train', 0), 96)
  start = time.perf_counter()
  for i in range(20):
    synthetic.scene_record(0, 'train', i, 96)
  per_scene = (time.perf_counter() - start) / 20
  assert per_scene < 0.05, per_scene


def test_ensure_synthetic_builds_and_is_idempotent(tmp_path):
  out = tmp_path / 'syn'
  info = synthetic.ensure_synthetic(str(out), 7, 3, 32, seed=1)
  assert info.splits == {'train': {'num_examples': 7, 'num_shards': 1},
                         'val': {'num_examples': 3, 'num_shards': 1}}
  assert info.class_names[3] == 'water'
  first = _shard_bytes(out)
  mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  again = synthetic.ensure_synthetic(str(out), 7, 3, 32, seed=1)
  assert again == info
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
  # The stored scene is exactly the generated one.
  paths = records.shard_paths(str(out), 'val', 1)
  serialized = next(iter(tf.data.TFRecordDataset(paths)))
  ex = {k: v.numpy() for k, v in records.parse_example(serialized).items()}
  image, label, inst = scenes.generate_scene(
      scenes.scene_rng(1, 'val', 0), 32)
  assert ex['file_name'] == b'val_000000'
  for key, want in (('image', image), ('label', label), ('instance', inst)):
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(ex[key]))), want)
  # Same parameters elsewhere: identical bytes.
  synthetic.ensure_synthetic(str(tmp_path / 'other'), 7, 3, 32, seed=1)
  assert _shard_bytes(tmp_path / 'other') == first


def test_ensure_synthetic_rebuilds_on_other_parameters(tmp_path):
  out = tmp_path / 'syn'
  synthetic.ensure_synthetic(str(out), 4, 2, 32, seed=0)
  before = _shard_bytes(out)
  info = synthetic.ensure_synthetic(str(out), 5, 2, 32, seed=0)
  assert info.splits['train']['num_examples'] == 5
  assert _shard_bytes(out) != before
  info = synthetic.ensure_synthetic(str(out), 5, 0, 24, seed=0)
  assert list(info.splits) == ['train']
  assert not list(out.glob('val.tfrecord*'))  # Stale split removed.
  params = (out / synthetic.PARAMS_FILE).read_text()
  assert '"size": 24' in params


def test_ensure_synthetic_recovers_from_an_interrupted_build(tmp_path):
  out = tmp_path / 'syn'
  synthetic.ensure_synthetic(str(out), 4, 2, 32)
  good = _shard_bytes(out)
  # A crash mid-build leaves a hidden temp folder and no info file.
  (out / records.INFO_FILE).unlink()
  (out / '.build-deadbeef').mkdir()
  (out / 'train.tfrecord-00000-of-00001').write_bytes(b'half')
  info = synthetic.ensure_synthetic(str(out), 4, 2, 32)
  assert info.splits['train']['num_examples'] == 4
  assert _shard_bytes(out) == good
  # A missing shard is noticed too.
  (out / 'val.tfrecord-00000-of-00001').unlink()
  synthetic.ensure_synthetic(str(out), 4, 2, 32)
  assert _shard_bytes(out) == good


def test_ensure_synthetic_refuses_to_replace_another_dataset(tmp_path):
  out = tmp_path / 'data'
  out.mkdir()
  records.DatasetInfo('facades', 13, False, False,
                      {'train': {'num_examples': 1, 'num_shards': 1}}).save(
                          str(out))
  with pytest.raises(ValueError, match='facades'):
    synthetic.ensure_synthetic(str(out), 4, 2, 32)


def test_build_dataset_synthetic_entry_point(tmp_path):
  summary = build.build_dataset(
      'synthetic', None, str(tmp_path / 'syn'), synthetic_num_train=6,
      synthetic_num_val=2, synthetic_size=24, examples_per_shard=4)
  assert {s: (m['examples'], m['shards']) for s, m in summary.items()} == {
      'train': (6, 2), 'val': (2, 1)}
  info = records.DatasetInfo.load(str(tmp_path / 'syn'))
  assert info.dataset == 'synthetic' and info.has_instance


def test_bad_synthetic_parameters(tmp_path):
  with pytest.raises(ValueError, match='size'):
    synthetic.build_synthetic(str(tmp_path), 2, 1, 8)
  with pytest.raises(ValueError, match='counts'):
    synthetic.build_synthetic(str(tmp_path), 0, 0, 32)
