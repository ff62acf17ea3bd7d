"""Tests of the embedded synthetic landscape data set."""
import io
import pathlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import build
from data_pipelines import records
from data_pipelines import scenes
from data_pipelines import synthetic
from data_pipelines import tfds_builders

SIZE = 48


def _scenes(n, size=SIZE, seed=0):
  return [scenes.generate_scene(scenes.scene_rng(seed, 'train', i),
                                   size) for i in range(n)]


def _shard_bytes(folder):
  return {p.name: p.read_bytes()
          for p in sorted(pathlib.Path(folder).glob('*.tfrecord*'))}


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
  assert tfds_builders.scene_fields(3, 'train', 5, SIZE) == \
      tfds_builders.scene_fields(3, 'train', 5, SIZE)


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


def test_ensure_synthetic_builds_and_is_idempotent(tmp_path):
  out = tmp_path / 'syn'
  info = synthetic.ensure_synthetic(str(out), 7, 3, 32, seed=1)
  assert info.splits == {'train': {'num_examples': 7, 'num_shards': 1},
                         'val': {'num_examples': 3, 'num_shards': 1}}
  assert info.class_names[3] == 'water'
  # A tfds build: DATA/spade_synthetic/CONFIG/VERSION.
  folder = pathlib.Path(info.folder)
  assert folder.relative_to(out).parts == ('spade_synthetic',
                                           '7x3_32px_seed1', '1.0.0')
  first = _shard_bytes(folder)
  mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
  again = synthetic.ensure_synthetic(str(out), 7, 3, 32, seed=1)
  assert again == info
  assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
  # The stored scene is exactly the generated one.
  serialized = next(iter(tf.data.TFRecordDataset(info.shard_files('val'))))
  ex = {k: v.numpy() for k, v in records.parse_example(serialized).items()}
  name = ex['file_name'].decode()
  index = int(name.split('_')[1])
  image, label, inst = scenes.generate_scene(
      scenes.scene_rng(1, 'val', index), 32)
  assert name.startswith('val_')
  for key, want in (('image', image), ('label', label), ('instance', inst)):
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(ex[key]))), want)
  # Same parameters elsewhere: identical bytes.
  other = synthetic.ensure_synthetic(str(tmp_path / 'other'), 7, 3, 32,
                                     seed=1)
  assert _shard_bytes(other.folder) == first


def test_the_build_loads_with_tfds(tmp_path):
  info = synthetic.ensure_synthetic(str(tmp_path), 6, 2, 32, seed=0)
  builder = tfds.builder_from_directory(info.folder)
  ex = next(iter(builder.as_dataset(split='train')))
  assert ex['image'].shape == (32, 32, 3) and ex['image'].dtype == tf.uint8
  assert ex['label'].shape == (32, 32, 1) and ex['instance'].dtype == tf.uint16
  index = int(ex['file_name'].numpy().decode().split('_')[1])
  _, label, inst = scenes.generate_scene(scenes.scene_rng(0, 'train', index),
                                         32)
  np.testing.assert_array_equal(ex['label'].numpy()[..., 0], label)
  np.testing.assert_array_equal(ex['instance'].numpy()[..., 0], inst)
  assert builder.info.metadata['spade']['class_names'][0] == 'sky'


def test_other_parameters_are_another_build(tmp_path):
  first = synthetic.ensure_synthetic(str(tmp_path), 4, 2, 32, seed=0)
  before = _shard_bytes(first.folder)
  second = synthetic.ensure_synthetic(str(tmp_path), 5, 0, 24, seed=0)
  assert second.splits == {'train': {'num_examples': 5, 'num_shards': 1}}
  assert second.folder != first.folder
  assert _shard_bytes(first.folder) == before  # Kept.


def test_an_interrupted_build_is_redone(tmp_path):
  info = synthetic.ensure_synthetic(str(tmp_path), 4, 2, 32)
  good = _shard_bytes(info.folder)
  folder = pathlib.Path(info.folder)
  # A crash mid-build leaves tfds' incomplete folder and no final one.
  folder.rename(folder.parent / 'incomplete.deadbeef_1.0.0')
  again = synthetic.ensure_synthetic(str(tmp_path), 4, 2, 32)
  assert again.folder == info.folder
  assert _shard_bytes(again.folder) == good


def test_build_dataset_synthetic_entry_point(tmp_path):
  summary = build.build_dataset(
      'synthetic', None, str(tmp_path / 'syn'), synthetic_num_train=6,
      synthetic_num_val=2, synthetic_size=24, num_shards=2)
  assert {s: (m['examples'], m['shards']) for s, m in summary.items()} == {
      'train': (6, 2), 'val': (2, 2)}
  info = records.DatasetInfo.load(str(tmp_path / 'syn'))
  assert info.dataset == 'synthetic' and info.has_instance


def test_bad_synthetic_parameters(tmp_path):
  with pytest.raises(ValueError, match='size'):
    synthetic.build_synthetic(str(tmp_path), 2, 1, 8)
  with pytest.raises(ValueError, match='counts'):
    synthetic.build_synthetic(str(tmp_path), 0, 0, 32)
