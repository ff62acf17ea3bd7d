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
files of a split are listed in one error (at most 50, see `writer.py`).

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
import dataclasses
import io
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf

from data_pipelines import coco_instances
from data_pipelines import layouts
from data_pipelines import records
from data_pipelines import synthetic
from data_pipelines import writer
from spade_jax import label_maps

_TRAIN_ORDER_SEED = 0
# Image formats stored as they are; others are re-encoded to PNG.
_KEPT_IMAGE_FORMATS = ('JPEG', 'MPO', 'PNG')


BuildError = writer.BuildError


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
      allowed += f' and {label_maps.DONT_CARE} (don\'t care)'
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


# ---------------------------------------------------------------------------
# The public entry point.


def _source_bytes(example: layouts.Example) -> int:
  paths = [example.image_path, example.label_path, example.instance_path]
  return sum(tf.io.gfile.stat(p).length for p in paths if p)


def _train_order(examples: List[layouts.Example]) -> List[layouts.Example]:
  order = np.random.default_rng(_TRAIN_ORDER_SEED).permutation(len(examples))
  return [examples[i] for i in order]


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
      n = writer.resolve_num_shards(
          len(exs), sum(writer.ordered_map(_source_bytes, exs, workers)),
          num_shards, examples_per_shard)
      load = lambda ex, layout=layout: _try(  # pylint: disable=g-long-lambda
          lambda e: load_example(e, layout, fmt), ex)
      plan[s] = (len(exs), n,
                 lambda _, exs=exs, load=load: writer.ordered_map(load, exs, workers))
    info = dataset_info_for(layout)
    if fmt.palette is not None:
      info = dataclasses.replace(info, colors=fmt.palette.tolist())
    summary = writer.build_splits(data_dir, info, plan)
  logging.info('Built %s in %s (%.1f s): %s', dataset, data_dir,
               time.time() - start, writer.summary_line(summary))
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
  print(f'Built {FLAGS.dataset} in {FLAGS.data_dir}: {writer.summary_line(summary)}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
