r"""Builds the TFRecords of a data set from its released files.

Usage:

  python -m data_pipelines.build --dataset coco_stuff \
      --manual_dir ~/datasets/cocostuff --data_dir ~/data/coco_stuff
  python -m data_pipelines.build --dataset custom --label_dir L \
      --image_dir I [--instance_dir N] --label_nc 20 \
      [--contain_dontcare_label] [--split train] --data_dir OUT
  python -m data_pipelines.build --dataset synthetic --data_dir OUT
  ... --label_format rgb [--palette colors.json]   colour label maps

`--manual_dir` holds the files as released (see `layouts.py` for each data
set's layout); the output is the format of `records.py`, which
`spade_jax/input_pipeline.py` reads.

What is stored: each image file's own bytes (JPEG and PNG kept as they are,
other formats re-encoded to lossless PNG), and the label and instance maps as
grayscale PNGs at their own bit depth: 8- and 16-bit grayscale PNGs are kept
byte for byte; palette/1-bit PNGs, RGB PNGs with equal channels and other
lossless formats are re-encoded to a grayscale PNG of the same values (TF
would otherwise decode palette PNGs to colours). PNG label maps follow
`spade_jax/label_maps.py` (the rule synthesize and the web server use too;
16-bit colour PNGs are refused). With `--label_format rgb` label maps are
colour PNGs in the class colours (the data set's palette, or `--palette`),
stored as the raw ids they stand for. No other value mapping is applied: the
reader maps 255 and ADE20K's shift.

Every example is checked while building, and errors name the file: images,
labels or instance maps that do not decode, a label or instance map whose size
differs from the image's, raw class ids outside the data set's range (255
allowed only where the set has a don't-care label), colour maps (without
--label_format rgb) and colours that are no class colour (with it). All bad
files of a split are listed in one error (at most `_MAX_REPORTED_ERRORS`).

Output is atomic: shards are written into a hidden temporary folder inside
`--data_dir`, moved into place once every split succeeded, and
`dataset_info.json` is written last (the existing one is removed before any
shard is replaced), so an interrupted or failed build never looks valid.
Rebuilding some splits of an existing, compatible build keeps its other
splits. The 'train' split is written in a fixed pseudo-random order so each
shard mixes the whole set; other splits keep name order.

Why no tensorflow-datasets builder: a tfds `GeneratorBasedBuilder` with a
`manual_dir` would write tfds's own versioned layout (its own
`dataset_info.json`, features spec and file naming), a second on-disk format
that the input pipeline does not read; keeping one format avoids the two
drifting apart. The tfds conventions are followed where they matter to users:
`--manual_dir` is the folder of the manually downloaded files, `--data_dir`
the output.
"""
import collections
import concurrent.futures
import dataclasses
import io
import itertools
import math
import os
import sys
import time
import uuid
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Optional,
                    Sequence, Tuple)

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf
import tqdm

from data_pipelines import coco_instances
from data_pipelines import layouts
from data_pipelines import records
from spade_jax import label_maps

# Default shard size, in source bytes.
_TARGET_SHARD_BYTES = 128 << 20
_MAX_REPORTED_ERRORS = 50
_TRAIN_ORDER_SEED = 0
# Image formats stored as they are; others are re-encoded to PNG.
_KEPT_IMAGE_FORMATS = ('JPEG', 'MPO', 'PNG')
_TMP_PREFIX = '.build-'


class BuildError(ValueError):
  """A source file is unusable (the message names it)."""


# ---------------------------------------------------------------------------
# Colours and class names.


_CITYSCAPES_NAMES = [
    'unlabeled', 'ego vehicle', 'rectification border', 'out of roi',
    'static', 'dynamic', 'ground', 'road', 'sidewalk', 'parking',
    'rail track', 'building', 'wall', 'fence', 'guard rail', 'bridge',
    'tunnel', 'pole', 'polegroup', 'traffic light', 'traffic sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus',
    'caravan', 'trailer', 'train', 'motorcycle', 'bicycle', 'license plate']


def dataset_info_for(layout: layouts.Layout) -> records.DatasetInfo:
  """The metadata of a built real data set (splits filled in later)."""
  n = layout.label_nc + (1 if layout.contain_dontcare_label else 0)
  names = list(_CITYSCAPES_NAMES) if layout.name == 'cityscapes' else None
  return records.DatasetInfo(
      dataset=layout.name, label_nc=layout.label_nc,
      contain_dontcare_label=layout.contain_dontcare_label,
      has_instance=layout.has_instance, splits={}, class_names=names,
      colors=label_maps.label_colormap(n).tolist())


# ---------------------------------------------------------------------------
# Reading and checking one example.


def _read(path: str) -> bytes:
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      return f.read()
  except (OSError, tf.errors.OpError) as e:
    raise BuildError(f'{path}: cannot read: {e}') from e


def _open(data: bytes, path: str, what: str) -> Image.Image:
  """Opens and fully decodes an image file (errors name the file)."""
  try:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im
  except Exception as e:  # PIL raises many kinds for corrupt files.
    raise BuildError(f'{path}: cannot decode {what}: {e}') from e


def _encode_png(im: Image.Image) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format='PNG')
  return buf.getvalue()


def prepare_image(data: bytes, path: str) -> Tuple[bytes, int, int]:
  """Checks an image file; returns (bytes to store, height, width)."""
  try:
    im = Image.open(io.BytesIO(data))
    width, height = im.size
    fmt = im.format
    if fmt in ('JPEG', 'MPO'):
      # Decodes every coefficient but skips the full-size IDCT: fast, and
      # still finds truncated or corrupt data.
      im.draft(None, (max(1, width // 8), max(1, height // 8)))
    im.load()
  except Exception as e:  # PIL raises many kinds for corrupt files.
    raise BuildError(f'{path}: cannot decode image: {e}') from e
  if fmt in _KEPT_IMAGE_FORMATS:
    return data, height, width
  logging.log_first_n(logging.INFO, 'Re-encoding %s images to PNG (e.g. %s).',
                      1, fmt, path)
  full = _open(data, path, 'image')
  if full.mode not in ('L', 'RGB'):
    full = full.convert('RGB')
  return _encode_png(full), height, width


def map_to_array(im: Image.Image, path: str, what: str) -> np.ndarray:
  """The raw values of a single-channel label or instance map."""
  if im.mode in ('L', 'P'):
    return np.asarray(im, dtype=np.uint8)
  if im.mode == '1':
    return np.asarray(im, dtype=np.uint8)
  if im.mode.startswith('I;16'):
    return np.asarray(im).astype(np.uint16)
  if im.mode == 'I':
    arr = np.asarray(im)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
      raise BuildError(f'{path}: {what} values {arr.min()}..{arr.max()} do '
                       'not fit 16 bits.')
    return arr.astype(np.uint16)
  raise BuildError(f'{path}: {what} map has mode {im.mode}; it must be a '
                   'single-channel (grayscale or palette-index) image.')


def encode_map_png(arr: np.ndarray) -> bytes:
  """A grayscale PNG of integer values: 8-bit if they fit, else 16-bit."""
  try:
    return label_maps.encode_label_map(arr)
  except label_maps.LabelMapError as e:
    raise BuildError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class LabelFormat:
  """How label maps hold their classes.

  'ids': the pixel values are the raw ids (gray PNG, or RGB with equal
  channels; `label_maps` rules). 'rgb': 8-bit RGB maps in `palette`'s
  colours (index = class id), stored as the raw ids they stand for.
  """
  kind: str = 'ids'
  palette: Optional[np.ndarray] = None


LABEL_FORMATS = ('ids', 'rgb')


def make_label_format(kind: str, layout: layouts.Layout,
                      palette_file: Optional[str] = None) -> LabelFormat:
  """The LabelFormat of a build: --label_format and --palette checked."""
  if kind not in LABEL_FORMATS:
    raise ValueError(f'label_format={kind!r}: expected one of '
                     f'{", ".join(LABEL_FORMATS)}.')
  if kind == 'ids':
    if palette_file:
      raise ValueError('--palette is for --label_format rgb (gray maps hold '
                       'the ids themselves).')
    return LabelFormat()
  n = layout.label_nc + (1 if layout.contain_dontcare_label else 0)
  if not palette_file:
    return LabelFormat('rgb', label_maps.label_colormap(n))
  try:
    palette = label_maps.load_palette(palette_file)
  except label_maps.LabelMapError as e:
    raise ValueError(str(e)) from None
  if not layout.label_nc <= len(palette) <= n:
    want = (f'{layout.label_nc} or {n}' if n > layout.label_nc else str(n))
    raise ValueError(
        f'{palette_file}: {len(palette)} colours, but {layout.name} has '
        f'label_nc {layout.label_nc}' +
        (' plus a don\'t-care class' if n > layout.label_nc else '') +
        f': give {want} colours (index = class id).')
  if len(palette) < n:  # The don't-care class keeps the default colour.
    palette = np.concatenate([palette,
                              label_maps.label_colormap(n)[len(palette):]])
  return LabelFormat('rgb', palette)


def prepare_map(data: bytes, path: str, what: str,
                label_format: Optional[LabelFormat] = None,
                layout: Optional[layouts.Layout] = None
                ) -> Tuple[bytes, np.ndarray]:
  """Checks a label/instance map; returns (PNG bytes to store, raw values).

  PNGs follow `label_maps.read_label_map`'s rules (the same as synthesize
  and the server); colour maps (`label_format` 'rgb', label maps only)
  become the raw ids of `layout`. Other lossless formats (BMP, GIF, TIFF)
  must be single-channel.
  """
  colors = label_format is not None and label_format.kind == 'rgb'
  header = label_maps.png_header(data)
  if header is None:
    if colors:
      raise BuildError(f'{path}: --label_format rgb needs PNG colour maps.')
    arr = map_to_array(_open(data, path, what), path, what)
    return encode_map_png(arr), arr
  try:
    arr, by_palette = label_maps.read_label_map(
        data, palette=label_format.palette if colors else None,
        colors_only=colors, name=f'{what} map')
  except label_maps.LabelMapError as e:
    hint = (' (a colour label map: build with --label_format rgb, and '
            '--palette if its colours are not the data set\'s)'
            if 'no palette was given' in str(e) and what == 'label' else '')
    raise BuildError(f'{path}: {e}{hint}') from None
  if by_palette:
    arr = label_maps.class_ids_to_raw(
        arr, dataset=layout.name, label_nc=layout.label_nc,
        contain_dontcare_label=layout.contain_dontcare_label)
  elif header[3] == 0 and header[2] in (8, 16):
    return data, arr  # Grayscale 8/16-bit PNG: stored as it is.
  return encode_map_png(arr), arr


def bad_label_values(arr: np.ndarray, layout: layouts.Layout) -> List[int]:
  """The distinct values of a label map outside the layout's range."""
  if arr.dtype == np.uint8:
    present = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
  else:
    present = np.unique(arr)
  return layout.check_label_values(present)


def _check_size(path: str, what: str, arr: np.ndarray, height: int,
                width: int, image_path: str) -> None:
  if arr.shape[:2] != (height, width):
    raise BuildError(
        f'{path}: {what} size {arr.shape[1]}x{arr.shape[0]} (WxH) differs '
        f'from the image {image_path} ({width}x{height}).')


def load_example(example: layouts.Example, layout: layouts.Layout,
                 label_format: Optional[LabelFormat] = None) -> bytes:
  """Reads, checks and serializes one example (raises BuildError)."""
  image, height, width = prepare_image(_read(example.image_path),
                                       example.image_path)
  label, label_arr = prepare_map(_read(example.label_path),
                                 example.label_path, 'label', label_format,
                                 layout)
  _check_size(example.label_path, 'label', label_arr, height, width,
              example.image_path)
  bad = bad_label_values(label_arr, layout)
  if bad:
    allowed = f'0..{layout.max_raw_label}'
    if layout.allow_dontcare_value:
      allowed += f' and {layouts.DONTCARE_VALUE} (don\'t care)'
    shown = ', '.join(map(str, bad[:20])) + (' ...' if len(bad) > 20 else '')
    raise BuildError(
        f'{example.label_path}: class ids {shown} are outside the range of '
        f'{layout.name} (label_nc {layout.label_nc}: raw values {allowed}).')
  instance = b''
  if example.annotation_file:
    try:
      polygons = coco_instances.read_annotations(example.annotation_file)
      if example.name not in polygons:
        raise BuildError(f'{example.label_path}: image {example.name} is not '
                         f'in {example.annotation_file}, which its instance '
                         'map is made from.')
      instance = encode_map_png(coco_instances.instance_map(
          label_arr, polygons[example.name]))
    except coco_instances.AnnotationError as e:
      raise BuildError(str(e)) from None
  elif example.instance_path:
    instance, inst_arr = prepare_map(_read(example.instance_path),
                                     example.instance_path, 'instance')
    _check_size(example.instance_path, 'instance', inst_arr, height, width,
                example.image_path)
  return records.encode_example(image, label, instance, example.name, height,
                                width)


def _try(fn: Callable[[Any], bytes], item: Any) -> Tuple[Optional[bytes],
                                                         Optional[str]]:
  try:
    return fn(item), None
  except BuildError as e:
    return None, str(e)


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


# ---------------------------------------------------------------------------
# Writing shards and committing a build.


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


def _shard_starts(num_examples: int, num_shards: int) -> List[int]:
  return [i * num_examples // num_shards for i in range(num_shards + 1)]


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
  starts = _shard_starts(num_examples, num_shards)
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


# ---------------------------------------------------------------------------
# The public entry point.


def _source_bytes(example: layouts.Example) -> int:
  paths = [example.image_path, example.label_path, example.instance_path]
  return sum(tf.io.gfile.stat(p).length for p in paths if p)


def _train_order(examples: List[layouts.Example]) -> List[layouts.Example]:
  order = np.random.default_rng(_TRAIN_ORDER_SEED).permutation(len(examples))
  return [examples[i] for i in order]


def summary_line(summary: Dict[str, Dict[str, Any]]) -> str:
  parts = [f'{s}: {m["examples"]} examples, {m["shards"]} shards, '
           f'{m["bytes"]} bytes, {m["seconds"]:.1f} s'
           for s, m in summary.items()]
  total = (f'total {sum(m["examples"] for m in summary.values())} examples, '
           f'{sum(m["shards"] for m in summary.values())} shards, '
           f'{sum(m["bytes"] for m in summary.values())} bytes, '
           f'{sum(m["seconds"] for m in summary.values()):.1f} s')
  return '; '.join(parts + [total])


def build_dataset(dataset: str, manual_dir: Optional[str], data_dir: str, *,
                  label_dir: Optional[str] = None,
                  image_dir: Optional[str] = None,
                  instance_dir: Optional[str] = None,
                  label_nc: Optional[int] = None,
                  contain_dontcare_label: bool = False,
                  split: str = 'train',
                  num_shards: Optional[int] = None,
                  examples_per_shard: Optional[int] = None,
                  splits: Optional[Sequence[str]] = None,
                  num_workers: Optional[int] = None,
                  synthetic_num_train: int = 2000,
                  synthetic_num_val: int = 64,
                  synthetic_size: int = 96,
                  seed: int = 0,
                  label_format: str = 'ids',
                  palette: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
  """Builds the TFRecords of a data set into `data_dir`.

  Args:
    dataset: coco_stuff | ade20k | cityscapes | facades | custom | synthetic.
    manual_dir: the released files (layout in `layouts.py`); unused by
      custom and synthetic.
    data_dir: output folder.
    label_dir: custom: label maps.
    image_dir: custom: images.
    instance_dir: custom: instance maps (optional).
    label_nc: custom: number of classes.
    contain_dontcare_label: custom: whether 255 means don't-care.
    split: custom: the split name.
    num_shards: shards per split (default: ~128 MiB of source each).
    examples_per_shard: alternative to num_shards.
    splits: which splits to build (default: all of the data set's).
    num_workers: threads reading and checking files (default: CPU count).
    synthetic_num_train: synthetic: training scenes.
    synthetic_num_val: synthetic: validation scenes.
    synthetic_size: synthetic: scene height and width.
    seed: synthetic: generator seed.
    label_format: 'ids' (gray maps of the raw ids) or 'rgb' (colour maps in
      the class colours, stored as ids).
    palette: rgb: a JSON palette file (`label_maps.load_palette`); default:
      the data set's colours (those of dataset_info.json).

  Returns:
    Per split: {'examples', 'shards', 'bytes', 'seconds'}.

  Raises:
    layouts.PairingError: unpaired or missing files (before writing).
    BuildError: unusable files (nothing valid-looking is left behind).
  """
  start = time.time()
  if dataset == 'synthetic':
    if label_format != 'ids' or palette:
      raise ValueError('--label_format/--palette do not apply to the '
                       'synthetic set (it draws its own maps).')
    from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
    summary = synthetic.build_synthetic(
        data_dir, synthetic_num_train, synthetic_num_val, synthetic_size,
        seed=seed, num_shards=num_shards,
        examples_per_shard=examples_per_shard)
  else:
    if dataset == 'custom':
      layout = layouts.custom_layout(label_nc, contain_dontcare_label,
                                     bool(instance_dir), split)
    else:
      layout = layouts.get_layout(dataset)
    fmt = make_label_format(label_format, layout, palette)
    wanted = list(splits or layout.splits)
    examples = {s: layouts.find_examples(
        layout, s, manual_dir, image_dir=image_dir, label_dir=label_dir,
        instance_dir=instance_dir) for s in wanted}
    for f in sorted({e.annotation_file for exs in examples.values()
                     for e in exs if e.annotation_file}):
      logging.info('Reading the COCO annotations %s', f)
      try:
        coco_instances.read_annotations(f)  # Cached for the examples.
      except coco_instances.AnnotationError as e:
        raise BuildError(str(e)) from None
    workers = num_workers or os.cpu_count() or 1
    plan = {}
    for s, exs in examples.items():
      if s == 'train':
        exs = _train_order(exs)
      n = resolve_num_shards(
          len(exs), sum(ordered_map(_source_bytes, exs, workers)),
          num_shards, examples_per_shard)
      load = lambda ex, layout=layout: _try(  # pylint: disable=g-long-lambda
          lambda e: load_example(e, layout, fmt), ex)
      plan[s] = (len(exs), n,
                 lambda _, exs=exs, load=load: ordered_map(load, exs, workers))
    info = dataset_info_for(layout)
    if fmt.palette is not None:
      info = dataclasses.replace(info, colors=fmt.palette.tolist())
    summary = build_splits(data_dir, info, plan)
  logging.info('Built %s in %s (%.1f s): %s', dataset, data_dir,
               time.time() - start, summary_line(summary))
  return summary


# ---------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (idempotent)."""
  if 'dataset' in FLAGS:
    return
  flags.DEFINE_enum('dataset', None, list(layouts.DATASETS) + ['synthetic'],
                    'Which data set to build.')
  flags.DEFINE_string('manual_dir', None,
                      'Folder holding the released files.')
  flags.DEFINE_string('data_dir', None, 'Output folder.')
  flags.DEFINE_string('label_dir', None, 'custom: label maps.')
  flags.DEFINE_string('image_dir', None, 'custom: images.')
  flags.DEFINE_string('instance_dir', None, 'custom: instance maps.')
  flags.DEFINE_integer('label_nc', None, 'custom: number of classes.')
  flags.DEFINE_bool('contain_dontcare_label', False,
                    'custom: the value 255 means don\'t care.')
  flags.DEFINE_string('split', 'train', 'custom: the split name.')
  flags.DEFINE_list('splits', None, 'Splits to build (default: all).')
  flags.DEFINE_integer('num_shards', None, 'Shards per split.')
  flags.DEFINE_integer('examples_per_shard', None,
                       'Examples per shard (instead of --num_shards).')
  flags.DEFINE_integer('num_workers', None,
                       'Threads reading files (default: CPU count).')
  flags.DEFINE_integer('synthetic_num_train', 2000,
                       'synthetic: training scenes.')
  flags.DEFINE_integer('synthetic_num_val', 64,
                       'synthetic: validation scenes.')
  flags.DEFINE_integer('synthetic_size', 96, 'synthetic: scene size.')
  flags.DEFINE_integer('seed', 0, 'synthetic: generator seed.')
  flags.DEFINE_enum('label_format', 'ids', list(LABEL_FORMATS),
                    'ids: gray label maps of the raw ids; rgb: colour maps '
                    'in the class colours (the data set\'s, or --palette).')
  flags.DEFINE_string('palette', None,
                      'rgb: JSON palette, [[r, g, b], ...] per class id, or a '
                      'classes.json / dataset_info.json holding "colors".')
  flags.mark_flags_as_required(['dataset', 'data_dir'])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    summary = build_dataset(
        FLAGS.dataset, FLAGS.manual_dir, FLAGS.data_dir,
        label_dir=FLAGS.label_dir, image_dir=FLAGS.image_dir,
        instance_dir=FLAGS.instance_dir, label_nc=FLAGS.label_nc,
        contain_dontcare_label=FLAGS.contain_dontcare_label,
        split=FLAGS.split, num_shards=FLAGS.num_shards,
        examples_per_shard=FLAGS.examples_per_shard, splits=FLAGS.splits,
        num_workers=FLAGS.num_workers,
        synthetic_num_train=FLAGS.synthetic_num_train,
        synthetic_num_val=FLAGS.synthetic_num_val,
        synthetic_size=FLAGS.synthetic_size, seed=FLAGS.seed,
        label_format=FLAGS.label_format, palette=FLAGS.palette)
  except (BuildError, ValueError) as e:
    logging.error('%s', e)
    sys.exit(f'Build failed: {e}')
  print(f'Built {FLAGS.dataset} in {FLAGS.data_dir}: {summary_line(summary)}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
