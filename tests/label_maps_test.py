"""Tests of spade_jax/label_maps.py: the one label-map reading rule."""
import io
import struct
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image
import pytest

from spade_jax import label_maps

_IDS = np.array([[0, 5, 5, 2], [1, 0, 7, 2], [3, 3, 4, 6]], np.int64)


def _png(arr: np.ndarray, mode=None) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr, mode).save(buf, format='PNG') if mode else \
      Image.fromarray(arr).save(buf, format='PNG')
  return buf.getvalue()


def _raw_png(arr: np.ndarray, depth: int, color_type: int) -> bytes:
  """A PNG written by hand (big-endian samples, filter 0), any depth/type."""
  h, w = arr.shape[:2]
  dtype = '>u2' if depth == 16 else 'u1'
  rows = arr.astype(dtype).reshape(h, -1)
  raw = b''.join(b'\x00' + r.tobytes() for r in rows)

  def chunk(kind, body):
    return (struct.pack('>I', len(body)) + kind + body +
            struct.pack('>I', zlib.crc32(kind + body) & 0xffffffff))

  ihdr = struct.pack('>IIBBBBB', w, h, depth, color_type, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) +
          chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def test_module_imports_no_tensorflow_or_jax():
  code = ('import sys; import spade_jax.label_maps; '
          'bad = [m for m in ("tensorflow", "jax", "flax") if m in '
          'sys.modules]; print(bad); sys.exit(1 if bad else 0)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=False)
  assert out.returncode == 0, out.stdout + out.stderr


def test_gray_8_and_16_bit_and_palette_index_and_path(tmp_path):
  got = label_maps.decode_label_map(_png(_IDS.astype(np.uint8)))
  assert got.dtype == np.int32 and got.shape == (3, 4)
  np.testing.assert_array_equal(got, _IDS)
  big = _IDS * 1000
  data = label_maps.encode_label_map(big)
  assert label_maps.png_header(data)[2:] == (16, 0)
  np.testing.assert_array_equal(label_maps.decode_label_map(data), big)
  pim = Image.fromarray(_IDS.astype(np.uint8), 'P')
  pim.putpalette(label_maps.default_palette(256).ravel().tolist())
  buf = io.BytesIO()
  pim.save(buf, format='PNG')
  np.testing.assert_array_equal(
      label_maps.decode_label_map(buf.getvalue()), _IDS)
  path = tmp_path / 'm.png'
  path.write_bytes(_png(_IDS.astype(np.uint8)))
  np.testing.assert_array_equal(label_maps.decode_label_map(str(path)), _IDS)
  np.testing.assert_array_equal(label_maps.decode_label_map(path), _IDS)


def test_equal_channel_rgb_rgba_and_gray_alpha_are_ids():
  gray = _IDS.astype(np.uint8)
  rgb = np.stack([gray] * 3, -1)
  rgba = np.concatenate([rgb, np.full_like(gray, 255)[..., None]], -1)
  la = np.stack([gray, np.full_like(gray, 255)], -1)
  for arr, mode in ((rgb, 'RGB'), (rgba, 'RGBA'), (la, 'LA')):
    got = label_maps.decode_label_map(_png(arr, mode))
    np.testing.assert_array_equal(got, _IDS, err_msg=mode)


def test_transparent_pixels_are_refused():
  rgba = np.zeros((2, 3, 4), np.uint8)
  rgba[..., 3] = 255
  rgba[1, 2, 3] = 0
  with pytest.raises(label_maps.LabelMapError,
                     match=r'1 transparent pixels \(first at row 1, col 2\)'):
    label_maps.decode_label_map(_png(rgba, 'RGBA'))


@pytest.mark.parametrize('color_type,channels', [(2, 3), (6, 4), (4, 2)])
def test_16_bit_colour_pngs_are_refused_not_cut(color_type, channels):
  # Ids 0 and 5 in every channel; Pillow alone would read both as 0.
  arr = np.zeros((2, 2, channels), np.int64)
  arr[0, 0, :] = 5
  if color_type in (4, 6):
    arr[..., -1] = 65535
  data = _raw_png(arr, 16, color_type)
  with Image.open(io.BytesIO(data)) as im:  # What the rule protects from.
    assert np.asarray(im.convert('RGB')).max() == 0
  with pytest.raises(label_maps.LabelMapError, match='16-bit-per-channel'):
    label_maps.decode_label_map(data)


def test_hand_written_16_bit_gray_reads_exactly():
  arr = np.array([[0, 5], [300, 65535]], np.int64)
  np.testing.assert_array_equal(
      label_maps.decode_label_map(_raw_png(arr, 16, 0)), arr)


def test_colour_map_through_palette_round_trips():
  palette = label_maps.label_colormap(8)
  colours = label_maps.colorize(_IDS, palette)
  assert colours.dtype == np.uint8 and colours.shape == (3, 4, 3)
  got = label_maps.decode_label_map(_png(colours), palette=palette)
  np.testing.assert_array_equal(got, _IDS)
  rgba = np.concatenate([colours, np.full((3, 4, 1), 255, np.uint8)], -1)
  np.testing.assert_array_equal(
      label_maps.decode_label_map(_png(rgba, 'RGBA'), palette=palette), _IDS)


def test_round_trip_every_class_of_large_palettes():
  for n in (35, 151, 183):
    palette = label_maps.label_colormap(n)
    ids = np.arange(n).reshape(1, n)
    got = label_maps.decode_label_map(
        _png(label_maps.colorize(ids, palette)), palette=palette)
    # Cityscapes repeats colours: a shared colour reads as its lowest id.
    expect = np.array([int(np.flatnonzero((palette == palette[i]).all(1))[0])
                       for i in range(n)])[None]
    np.testing.assert_array_equal(got, expect)
    if n != 35:
      np.testing.assert_array_equal(got, ids)
  assert label_maps.decode_label_map(
      _png(label_maps.colorize(np.array([[26, 34]]),
                               label_maps.label_colormap(35))),
      palette=label_maps.label_colormap(35)).tolist() == [[26, 26]]


def test_unknown_colour_named_with_count_and_first_pixel():
  palette = label_maps.label_colormap(8)
  colours = label_maps.colorize(_IDS, palette)
  colours[1, 2] = colours[2, 3] = (1, 2, 3)
  with pytest.raises(label_maps.LabelMapError) as e:
    label_maps.decode_label_map(_png(colours), palette=palette,
                                name='a.png')
  msg = str(e.value)
  assert '(1, 2, 3): 2 pixels, first at (row 1, col 2)' in msg
  assert 'a.png' in msg and 'nearest' in msg


def test_colour_map_without_palette_says_to_pass_it():
  colours = label_maps.colorize(_IDS, label_maps.label_colormap(8))
  with pytest.raises(label_maps.LabelMapError, match='no palette was given'):
    label_maps.decode_label_map(_png(colours))


def test_gray_rgb_with_palette():
  palette = label_maps.default_palette(200)
  # Gray levels that are no palette colour (or the same id) are ids.
  gray = np.array([[0, 1], [2, 3]], np.uint8)
  np.testing.assert_array_equal(
      label_maps.decode_label_map(_png(np.stack([gray] * 3, -1)),
                                  palette=palette), gray)
  # (128, 128, 128) is class 7 and also gray 128: refused as ambiguous.
  amb = np.array([[0, 128]], np.uint8)
  assert palette[7].tolist() == [128, 128, 128]
  with pytest.raises(label_maps.LabelMapError,
                     match='ambiguous.*gray 128 = class 7'):
    label_maps.decode_label_map(_png(np.stack([amb] * 3, -1)),
                                palette=palette)
  # A mode-L map is always ids.
  np.testing.assert_array_equal(
      label_maps.decode_label_map(_png(amb), palette=palette), amb)


def test_max_pixels_checked_from_the_header_before_decoding():
  # A header claiming 50000x50000 with no pixel data at all.
  head = _raw_png(np.zeros((1, 1), np.int64), 8, 0)
  ihdr = struct.pack('>IIBBBBB', 50000, 50000, 8, 0, 0, 0, 0)
  fake = head[:8] + struct.pack('>I', 13) + b'IHDR' + ihdr + struct.pack(
      '>I', zlib.crc32(b'IHDR' + ihdr) & 0xffffffff) + head[33:]
  with pytest.raises(label_maps.LabelMapError,
                     match='50000x50000 = 2500000000 pixels; the limit is '
                     '1000000'):
    label_maps.decode_label_map(fake, max_pixels=1_000_000)
  np.testing.assert_array_equal(
      label_maps.decode_label_map(_png(_IDS.astype(np.uint8)),
                                  max_pixels=12), _IDS)
  with pytest.raises(label_maps.LabelMapError, match='limit is 11'):
    label_maps.decode_label_map(_png(_IDS.astype(np.uint8)), max_pixels=11)


def test_non_png_and_ico_containers_are_refused():
  gray = Image.fromarray(_IDS.astype(np.uint8))
  for fmt in ('BMP', 'ICO', 'TIFF'):
    buf = io.BytesIO()
    gray.convert('RGBA' if fmt == 'ICO' else 'L').save(buf, format=fmt)
    with pytest.raises(label_maps.LabelMapError, match='not a PNG'):
      label_maps.decode_label_map(buf.getvalue())
  with pytest.raises(label_maps.LabelMapError, match='empty'):
    label_maps.decode_label_map(b'')
  with pytest.raises(label_maps.LabelMapError, match='cannot decode'):
    label_maps.decode_label_map(_png(_IDS.astype(np.uint8))[:40])
  with pytest.raises(label_maps.LabelMapError, match='cannot read'):
    label_maps.decode_label_map('/nonexistent/x.png')


def test_encode_chooses_depth_and_checks_range():
  assert label_maps.png_header(label_maps.encode_label_map(_IDS))[2:] == (8,
                                                                          0)
  assert label_maps.png_header(
      label_maps.encode_label_map(np.array([[256]])))[2:] == (16, 0)
  for bad in (np.array([[-1]]), np.array([[70000]]), np.zeros((2, 2, 3), int),
              np.zeros((2, 2), np.float32)):
    with pytest.raises(label_maps.LabelMapError):
      label_maps.encode_label_map(bad)


def test_colorize_checks_ids_and_palettes():
  with pytest.raises(label_maps.LabelMapError, match='id 8 has no colour'):
    label_maps.colorize(np.array([[8]]), label_maps.label_colormap(8))
  with pytest.raises(label_maps.LabelMapError, match=r'\(K, 3\)'):
    label_maps.colorize(_IDS, np.zeros((4, 4), np.uint8))


def test_palettes_are_one_interleaving():
  assert label_maps.default_palette(4).tolist() == [
      [0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
  np.testing.assert_array_equal(label_maps.label_colormap(183),
                                label_maps.default_palette(184)[1:])
  pal = label_maps.palette_for(5, [[1, 2, 3], [4, 5, 6]])
  assert pal.tolist() == [[1, 2, 3], [4, 5, 6]] + \
      label_maps.default_palette(5)[2:].tolist()
  np.testing.assert_array_equal(label_maps.palette_for(3),
                                label_maps.default_palette(3))


def test_class_ids_to_raw_inverts_the_reader():
  ids = np.array([[0, 3, 4]])
  assert label_maps.class_ids_to_raw(
      ids, dataset='ade20k', label_nc=4,
      contain_dontcare_label=True).tolist() == [[1, 4, 0]]
  assert label_maps.class_ids_to_raw(
      ids, dataset='coco_stuff', label_nc=4,
      contain_dontcare_label=True).tolist() == [[0, 3, 255]]
  assert label_maps.class_ids_to_raw(
      ids, dataset='custom', label_nc=5,
      contain_dontcare_label=False).tolist() == [[0, 3, 4]]


def test_read_label_map_says_which_and_colors_only():
  palette = label_maps.default_palette(200)
  gray = _IDS.astype(np.uint8)
  ids, by_palette = label_maps.read_label_map(_png(gray), palette=palette)
  assert not by_palette
  colours = label_maps.colorize(_IDS, palette)
  ids, by_palette = label_maps.read_label_map(_png(colours), palette=palette)
  assert by_palette
  np.testing.assert_array_equal(ids, _IDS)
  # colors_only: every pixel through the palette, gray-looking ones too.
  amb = np.stack([np.array([[0, 128]], np.uint8)] * 3, -1)
  ids, by_palette = label_maps.read_label_map(_png(amb), palette=palette,
                                              colors_only=True)
  assert by_palette and ids.tolist() == [[0, 7]]
  with pytest.raises(label_maps.LabelMapError, match='PIL mode L'):
    label_maps.read_label_map(_png(gray), palette=palette, colors_only=True)
  with pytest.raises(label_maps.LabelMapError, match='1 pixels'):
    label_maps.read_label_map(_png(np.stack([gray] * 3, -1)),
                              palette=palette[:3], colors_only=True)


def test_load_palette(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'p.json'
  path.write_text(json.dumps([[1, 2, 3], [4, 5, 6]]))
  assert label_maps.load_palette(str(path)).tolist() == [[1, 2, 3], [4, 5, 6]]
  path.write_text(json.dumps({'names': None, 'colors': [[7, 8, 9]]}))
  assert label_maps.load_palette(str(path)).tolist() == [[7, 8, 9]]
  for bad in ([[1, 2]], [[1, 2, 300]], {'names': ['a']}, 'x'):
    path.write_text(json.dumps(bad))
    with pytest.raises(label_maps.LabelMapError, match='p.json'):
      label_maps.load_palette(str(path))


def test_dataset_to_class_ids_and_back():
  raw = np.array([[0, 1, 4, 255]])
  assert label_maps.dataset_to_class_ids(
      raw, dataset='ade20k', label_nc=4,
      contain_dontcare_label=True).tolist() == [[4, 0, 3, 4]]
  assert label_maps.dataset_to_class_ids(
      raw, dataset='coco_stuff', label_nc=5,
      contain_dontcare_label=True).tolist() == [[0, 1, 4, 5]]
  assert label_maps.dataset_to_class_ids(
      raw, dataset='custom', label_nc=5,
      contain_dontcare_label=False).tolist() == [[0, 1, 4, 255]]
  ids = np.array([[0, 3, 4]])
  for dataset in ('ade20k', 'coco_stuff'):
    kw = dict(dataset=dataset, label_nc=4, contain_dontcare_label=True)
    back = label_maps.dataset_to_class_ids(
        label_maps.class_ids_to_raw(ids, **kw), **kw)
    assert back.tolist() == ids.tolist()


def test_class_ids_maps_dont_care_and_names_bad_ids():
  assert label_maps.class_ids(
      np.array([[0, 4, 5, 255]]), label_nc=5,
      contain_dontcare_label=True).tolist() == [[0, 4, 5, 5]]
  assert label_maps.class_ids(np.array([[2]], np.uint8), label_nc=5,
                              contain_dontcare_label=False).dtype == np.int32
  with pytest.raises(label_maps.LabelMapError,
                     match=r"the label map hold class ids \[6, 254\] at 2 "
                     r"pixels, outside .* 0\.\.4, or 5 or 255"):
    label_maps.class_ids(np.array([[6, 254, 1]]), label_nc=5,
                         contain_dontcare_label=True, what='label map')
  # Large ids are checked before any cast could wrap them.
  with pytest.raises(label_maps.LabelMapError, match=r'\[4294967297\]'):
    label_maps.class_ids(np.array([[2**32 + 1]]), label_nc=5,
                         contain_dontcare_label=False)


@pytest.mark.parametrize('in_size,out_size', [(64, 32), (7, 3), (16, 379),
                                              (300, 300)])
def test_resize_nearest_is_pils(in_size, out_size):
  rng = np.random.default_rng(in_size)
  ids = rng.integers(0, 200, (in_size, in_size + 3)).astype(np.uint8)
  want = np.asarray(Image.fromarray(ids).resize(
      (out_size + 1, out_size), Image.NEAREST))
  got = label_maps.resize_nearest(ids, (out_size, out_size + 1))
  np.testing.assert_array_equal(got, want)
  batch = label_maps.resize_nearest(np.stack([ids, ids]),
                                    (out_size, out_size + 1))
  np.testing.assert_array_equal(batch, np.stack([want, want]))
  np.testing.assert_array_equal(label_maps.pil_nearest_indices(64, 32),
                                np.arange(32) * 2 + 1)
