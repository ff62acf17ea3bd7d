"""Read-time checks of built records: ids, counts, damaged frames.

Label ids outside the set's range, shards holding another number of records
than dataset_info.json says, and cut-off or corrupted record frames are
errors naming the shard, or (cut-off, missing and out-of-range records) are
skipped and counted with config.skip_bad_records.
"""
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import records
from input_pipeline_test import config_for
from input_pipeline_test import make_example
from input_pipeline_test import names_of
from input_pipeline_test import take
from input_pipeline_test import write_dataset
from spade_jax import input_pipeline

SHAPE = (8, 8)


def _examples(n, label_nc=4):
  rng = np.random.default_rng(0)
  return [make_example(f'ex{i:03d}', rng.integers(
      0, label_nc, SHAPE).astype(np.uint8)) for i in range(n)]


def _config(**changes):
  return config_for(label_nc=4, no_instance=True, batch_size=1,
                    preprocess_mode='none', **changes)


def _read(data_dir, config, counter=None):
  return take(input_pipeline.create_split(
      config, str(data_dir), 'val', train=False, process_index=0,
      process_count=1, bad_records=counter))


def _shard(data_dir, i, n=2):
  return records.shard_path(str(data_dir), 'val', i, n)


def test_label_ids_outside_the_range_are_named_or_skipped(tmp_path, caplog):
  examples = _examples(4)
  examples[2]['label'] = examples[2]['label'].copy()
  examples[2]['label'][3, 5] = 9
  data_dir = write_dataset(tmp_path / 'ids', {'val': examples}, label_nc=4,
                           has_instance=False)
  with pytest.raises(tf.errors.InvalidArgumentError) as info:
    _read(data_dir, _config())
  message = str(info.value)
  # Written round-robin: ex002 is in shard 0.
  assert 'ex002' in message and _shard(data_dir, 0) in message, message
  assert 'label id 9 outside' in message and '0..3 (label_nc=4)' in message
  counter = input_pipeline.BadRecordCounter()
  with caplog.at_level(logging.WARNING):
    batches = _read(data_dir, _config(skip_bad_records=True), counter)
  assert sorted(sum(names_of(batches), [])) == ['ex000', 'ex001', 'ex003']
  assert counter.count == 1 and counter.file_names == ['ex002']
  assert 'label id 9' in caplog.text
  # 255 is in range only for sets with a don't-care class.
  examples[2]['label'][3, 5] = 255
  care = write_dataset(tmp_path / 'dontcare', {'val': examples}, label_nc=4,
                       contain_dontcare_label=True, has_instance=False)
  batches = _read(care, _config(contain_dontcare_label=True))
  assert len(batches) == 4
  assert 4 in np.concatenate([b['label'].ravel() for b in batches])


def test_record_counts_must_match_dataset_info(tmp_path, caplog):
  data_dir = write_dataset(tmp_path / 'count', {'val': _examples(5)},
                           label_nc=4, has_instance=False)
  info = records.DatasetInfo.load(str(data_dir))
  info.splits['val']['num_examples'] = 7
  info.save(str(data_dir))
  with pytest.raises(ValueError) as err:
    _read(data_dir, _config())
  message = str(err.value)
  assert 'says 7 records, its shards hold 5' in message, message
  assert f'{_shard(data_dir, 0)} holds 3' in message
  assert f'{_shard(data_dir, 1)} holds 2' in message
  assert 'skip_bad_records' in message
  counter = input_pipeline.BadRecordCounter()
  with caplog.at_level(logging.WARNING):
    batches = _read(data_dir, _config(skip_bad_records=True), counter)
  assert len(batches) == 5 and counter.count == 2
  assert 'says 7 records' in caplog.text


def test_cut_off_shard_is_named_or_its_complete_records_read(tmp_path):
  data_dir = write_dataset(tmp_path / 'cut', {'val': _examples(6)},
                           label_nc=4, has_instance=False)
  shard = _shard(data_dir, 1)
  with open(shard, 'rb') as f:
    data = f.read()
  with open(shard, 'wb') as f:
    f.write(data[:-20])
  with pytest.raises(tf.errors.DataLossError) as err:
    _read(data_dir, _config())
  message = str(err.value)
  assert f'Shard {shard} ends in a cut-off record' in message, message
  assert 'after 2 complete records' in message
  counter = input_pipeline.BadRecordCounter()
  batches = _read(data_dir, _config(skip_bad_records=True), counter)
  # Round-robin: shard 1 held ex001, ex003, ex005; ex005 was cut off.
  assert sorted(sum(names_of(batches), [])) == [
      'ex000', 'ex001', 'ex002', 'ex003', 'ex004']
  assert counter.count == 1 and shard in counter.file_names[0]


def test_corrupted_record_frame_names_its_shard(tmp_path):
  data_dir = write_dataset(tmp_path / 'flip', {'val': _examples(6)},
                           label_nc=4, has_instance=False)
  shard = _shard(data_dir, 1)
  offsets = records.scan_shard(shard).offsets
  with open(shard, 'r+b') as f:
    f.seek(offsets[1] + 40)  # Inside the second record's data.
    byte = f.read(1)
    f.seek(offsets[1] + 40)
    f.write(bytes([byte[0] ^ 0xFF]))
  for train in (False, True):
    ds = input_pipeline.create_split(
        _config(skip_bad_records=True), str(data_dir), 'val', train=train,
        process_index=0, process_count=1)
    with pytest.raises(tf.errors.DataLossError) as err:
      for i, _ in enumerate(input_pipeline.numpy_batches(ds)):
        assert i < 20, 'the damaged frame was never reached'
    message = str(err.value)
    assert f'Damaged record frame in shard {shard}' in message, message
    assert 'corrupted record at' in message, message
    assert os.path.basename(_shard(data_dir, 0)) not in message
