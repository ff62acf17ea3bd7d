"""Tests of spade_jax.input_pipeline (reading built TFRecords)."""
import io
import logging
import pathlib
from typing import Dict, List, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import default as default_config
from data_pipelines import build
from data_pipelines import records
from spade_jax import input_pipeline
from spade_jax import label_maps
from spade_jax import layers

PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                    [255, 255, 0], [255, 0, 255], [0, 255, 255],
                    [255, 255, 255]], np.uint8)


# ---------------------------------------------------------------------------
# Helpers.


def png_bytes(array: np.ndarray) -> bytes:
  """PNG of a uint8 (gray or RGB) or uint16 (16-bit gray) array."""
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def make_example(name: str, label: np.ndarray,
                 instance: Optional[np.ndarray] = None,
                 image: Optional[np.ndarray] = None) -> Dict[str, object]:
  """An example whose image colour encodes its label (unless given)."""
  if image is None:
    image = PALETTE[label % len(PALETTE)]
  return {'name': name, 'image': image, 'label': label, 'instance': instance}


def write_split(data_dir: pathlib.Path, split: str,
                examples: Sequence[Dict[str, object]],
                num_shards: int = 2) -> Dict[str, int]:
  """Writes examples round-robin over shards; returns the split entry."""
  writers = [tf.io.TFRecordWriter(p) for p in
             records.shard_paths(str(data_dir), split, num_shards)]
  for i, ex in enumerate(examples):
    image = ex['image']
    image_bytes = image if isinstance(image, bytes) else png_bytes(image)
    label = ex['label']
    label_bytes = label if isinstance(label, bytes) else png_bytes(label)
    inst = ex['instance']
    inst_bytes = (inst if isinstance(inst, bytes) or inst is None
                  else png_bytes(inst))
    writers[i % num_shards].write(records.encode_example(
        image_bytes, label_bytes, inst_bytes or b'', ex['name'],
        ex.get('height', 0), ex.get('width', 0)))
  for w in writers:
    w.close()
  return {'num_examples': len(examples), 'num_shards': num_shards}


def write_dataset(data_dir: pathlib.Path,
                  splits: Dict[str, Sequence[Dict[str, object]]],
                  dataset: str = 'custom', label_nc: int = 8,
                  contain_dontcare_label: bool = False,
                  has_instance: bool = True,
                  num_shards: int = 2) -> pathlib.Path:
  data_dir.mkdir(parents=True, exist_ok=True)
  entries = {s: write_split(data_dir, s, ex, num_shards)
             for s, ex in splits.items()}
  records.DatasetInfo(dataset, label_nc, contain_dontcare_label, has_instance,
                      entries).save(str(data_dir))
  return data_dir


def random_blocks(rng: np.random.Generator, shape, block: int,
                  high: int) -> np.ndarray:
  """A map of random ids constant over block x block squares."""
  small = rng.integers(0, high, (-(-shape[0] // block), -(-shape[1] // block)))
  return np.kron(small, np.ones((block, block), np.int64))[
      :shape[0], :shape[1]]


def blocky_examples(n: int, shape=(24, 32), seed: int = 0,
                    prefix: str = 'ex') -> List[Dict[str, object]]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    label = random_blocks(rng, shape, 4, 8).astype(np.uint8)
    instance = random_blocks(rng, shape, 6, 5).astype(np.uint8)
    out.append(make_example(f'{prefix}{i:03d}', label, instance))
  return out


def config_for(**kw):
  config = default_config.get_config()
  config.dataset = 'custom'
  config.label_nc = 8
  config.contain_dontcare_label = False
  config.no_instance = False
  config.batch_size = 4
  config.load_size = 24
  config.crop_size = 16
  config.shuffle_buffer_size = 16
  for k, v in kw.items():
    config[k] = v
  return config


def take(ds: tf.data.Dataset, n: Optional[int] = None) -> List[dict]:
  if n is not None:
    ds = ds.take(n)
  return list(ds.as_numpy_iterator())


def numpy_edges(inst: np.ndarray) -> np.ndarray:
  """The reference 4-neighbour edge rule."""
  edge = np.zeros(inst.shape, bool)
  dx = inst[:, 1:] != inst[:, :-1]
  dy = inst[1:, :] != inst[:-1, :]
  edge[:, 1:] |= dx
  edge[:, :-1] |= dx
  edge[1:, :] |= dy
  edge[:-1, :] |= dy
  return edge.astype(np.float32)


def device_edges(batch) -> np.ndarray:
  """The edges the generator computes from a batch's instance ids."""
  return np.asarray(layers.instance_edges(jnp.asarray(batch['instance'])))


def to_uint8(image: np.ndarray) -> np.ndarray:
  return np.round((image + 1.0) * 127.5).astype(np.uint8)


def build_coco(src: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  """Builds the COCO-Stuff sample with the real builder."""
  build.build_dataset('coco_stuff', str(src), str(out), num_shards=3,
                      num_workers=2)
  return out


@pytest.fixture(name='blocky_dir')
def fixture_blocky_dir(tmp_path):
  return write_dataset(tmp_path / 'blocky', {
      'train': blocky_examples(10, seed=1, prefix='tr'),
      'val': blocky_examples(5, seed=2, prefix='va')}, num_shards=3)


# ---------------------------------------------------------------------------
# Real data, exact values.


def test_coco_sample_none_mode_is_pixel_exact(coco_sample_dir, tmp_path):
  data_dir = build_coco(coco_sample_dir, tmp_path / 'coco')
  config = config_for(label_nc=182, contain_dontcare_label=True,
                      dataset='coco_stuff', preprocess_mode='none',
                      batch_size=1)
  batches = take(input_pipeline.create_split(
      config, str(data_dir), 'val', train=False, process_index=0,
      process_count=1))
  assert len(batches) == 8
  for batch in batches:
    name = batch['file_name'][0].decode()
    label_png = np.array(Image.open(coco_sample_dir / 'val_label' /
                                    f'{name}.png')).astype(np.int32)
    inst_png = np.array(Image.open(coco_sample_dir / 'val_inst' /
                                   f'{name}.png')).astype(np.int32)
    rgb = np.array(Image.open(coco_sample_dir / 'val_img' /
                              f'{name}.jpg').convert('RGB'))
    expected_label = np.where(label_png == 255, 182, label_png)
    np.testing.assert_array_equal(batch['label'][0], expected_label)
    np.testing.assert_array_equal(batch['instance'][0], inst_png)
    np.testing.assert_array_equal(device_edges(batch)[0],
                                  numpy_edges(inst_png))
    expected_image = (rgb.astype(np.float32) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(batch['image'][0], expected_image, atol=1e-6)
    assert batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    assert batch['instance'].dtype == np.int32
  # Don't-care pixels exist in the sample and were mapped.
  assert any((b['label'] == 182).any() for b in batches)


def test_coco_sample_resize_matches_pil(coco_sample_dir, tmp_path):
  data_dir = build_coco(coco_sample_dir, tmp_path / 'coco')
  config = config_for(label_nc=182, contain_dontcare_label=True,
                      dataset='coco_stuff', preprocess_mode='resize_and_crop',
                      load_size=72, crop_size=64, batch_size=4)
  batches = take(input_pipeline.create_split(
      config, str(data_dir), 'val', train=False, process_index=0,
      process_count=1))
  for batch in batches:
    for i, name in enumerate(batch['file_name']):
      name = name.decode()
      label = Image.open(coco_sample_dir / 'val_label' / f'{name}.png')
      label = np.array(label.resize((72, 72), Image.NEAREST))[4:68, 4:68]
      np.testing.assert_array_equal(batch['label'][i],
                                    np.where(label == 255, 182, label))
      rgb = Image.open(coco_sample_dir / 'val_img' / f'{name}.jpg')
      rgb = np.array(rgb.convert('RGB').resize((72, 72), Image.BICUBIC))
      diff = np.abs(to_uint8(batch['image'][i]).astype(int) -
                    rgb[4:68, 4:68].astype(int))
      assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


@pytest.mark.parametrize('in_size,out_size', [
    (640, 286), (426, 286), (454, 639), (16, 379), (7, 3), (300, 300)])
def test_nearest_indices_match_pil(in_size, out_size):
  row = np.arange(in_size, dtype=np.int32)[None, :]
  pil = np.array(Image.fromarray(row).resize((out_size, 1), Image.NEAREST))[0]
  ours = input_pipeline.nearest_indices(in_size, out_size).numpy()
  np.testing.assert_array_equal(ours, pil)
  np.testing.assert_array_equal(
      label_maps.pil_nearest_indices(in_size, out_size), pil)


# ---------------------------------------------------------------------------
# Preprocess modes.


# Crop modes in training (random offsets), the others as for evaluation.
@pytest.mark.parametrize('mode,aspect,train,expected', [
    ('resize_and_crop', 1.0, True, (16, 16)),
    ('resize_and_crop', 1.0, False, (16, 16)),
    ('crop', 1.0, True, (16, 16)),
    ('crop', 2.0, False, (8, 16)),
    ('scale_width', 1.0, False, (18, 24)),         # 24 * 30 // 40 = 18.
    ('scale_width_and_crop', 1.0, True, (16, 16)),
    ('scale_shortside', 1.0, True, (24, 32)),      # short 30 -> 24, 40 -> 32.
    ('scale_shortside_and_crop', 1.0, False, (16, 16)),
    ('fixed', 1.0, True, (16, 16)),
    ('fixed', 2.0, False, (8, 16)),                # width crop, height / 2.
    ('none', 1.0, True, (30, 40)),
])
def test_mode_output_shapes(tmp_path, mode, aspect, train, expected):
  examples = blocky_examples(2, shape=(30, 40))
  data_dir = write_dataset(tmp_path / 'd', {'train': examples})
  config = config_for(preprocess_mode=mode, aspect_ratio=aspect, batch_size=2)
  (batch,) = take(input_pipeline.create_split(
      config, str(data_dir), 'train', train=train, num_epochs=1,
      process_index=0, process_count=1))
  assert batch['image'].shape == (2,) + expected + (3,)
  assert batch['label'].shape == (2,) + expected
  assert batch['instance'].shape == (2,) + expected
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  # Labels are never interpolated: only the classes of the source appear.
  assert set(np.unique(batch['label'])) <= set(
      np.unique(np.stack([e['label'] for e in examples])))


def test_small_image_is_zero_padded_by_crop(tmp_path):
  label = np.full((10, 12), 3, np.uint8)
  data_dir = write_dataset(tmp_path / 'd', {'val': [make_example(
      'a', label, np.zeros_like(label))]})
  config = config_for(preprocess_mode='crop', crop_size=16, batch_size=1)
  (batch,) = take(input_pipeline.create_split(
      config, str(data_dir), 'val', train=False, process_index=0,
      process_count=1))
  assert batch['label'].shape == (1, 16, 16)
  np.testing.assert_array_equal(batch['label'][0, :10, :12], 3)
  np.testing.assert_array_equal(batch['label'][0, 10:], 0)
  np.testing.assert_array_equal(batch['image'][0, :, 12:], -1.0)


def find_crop(src: np.ndarray, out: np.ndarray):
  """All (top, left, flipped) such that out is that crop of src."""
  h, w = out.shape[:2]
  found = []
  for flipped in (False, True):
    target = out[:, ::-1] if flipped else out
    for top in range(src.shape[0] - h + 1):
      for left in range(src.shape[1] - w + 1):
        if np.array_equal(src[top:top + h, left:left + w], target):
          found.append((top, left, flipped))
  return found


@pytest.mark.parametrize('no_flip', [False, True])
def test_random_crop_and_flip_keep_image_label_instance_aligned(
    tmp_path, no_flip):
  examples = blocky_examples(10, shape=(24, 32), seed=3)
  by_name = {e['name']: e for e in examples}
  data_dir = write_dataset(tmp_path / 'd', {'train': examples})
  config = config_for(preprocess_mode='crop', crop_size=16, no_flip=no_flip,
                      batch_size=5)
  batches = take(input_pipeline.create_split(
      config, str(data_dir), 'train', train=True, with_metadata=True,
      process_index=0, process_count=1), 6)
  flips, offsets = set(), set()
  for batch in batches:
    for i, name in enumerate(batch['file_name']):
      src = by_name[name.decode()]
      label = batch['label'][i]
      # The image's colours encode its label: the two are aligned.
      np.testing.assert_array_equal(to_uint8(batch['image'][i]),
                                    PALETTE[label])
      matches = [m for m in find_crop(src['label'].astype(np.int32), label)
                 if np.array_equal(
                     numpy_edges(src['instance'][m[0]:m[0] + 16,
                                                 m[1]:m[1] + 16]),
                     device_edges(batch)[i][:, ::-1] if m[2]
                     else device_edges(batch)[i])]
      assert matches, name
      flips.add(matches[0][2])
      offsets.add(matches[0][:2])
  assert flips == ({False} if no_flip else {False, True})
  assert len(offsets) > 5


@pytest.mark.parametrize('mode', ['resize_and_crop', 'scale_width_and_crop',
                                  'scale_shortside_and_crop'])
def test_resized_training_crops_match_pil_resize(tmp_path, mode):
  examples = blocky_examples(4, shape=(20, 30), seed=4)
  by_name = {e['name']: e for e in examples}
  data_dir = write_dataset(tmp_path / 'd', {'train': examples})
  config = config_for(preprocess_mode=mode, load_size=36, crop_size=24,
                      batch_size=4)
  (batch,) = take(input_pipeline.create_split(
      config, str(data_dir), 'train', train=True, with_metadata=True,
      process_index=0, process_count=1), 1)
  for i, name in enumerate(batch['file_name']):
    src = by_name[name.decode()]
    if mode == 'resize_and_crop':
      size = (36, 36)
    elif mode == 'scale_width_and_crop':
      size = (36, 36 * 20 // 30)
    else:
      size = (36 * 30 // 20, 36)
    label = np.array(Image.fromarray(src['label']).resize(size,
                                                          Image.NEAREST))
    image = np.array(Image.fromarray(src['image']).resize(size,
                                                          Image.BICUBIC))
    matches = find_crop(label.astype(np.int32), batch['label'][i])
    assert matches, name
    top, left, flipped = matches[0]
    expected = image[top:top + 24, left:left + 24]
    if flipped:
      expected = expected[:, ::-1]
    diff = np.abs(to_uint8(batch['image'][i]).astype(int) - expected)
    assert diff.max() <= 2, diff.max()


# ---------------------------------------------------------------------------
# Order, sharding, determinism, restoring.


def names_of(batches) -> List[List[str]]:
  return [[n.decode() for n in b['file_name']] for b in batches]


def test_epochs_are_permutations_and_reshuffled(blocky_dir):
  config = config_for(batch_size=5, preprocess_mode='crop')
  batches = take(input_pipeline.create_split(
      config, str(blocky_dir), 'train', train=True, with_metadata=True,
      process_index=0, process_count=1), 6)
  names = sum(names_of(batches), [])
  epochs = [names[0:10], names[10:20], names[20:30]]
  for epoch in epochs:
    assert sorted(epoch) == [f'tr{i:03d}' for i in range(10)]
  assert len({tuple(e) for e in epochs}) == 3
  np.testing.assert_array_equal(
      np.concatenate([b['index'] for b in batches]), np.arange(30))


def test_same_seed_same_batches_other_seed_differs(blocky_dir):
  def run(seed):
    return take(input_pipeline.create_split(
        config_for(seed=seed), str(blocky_dir), 'train', train=True,
        with_metadata=True, process_index=0, process_count=1), 4)

  first, again, other = run(0), run(0), run(1)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert names_of(first) != names_of(other)


def test_restore_from_step_equals_uninterrupted_run(blocky_dir):
  # 10 examples, batches of 4: global batches straddle epoch boundaries.
  config = config_for(batch_size=4)
  full = take(input_pipeline.create_split(
      config, str(blocky_dir), 'train', train=True, with_metadata=True,
      process_index=0, process_count=1), 9)
  for start in (2, 5):
    resumed = take(input_pipeline.create_split(
        config, str(blocky_dir), 'train', train=True, with_metadata=True,
        start_step=start, process_index=0, process_count=1), 9 - start)
    for a, b in zip(full[start:], resumed):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_processes_read_disjoint_shares_that_cover_each_epoch(blocky_dir):
  # 10 train records in 3 shards, 2 processes with 2 records per batch:
  # each process owns 5 records of every epoch (see data_order).
  config = config_for(batch_size=4)
  shares = [take(input_pipeline.create_split(
      config, str(blocky_dir), 'train', train=True, with_metadata=True,
      process_index=p, process_count=2), 5) for p in range(2)]
  for p in range(2):
    assert all(len(b['file_name']) == 2 for b in shares[p])
  for epoch in range(2):
    names = [sum(names_of(shares[p]), [])[5 * epoch:5 * epoch + 5]
             for p in range(2)]
    assert not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == [f'tr{i:03d}' for i in range(10)]
    indices = [np.concatenate([b['index'] for b in shares[p]])[
        5 * epoch:5 * epoch + 5] for p in range(2)]
    assert sorted(np.concatenate(indices)) == list(
        range(10 * epoch, 10 * epoch + 10))
  again = take(input_pipeline.create_split(
      config, str(blocky_dir), 'train', train=True, with_metadata=True,
      process_index=1, process_count=2), 5)
  for a, b in zip(shares[1], again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_a_process_resumes_its_own_share_exactly(blocky_dir):
  config = config_for(batch_size=4)
  full = take(input_pipeline.create_split(
      config, str(blocky_dir), 'train', train=True, with_metadata=True,
      process_index=1, process_count=2), 7)
  for start in (1, 3, 6):  # Inside the first epoch, at its end, the third.
    resumed = take(input_pipeline.create_split(
        config, str(blocky_dir), 'train', train=True, with_metadata=True,
        start_step=start, process_index=1, process_count=2), 7 - start)
    for a, b in zip(full[start:], resumed):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_one_process_reads_in_the_order_of_two(blocky_dir):
  config = config_for(batch_size=4, data_order_processes=2)
  together = take(input_pipeline.create_split(
      config, str(blocky_dir), 'train', train=True, with_metadata=True,
      process_index=0, process_count=1), 4)
  config.data_order_processes = 0
  shares = [take(input_pipeline.create_split(
      config, str(blocky_dir), 'train', train=True, with_metadata=True,
      process_index=p, process_count=2), 4) for p in range(2)]
  for step, whole in enumerate(together):
    for key in whole:
      np.testing.assert_array_equal(
          np.concatenate([shares[p][step][key] for p in range(2)]),
          whole[key])
  with pytest.raises(ValueError, match='data_order_processes=3'):
    input_pipeline.create_split(
        config_for(batch_size=4, data_order_processes=3), str(blocky_dir),
        'train', train=True, process_index=0, process_count=2)


def test_batch_not_divisible_by_processes_is_an_error(blocky_dir):
  with pytest.raises(ValueError, match='not divisible'):
    input_pipeline.create_split(config_for(batch_size=5), str(blocky_dir),
                                'train', train=True, process_index=0,
                                process_count=2)


def test_eval_pads_last_batch_and_shards_cover_split(blocky_dir):
  config = config_for(batch_size=2)
  batches = take(input_pipeline.create_split(
      config, str(blocky_dir), 'val', train=False, process_index=0,
      process_count=1))
  # Shards in order, records in shard order (written round-robin over 3).
  assert names_of(batches) == [['va000', 'va003'], ['va001', 'va004'],
                               ['va002', 'va000']]
  np.testing.assert_array_equal(batches[-1]['valid'], [True, False])
  assert len(batches) == 3
  per_process = [take(input_pipeline.create_split(
      config, str(blocky_dir), 'val', train=False, process_index=p,
      process_count=2)) for p in range(2)]
  valid_names = [n for p in per_process for b in p
                 for n, v in zip(b['file_name'], b['valid']) if v]
  assert sorted(n.decode() for n in valid_names) == [
      f'va{i:03d}' for i in range(5)]
  assert [len(p) for p in per_process] == [3, 3]


# ---------------------------------------------------------------------------
# Corrupt records.


def corrupt_dataset(tmp_path) -> pathlib.Path:
  examples = blocky_examples(6, seed=5)
  good_jpeg = io.BytesIO()
  Image.fromarray(examples[0]['image']).save(good_jpeg, format='JPEG')
  examples[2]['image'] = b'this is not an image'
  examples[4]['image'] = good_jpeg.getvalue()[:60]  # Truncated JPEG.
  examples[5]['label'] = b'\x89PNG broken'
  return write_dataset(tmp_path / 'bad', {'val': examples, 'train': examples},
                       num_shards=2)


def test_corrupt_record_error_names_record_and_shard(tmp_path):
  data_dir = corrupt_dataset(tmp_path)
  config = config_for(batch_size=2)
  ds = input_pipeline.create_split(config, str(data_dir), 'val', train=False,
                                   process_index=0, process_count=1)
  with pytest.raises(tf.errors.InvalidArgumentError) as err:
    take(ds)
  message = str(err.value)
  assert 'ex002' in message
  assert 'val.tfrecord-00000-of-00002' in message
  assert 'image undecodable' in message
  assert 'skip_bad_records' in message


def test_skip_bad_records_skips_counts_and_logs(tmp_path, caplog):
  data_dir = corrupt_dataset(tmp_path)
  config = config_for(batch_size=1, skip_bad_records=True)
  counter = input_pipeline.BadRecordCounter()
  with caplog.at_level(logging.WARNING):
    batches = take(input_pipeline.create_split(
        config, str(data_dir), 'val', train=False, process_index=0,
        process_count=1, bad_records=counter))
  assert sum(names_of(batches), []) == ['ex000', 'ex001', 'ex003']
  assert counter.count == 3
  assert sorted(counter.file_names) == ['ex002', 'ex004', 'ex005']
  assert 'ex005' in caplog.text and 'label undecodable' in caplog.text


def test_skipped_steps_are_not_decoded(tmp_path):
  data_dir = corrupt_dataset(tmp_path)
  # Eval order (2 shards, written round-robin): ex000, ex002, ex004, ex001,
  # ex003, ex005; the two bad ones at positions 1 and 2 are skipped unread.
  config = config_for(batch_size=1)
  batches = take(input_pipeline.create_split(
      config, str(data_dir), 'val', train=False, start_step=3,
      process_index=0, process_count=1), 2)
  assert names_of(batches) == [['ex001'], ['ex003']]
  # Training: find where the bad records sit, then resume after the last one
  # of epoch 0: the rest of the epoch reads without error.
  counter = input_pipeline.BadRecordCounter()
  skip_config = config_for(batch_size=1, skip_bad_records=True)
  seen = take(input_pipeline.create_split(
      skip_config, str(data_dir), 'train', train=True, with_metadata=True,
      process_index=0, process_count=1, num_epochs=1, bad_records=counter))
  assert counter.count == 3
  good_positions = sorted(int(b['index'][0]) for b in seen)
  bad_positions = sorted(set(range(6)) - set(good_positions))
  resumed = take(input_pipeline.create_split(
      config, str(data_dir), 'train', train=True, with_metadata=True,
      start_step=bad_positions[-1] + 1, process_index=0, process_count=1,
      num_epochs=1))
  assert [int(b['index'][0]) for b in resumed] == list(
      range(bad_positions[-1] + 1, 6))


# ---------------------------------------------------------------------------
# Data-set conventions.


def test_ade20k_labels_shift_and_other_becomes_dontcare(tmp_path):
  raw = np.array([[0, 1, 2, 150], [150, 0, 5, 1]], np.uint8)
  data_dir = write_dataset(tmp_path / 'ade', {'val': [
      {'name': 'a', 'image': np.zeros((2, 4, 3), np.uint8), 'label': raw,
       'instance': None}]}, dataset='ade20k', label_nc=150,
                           contain_dontcare_label=True, has_instance=False)
  config = config_for(dataset='ade20k', label_nc=150,
                      contain_dontcare_label=True, no_instance=True,
                      preprocess_mode='none', batch_size=1)
  (batch,) = take(input_pipeline.create_split(
      config, str(data_dir), 'val', train=False, process_index=0,
      process_count=1))
  np.testing.assert_array_equal(
      batch['label'][0], [[150, 0, 1, 149], [149, 150, 4, 0]])
  np.testing.assert_array_equal(batch['instance'], 0)


def test_cityscapes_like_16bit_instances(tmp_path):
  rng = np.random.default_rng(6)
  label = random_blocks(rng, (16, 24), 4, 34).astype(np.uint8)
  # Ids that differ only by multiples of 256: an 8-bit read would lose edges.
  instance = (26000 + 256 * random_blocks(rng, (16, 24), 4, 3)).astype(
      np.uint16)
  data_dir = write_dataset(tmp_path / 'city', {'val': [
      {'name': 'frankfurt_000000', 'image': np.zeros((16, 24, 3), np.uint8),
       'label': label, 'instance': instance}]}, dataset='cityscapes',
                           label_nc=35)
  config = config_for(dataset='cityscapes', label_nc=35,
                      preprocess_mode='fixed', crop_size=24, aspect_ratio=1.5,
                      batch_size=1)
  (batch,) = take(input_pipeline.create_split(
      config, str(data_dir), 'val', train=False, process_index=0,
      process_count=1))
  assert Image.open(io.BytesIO(png_bytes(instance))).mode.startswith('I')
  np.testing.assert_array_equal(batch['label'][0], label)
  expected = numpy_edges(instance.astype(np.int64))
  assert expected.any() and not numpy_edges(instance % 256).any()
  np.testing.assert_array_equal(batch['instance'][0], instance)
  np.testing.assert_array_equal(device_edges(batch)[0], expected)


def test_missing_instance_map_is_a_clear_error(tmp_path):
  examples = blocky_examples(2)
  examples[1]['instance'] = None
  data_dir = write_dataset(tmp_path / 'd', {'val': examples})
  ds = input_pipeline.create_split(config_for(batch_size=1), str(data_dir),
                                   'val', train=False, process_index=0,
                                   process_count=1)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match='no instance map.*no_instance'):
    take(ds)
  # Without instances wanted, the same data reads fine.
  batches = take(input_pipeline.create_split(
      config_for(batch_size=1, no_instance=True), str(data_dir), 'val',
      train=False, process_index=0, process_count=1))
  assert len(batches) == 2


def test_config_must_match_dataset(tmp_path):
  data_dir = write_dataset(tmp_path / 'd', {'val': blocky_examples(1)},
                           has_instance=False)
  with pytest.raises(ValueError, match='no instance maps'):
    input_pipeline.create_split(config_for(), str(data_dir), 'val',
                                train=False)
  with pytest.raises(ValueError, match='label_nc'):
    input_pipeline.create_split(config_for(label_nc=9, no_instance=True),
                                str(data_dir), 'val', train=False)
  with pytest.raises(ValueError, match='Split'):
    input_pipeline.create_split(config_for(no_instance=True), str(data_dir),
                                'test', train=False)
  with pytest.raises(ValueError, match='preprocess_mode'):
    input_pipeline.create_split(
        config_for(no_instance=True, preprocess_mode='bogus'), str(data_dir),
        'val', train=False)


def test_edges_rule_on_the_device():
  inst = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]], np.int32)
  np.testing.assert_array_equal(
      device_edges({'instance': inst[None]})[0],
      [[0, 1, 1], [1, 1, 1], [1, 1, 1]])
  rng = np.random.default_rng(0)
  inst = random_blocks(rng, (20, 28), 4, 5)
  np.testing.assert_array_equal(device_edges({'instance': inst[None]})[0],
                                numpy_edges(inst))


@pytest.mark.parametrize('dataset,dontcare', [
    ('ade20k', True), ('coco_stuff', True), ('custom', False)])
def test_map_labels_in_the_graph_equals_numpy(dataset, dontcare):
  raw = np.random.default_rng(1).integers(0, 256, (6, 9)).astype(np.int32)
  kw = dict(dataset=dataset, label_nc=150, contain_dontcare_label=dontcare)
  np.testing.assert_array_equal(
      input_pipeline.map_labels(tf.constant(raw), **kw).numpy(),
      label_maps.dataset_to_class_ids(raw, **kw))
