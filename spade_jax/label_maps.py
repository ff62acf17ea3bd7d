"""Label maps as files: the one place that reads, writes and colours them.

Every command that takes a label map (the data-set builder, `synthesize`, the
web server) decodes it with `decode_label_map`, so one rule holds everywhere:

* PNG only (opened with Pillow restricted to PNG, so an ICO or other
  container that embeds a PNG is refused before anything is decoded), and the
  pixel count from the header checked against `max_pixels` before decoding.
* 8- and 16-bit gray, palette ('P', the index is the id, whatever colours
  the PNG's own palette shows) and 1-bit PNGs: the pixel values are the ids.
* 8-bit RGB, RGBA and gray+alpha whose colour channels are equal: the gray
  value is the id (what a browser canvas writes). Alpha must be opaque.
* 8-bit RGB/RGBA in a palette's colours (`palette`, index = class id): each
  colour maps to its id. A colour not in the palette is an error naming the
  colour, how many pixels have it and where the first one is; never a silent
  nearest colour. Without a palette a colour map is an error that says to
  pass one. A colour the palette gives several ids (Cityscapes repeats some)
  reads as the lowest of them. An RGB map whose channels are all equal is
  read as gray ids, unless every gray level is also a class colour of
  another id: then it is refused as ambiguous (`read_label_map`'s
  `colors_only` reads it through the palette).
* 16-bit-per-channel colour PNGs (RGB, RGBA, gray+alpha at 16 bits) are
  REFUSED with a `LabelMapError`: Pillow silently keeps only their high byte,
  so ids 0 and 5 would both read as 0. The bit depth and colour type are read
  from the PNG's IHDR chunk. Save ids above 255 as a 16-bit gray PNG
  (`encode_label_map` does).

The palette: `default_palette` (PASCAL-VOC bit interleaving; id 0 black) is
what spade_jax shows for classes without colours of their own, and
`label_colormap` is the reference SPADE/pix2pixHD `util.labelcolormap` that
the data-set builder stores in `dataset_info.json` (the same interleaving
started at 1, so id 0 gets a colour; Cityscapes has its own table). A
model's palette is `palette_for(num_classes, colors)`: its own colours
(classes.json / dataset_info.json) then `default_palette` for the rest.

The conventions between raw values and class ids live here too: the
don't-care value `DONT_CARE`, the data-set mapping `dataset_to_class_ids`
(and its inverse `class_ids_to_raw`), the range check `class_ids`, and the
PIL-nearest resize of maps (`pil_nearest_indices`, `resize_nearest`). The
tf.data pipeline and the exported module run the same functions with their
own array module (`xp`).

Only numpy and Pillow: the web server and the builder import this module.
"""
import io
import json
import os
import struct
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

# The raw label value meaning "don't care" in data sets that have one (the
# one definition: everything else reads it from here).
DONT_CARE = 255

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# PNG colour types (IHDR byte 25).
_GRAY, _RGB, _PALETTE, _GRAY_ALPHA, _RGBA = 0, 2, 3, 4, 6
_COLOR_TYPE_NAMES = {_GRAY: 'gray', _RGB: 'RGB', _PALETTE: 'palette',
                     _GRAY_ALPHA: 'gray+alpha', _RGBA: 'RGBA'}
# PIL modes whose pixel values are the ids.
_ID_MODES = ('1', 'L', 'P', 'I', 'I;16', 'I;16B', 'I;16L')
# How many distinct unknown colours an error lists.
_MAX_LISTED_COLORS = 5

Source = Union[bytes, bytearray, memoryview, str, os.PathLike]


class LabelMapError(ValueError):
  """A label map that cannot be used (the message says why and what to do)."""


# ---------------------------------------------------------------------------
# Palettes.
# ---------------------------------------------------------------------------
def _interleaved(ids: np.ndarray) -> np.ndarray:
  """PASCAL-VOC colours of integer ids: bits spread over R, G, B."""
  palette = np.zeros((len(ids), 3), np.int64)
  shifted = np.asarray(ids, np.int64).copy()
  for bit in range(8):
    for channel in range(3):
      palette[:, channel] |= ((shifted >> channel) & 1) << (7 - bit)
    shifted >>= 3
  return palette.astype(np.uint8)


def default_palette(num_colors: int = 256) -> np.ndarray:
  """A fixed, well-spread palette (PASCAL-VOC style); uint8 (num_colors, 3).

  Class 0 is black; colours of consecutive ids differ clearly.
  """
  return _interleaved(np.arange(num_colors))


_CITYSCAPES_COLORS = [
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (111, 74, 0),
    (81, 0, 81), (128, 64, 128), (244, 35, 232), (250, 170, 160),
    (230, 150, 140), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
    (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100),
    (0, 0, 230), (119, 11, 32), (0, 0, 142)]


def label_colormap(n: int) -> np.ndarray:
  """The reference SPADE/pix2pixHD colour map (`util.labelcolormap`).

  35 entries: the Cityscapes colours; otherwise id i gets the interleaved
  colour of i + 1 (so id 0 is not black). uint8 (n, 3).
  """
  if n == 35:
    return np.asarray(_CITYSCAPES_COLORS, np.uint8)
  return _interleaved(np.arange(1, n + 1))


def palette_for(num_classes: int,
                colors: Optional[Sequence[Sequence[int]]] = None
                ) -> np.ndarray:
  """A model's palette: its own colours, then `default_palette` after them.

  Args:
    num_classes: entries wanted (label_nc, plus 1 with a don't-care class).
    colors: [r, g, b] per class id, e.g. classes.json / dataset_info.json
      "colors"; None or shorter lists are filled from `default_palette`.

  Returns:
    uint8 (num_classes, 3).
  """
  palette = default_palette(num_classes)
  if colors is not None:
    given = np.asarray(colors, np.int64).reshape(-1, 3)[:num_classes]
    if given.size and (given.min() < 0 or given.max() > 255):
      raise LabelMapError('palette colours must be integers in 0..255.')
    palette[:len(given)] = given
  return palette


def load_palette(path: str) -> np.ndarray:
  """A palette file -> uint8 (K, 3), index = class id.

  JSON: a list of [r, g, b], or an object whose "colors" is one (a model's
  classes.json, a built data set's dataset_info.json).
  """
  try:
    with open(path) as f:
      obj = json.load(f)
  except (OSError, ValueError) as e:
    raise LabelMapError(f'cannot read the palette {path}: {e}') from None
  colors = obj.get('colors') if isinstance(obj, dict) else obj
  if colors is None:
    raise LabelMapError(f'the palette {path} has no "colors" (a JSON list of '
                        '[r, g, b] per class id, or an object holding one).')
  try:
    arr = np.asarray(colors)
  except ValueError:
    arr = np.zeros((0,))
  if arr.ndim != 2 or arr.shape[1:] != (3,) or not len(arr) or \
      not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or \
      arr.max() > 255:
    raise LabelMapError(f'the palette {path} must list [r, g, b] integers in '
                        '0..255, one per class id.')
  return arr.astype(np.uint8)


def _check_palette(palette) -> np.ndarray:
  arr = np.asarray(palette)
  if arr.ndim != 2 or arr.shape[1] != 3 or not len(arr):
    raise LabelMapError(f'a palette is a (K, 3) array of RGB colours; got '
                        f'shape {arr.shape}.')
  if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or \
      arr.max() > 255:
    raise LabelMapError('palette colours must be integers in 0..255.')
  return arr.astype(np.uint8)


def colorize(ids: np.ndarray, palette) -> np.ndarray:
  """Class ids (..., H, W) -> uint8 (..., H, W, 3) colours `palette[ids]`.

  Raises:
    LabelMapError: an id is negative or has no palette entry.
  """
  palette = _check_palette(palette)
  ids = np.asarray(ids)
  if not np.issubdtype(ids.dtype, np.integer):
    raise LabelMapError(f'ids must be integers, got {ids.dtype}.')
  if ids.size and (ids.min() < 0 or ids.max() >= len(palette)):
    bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
    raise LabelMapError(f'id {bad} has no colour: the palette has '
                        f'{len(palette)} entries (ids 0..{len(palette) - 1}).')
  return palette[ids]


# ---------------------------------------------------------------------------
# Raw data-set values <-> class ids.
#
# `xp` is the array module: numpy by default; `jax.numpy` inside a jitted
# graph (the exported module) and `tensorflow` inside the tf.data pipeline
# pass themselves, so the rule is written once (tests check each equal).
# ---------------------------------------------------------------------------
def dont_care_to_class(ids, *, label_nc: int, contain_dontcare_label: bool,
                       xp=np):
  """Maps the raw don't-care value `DONT_CARE` to class `label_nc`.

  Without a don't-care class the ids pass unchanged.
  """
  if not contain_dontcare_label:
    return ids
  return xp.where(ids == DONT_CARE, label_nc, ids)


def dataset_to_class_ids(raw, *, dataset: str, label_nc: int,
                         contain_dontcare_label: bool, xp=np):
  """Raw data-set values -> model class ids (the reference's conventions).

  ade20k: value - 1, with 0 ("other") becoming label_nc. With
  contain_dontcare_label, the raw value `DONT_CARE` becomes label_nc. Same
  shape and integer type as `raw`; `class_ids_to_raw` is the inverse.
  """
  label = raw
  if dataset == 'ade20k':
    label = xp.where(raw == 0, label_nc, raw - 1)
  if contain_dontcare_label:
    label = xp.where(raw == DONT_CARE, label_nc, label)
  return label


def class_ids(labels, *, label_nc: int, contain_dontcare_label: bool,
              what: str = 'labels') -> np.ndarray:
  """Integer class ids -> checked int32 ids 0..num_classes-1.

  Ids run 0..label_nc-1; with `contain_dontcare_label`, label_nc and
  `DONT_CARE` both mean don't-care (and become label_nc).

  Raises:
    LabelMapError: naming the ids outside the range and how many pixels.
  """
  label_nc = int(label_nc)
  # Checked before the cast to int32, which would wrap large ids.
  labels = dont_care_to_class(np.asarray(labels).astype(np.int64),
                              label_nc=label_nc,
                              contain_dontcare_label=contain_dontcare_label)
  top = label_nc if contain_dontcare_label else label_nc - 1
  bad = (labels < 0) | (labels > top)
  if bad.any():
    values = np.unique(labels[bad])
    more = f' (and {len(values) - 10} more)' if len(values) > 10 else ''
    count = int(bad.sum())
    allowed = f'0..{label_nc - 1}' + (
        f", or {label_nc} or {DONT_CARE} (don't care)"
        if contain_dontcare_label else '')
    raise LabelMapError(
        f'the {what} hold class ids {values[:10].tolist()}{more} at {count} '
        f'pixel{"s" if count > 1 else ""}, outside this model\'s range '
        f'{allowed}.')
  return labels.astype(np.int32)


def class_ids_to_raw(ids: np.ndarray, *, dataset: str, label_nc: int,
                     contain_dontcare_label: bool) -> np.ndarray:
  """Class ids -> the raw values a data set stores (inverse of the reader).

  The reader (`dataset_to_class_ids`) shifts ADE20K (raw 0 = don't
  care, raw k = class k-1) and maps raw `DONT_CARE` to class `label_nc`;
  this undoes it, so a colour map decoded to class ids can be stored or fed
  like any raw map. int32, same shape.
  """
  ids = np.asarray(ids, np.int64)
  if dataset == 'ade20k':
    raw = np.where(ids == label_nc, 0, ids + 1)
  elif contain_dontcare_label:
    raw = np.where(ids == label_nc, DONT_CARE, ids)
  else:
    raw = ids
  return raw.astype(np.int32)


# ---------------------------------------------------------------------------
# Resizing.
# ---------------------------------------------------------------------------
def pil_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of PIL NEAREST: floor((dst + 0.5) * in / out).

  Computed as PIL does, by accumulating the float64 step, so that exact
  ties round as PIL's do. int64 (out_size,).
  """
  step = in_size / out_size
  steps = np.full(out_size, step, np.float64)
  steps[0] = step * 0.5
  return np.minimum(np.cumsum(steps).astype(np.int64), in_size - 1)


def resize_nearest(ids: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """Resizes (H, W) or (N, H, W) maps to `size` (H', W') like PIL NEAREST.

  How the data pipeline resizes label and instance maps; no interpolation.
  Plain indexing, so a jax array (the exported module's input) works too.
  """
  h, w = size
  if ids.shape[-2:] == (h, w):
    return ids
  rows = pil_nearest_indices(ids.shape[-2], h)
  cols = pil_nearest_indices(ids.shape[-1], w)
  return ids[..., rows, :][..., cols]


# ---------------------------------------------------------------------------
# Decoding.
# ---------------------------------------------------------------------------
def _read_source(source: Source, name: str) -> bytes:
  if isinstance(source, (bytes, bytearray, memoryview)):
    return bytes(source)
  try:
    with open(source, 'rb') as f:
      return f.read()
  except OSError as e:
    raise LabelMapError(f'cannot read the {name} {os.fspath(source)}: '
                        f'{e.strerror or e}') from None


def png_header(data: bytes) -> Optional[Tuple[int, int, int, int]]:
  """(width, height, bit depth, colour type) from a PNG's IHDR, or None."""
  if len(data) < 29 or not data.startswith(_PNG_SIGNATURE) or \
      data[12:16] != b'IHDR':
    return None
  width, height, depth, color_type = struct.unpack('>IIBB', data[16:26])
  return width, height, depth, color_type


def _palette_ids(rgb: np.ndarray, palette: np.ndarray,
                 name: str) -> np.ndarray:
  """(H, W, 3) uint8 colours -> (H, W) ids through `palette` (exact match)."""
  codes = ((rgb[..., 0].astype(np.int64) << 16) |
           (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2])
  pal_codes = ((palette[:, 0].astype(np.int64) << 16) |
               (palette[:, 1].astype(np.int64) << 8) | palette[:, 2])
  # Lowest id per colour, where a palette repeats one (Cityscapes does).
  order = np.argsort(pal_codes, kind='stable')
  sorted_codes = pal_codes[order]
  uniq, inverse = np.unique(codes, return_inverse=True)
  pos = np.searchsorted(sorted_codes, uniq)
  pos_c = np.minimum(pos, len(sorted_codes) - 1)
  found = sorted_codes[pos_c] == uniq
  if not found.all():
    missing = np.flatnonzero(~found)
    counts = np.bincount(inverse.ravel(), minlength=len(uniq))
    listed = []
    for m in missing[:_MAX_LISTED_COLORS]:
      c = int(uniq[m])
      first = int(np.argmax(inverse.ravel() == m))
      row, col = divmod(first, rgb.shape[1])
      listed.append(f'({c >> 16}, {(c >> 8) & 255}, {c & 255}): '
                    f'{int(counts[m])} pixels, first at (row {row}, col '
                    f'{col})')
    more = (f' and {len(missing) - _MAX_LISTED_COLORS} more'
            if len(missing) > _MAX_LISTED_COLORS else '')
    raise LabelMapError(
        f'the {name} has {len(missing)} colour(s) that are not class colours '
        f'of the palette ({len(palette)} classes): ' + '; '.join(listed) +
        f'{more}. Paint only with the class colours (or save the ids as a '
        'gray PNG); colours are never matched to the nearest class.')
  ids = order[pos_c]
  return ids[inverse].reshape(codes.shape).astype(np.int32)


def decode_label_map(source: Source, *, palette=None,
                     max_pixels: Optional[int] = None,
                     name: str = 'label map') -> np.ndarray:
  """A label-map PNG (bytes or a path) -> int32 (H, W) ids.

  The rules are the module docstring's. 16-bit-per-channel colour PNGs are
  refused (not decoded), since Pillow keeps only their high byte.

  Args:
    source: the PNG's bytes, or a file path.
    palette: optional (K, 3) uint8 class colours (index = class id); RGB maps
      in these colours decode to the ids. A gray-looking RGB map (equal
      channels) whose gray levels are all palette colours that would give
      other ids than the gray values is refused as ambiguous.
    max_pixels: refuse a map with more pixels than this (checked from the
      header, before any pixel is decoded).
    name: how error messages call the map (e.g. its path).

  Returns:
    int32 (H, W): the pixel values (gray, palette index) or the class ids
    (colour maps through `palette`). `read_label_map` also says which.

  Raises:
    LabelMapError: with what is wrong and what to do.
  """
  return read_label_map(source, palette=palette, max_pixels=max_pixels,
                        name=name)[0]


def read_label_map(source: Source, *, palette=None,
                   max_pixels: Optional[int] = None,
                   name: str = 'label map',
                   colors_only: bool = False) -> Tuple[np.ndarray, bool]:
  """`decode_label_map`, also saying whether the palette was used.

  Gray values of a data set are raw values (ADE20K shifted, 255 don't
  care), while colours decode to class ids; a caller that feeds raw values
  on converts the latter with `class_ids_to_raw`.

  Args:
    source, palette, max_pixels, name: as `decode_label_map`.
    colors_only: the map must be an 8-bit RGB/RGBA map in `palette`'s colours
      (the builder's --label_format rgb): every pixel goes through the
      palette, gray-looking ones too, and a single-channel map is an error.

  Returns:
    (int32 (H, W) ids, True when they are class ids from the palette).
  """
  data = _read_source(source, name)
  if not data:
    raise LabelMapError(f'the {name} is empty.')
  header = png_header(data)
  if header is None:
    raise LabelMapError(f'the {name} is not a PNG file: label maps must be '
                        'PNG (lossless; the pixel values are the ids).')
  width, height, depth, color_type = header
  if max_pixels is not None and width * height > max_pixels:
    raise LabelMapError(f'the {name} is {width}x{height} = {width * height} '
                        f'pixels; the limit is {max_pixels} pixels.')
  if depth == 16 and color_type in (_RGB, _GRAY_ALPHA, _RGBA):
    raise LabelMapError(
        f'the {name} is a 16-bit-per-channel {_COLOR_TYPE_NAMES[color_type]} '
        'PNG, which would be read as its high byte only: save ids as a gray '
        'PNG (16-bit gray for ids above 255) or colours as 8-bit RGB.')
  if palette is not None:
    palette = _check_palette(palette)
  elif colors_only:
    raise LabelMapError('colour label maps need a palette.')
  try:
    with Image.open(io.BytesIO(data), formats=['PNG']) as im:
      if width * height and im.size != (width, height):
        raise LabelMapError(f'the {name} has an inconsistent PNG header.')
      im.load()
      mode = im.mode
      arr = np.asarray(im)
  except LabelMapError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Pillow raises many kinds for corrupt or hostile files.
    raise LabelMapError(f'cannot decode the {name}: {e}') from None
  if arr.ndim < 2 or arr.size == 0:
    raise LabelMapError(f'the {name} has shape {arr.shape}: expected (H, W) '
                        'with at least one pixel.')
  if mode in _ID_MODES or mode == 'LA':
    if colors_only:
      raise LabelMapError(
          f'the {name} has PIL mode {mode}: expected an 8-bit RGB map in the '
          'class colours (the ids of a gray map are read without '
          '--label_format rgb).')
    if mode != 'LA':
      return arr.astype(np.int32), False
  if mode not in ('RGB', 'RGBA', 'LA'):
    raise LabelMapError(f'the {name} has PIL mode {mode}: expected a gray '
                        '8- or 16-bit PNG of ids, or an 8-bit RGB(A) map.')
  if mode in ('RGBA', 'LA'):
    transparent = arr[..., -1] != 255
    if transparent.any():
      row, col = np.unravel_index(int(np.argmax(transparent)),
                                  transparent.shape)
      raise LabelMapError(
          f'the {name} has {int(transparent.sum())} transparent pixels '
          f'(first at row {row}, col {col}): ids need opaque pixels (or a '
          'PNG without alpha).')
  if mode == 'LA':
    return arr[..., 0].astype(np.int32), False
  rgb = arr[..., :3]
  gray = bool(((rgb[..., 0] == rgb[..., 1]) &
               (rgb[..., 0] == rgb[..., 2])).all())
  if colors_only:
    return _palette_ids(rgb, palette, name), True
  if palette is None:
    if gray:
      return rgb[..., 0].astype(np.int32), False
    differ = int(((rgb[..., 0] != rgb[..., 1]) |
                  (rgb[..., 0] != rgb[..., 2])).sum())
    raise LabelMapError(
        f'the {name} is a colour image ({differ} pixels have R, G, B not all '
        'equal) and no palette was given: pass the class colours (the '
        "model's classes.json / the data set's dataset_info.json; --palette "
        'for the builder) or send the ids as a gray PNG.')
  if not gray:
    return _palette_ids(rgb, palette, name), True
  # Equal channels: gray ids, unless every level is a palette colour.
  levels = np.unique(rgb[..., 0])
  try:
    by_palette = _palette_ids(levels[:, None, None].repeat(3, axis=2),
                              palette, name)[:, 0]
  except LabelMapError:
    return rgb[..., 0].astype(np.int32), False
  if (by_palette == levels).all():
    return rgb[..., 0].astype(np.int32), False
  pairs = ', '.join(f'gray {int(v)} = class {int(p)}' for v, p in
                    zip(levels, by_palette) if v != p)
  raise LabelMapError(
      f'the {name} is ambiguous: its pixels are gray and every gray level is '
      f'also a class colour ({pairs}), so it could be ids or colours. Save '
      'the ids as a gray (mode L or 16-bit) PNG, which is always read as ids.')


# ---------------------------------------------------------------------------
# Encoding.
# ---------------------------------------------------------------------------
def encode_label_map(ids: np.ndarray) -> bytes:
  """Ids (H, W) -> PNG bytes: 8-bit gray when all ids <= 255, else 16-bit.

  Raises:
    LabelMapError: not 2-D, not integers, or ids outside 0..65535.
  """
  ids = np.asarray(ids)
  if ids.ndim != 2 or ids.size == 0:
    raise LabelMapError(f'a label map is (H, W) with at least one pixel; got '
                        f'shape {ids.shape}.')
  if not (np.issubdtype(ids.dtype, np.integer) or ids.dtype == bool):
    raise LabelMapError(f'ids must be integers, got {ids.dtype}.')
  lo, hi = int(ids.min()), int(ids.max())
  if lo < 0 or hi > 65535:
    raise LabelMapError(f'ids {lo}..{hi} do not fit a PNG (0..65535).')
  if hi <= 255:
    im = Image.fromarray(ids.astype(np.uint8))  # Mode L.
  else:
    im = Image.fromarray(ids.astype('<u2'))  # Mode I;16.
  buf = io.BytesIO()
  im.save(buf, format='PNG')
  return buf.getvalue()
