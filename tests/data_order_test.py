"""Tests of the read plan (data_order): shares, windows, seeking."""
import collections

import pytest

from spade_jax import data_order


def records_of(plan, position, n, num_epochs=None):
  """(shard, record, valid) of stream positions [position, position + n)
  from the plan's pieces, each window permuted by a stand-in of the
  permutation input_pipeline draws from the same (key, window number)."""
  pieces, drop = plan.start(position, num_epochs)
  window = max(1, plan.window) if plan.train else 1
  out = []
  for p in pieces:
    ids = [(p.shard, p.skip + k, p.valid) for k in range(p.take)]
    if window > 1 and p.key:
      runs = [ids[k:k + window] for k in range(0, len(ids), window)]
      ids = []
      for number, run in enumerate(runs, start=p.first_window):
        ids += sorted(run, key=lambda r, s=(p.key, number): data_order.mix(
            *s, r[1]))
    out += ids
    if len(out) >= drop + n:
      break
  return out[drop:drop + n]


def plan(counts, p=0, count=1, window=4, train=True, local_batch=1):
  return data_order.Plan(counts=tuple(counts), train=train, seed=3,
                         process_index=p, process_count=count,
                         local_batch=local_batch, window=window)


@pytest.mark.parametrize('counts,count', [((100,) * 8, 4), ((7, 5, 9), 2),
                                          ((3, 11, 1, 6), 3)])
def test_shares_are_disjoint_and_cover_every_epoch(counts, count):
  for epoch in range(3):
    seen = collections.Counter()
    for p in range(count):
      pl = plan(counts, p, count)
      size = pl.epoch_size
      for shard, record, valid in records_of(pl, epoch * size, size):
        assert valid
        seen[(shard, record)] += 1
    assert set(seen.values()) == {1}
    assert len(seen) == sum(counts)


def test_each_process_reads_its_share_plus_at_most_one_shard_prefix():
  counts = (7, 5, 9, 4)
  for p in range(3):
    pl = plan(counts, p, 3)
    for epoch in range(4):
      pieces = pl.epoch_pieces(epoch)
      read = sum(x.skip + x.take if i == 0 else x.take
                 for i, x in enumerate(pieces))
      assert sum(x.take for x in pieces) == pl.epoch_size
      assert read <= pl.epoch_size + max(counts)
      assert all(x.skip == 0 for x in pieces[1:])


def test_the_order_is_a_function_of_the_position_only():
  pl = plan((7, 5, 9), 1, 2, window=3)
  straight = records_of(pl, 0, 60)
  for start in (1, 5, 10, 11, 29, 33):
    assert records_of(pl, start, 60 - start) == straight[start:]


def test_seeking_skips_whole_pieces_and_reads_within_one_shard():
  counts = (100,) * 8
  pl = plan(counts, 0, 1, window=1000)
  pieces, drop = pl.start(720)
  first = next(pieces)
  # 90% of the epoch: the 8th shard of the order, read from its start.
  assert first.skip + first.take == 100 and first.skip == 0
  assert drop == 20
  assert first.shard == data_order.shard_order(3, 0, 8)[7]


def test_windows_shuffle_and_epochs_differ():
  pl = plan((20,), window=5)
  e0 = records_of(pl, 0, 20)
  e1 = records_of(pl, 20, 20)
  assert sorted(e0) == sorted(e1)
  assert e0 != e1
  assert e0 != sorted(e0)
  # A window never mixes records from two runs of 5.
  assert sorted(r[1] // 5 for r in e0[:5]) == [0] * 5


def test_evaluation_pads_to_equal_batches_and_is_valid_once():
  counts = (3, 4)  # 7 records; 3 processes x batches of 2: 4 records each.
  shares = [plan(counts, p, 3, train=False, local_batch=2) for p in range(3)]
  assert [s.epoch_size for s in shares] == [4, 4, 4]
  read = [records_of(s, 0, s.epoch_size, 1) for s in shares]
  assert [len(r) for r in read] == [4, 4, 4]
  valid = [r[:2] for share in read for r in share if r[2]]
  assert sorted(valid) == sorted((j, k) for j, c in enumerate(counts)
                                 for k in range(c))
  # Stored order, contiguous parts; the indices are global positions.
  assert valid == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
  assert [shares[1].index(t) for t in range(4)] == [4, 5, 6, 7]


def test_describe_change():
  same = {'data_order_processes': 2, 'process_count': 2, 'num_devices': 4,
          'global_batch': 8}
  assert data_order.describe_change(same, same) is None
  text = data_order.describe_change(same, dict(same, num_devices=8))
  assert 'unchanged' in text and 'num_devices 4 -> 8' in text
  text = data_order.describe_change(
      same, dict(same, process_count=1, data_order_processes=1))
  assert 'bit-exact' in text and 'process_count 2 -> 1' in text
  assert 'config.data_order_processes=2' in text
  text = data_order.describe_change(same, dict(same, process_count=1))
  assert 'unchanged' in text


def test_a_resumed_run_says_what_its_order_keeps(tmp_path, caplog):
  from spade_jax import run_config  # pylint: disable=g-import-not-at-top
  first = {'data_order_processes': 1, 'process_count': 1, 'num_devices': 1,
           'global_batch': 4}
  run_config.note_input_order(str(tmp_path), first, resumed=False)
  with caplog.at_level('WARNING'):
    run_config.note_input_order(str(tmp_path), first, resumed=True)
  assert not caplog.records
  with caplog.at_level('WARNING'):
    run_config.note_input_order(str(tmp_path), dict(first, num_devices=2),
                                resumed=True)
  assert 'num_devices 1 -> 2' in caplog.text and 'unchanged' in caplog.text
  (tmp_path / run_config.INPUT_ORDER_FILE).write_text('{not json')
  with caplog.at_level('WARNING'):
    run_config.note_input_order(str(tmp_path), first, resumed=True)
  assert 'is not compared' in caplog.text
