"""data_pipelines.build: colour label maps, COCO-Stuff from the official
release (instance maps from the annotations), and symlink loops."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from build_test import _assert_nothing_valid
from build_test import _decode_png
from build_test import _image
from build_test import _label
from build_test import _read_split
from build_test import _save
from data_pipelines import build
from data_pipelines import examples
from data_pipelines import coco_instances
from data_pipelines import records
from spade_jax import label_maps

# ---------------------------------------------------------------------------
# --label_format rgb.


def _colour_set(root: pathlib.Path, ids_by_name, palette, split='train'):
  for i, (name, ids) in enumerate(ids_by_name.items()):
    h, w = ids.shape
    _save(root / f'{split}_img' / f'{name}.jpg', _image(h, w, i))
    _save(root / f'{split}_label' / f'{name}.png',
          label_maps.colorize(ids, palette))


def _labels(out, split='train'):
  return {e['file_name'].decode(): _decode_png(e['label'])
          for e in _read_split(out, split)}


def test_rgb_labels_round_trip_with_the_data_sets_palette(tmp_path):
  # Facades: 13 classes, no don't-care; colours = dataset_info's.
  ids = {n: _label(12, 16, 12, seed=i).astype(np.int64)
         for i, n in enumerate(('a', 'b'))}
  palette = label_maps.label_colormap(13)
  _colour_set(tmp_path / 'src', ids, palette)
  out = tmp_path / 'out'
  build.build_dataset('facades', str(tmp_path / 'src'), str(out),
                      splits=['train'], label_format='rgb')
  got = _labels(out)
  for name in ids:
    np.testing.assert_array_equal(got[name], ids[name])
  assert records.DatasetInfo.load(str(out)).colors == palette.tolist()


def test_rgb_dont_care_and_ade20k_shift_become_raw_values(tmp_path):
  # COCO-Stuff: class 182 (don't care) is stored as raw 255.
  ids = _label(8, 8, 181, seed=3).astype(np.int64)
  ids[0, :3] = 182
  _colour_set(tmp_path / 'coco', {'x': ids}, label_maps.label_colormap(183))
  (tmp_path / 'coco' / 'train_inst').mkdir()
  _save(tmp_path / 'coco' / 'train_inst' / 'x.png', _label(8, 8, 9))
  build.build_dataset('coco_stuff', str(tmp_path / 'coco'),
                      str(tmp_path / 'o1'), splits=['train'],
                      label_format='rgb')
  raw = _labels(tmp_path / 'o1')['x']
  np.testing.assert_array_equal(raw, np.where(ids == 182, 255, ids))
  # ADE20K: class c is raw c + 1, the don't-care class raw 0.
  root = tmp_path / 'ade' / 'ADEChallengeData2016'
  ade = _label(6, 6, 149, seed=4).astype(np.int64)
  ade[0, 0] = 150
  _save(root / 'images' / 'training' / 'y.jpg', _image(6, 6))
  _save(root / 'annotations' / 'training' / 'y.png',
        label_maps.colorize(ade, label_maps.label_colormap(151)))
  build.build_dataset('ade20k', str(tmp_path / 'ade'), str(tmp_path / 'o2'),
                      splits=['train'], label_format='rgb')
  raw = _labels(tmp_path / 'o2')['y']
  np.testing.assert_array_equal(raw, np.where(ade == 150, 0, ade + 1))


def test_rgb_with_a_palette_file_and_the_cli(tmp_path):
  palette = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0], [1, 2, 3]],
                     np.uint8)
  pal_file = tmp_path / 'classes.json'
  pal_file.write_text(json.dumps({'names': None,
                                  'colors': palette.tolist()}))
  ids = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
  _save(tmp_path / 'img' / 'a.png', _image(2, 4))
  _save(tmp_path / 'lbl' / 'a.png', label_maps.colorize(ids, palette))
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'data_pipelines.build', '--dataset', 'custom',
       '--label_dir', str(tmp_path / 'lbl'), '--image_dir',
       str(tmp_path / 'img'), '--label_nc', '4', '--data_dir', str(out),
       '--label_format', 'rgb', '--palette', str(pal_file)],
      capture_output=True, text=True, timeout=240, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_array_equal(_labels(out)['a'], ids)
  assert records.DatasetInfo.load(str(out)).colors == palette.tolist()


def test_rgb_errors_name_colour_and_file(tmp_path):
  palette = label_maps.label_colormap(13)
  ids = _label(12, 16, 12).astype(np.int64)
  colours = label_maps.colorize(ids, palette)
  colours[5, 7] = (1, 2, 3)
  _save(tmp_path / 'src' / 'train_img' / 'a.jpg', _image(12, 16))
  _save(tmp_path / 'src' / 'train_label' / 'a.png', colours)
  out = tmp_path / 'out'
  with pytest.raises(build.BuildError) as e:
    build.build_dataset('facades', str(tmp_path / 'src'), str(out),
                        splits=['train'], label_format='rgb')
  msg = str(e.value)
  assert 'train_label/a.png' in msg
  assert '(1, 2, 3): 1 pixels, first at (row 5, col 7)' in msg
  _assert_nothing_valid(out)
  # A colour map without --label_format rgb says to use it.
  with pytest.raises(build.BuildError, match='--label_format rgb'):
    build.build_dataset('facades', str(tmp_path / 'src'), str(out),
                        splits=['train'])
  layout = build.layouts.get_layout('facades')
  bad = tmp_path / 'p.json'
  bad.write_text(json.dumps([[0, 0, 0]] * 5))
  with pytest.raises(ValueError, match='5 colours.*give 13'):
    examples.make_label_format('rgb', layout, str(bad))
  with pytest.raises(ValueError, match='--palette is for'):
    examples.make_label_format('ids', layout, str(bad))


def test_equal_channel_rgb_and_16_bit_colour_rules_hold_in_the_builder(
    tmp_path):
  ids = _label(12, 16, 12).astype(np.uint8)
  _save(tmp_path / 'src' / 'train_img' / 'a.jpg', _image(12, 16))
  _save(tmp_path / 'src' / 'train_label' / 'a.png', np.stack([ids] * 3, -1))
  build.build_dataset('facades', str(tmp_path / 'src'), str(tmp_path / 'o'),
                      splits=['train'])
  np.testing.assert_array_equal(_labels(tmp_path / 'o')['a'], ids)
  # A 16-bit RGB PNG is refused, not cut to its high byte.
  rgb16 = np.stack([ids.astype(np.uint16)] * 3, -1)
  from label_maps_test import _raw_png  # pylint: disable=g-import-not-at-top
  (tmp_path / 'src' / 'train_label' / 'a.png').write_bytes(
      _raw_png(rgb16, 16, 2))
  with pytest.raises(build.BuildError, match='16-bit-per-channel RGB'):
    build.build_dataset('facades', str(tmp_path / 'src'),
                        str(tmp_path / 'o2'), splits=['train'])


# ---------------------------------------------------------------------------
# COCO-Stuff from the official release.


def _reference_instance_map(label, anns):
  """`coco_generate_instance_map.py` of the reference, for one image."""
  from skimage.draw import polygon  # pylint: disable=g-import-not-at-top
  img = label.copy()
  count = 0
  for ann in anns:
    if isinstance(ann['segmentation'], list):
      for seg in ann['segmentation']:
        poly = np.array(seg).reshape((int(len(seg) / 2), 2))
        rr, cc = polygon(poly[:, 1] - 1, poly[:, 0] - 1)
        img[rr, cc] = count
      count += 1
  return img


def _official_coco(root: pathlib.Path):
  """A tiny official-layout COCO-Stuff split: 3 images, polygons + crowd."""
  h, w = 20, 24
  images, anns = [], []
  labels = {}
  polys = {
      1: [[[2, 2, 10, 2, 10, 9, 2, 9]],  # A rectangle.
          {'counts': [0, 10], 'size': [h, w]},  # Crowd RLE: skipped.
          [[12, 3, 20, 5, 15, 14], [3, 12, 6, 12, 6, 18]]],  # Two parts.
      2: [],  # No annotation: the instance map is the label map.
      3: [[[1, 1, 22, 1, 22, 18, 1, 18]], [[5, 5, 9, 5, 7, 11]]],
  }
  ann_id = 1
  for k, (image_id, segs) in enumerate(polys.items()):
    name = f'{image_id:012d}'
    images.append({'id': image_id, 'file_name': f'{name}.jpg',
                   'height': h, 'width': w})
    for seg in segs:
      crowd = isinstance(seg, dict)
      anns.append({'id': ann_id, 'image_id': image_id, 'category_id': 1,
                   'segmentation': seg, 'iscrowd': int(crowd),
                   'area': 1.0, 'bbox': [0, 0, 1, 1]})
      ann_id += 1
    label = _label(h, w, 181, seed=k)
    label[0, 0] = 255
    labels[name] = label
    _save(root / 'train2017' / f'{name}.jpg', _image(h, w, k))
    _save(root / 'stuffthingmaps_trainval2017' / 'train2017' / f'{name}.png',
          label)
  (root / 'annotations').mkdir(parents=True)
  coco = {'images': images, 'annotations': anns,
          'categories': [{'id': 1, 'name': 'thing', 'supercategory': 'x'}]}
  (root / 'annotations' / 'instances_train2017.json').write_text(
      json.dumps(coco))
  return labels, {i['file_name'][:-4]: [a for a in anns
                                        if a['image_id'] == i['id']]
                  for i in images}


def test_coco_stuff_official_release_equals_the_prepared_layout(tmp_path):
  pytest.importorskip('pycocotools', reason='the coco extra (pycocotools)')
  pytest.importorskip('skimage', reason='the coco extra (scikit-image)')
  official = tmp_path / 'official'
  labels, anns = _official_coco(official)
  # The prepared layout, its train_inst made as the reference script does.
  prepared = tmp_path / 'prepared'
  for name, label in labels.items():
    (prepared / 'train_img').mkdir(parents=True, exist_ok=True)
    os.link(official / 'train2017' / f'{name}.jpg',
            prepared / 'train_img' / f'{name}.jpg')
    _save(prepared / 'train_label' / f'{name}.png', label)
    _save(prepared / 'train_inst' / f'{name}.png',
          _reference_instance_map(label, anns[name]))
  build.build_dataset('coco_stuff', str(official), str(tmp_path / 'o1'),
                      splits=['train'])
  build.build_dataset('coco_stuff', str(prepared), str(tmp_path / 'o2'),
                      splits=['train'])
  a, b = _read_split(tmp_path / 'o1', 'train'), _read_split(tmp_path / 'o2',
                                                           'train')
  assert [e['file_name'] for e in a] == [e['file_name'] for e in b]
  assert len(a) == 3
  for x, y in zip(a, b):
    assert x['image'] == y['image']
    np.testing.assert_array_equal(_decode_png(x['label']),
                                  _decode_png(y['label']))
    np.testing.assert_array_equal(_decode_png(x['instance']),
                                  _decode_png(y['instance']))
  inst = {e['file_name'].decode(): _decode_png(e['instance']) for e in a}
  # Hand-checked pixels: the rectangle (x 2..10, y 2..9) is instance 0 at
  # rows/cols 1..9 (the reference's -1 shift); the crowd RLE is not painted
  # and not counted, so the two-part polygon is instance 1.
  first = inst['000000000001']
  assert (first[1:9, 1:10] == 0).all()
  assert first[11, 4] == 1 and first[4, 14] == 1
  np.testing.assert_array_equal(inst['000000000002'],
                                labels['000000000002'])
  assert records.DatasetInfo.load(str(tmp_path / 'o1')).has_instance


def test_coco_stuff_official_errors(tmp_path):
  with pytest.raises(build.layouts.PairingError,
                     match='neither COCO-Stuff layout'):
    build.build_dataset('coco_stuff', str(tmp_path), str(tmp_path / 'o'),
                        splits=['train'])
  pytest.importorskip('pycocotools', reason='the coco extra (pycocotools)')
  root = tmp_path / 'official'
  _official_coco(root)
  ann = root / 'annotations' / 'instances_train2017.json'
  coco = json.loads(ann.read_text())
  coco['images'] = coco['images'][1:]
  coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] != 1]
  ann.write_text(json.dumps(coco))
  coco_instances._CACHE.clear()  # pylint: disable=protected-access
  with pytest.raises(build.BuildError, match='000000000001 is not in'):
    build.build_dataset('coco_stuff', str(root), str(tmp_path / 'o'),
                        splits=['train'])
  ann.unlink()
  with pytest.raises(build.layouts.PairingError,
                     match='instances_train2017.json is missing'):
    build.build_dataset('coco_stuff', str(root), str(tmp_path / 'o'),
                        splits=['train'])


# ---------------------------------------------------------------------------
# Symlink loops.


def test_symlink_loops_do_not_hang_the_build(tmp_path):
  src = tmp_path / 'src'
  for split in ('train',):
    name = 'aachen_000000_000000'
    city = 'aachen'
    _save(src / 'leftImg8bit' / split / city / f'{name}_leftImg8bit.png',
          _image(8, 16))
    gt = src / 'gtFine' / split / city
    _save(gt / f'{name}_gtFine_labelIds.png', _label(8, 16, 34))
    _save(gt / f'{name}_gtFine_instanceIds.png',
          np.full((8, 16), 7, np.uint16))
    for folder in (src / 'leftImg8bit' / split / city, gt):
      os.symlink('..', folder / 'loop')
      os.symlink('..', folder.parent / 'loop2')
  code = ('import sys; from data_pipelines import build; '
          's = build.build_dataset("cityscapes", sys.argv[1], sys.argv[2], '
          'splits=["train"]); print(s["train"]["examples"])')
  proc = subprocess.run(
      [sys.executable, '-c', code, str(src), str(tmp_path / 'out')],
      capture_output=True, text=True, timeout=180, check=False,
      cwd=pathlib.Path(__file__).resolve().parent.parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == '1'
  assert 'already read' in proc.stderr
  assert 'two image files' not in proc.stderr
