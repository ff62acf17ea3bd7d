"""Input pipeline: tf.data over the TFRecords of `data_pipelines.records`.

Reads a built data set (see `data_pipelines/records.py` for the format),
decodes image, label and instance maps, applies the reference SPADE
preprocessing (resize / crop / flip, PIL-like resampling) and batches.

Every batch is a dict of numpy-convertible tensors:

  image           float32 (B, H, W, 3) in [-1, 1]
  label           int32   (B, H, W)    model class ids (don't-care = label_nc)
  instance        int32   (B, H, W)    instance ids (zeros when
                                       config.no_instance); the generator
                                       takes their edges, computed on the
                                       device (`generation.instance_edges`)
and, with `with_metadata` (the default for evaluation):
  file_name       bytes   (B,)         the example's base name
  index           int64   (B,)         its position in the global order
  valid           bool    (B,)         False for the padding that completes
                                       the last evaluation batch

Which records a process reads, and in which order, is its read plan
(`data_order`, where the scheme is explained): with P processes each reads
only its own share of every epoch (about 1/P of the split's bytes plus at
most one shard), shuffled in windows that never cross a shard, so that
restarting at any step reads at most one shard's worth of bytes before the
first batch. The order is a function of (config.seed, P, process, step);
random crop offsets and flips come from a stateless RNG keyed by the
record's `index` (its position in the epoch's global order). Evaluation
reads the shards in their stored order, each process a contiguous part,
every record valid in exactly one process. `config.data_order_processes`
reads in the order of another number of processes (each process then reads
several consecutive shares and concatenates their batches): one process can
reproduce a multi-process run's batches, and a run can resume with fewer
processes in its old order.

Records are checked as they are read, and a bad one stops reading with an
error naming its shard (and record), or with `config.skip_bad_records` is
skipped, logged and counted (`BadRecordCounter`): an undecodable image or
map, label ids outside the set's range, a shard whose last record is cut off,
shards holding another number of records than dataset_info.json says (only
the records' 12-byte frame headers are read for that, at start). A record
frame whose checksum fails (TensorFlow's DataLossError, which names no file)
is re-raised by `numpy_batches` naming the shard.

Preprocessing follows the reference (`data/base_dataset.py`) with these
documented choices:
* `none` keeps the native size (the reference rounds to multiples of 32 with a
  bicubic resize; we keep pixels exact, the model checks its own sizes).
* `fixed` resizes to width crop_size, height round(crop_size / aspect_ratio)
  as the reference does (the generator's size depends on crop_size).
* Crops are crop_size wide and round(crop_size / aspect_ratio) high (square at
  aspect_ratio 1, as in the reference); random offsets only when training,
  centred otherwise. A resized image smaller than the crop is padded with
  zeros at the bottom/right, as PIL's crop does in the reference.
* `scale_shortside` scales the short side to load_size (the reference keeps
  the short side unchanged by mistake and only rescales the long side).
"""
import dataclasses
import re
import threading
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple
import weakref

from absl import logging
import jax
import ml_collections
import tensorflow as tf

from data_pipelines import records
from spade_jax import data_order
from spade_jax import label_maps

PREPROCESS_MODES = ('resize_and_crop', 'crop', 'scale_width',
                    'scale_width_and_crop', 'scale_shortside',
                    'scale_shortside_and_crop', 'fixed', 'none')
_CROP_MODES = ('resize_and_crop', 'crop', 'scale_width_and_crop',
               'scale_shortside_and_crop')
# The dataset functions below use no Python control flow on tensors; skipping
# AutoGraph's source conversion makes building a pipeline several times faster.
_no_autograph = tf.autograph.experimental.do_not_convert
_READ_BUFFER = 1 << 20
# Keys of the metadata fields added with `with_metadata`.
METADATA_KEYS = ('file_name', 'index', 'valid')


# ---------------------------------------------------------------------------
# Bad-record bookkeeping.


class BadRecordCounter:
  """Thread-safe count of the corrupt records skipped (skip_bad_records)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._count = 0
    self.file_names = []

  def add(self, file_name: str, count: int = 1) -> None:
    """Counts `count` skipped records; `file_name` names them."""
    with self._lock:
      self._count += count
      self.file_names.append(file_name)

  @property
  def count(self) -> int:
    with self._lock:
      return self._count


# Used when `create_split` is given no counter of its own.
BAD_RECORDS = BadRecordCounter()


# ---------------------------------------------------------------------------
# Static (config-derived) preprocessing parameters.


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How examples are resized, cropped and flipped."""
  mode: str
  load_size: int
  crop_size: int
  aspect_ratio: float = 1.0
  random_crop: bool = False
  random_flip: bool = False

  def __post_init__(self):
    if self.mode not in PREPROCESS_MODES:
      raise ValueError(f'Unknown preprocess_mode {self.mode!r}; expected one '
                       f'of {", ".join(PREPROCESS_MODES)}.')
    if self.load_size <= 0 or self.crop_size <= 0 or self.aspect_ratio <= 0:
      raise ValueError('load_size, crop_size and aspect_ratio must be '
                       f'positive, got {self.load_size}, {self.crop_size}, '
                       f'{self.aspect_ratio}.')

  @property
  def crop_shape(self) -> Tuple[int, int]:
    """(height, width) of crops and of `fixed` outputs."""
    return (int(round(self.crop_size / self.aspect_ratio)), self.crop_size)

  @property
  def output_shape(self) -> Optional[Tuple[int, int]]:
    """(height, width) of every output, or None if it depends on the input."""
    if self.mode in _CROP_MODES or self.mode == 'fixed':
      return self.crop_shape
    return None


def preprocess_from_config(config: ml_collections.ConfigDict, *,
                           train: bool) -> Preprocess:
  return Preprocess(
      mode=config.preprocess_mode,
      load_size=int(config.load_size),
      crop_size=int(config.crop_size),
      aspect_ratio=float(config.aspect_ratio),
      random_crop=train,
      random_flip=train and not config.no_flip)


# ---------------------------------------------------------------------------
# Decoding.


def decode_image(data: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/BMP/GIF bytes to uint8 RGB (H, W, 3), like PIL's."""
  # INTEGER_ACCURATE is libjpeg's ISLOW DCT, the one PIL uses.
  return tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3,
                                dct_method='INTEGER_ACCURATE'),
      lambda: tf.ensure_shape(
          tf.io.decode_image(data, channels=3, dtype=tf.uint8,
                             expand_animations=False), [None, None, 3]))


def decode_map_png(data: tf.Tensor) -> tf.Tensor:
  """Decodes a grayscale 8- or 16-bit PNG to its raw values, int32 (H, W)."""
  header = tf.io.decode_raw(tf.strings.substr(data, 0, 26), tf.uint8)
  signature = tf.constant([137, 80, 78, 71, 13, 10, 26, 10], tf.uint8)
  is_png = tf.logical_and(
      tf.equal(tf.size(header), 26),
      tf.reduce_all(tf.equal(header[:8], signature)))
  checks = [
      tf.debugging.Assert(is_png, ['not a PNG file']),
      # Colour type 0: grayscale. Palette or RGB label maps are rejected (TF
      # would convert them to colours instead of returning the indices).
      tf.debugging.Assert(tf.equal(header[25], 0),
                          ['label/instance PNG is not single-channel gray']),
  ]
  with tf.control_dependencies(checks):
    bit_depth = tf.identity(header[24])
  decoded = tf.cond(
      tf.equal(bit_depth, 16),
      lambda: tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint16),
                      tf.int32),
      lambda: tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint8),
                      tf.int32))
  return decoded[..., 0]


def map_labels(raw: tf.Tensor, *, dataset: str, label_nc: int,
               contain_dontcare_label: bool) -> tf.Tensor:
  """Raw label values -> int32 model class ids, in the graph.

  `label_maps.dataset_to_class_ids` (ADE20K shift, don't-care) run on
  tensors.
  """
  return label_maps.dataset_to_class_ids(
      tf.cast(raw, tf.int32), dataset=dataset, label_nc=label_nc,
      contain_dontcare_label=contain_dontcare_label, xp=tf)


# ---------------------------------------------------------------------------
# Geometry.


def resized_shape(mode: str, height: tf.Tensor, width: tf.Tensor,
                  load_size: int, crop_shape: Tuple[int, int]
                  ) -> Tuple[tf.Tensor, tf.Tensor]:
  """(height, width) after the resize step of `mode` (before any crop)."""
  h = tf.cast(height, tf.int64)
  w = tf.cast(width, tf.int64)
  load = tf.constant(load_size, tf.int64)
  if mode == 'resize_and_crop':
    return load, load
  if mode in ('scale_width', 'scale_width_and_crop'):
    # int(load * h / w) in the reference; exact in integers.
    return (load * h) // w, load
  if mode in ('scale_shortside', 'scale_shortside_and_crop'):
    short = tf.minimum(h, w)
    long_side = (load * tf.maximum(h, w)) // short
    width_is_shorter = w <= h
    return (tf.where(width_is_shorter, long_side, load),
            tf.where(width_is_shorter, load, long_side))
  if mode == 'fixed':
    return (tf.constant(crop_shape[0], tf.int64),
            tf.constant(crop_shape[1], tf.int64))
  return h, w  # crop, none


def _bicubic_axis(image: tf.Tensor, out_size: tf.Tensor, axis: int
                  ) -> tf.Tensor:
  """One PIL BICUBIC pass along `axis` (0 rows, 1 cols), rounded to uint8."""
  shape = tf.shape(image, out_type=tf.int64)
  if axis == 0:
    target = tf.stack([out_size, shape[1]])
  else:
    target = tf.stack([shape[0], out_size])

  def resize():
    x = tf.image.resize(tf.cast(image, tf.float32), tf.cast(target, tf.int32),
                        method='bicubic', antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)

  return tf.cond(tf.equal(shape[axis], out_size), lambda: image, resize)


def resize_bicubic(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor
                   ) -> tf.Tensor:
  """Resizes uint8 (H, W, C) like PIL's BICUBIC: antialiased, keys a=-0.5.

  PIL filters horizontally, rounds to uint8, then vertically; doing the same
  matches it to +-1 level (rare) instead of a few levels.
  """
  image = _bicubic_axis(image, tf.cast(width, tf.int64), axis=1)
  return _bicubic_axis(image, tf.cast(height, tf.int64), axis=0)


def nearest_indices(in_size: tf.Tensor, out_size: tf.Tensor) -> tf.Tensor:
  """`label_maps.pil_nearest_indices` on tensors (sizes known in the graph)."""
  in_size = tf.cast(in_size, tf.int64)
  out_size = tf.cast(out_size, tf.int64)
  step = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
  steps = tf.concat([[step * 0.5], tf.fill([out_size - 1], step)], axis=0)
  index = tf.cast(tf.math.cumsum(steps), tf.int64)
  return tf.minimum(index, in_size - 1)


def resize_nearest(x: tf.Tensor, height: tf.Tensor, width: tf.Tensor
                   ) -> tf.Tensor:
  """Resizes a (H, W) map like PIL NEAREST (pixel centres), no interpolation."""
  shape = tf.shape(x, out_type=tf.int64)
  rows = nearest_indices(shape[0], height)
  cols = nearest_indices(shape[1], width)
  return tf.gather(tf.gather(x, rows, axis=0), cols, axis=1)


def crop_offsets(height: tf.Tensor, width: tf.Tensor,
                 crop_shape: Tuple[int, int], random: bool,
                 rng_seed: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """Top-left corner of the crop: uniform over valid offsets, or centred."""
  max_y = tf.maximum(tf.cast(height, tf.int64) - crop_shape[0], 0)
  max_x = tf.maximum(tf.cast(width, tf.int64) - crop_shape[1], 0)
  if not random:
    return max_y // 2, max_x // 2
  u = tf.random.stateless_uniform([2], seed=rng_seed, dtype=tf.float64)
  y = tf.minimum(tf.cast(u[0] * tf.cast(max_y + 1, tf.float64), tf.int64),
                 max_y)
  x = tf.minimum(tf.cast(u[1] * tf.cast(max_x + 1, tf.float64), tf.int64),
                 max_x)
  return y, x


def crop_or_pad(x: tf.Tensor, top: tf.Tensor, left: tf.Tensor,
                crop_shape: Tuple[int, int]) -> tf.Tensor:
  """Crops (H, W, ...) at (top, left); pads zeros bottom/right if too small."""
  shape = tf.shape(x, out_type=tf.int64)
  pad_h = tf.maximum(top + crop_shape[0] - shape[0], 0)
  pad_w = tf.maximum(left + crop_shape[1] - shape[1], 0)
  paddings = tf.concat([[[0, pad_h], [0, pad_w]],
                        tf.zeros([tf.rank(x) - 2, 2], tf.int64)], axis=0)
  x = tf.pad(x, paddings)
  return x[top:top + crop_shape[0], left:left + crop_shape[1]]


def transform(image: tf.Tensor, maps: Dict[str, tf.Tensor], pre: Preprocess,
              rng_seed: tf.Tensor) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
  """Resizes, crops and flips an image and its label/instance maps alike.

  Args:
    image: uint8 (H, W, 3).
    maps: name -> integer (H, W) maps of the same size (label, instance).
    pre: preprocessing parameters.
    rng_seed: int64 [2] stateless seed for the crop offsets and flip.

  Returns:
    (image uint8, maps) after resizing (bicubic / nearest), cropping, flipping.
  """
  shape = tf.shape(image, out_type=tf.int64)
  new_h, new_w = resized_shape(pre.mode, shape[0], shape[1], pre.load_size,
                               pre.crop_shape)
  if pre.mode != 'none' and pre.mode != 'crop':
    image = resize_bicubic(image, new_h, new_w)
    maps = {k: resize_nearest(v, new_h, new_w) for k, v in maps.items()}
  if pre.mode in _CROP_MODES:
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(rng_seed, 2))
    top, left = crop_offsets(new_h, new_w, pre.crop_shape, pre.random_crop,
                             crop_seed)
    image = crop_or_pad(image, top, left, pre.crop_shape)
    maps = {k: crop_or_pad(v, top, left, pre.crop_shape)
            for k, v in maps.items()}
  else:
    flip_seed = tf.random.experimental.stateless_split(rng_seed, 2)[1]
  if pre.random_flip:
    flip = tf.random.stateless_uniform([], seed=flip_seed) < 0.5
    image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
    maps = {k: tf.cond(flip, lambda v=v: v[:, ::-1], lambda v=v: v)
            for k, v in maps.items()}
  out_shape = pre.output_shape
  if out_shape is not None:
    image = tf.ensure_shape(image, out_shape + (3,))
    maps = {k: tf.ensure_shape(v, out_shape) for k, v in maps.items()}
  return image, maps


def normalize_image(image: tf.Tensor) -> tf.Tensor:
  """uint8 -> float32 in [-1, 1], as ToTensor + Normalize(0.5, 0.5)."""
  return (tf.cast(image, tf.float32) / 255.0 - 0.5) / 0.5


# ---------------------------------------------------------------------------
# Per-example processing with corrupt-record handling.


@dataclasses.dataclass(frozen=True)
class _ExampleSpec:
  """Everything the per-example function needs (static)."""
  pre: Preprocess
  dataset: str
  label_nc: int
  contain_dontcare_label: bool
  use_instance: bool
  seed: int
  skip_bad_records: bool

  @property
  def num_classes(self) -> int:
    """Model class ids: 0..label_nc-1, then label_nc for don't-care."""
    return self.label_nc + int(self.contain_dontcare_label)

  def label_range(self) -> str:
    """The raw label values this set allows, in words."""
    if self.dataset == 'ade20k':
      text = f'0..{self.label_nc} (ade20k, label_nc={self.label_nc})'
    else:
      text = f'0..{self.label_nc - 1} (label_nc={self.label_nc})'
    if self.contain_dontcare_label:
      text += f" and {label_maps.DONT_CARE} (don't-care)"
    return text


def _bad_label_id(raw: tf.Tensor, spec: _ExampleSpec) -> tf.Tensor:
  """The largest raw label value outside the set's range, or -1 (int32)."""
  label = map_labels(raw, dataset=spec.dataset, label_nc=spec.label_nc,
                     contain_dontcare_label=spec.contain_dontcare_label)
  bad = tf.logical_or(label < 0, label >= spec.num_classes)
  return tf.reduce_max(tf.where(bad, tf.cast(raw, tf.int32), -1))


def _decode_fields(fields: Dict[str, tf.Tensor], spec: _ExampleSpec
                   ) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
  """Decodes image and maps; asserts they have the same size."""
  image = decode_image(fields['image'])
  maps = {'label': decode_map_png(fields['label'])}
  if spec.use_instance:
    maps['instance'] = decode_map_png(fields['instance'])
  size = tf.shape(image)[:2]
  checks = [tf.debugging.Assert(tf.reduce_all(tf.equal(tf.shape(v), size)),
                                [f'{k} size differs from the image size'])
            for k, v in maps.items()]
  # Ids outside the set's classes would index past the one-hot encoding.
  checks.append(tf.debugging.Assert(
      _bad_label_id(maps['label'], spec) < 0,
      [f'label ids outside {spec.label_range()}']))
  with tf.control_dependencies(checks):
    image = tf.identity(image)
  return image, maps


def _process(fields: Dict[str, tf.Tensor], spec: _ExampleSpec
             ) -> Dict[str, tf.Tensor]:
  """Decodes and preprocesses one example (raises on undecodable data)."""
  image, maps = _decode_fields(fields, spec)
  rng_seed = tf.stack([tf.constant(spec.seed, tf.int64), fields['index']])
  image, maps = transform(image, maps, spec.pre, rng_seed)
  label = map_labels(maps['label'], dataset=spec.dataset,
                     label_nc=spec.label_nc,
                     contain_dontcare_label=spec.contain_dontcare_label)
  if spec.use_instance:
    instance = maps['instance']
  else:
    instance = tf.zeros(tf.shape(label), tf.int32)
  return {
      'image': normalize_image(image),
      'label': label,
      'instance': instance,
      'file_name': fields['file_name'],
      'index': fields['index'],
      'valid': fields['valid'],
      'decoded': tf.constant(True),
  }


def _decodes(data: tf.Tensor, decode_fn) -> tf.Tensor:
  """True if decode_fn(data) runs without error (used only on failures)."""
  ds = tf.data.Dataset.from_tensors(data).map(_no_autograph(decode_fn))
  ds = ds.ignore_errors()
  return ds.reduce(tf.constant(False),
                   _no_autograph(lambda ok, _: tf.constant(True)))


def _describe_failure(fields: Dict[str, tf.Tensor], spec: _ExampleSpec
                      ) -> tf.Tensor:
  """A message saying which field of a record could not be decoded."""
  parts = [tf.where(_decodes(fields['image'], decode_image), '',
                    'image undecodable; ')]
  parts.append(tf.where(_decodes(fields['label'], decode_map_png), '',
                        'label undecodable or not a gray PNG; '))
  if spec.use_instance:
    parts.append(tf.where(_decodes(fields['instance'], decode_map_png), '',
                          'instance undecodable or not a gray PNG; '))
  bad_id = tf.data.Dataset.from_tensors(fields['label']).map(
      _no_autograph(lambda d: _bad_label_id(decode_map_png(d), spec))
  ).ignore_errors().reduce(tf.constant(-1),
                           _no_autograph(lambda _, x: x))
  parts.append(tf.where(bad_id >= 0, tf.strings.join([
      'label id ', tf.strings.as_string(bad_id), ' outside the set\'s '
      f'range {spec.label_range()}; ']), ''))
  reason = tf.strings.join(parts)
  return tf.where(tf.equal(reason, ''),
                  'image, label and instance sizes differ', reason)


def _log_skipped(counter: BadRecordCounter):
  """A py_function body that logs and counts one skipped record."""

  def log(shard, file_name, index, reason):
    name = file_name.numpy().decode('utf-8', 'replace')
    counter.add(name)
    logging.warning('Skipping corrupt record %r (stream position %d) in %s: '
                    '%s (%d skipped so far).', name, int(index.numpy()),
                    shard.numpy().decode('utf-8', 'replace'),
                    reason.numpy().decode('utf-8', 'replace'), counter.count)
    return True

  return log


def _placeholder(fields: Dict[str, tf.Tensor], spec: _ExampleSpec,
                 counter: BadRecordCounter) -> Dict[str, tf.Tensor]:
  """Runs on a record that failed: raises a clear error, or logs and counts."""
  reason = _describe_failure(fields, spec)
  message = tf.strings.join([
      'Corrupt record ', fields['file_name'], ' in shard ', fields['shard'],
      ' (stream position ', tf.strings.as_string(fields['index']), '): ',
      reason, '. Set config.skip_bad_records=True to skip such records.'])
  if spec.skip_bad_records:
    logged = tf.py_function(_log_skipped(counter),
                            [fields['shard'], fields['file_name'],
                             fields['index'], reason], Tout=tf.bool)
    deps = [logged]
  else:
    deps = [tf.debugging.Assert(False, [message], summarize=1)]
  with tf.control_dependencies(deps):
    shape = spec.pre.output_shape or (1, 1)
    return {
        'image': tf.zeros(shape + (3,), tf.float32),
        'label': tf.zeros(shape, tf.int32),
        'instance': tf.zeros(shape, tf.int32),
        'file_name': tf.identity(fields['file_name']),
        'index': tf.identity(fields['index']),
        'valid': tf.identity(fields['valid']),
        'decoded': tf.constant(False),
    }


def _parse(shard: tf.Tensor, serialized: tf.Tensor, index: tf.Tensor,
           valid: tf.Tensor) -> Dict[str, tf.Tensor]:
  fields = records.parse_example(serialized)
  fields.update(shard=shard, index=index, valid=valid)
  return fields


def _make_example_fn(spec: _ExampleSpec, counter: BadRecordCounter):
  """The per-record map: parse, then decode or fall back on failure."""

  def example_fn(index, record):
    shard, serialized, valid = record
    fields = _parse(shard, serialized, index, valid)
    checks = []
    if spec.use_instance:
      checks.append(tf.debugging.Assert(
          tf.strings.length(fields['instance']) > 0,
          ['Record', fields['file_name'], 'in shard', fields['shard'],
           'has no instance map but config.no_instance is False; set '
           'config.no_instance=True for data without instance maps.']))
    with tf.control_dependencies(checks):
      fields['index'] = tf.identity(fields['index'])
    single = tf.data.Dataset.from_tensors(fields)
    good = single.map(_no_autograph(lambda f: _process(f, spec)))
    good = good.ignore_errors()
    bad = single.map(_no_autograph(lambda f: _placeholder(f, spec, counter)))
    return good.concatenate(bad).take(1).get_single_element()

  return _no_autograph(example_fn)


# ---------------------------------------------------------------------------
# Record streams.


def _window_permutation(key: tf.Tensor):
  """(window number, records) -> the records permuted by (key, number)."""
  def permute(number, window):
    seed = tf.stack([key, number])
    order = tf.argsort(tf.random.stateless_uniform(tf.shape(window)[:1],
                                                   seed=seed))
    return tf.gather(window, order)
  return _no_autograph(permute)


def _record_stream(paths: Tuple[str, ...], plan: data_order.Plan, start: int,
                   num_epochs: Optional[int]) -> tf.data.Dataset:
  """(index, (shard, record, valid)) of `plan` from stream position `start`.

  Only the pieces the plan names are read, one after another; records before
  `start` are skipped as bytes (never decoded), whole pieces not read at all.
  """
  _, drop = plan.start(start, num_epochs)
  window = max(1, plan.window) if plan.train else 1

  def descriptors():  # A fresh plan at every iteration of the dataset.
    pieces, _ = plan.start(start, num_epochs)
    for p in pieces:
      yield p.shard, p.skip, p.take, p.valid, p.key, p.first_window

  scalar = tf.TensorSpec([], tf.int64)
  ds = tf.data.Dataset.from_generator(
      descriptors, output_signature=(scalar, scalar, scalar,
                                     tf.TensorSpec([], tf.bool), scalar,
                                     scalar))
  shard_paths = tf.constant(paths)

  def read(shard, skip, take, valid, key, first_window):
    path = shard_paths[shard]
    records = tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER).skip(
        skip).take(take)
    if window > 1:
      numbers = tf.data.Dataset.range(first_window, first_window + 2**40)
      records = tf.data.Dataset.zip((numbers, records.batch(window))).map(
          _window_permutation(key)).unbatch()
    return records.map(_no_autograph(lambda r: (path, r, valid)))

  ds = ds.flat_map(_no_autograph(read)).skip(drop)
  size, span, lo = plan.epoch_size, plan.span, plan.lo

  def with_index(position, record):
    return (position // size) * span + lo + position % size, record

  return ds.enumerate(start=start).map(_no_autograph(with_index))


# ---------------------------------------------------------------------------
# Public API.


def _share_batches(paths: Tuple[str, ...], plan: data_order.Plan,
                   spec: _ExampleSpec, counter: BadRecordCounter,
                   keep: Sequence[str], start_step: int,
                   num_epochs: Optional[int]) -> tf.data.Dataset:
  """The decoded, batched examples of one share's plan."""
  ds = _record_stream(paths, plan, start_step * plan.local_batch, num_epochs)
  ds = ds.map(_make_example_fn(spec, counter),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if spec.skip_bad_records:
    ds = ds.filter(_no_autograph(lambda ex: ex['decoded']))
  ds = ds.map(_no_autograph(lambda ex: {k: ex[k] for k in keep}))
  return ds.batch(plan.local_batch, drop_remainder=plan.train)


def _check_config(config: ml_collections.ConfigDict,
                  info: records.DatasetInfo) -> None:
  """Fails early when the config does not fit the built data set."""
  if config.label_nc != info.label_nc:
    raise ValueError(
        f'config.label_nc={config.label_nc} but the data set '
        f'({info.dataset}) has label_nc={info.label_nc}.')
  if bool(config.contain_dontcare_label) != bool(info.contain_dontcare_label):
    raise ValueError(
        f'config.contain_dontcare_label={config.contain_dontcare_label} but '
        f'the data set ({info.dataset}) has '
        f'contain_dontcare_label={info.contain_dontcare_label}.')
  if not config.no_instance and not info.has_instance:
    raise ValueError(
        f'The {info.dataset} data set has no instance maps but '
        'config.no_instance is False; set config.no_instance=True.')
  if config.dataset and config.dataset != info.dataset:
    logging.warning('config.dataset=%r but the data in this folder is %r; '
                    'using the data set\'s label conventions.',
                    config.dataset, info.dataset)


def split_size(info: records.DatasetInfo, split: str) -> Tuple[int, int]:
  """(num_examples, num_shards) of a split, with a clear error if absent."""
  if split not in info.splits:
    raise ValueError(f'Split {split!r} not in the data set; it has '
                     f'{sorted(info.splits)}.')
  entry = info.splits[split]
  return int(entry['num_examples']), int(entry['num_shards'])


def create_split(config: ml_collections.ConfigDict, data_dir: str,
                 split: str, *, train: bool, batch_size: Optional[int] = None,
                 start_step: int = 0, process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 num_epochs: Optional[int] = None,
                 with_metadata: Optional[bool] = None,
                 bad_records: Optional[BadRecordCounter] = None
                 ) -> tf.data.Dataset:
  """Creates the batched dataset of this process's share of a split.

  Args:
    config: reads preprocess_mode, load_size, crop_size, aspect_ratio,
      no_flip, shuffle_buffer_size, prefetch, skip_bad_records, batch_size,
      seed, label_nc, contain_dontcare_label, no_instance, dataset,
      data_order_processes (read the shares of that many processes, this
      process's consecutive ones, each batch their batches concatenated).
    data_dir: folder of a built data set (dataset_info.json + shards).
    split: split name, e.g. 'train'.
    train: shuffle, random crops and flips, and drop an incomplete last batch;
      otherwise one ordered pass, centred crops, the last batch completed with
      padding marked valid=False.
    batch_size: GLOBAL batch size (default config.batch_size).
    start_step: number of global batches already consumed; the stream resumes
      exactly where an uninterrupted run would be.
    process_index: this process (default jax.process_index()).
    process_count: number of processes (default jax.process_count()).
    num_epochs: epochs to read (default: forever when training, 1 otherwise).
    with_metadata: add file_name, index and valid (default: not train).
    bad_records: counter of skipped corrupt records (default BAD_RECORDS).

  Returns:
    A tf.data.Dataset of dicts with per-process batches of
    batch_size // process_count examples (see the module docstring).
  """
  info = records.DatasetInfo.load(data_dir, config.dataset or None)
  _check_config(config, info)
  num_examples, num_shards = split_size(info, split)
  if num_examples <= 0:
    raise ValueError(f'Split {split!r} of {data_dir} is empty.')
  batch_size = int(config.batch_size if batch_size is None else batch_size)
  process_index = (jax.process_index() if process_index is None
                   else process_index)
  process_count = (jax.process_count() if process_count is None
                   else process_count)
  if batch_size % process_count:
    raise ValueError(f'Global batch size {batch_size} is not divisible by '
                     f'the number of processes {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in '
                     f'[0, {process_count}).')
  order_count = int(config.data_order_processes) or process_count
  if order_count % process_count or batch_size % order_count:
    raise ValueError(
        f'config.data_order_processes={config.data_order_processes}: the '
        f'order of {order_count} processes needs a multiple of the '
        f'{process_count} processes running and a global batch size '
        f'({batch_size}) divisible by it; set it to 0 (this run\'s order) or '
        'to the process count of the run whose order you want.')
  shares_per_process = order_count // process_count
  share_batch = batch_size // order_count
  pre = preprocess_from_config(config, train=train)
  spec = _ExampleSpec(
      pre=pre, dataset=info.dataset, label_nc=int(info.label_nc),
      contain_dontcare_label=bool(info.contain_dontcare_label),
      use_instance=not config.no_instance, seed=int(config.seed),
      skip_bad_records=bool(config.skip_bad_records))
  paths = tuple(info.shard_files(split))
  missing = [p for p in paths if not tf.io.gfile.exists(p)]
  if missing:
    raise FileNotFoundError(f'Missing shards of split {split!r}: {missing}')
  counter = bad_records or BAD_RECORDS
  counts = _check_shards(paths, num_examples, split, data_dir,
                         spec.skip_bad_records, counter)
  num_examples = sum(counts)
  if num_examples <= 0:
    raise ValueError(f'Split {split!r} of {data_dir} holds no readable '
                     'record.')

  keep = ['image', 'label', 'instance']
  if with_metadata if with_metadata is not None else not train:
    keep += list(METADATA_KEYS)
  epochs = num_epochs if num_epochs is not None or train else 1
  first = process_index * shares_per_process
  shares = []
  for share in range(first, first + shares_per_process):
    plan = data_order.Plan(
        counts=tuple(counts), train=train, seed=int(config.seed),
        process_index=share, process_count=order_count,
        local_batch=share_batch, window=int(config.shuffle_buffer_size))
    shares.append(_share_batches(paths, plan, spec, counter, keep,
                                 int(start_step), epochs))
  ds = shares[0] if len(shares) == 1 else tf.data.Dataset.zip(
      tuple(shares)).map(_no_autograph(lambda *parts: {
          k: tf.concat([p[k] for p in parts], 0) for k in keep}))
  ds = ds.prefetch(int(config.prefetch) if config.prefetch > 0
                   else tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  _SHARDS_READ[ds] = paths
  return ds


def numpy_batches(dataset: tf.data.Dataset) -> Iterator[Dict[str, Any]]:
  """Yields the batches of a dataset from `create_split` as numpy arrays.

  A damaged record frame (TensorFlow's DataLossError, which names no file)
  is re-raised as a DataLossError that names the shard holding it.
  """
  iterator = dataset.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.DataLossError as e:
      raise _naming_the_shard(e, _SHARDS_READ.get(dataset, ())) from None
    yield batch


# The shards each dataset of `create_split` reads (for numpy_batches' errors).
_SHARDS_READ = weakref.WeakKeyDictionary()


def _check_shards(paths: Sequence[str], num_examples: int, split: str,
                  data_dir: str, skip_bad_records: bool,
                  counter: BadRecordCounter) -> Tuple[int, ...]:
  """Complete records per shard, checked against dataset_info.json.

  Only the record frames' headers are read (`records.scan_shard`). A shard
  whose last record is cut off, or shards holding another number of records
  than dataset_info.json says, are errors naming the shards; with
  skip_bad_records they are logged, the cut-off and missing records counted
  as skipped, and what is there is read.
  """
  scans = [records.scan_shard(p) for p in paths]
  how = ('Rebuild the data set (python -m data_pipelines.build) or restore '
         'the file from a copy, or set config.skip_bad_records=True to read '
         'the complete records.')
  for path, scan in zip(paths, scans):
    if scan.truncated_at is None:
      continue
    message = (f'Shard {path} ends in a cut-off record (at byte '
               f'{scan.truncated_at} of {scan.size}, after '
               f'{scan.num_records} complete records): the file is '
               'truncated.')
    if not skip_bad_records:
      raise tf.errors.DataLossError(None, None, f'{message} {how}')
    logging.warning('%s Skipping the cut-off record (skip_bad_records).',
                    message)
    counter.add(f'{path}: cut-off record at byte {scan.truncated_at}')
  counts = tuple(scan.num_records for scan in scans)
  if sum(counts) != num_examples:
    built = records.shard_sizes(num_examples, len(paths))
    detail = ', '.join(f'{p} holds {c}' + (f' (a build writes {b})'
                                           if c != b else '')
                       for p, c, b in zip(paths, counts, built))
    message = (f'Split {split!r} of {data_dir}: {records.INFO_FILE} says '
               f'{num_examples} records, its shards hold {sum(counts)}: '
               f'{detail}.')
    if not skip_bad_records:
      raise ValueError(
          f'{message} The data set is incomplete or was changed after it was '
          'built: rebuild it (python -m data_pipelines.build), or set '
          'config.skip_bad_records=True to read the records that are there.')
    logging.warning('%s Reading the %d records there (skip_bad_records).',
                    message, sum(counts))
    cut_off = sum(scan.truncated_at is not None for scan in scans)
    missing = num_examples - sum(counts) - cut_off  # Cut-offs are counted.
    if missing > 0:
      counter.add(f'{split}: {missing} missing record(s)', missing)
  return counts


def _damaged_shard(paths: Sequence[str], offset: Optional[int]
                   ) -> Optional[str]:
  """The first shard whose records do not all read (CRCs checked)."""
  def may_hold(path):  # TF names a record's start or its data's (+12).
    starts = set(records.scan_shard(path).offsets)
    return offset is None or offset in starts or offset - 12 in starts
  candidates = [p for p in paths if may_hold(p)] or list(paths)
  for path in candidates:
    try:
      for _ in tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER):
        pass
    except tf.errors.DataLossError:
      return path
  return None


def _naming_the_shard(error: tf.errors.DataLossError,
                      paths: Sequence[str]) -> tf.errors.DataLossError:
  """The same error, its message naming the damaged shard when found."""
  text = error.message or str(error)
  found = re.search(r'(corrupted|truncated) record at (\d+)', text)
  offset = int(found.group(2)) if found else None
  path = _damaged_shard(paths, offset) if paths else None
  where = f'shard {path}' if path else 'one of the shards ' + ', '.join(paths)
  what = found.group(0) if found else text.strip().splitlines()[0]
  return tf.errors.DataLossError(
      error.node_def, error.op,
      f'Damaged record frame in {where} ({what}): the file is corrupt (its '
      'checksums do not match), so the records after it cannot be found '
      '(skip_bad_records cannot skip this). Rebuild the data set (python -m '
      'data_pipelines.build) or restore the file from a copy.')


def steps_per_epoch(data_dir: str, split: str, batch_size: int) -> int:
  """Global batches in one epoch of a split (incomplete last one dropped)."""
  num_examples, _ = split_size(records.DatasetInfo.load(data_dir), split)
  return num_examples // batch_size
