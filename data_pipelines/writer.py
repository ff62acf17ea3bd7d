"""Writing a data set: TFRecord shards into a temporary folder, then a commit.

The writer shared by every builder (`build.py` for the released layouts,
`synthetic.py` for the generated set): `ordered_map` prepares examples on
threads in order, `write_split` writes one split's serialized records into
contiguous shards (listing every bad example in one error), and
`build_splits` writes all splits into a hidden temporary folder inside the
output and `commit`s them: the old `dataset_info.json` is removed first and
the new one written last, so an interrupted or failed build never looks
valid. Rebuilding some splits of a compatible build keeps its other splits.
"""
import collections
import concurrent.futures
import dataclasses
import itertools
import math
import os
import time
import uuid
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Optional,
                    Sequence, Tuple)

from absl import logging
import numpy as np
import tensorflow as tf
import tqdm

from data_pipelines import records

# Default shard size, in source bytes.
_TARGET_SHARD_BYTES = 128 << 20
_MAX_REPORTED_ERRORS = 50
_TMP_PREFIX = '.build-'


class BuildError(ValueError):
  """A source file is unusable (the message names it)."""


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any],
                num_workers: int, window: int = 64) -> Iterator[Any]:
  """`map(fn, items)` on threads, in order, at most `window` ahead."""
  if num_workers <= 1:
    yield from map(fn, items)
    return
  it = iter(items)
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    pending = collections.deque(
        pool.submit(fn, x) for x in itertools.islice(it, window))
    while pending:
      result = pending.popleft().result()
      for x in itertools.islice(it, 1):
        pending.append(pool.submit(fn, x))
      yield result




def default_num_shards(num_examples: int, source_bytes: int) -> int:
  return max(1, min(num_examples, math.ceil(source_bytes /
                                            _TARGET_SHARD_BYTES)))


def resolve_num_shards(num_examples: int, source_bytes: int,
                       num_shards: Optional[int] = None,
                       examples_per_shard: Optional[int] = None) -> int:
  """Shard count: as asked, or ~128 MiB of source each; never > examples."""
  if num_shards is not None and examples_per_shard is not None:
    raise ValueError('Give num_shards or examples_per_shard, not both.')
  if num_shards is not None:
    if num_shards <= 0:
      raise ValueError(f'num_shards must be positive, got {num_shards}.')
    n = num_shards
  elif examples_per_shard is not None:
    if examples_per_shard <= 0:
      raise ValueError('examples_per_shard must be positive, got '
                       f'{examples_per_shard}.')
    n = math.ceil(num_examples / examples_per_shard)
  else:
    n = default_num_shards(num_examples, source_bytes)
  if n > num_examples:
    logging.warning('%d shards asked for %d examples; writing %d.', n,
                    num_examples, num_examples)
  return max(1, min(n, num_examples))


def write_split(results: Iterable[Tuple[Optional[bytes], Optional[str]]],
                out_dir: str, split: str, num_examples: int,
                num_shards: int, desc: str = '') -> int:
  """Writes serialized examples into `num_shards` contiguous shards.

  Args:
    results: `(record, None)` or `(None, error message)` per example, in
      order; exactly `num_examples` of them.
    out_dir: the (temporary) output folder.
    split: the split name.
    num_examples: how many examples `results` yields.
    num_shards: how many shards to write.
    desc: progress bar label.

  Returns:
    Bytes written.

  Raises:
    BuildError: listing the error messages (writing stops at the first one;
      checking goes on to report up to `_MAX_REPORTED_ERRORS` of them).
  """
  paths = records.shard_paths(out_dir, split, num_shards)
  starts = np.cumsum([0] + records.shard_sizes(num_examples, num_shards))
  errors = []
  writer, shard, count = None, -1, 0
  try:
    for i, (record, error) in enumerate(
        tqdm.tqdm(results, total=num_examples, desc=desc or split,
                  unit='ex', disable=None, leave=False)):
      count += 1
      if error is not None:
        errors.append(error)
        if len(errors) >= _MAX_REPORTED_ERRORS:
          break
        continue
      if errors:
        continue
      while i >= starts[shard + 1]:
        if writer is not None:
          writer.close()
        shard += 1
        writer = tf.io.TFRecordWriter(paths[shard])
      writer.write(record)
  finally:
    if writer is not None:
      writer.close()
  if errors:
    more = ' (stopped checking there)' if len(errors) >= \
        _MAX_REPORTED_ERRORS else ''
    raise BuildError(f'{len(errors)} bad example(s) in split {split!r}{more}:'
                     '\n  ' + '\n  '.join(errors))
  if count != num_examples:
    raise BuildError(f'Split {split!r}: expected {num_examples} examples, got '
                     f'{count}.')
  return sum(tf.io.gfile.stat(p).length for p in paths)


def make_temp_dir(data_dir: str) -> str:
  """A fresh hidden folder inside `data_dir` for an in-progress build."""
  path = os.path.join(data_dir, f'{_TMP_PREFIX}{uuid.uuid4().hex}')
  tf.io.gfile.makedirs(path)
  return path


def _remove_tree(path: str) -> None:
  if tf.io.gfile.exists(path):
    tf.io.gfile.rmtree(path)


def _load_info(data_dir: str) -> Optional[records.DatasetInfo]:
  try:
    return records.DatasetInfo.load(data_dir)
  except (FileNotFoundError, ValueError, TypeError) as e:
    if not isinstance(e, FileNotFoundError):
      logging.warning('Ignoring unreadable %s in %s: %s', records.INFO_FILE,
                      data_dir, e)
    return None


def _compatible(a: records.DatasetInfo, b: records.DatasetInfo) -> bool:
  return (a.dataset, a.label_nc, a.contain_dontcare_label, a.has_instance) \
      == (b.dataset, b.label_nc, b.contain_dontcare_label, b.has_instance)


def _split_files(data_dir: str, split: str) -> List[str]:
  return tf.io.gfile.glob(os.path.join(data_dir, f'{split}.tfrecord-*'))


def commit(tmp_dir: str, data_dir: str, info: records.DatasetInfo, *,
           keep_other_splits: bool = True,
           extra_files: Sequence[str] = ()) -> records.DatasetInfo:
  """Moves a finished build from `tmp_dir` into `data_dir`.

  The old `dataset_info.json` goes first and the new one comes last, so no
  mix of old and new shards ever looks like a valid build.

  Args:
    tmp_dir: holds the new shards (`info.splits`) and `extra_files`.
    data_dir: the final folder.
    info: metadata of the new splits.
    keep_other_splits: keep the splits of an existing compatible build that
      were not rebuilt.
    extra_files: other file names in `tmp_dir` to move (before the info).

  Returns:
    The info written (with any kept splits).
  """
  old = _load_info(data_dir)
  info = dataclasses.replace(info, splits=dict(info.splits))
  new_splits = list(info.splits)
  stale = set(new_splits)
  if old is not None:
    for split, meta in old.splits.items():
      if split in info.splits:
        continue
      complete = all(tf.io.gfile.exists(p) for p in records.shard_paths(
          data_dir, split, meta['num_shards']))
      if keep_other_splits and _compatible(old, info) and complete:
        info.splits = {split: meta, **info.splits}
      else:
        stale.add(split)
  info_path = os.path.join(data_dir, records.INFO_FILE)
  if tf.io.gfile.exists(info_path):
    tf.io.gfile.remove(info_path)
  for split in stale:
    for path in _split_files(data_dir, split):
      tf.io.gfile.remove(path)
  for split in new_splits:
    for path in records.shard_paths(tmp_dir, split,
                                    info.splits[split]['num_shards']):
      tf.io.gfile.rename(path, os.path.join(data_dir, os.path.basename(path)),
                         overwrite=True)
  for name in extra_files:
    tf.io.gfile.rename(os.path.join(tmp_dir, name),
                       os.path.join(data_dir, name), overwrite=True)
  info.save(data_dir)
  _remove_tree(tmp_dir)
  return info


def build_splits(
    data_dir: str, info: records.DatasetInfo,
    splits: Dict[str, Tuple[int, int, Callable[[str], Iterable[Tuple[
        Optional[bytes], Optional[str]]]]]], *,
    keep_other_splits: bool = True,
    write_extra: Optional[Callable[[str], Sequence[str]]] = None
) -> Dict[str, Dict[str, Any]]:
  """Writes splits into a temporary folder, then commits them all.

  Args:
    data_dir: output folder (created if needed).
    info: metadata; its `splits` are filled in here.
    splits: split name -> (num_examples, num_shards, fn) where `fn(split)`
      yields `(record, error)` pairs.
    keep_other_splits: see `commit`.
    write_extra: called with the temporary folder after the shards are
      written; writes extra files there and returns their names.

  Returns:
    Per split: examples, shards, bytes, seconds.
  """
  tf.io.gfile.makedirs(data_dir)
  stale = tf.io.gfile.glob(os.path.join(data_dir, _TMP_PREFIX + '*'))
  if stale:
    logging.warning('Folders left by interrupted (or running) builds in %s: '
                    '%s. They are never read; delete them to free space.',
                    data_dir, ', '.join(os.path.basename(p) for p in stale))
  tmp_dir = make_temp_dir(data_dir)
  summary = {}
  try:
    info = dataclasses.replace(info, splits={})
    for split, (num_examples, num_shards, results) in splits.items():
      start = time.time()
      nbytes = write_split(results(split), tmp_dir, split, num_examples,
                           num_shards, desc=f'{info.dataset}/{split}')
      info.splits[split] = {'num_examples': num_examples,
                            'num_shards': num_shards}
      summary[split] = {'examples': num_examples, 'shards': num_shards,
                        'bytes': nbytes, 'seconds': time.time() - start}
      logging.info('%s/%s: %d examples, %d shards, %d bytes, %.1f s',
                   info.dataset, split, num_examples, num_shards, nbytes,
                   summary[split]['seconds'])
    extra = write_extra(tmp_dir) if write_extra else ()
    commit(tmp_dir, data_dir, info, keep_other_splits=keep_other_splits,
           extra_files=extra)
  finally:
    _remove_tree(tmp_dir)
  return summary


def summary_line(summary: Dict[str, Dict[str, Any]]) -> str:
  parts = [f'{s}: {m["examples"]} examples, {m["shards"]} shards, '
           f'{m["bytes"]} bytes, {m["seconds"]:.1f} s'
           for s, m in summary.items()]
  total = (f'total {sum(m["examples"] for m in summary.values())} examples, '
           f'{sum(m["shards"] for m in summary.values())} shards, '
           f'{sum(m["bytes"] for m in summary.values())} bytes, '
           f'{sum(m["seconds"] for m in summary.values()):.1f} s')
  return '; '.join(parts + [total])
