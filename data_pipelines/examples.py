"""One example of a data set read from its released files and checked.

What is stored: each image file's own bytes (JPEG and PNG kept as they are,
other formats re-encoded to lossless PNG), and the label and instance maps as
grayscale PNGs: 8- and 16-bit grayscale PNGs are kept byte for byte where
their depth is the one the data set's features declare (`tfds_builders`:
labels 8-bit where the ids fit, instances 16-bit), else re-encoded to that
depth with the same values; palette/1-bit PNGs, RGB PNGs with equal channels
and other lossless formats are re-encoded likewise (TF would otherwise
decode palette PNGs to colours). PNG label maps follow
`spade_jax/label_maps.py` (the rule synthesize and the web server use too;
16-bit colour PNGs are refused). With label format 'rgb' label maps are
colour PNGs in the class colours (the data set's palette, or a palette
file), stored as the raw ids they stand for. No other value mapping is
applied: the reader maps 255 and ADE20K's shift.

Every example is checked, and errors name the file: images, labels or
instance maps that do not decode, a label or instance map whose size
differs from the image's, raw class ids outside the data set's range (255
allowed only where the set has a don't-care label), colour maps (without
label format 'rgb') and colours that are no class colour (with it).
"""
import collections
import concurrent.futures
import dataclasses
import io
import itertools
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf

from data_pipelines import coco_instances
from data_pipelines import layouts
from data_pipelines import metadata
from spade_jax import label_maps

# Image formats stored as they are; others are re-encoded to PNG.
_KEPT_IMAGE_FORMATS = ('JPEG', 'MPO', 'PNG')


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


# ---------------------------------------------------------------------------
# Colours and class names.


_CITYSCAPES_NAMES = [
    'unlabeled', 'ego vehicle', 'rectification border', 'out of roi',
    'static', 'dynamic', 'ground', 'road', 'sidewalk', 'parking',
    'rail track', 'building', 'wall', 'fence', 'guard rail', 'bridge',
    'tunnel', 'pole', 'polegroup', 'traffic light', 'traffic sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus',
    'caravan', 'trailer', 'train', 'motorcycle', 'bicycle', 'license plate']


def dataset_info_for(layout: layouts.Layout) -> metadata.DatasetInfo:
  """The metadata of a built real data set (splits filled in later)."""
  n = layout.label_nc + (1 if layout.contain_dontcare_label else 0)
  names = list(_CITYSCAPES_NAMES) if layout.name == 'cityscapes' else None
  return metadata.DatasetInfo(
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


def map_bits(values_max: int) -> int:
  """8 when raw values up to `values_max` fit a byte, else 16."""
  return 8 if values_max <= 255 else 16


def at_depth(png: bytes, arr: np.ndarray, bits: int) -> bytes:
  """`png` (of values `arr`) as a grayscale PNG of `bits` bits per pixel."""
  header = label_maps.png_header(png)
  if header is not None and header[3] == 0 and header[2] == bits:
    return png
  if bits == 8 and arr.size and int(arr.max()) > 255:
    raise BuildError(f'values up to {int(arr.max())} do not fit 8 bits.')
  buf = io.BytesIO()
  Image.fromarray(arr.astype(np.uint8 if bits == 8 else np.uint16)).save(
      buf, format='PNG')
  return buf.getvalue()


def load_example(example: layouts.Example, layout: layouts.Layout,
                 label_format: Optional[LabelFormat] = None
                 ) -> Dict[str, Any]:
  """Reads and checks one example (raises BuildError naming the file).

  Returns the fields the data set's features hold: 'image' (the bytes to
  store), 'label' (a grayscale PNG of `map_bits(layout.max_raw_label)`
  bits, or 16 with a don't-care value past it), 'instance' (a 16-bit PNG,
  when the set has instances), 'file_name', 'height', 'width'.
  """
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
  fields = {'image': image,
            'label': at_depth(label, label_arr, label_bits(layout)),
            'file_name': example.name, 'height': height, 'width': width}
  if example.annotation_file:
    try:
      polygons = coco_instances.read_annotations(example.annotation_file)
      if example.name not in polygons:
        raise BuildError(f'{example.label_path}: image {example.name} is not '
                         f'in {example.annotation_file}, which its instance '
                         'map is made from.')
      inst_arr = coco_instances.instance_map(label_arr,
                                             polygons[example.name])
      fields['instance'] = at_depth(b'', inst_arr, 16)
    except coco_instances.AnnotationError as e:
      raise BuildError(str(e)) from None
  elif example.instance_path:
    instance, inst_arr = prepare_map(_read(example.instance_path),
                                     example.instance_path, 'instance')
    _check_size(example.instance_path, 'instance', inst_arr, height, width,
                example.image_path)
    fields['instance'] = at_depth(instance, inst_arr, 16)
  return fields


def label_bits(layout: layouts.Layout) -> int:
  """Bits per pixel of a data set's stored label maps."""
  top = layout.max_raw_label
  if layout.allow_dontcare_value:
    top = max(top, label_maps.DONT_CARE)
  return map_bits(top)


def try_load(fn: Callable[[Any], Any], item: Any
             ) -> Tuple[Optional[Any], Optional[str]]:
  """(fn(item), None), or (None, the message) when it raises BuildError."""
  try:
    return fn(item), None
  except BuildError as e:
    return None, str(e)


