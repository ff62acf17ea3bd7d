"""Tests of data_pipelines.build and data_pipelines.layouts."""
import io
import pathlib
from typing import Dict, List

from absl import flags
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from data_pipelines import build
from data_pipelines import examples
from data_pipelines import layouts
from data_pipelines import records
from spade_jax import label_maps

# ---------------------------------------------------------------------------
# Helpers.


def _save(path: pathlib.Path, arr: np.ndarray, fmt: str = None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  if arr.dtype == np.uint16:
    im = Image.fromarray(arr.astype('<u2'))
  else:
    im = Image.fromarray(arr)
  im.save(path, format=fmt)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _label(h: int, w: int, hi: int, seed: int = 0,
           dtype=np.uint8) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, hi + 1, (h, w)).astype(dtype)


def _read_split(data_dir: pathlib.Path, split: str) -> List[Dict[str, object]]:
  info = records.DatasetInfo.load(str(data_dir))
  paths = info.shard_files(split)
  out = []
  for serialized in tf.data.TFRecordDataset(paths):
    ex = records.parse_example(serialized)
    out.append({k: v.numpy() for k, v in ex.items()})
  return out


def _decode_png(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)))


def _assert_nothing_valid(data_dir: pathlib.Path) -> None:
  """No build to find and no shard anywhere under data_dir (temp dirs too)."""
  if not data_dir.exists():
    return
  with pytest.raises(FileNotFoundError):
    records.DatasetInfo.load(str(data_dir))
  leftovers = [p for p in data_dir.rglob('*') if 'tfrecord' in p.name or
               p.name.startswith('.build-')]
  assert not leftovers, leftovers


def _coco_like(root: pathlib.Path, split: str, names, hi: int,
               instance: bool = True, size=(12, 16)) -> None:
  h, w = size
  for i, name in enumerate(names):
    _save(root / f'{split}_img' / f'{name}.jpg', _image(h, w, i))
    _save(root / f'{split}_label' / f'{name}.png', _label(h, w, hi, i))
    if instance:
      _save(root / f'{split}_inst' / f'{name}.png', _label(h, w, 40, i + 7))


# ---------------------------------------------------------------------------
# COCO-Stuff sample (real data).


def test_coco_sample_builds_exact_bytes(coco_sample_dir, tmp_path):
  out = tmp_path / 'coco'
  summary = build.build_dataset('coco_stuff', str(coco_sample_dir), str(out),
                                num_shards=3)
  src_names = {s: sorted(p.stem for p in (coco_sample_dir /
                                          f'{s}_img').glob('*.jpg'))
               for s in ('train', 'val')}
  assert {s: m['examples'] for s, m in summary.items()} == {
      s: len(n) for s, n in src_names.items()}
  assert all(m['shards'] == 3 and m['bytes'] > 0 for m in summary.values())
  info = records.DatasetInfo.load(str(out))
  assert (info.dataset, info.label_nc, info.contain_dontcare_label,
          info.has_instance) == ('coco_stuff', 182, True, True)
  assert len(info.colors) == 183
  for split, names in src_names.items():
    assert info.splits[split] == {'num_examples': len(names), 'num_shards': 3}
    for p in info.shard_files(split):
      assert pathlib.Path(p).stat().st_size > 0
    examples = _read_split(out, split)
    assert sorted(e['file_name'].decode() for e in examples) == names
    for e in examples:
      name = e['file_name'].decode()
      assert e['image'] == (coco_sample_dir / f'{split}_img' /
                            f'{name}.jpg').read_bytes()
      label_src = coco_sample_dir / f'{split}_label' / f'{name}.png'
      assert e['label'] == label_src.read_bytes()
      np.testing.assert_array_equal(_decode_png(e['label']),
                                    np.asarray(Image.open(label_src)))
      # Instance maps: the same values as a 16-bit PNG (the feature's).
      assert e['instance'][24] == 16
      np.testing.assert_array_equal(
          _decode_png(e['instance']),
          np.asarray(Image.open(coco_sample_dir / f'{split}_inst' /
                                f'{name}.png')))
      w, h = Image.open(io.BytesIO(e['image'])).size
      assert (e['height'], e['width']) == (h, w)
  assert not list(out.glob('.build-*'))


def test_splits_are_mixed_across_shards_in_a_fixed_order(tmp_path):
  src = tmp_path / 'src'
  names = [f'{i:03d}' for i in range(12)]
  _coco_like(src, 'train', names, 12, instance=False)
  _coco_like(src, 'val', names, 12, instance=False)
  orders = []
  for out in (tmp_path / 'out', tmp_path / 'again'):
    build.build_dataset('facades', str(src), str(out), num_shards=2)
    orders.append({s: [e['file_name'].decode() for e in _read_split(out, s)]
                   for s in ('train', 'val')})
  for split in ('train', 'val'):
    assert sorted(orders[0][split]) == names
    assert orders[0][split] != names  # tfds shuffles by key.
  assert orders[0] == orders[1]


# ---------------------------------------------------------------------------
# Other layouts on tiny folders.


def test_ade20k_layout(tmp_path):
  root = tmp_path / 'src' / 'ADEChallengeData2016'
  for split, folder, n in (('train', 'training', 3), ('val', 'validation', 2)):
    for i in range(n):
      name = f'ADE_{split}_{i:08d}'
      _save(root / 'images' / folder / f'{name}.jpg', _image(10, 14, i))
      label = _label(10, 14, 150, i)
      label[0, 0], label[0, 1] = 0, 150  # Both ends of the raw range.
      _save(root / 'annotations' / folder / f'{name}.png', label)
  out = tmp_path / 'out'
  summary = build.build_dataset('ade20k', str(tmp_path / 'src'), str(out))
  assert {s: (m['examples'], m['shards']) for s, m in summary.items()} == {
      'train': (3, 1), 'val': (2, 1)}
  info = records.DatasetInfo.load(str(out))
  assert (info.label_nc, info.contain_dontcare_label, info.has_instance) == (
      150, True, False)
  for e in _read_split(out, 'val'):
    assert e['instance'] == b''
    name = e['file_name'].decode()
    assert e['label'] == (root / 'annotations' / 'validation' /
                          f'{name}.png').read_bytes()


def test_cityscapes_layout_with_16bit_instances(tmp_path):
  src = tmp_path / 'src'
  expected = {}
  for split, cities in (('train', ('aachen', 'bonn')), ('val', ('lindau',))):
    for c, city in enumerate(cities):
      name = f'{city}_000000_{c:06d}'
      _save(src / 'leftImg8bit' / split / city / f'{name}_leftImg8bit.png',
            _image(8, 16, c))
      gt = src / 'gtFine' / split / city
      _save(gt / f'{name}_gtFine_labelIds.png', _label(8, 16, 34, c))
      inst = np.full((8, 16), 7, np.uint16)
      inst[:, 8:] = 26000 + c  # Car instances: class 26 * 1000 + k.
      _save(gt / f'{name}_gtFine_instanceIds.png', inst)
      # Files of the release that are not inputs.
      _save(gt / f'{name}_gtFine_color.png', _image(8, 16, c))
      (gt / f'{name}_gtFine_polygons.json').write_text('{}')
      expected[name] = inst
  out = tmp_path / 'out'
  summary = build.build_dataset('cityscapes', str(src), str(out))
  assert {s: m['examples'] for s, m in summary.items()} == {'train': 2,
                                                            'val': 1}
  info = records.DatasetInfo.load(str(out))
  assert (info.label_nc, info.contain_dontcare_label, info.has_instance) == (
      35, False, True)
  assert info.class_names[26] == 'car' and info.colors[26] == [0, 0, 142]
  for split in ('train', 'val'):
    for e in _read_split(out, split):
      name = e['file_name'].decode()
      assert e['instance'][24] == 16  # PNG bit depth: kept 16-bit.
      np.testing.assert_array_equal(_decode_png(e['instance']),
                                    expected[name])
      assert int(_decode_png(e['instance']).max()) > 255


def test_facades_layout(tmp_path):
  src, out = tmp_path / 'src', tmp_path / 'out'
  _coco_like(src, 'train', ['a', 'b', 'c'], 12, instance=False)
  _coco_like(src, 'val', ['d'], 12, instance=False)
  summary = build.build_dataset('facades', str(src), str(out),
                                splits=['train'], num_shards=2)
  assert summary['train']['examples'] == 3 and summary['train']['shards'] == 2
  info = records.DatasetInfo.load(str(out))
  assert list(info.splits) == ['train']
  assert (info.label_nc, info.has_instance) == (13, False)


def test_custom_layout_converts_palette_and_bmp(tmp_path):
  image_dir, label_dir = tmp_path / 'img', tmp_path / 'lbl'
  inst_dir = tmp_path / 'inst'
  img = _image(9, 11, 1)
  _save(image_dir / 'x.bmp', img)
  values = _label(9, 11, 4, 2)
  values[0, 0] = 255  # Don't care.
  palette_label = Image.fromarray(values, mode='L').convert('P')
  palette_label.putpalette(list(range(256)) * 3)
  label_dir.mkdir()
  palette_label.save(label_dir / 'x.png')
  assert Image.open(label_dir / 'x.png').mode == 'P'
  _save(inst_dir / 'x.png', _label(9, 11, 3, 3))
  _save(image_dir / 'y.jpg', _image(9, 11, 4))
  _save(label_dir / 'y.png', _label(9, 11, 4, 5))
  _save(inst_dir / 'y.png', _label(9, 11, 3, 6))
  out = tmp_path / 'out'
  summary = build.build_dataset(
      'custom', None, str(out), image_dir=str(image_dir),
      label_dir=str(label_dir), instance_dir=str(inst_dir), label_nc=5,
      contain_dontcare_label=True, split='test')
  assert summary['test']['examples'] == 2
  info = records.DatasetInfo.load(str(out))
  assert (info.dataset, info.label_nc, info.contain_dontcare_label,
          info.has_instance) == ('custom', 5, True, True)
  by_name = {e['file_name'].decode(): e for e in _read_split(out, 'test')}
  x = by_name['x']
  assert x['label'][25] == 0  # Re-encoded as a grayscale PNG...
  np.testing.assert_array_equal(_decode_png(x['label']), values)  # ...same.
  assert x['image'].startswith(b'\x89PNG')  # BMP stored as lossless PNG.
  np.testing.assert_array_equal(_decode_png(x['image']), img)
  assert by_name['y']['image'] == (image_dir / 'y.jpg').read_bytes()


def test_an_existing_build_is_kept_unless_overwrite(tmp_path, caplog):
  src, out = tmp_path / 'src', tmp_path / 'out'
  _coco_like(src, 'train', ['a', 'b'], 12, instance=False)
  _coco_like(src, 'val', ['c', 'd', 'e'], 12, instance=False)
  build.build_dataset('facades', str(src), str(out))
  folder = pathlib.Path(records.DatasetInfo.load(str(out)).folder)
  mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
  with caplog.at_level('WARNING'):
    build.build_dataset('facades', str(src), str(out), num_shards=2)
  assert 'pass --overwrite' in caplog.text
  assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
  build.build_dataset('facades', str(src), str(out), num_shards=2,
                      overwrite=True)
  info = records.DatasetInfo.load(str(out))
  assert info.folder == str(folder)
  assert info.splits == {'train': {'num_examples': 2, 'num_shards': 2},
                         'val': {'num_examples': 3, 'num_shards': 2}}
  with pytest.raises(ValueError, match='num_shards'):
    build.build_dataset('facades', str(src), str(out), num_shards=3,
                        overwrite=True)
  assert records.DatasetInfo.load(str(out)).splits == info.splits
  assert not list(out.glob('.build-*')) and not list(
      folder.parent.glob('*.build-old'))
  assert len(_read_split(out, 'train')) == 2


def test_cli_main(tmp_path, capsys):
  src, out = tmp_path / 'src', tmp_path / 'out'
  _coco_like(src, 'train', ['a', 'b'], 12, instance=False)
  build.define_flags()
  argv = ['build', '--dataset=facades', f'--manual_dir={src}',
          f'--data_dir={out}', '--splits=train']
  flags.FLAGS(argv)
  try:
    build.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  printed = capsys.readouterr().out
  assert 'train: 2 examples, 1 shards' in printed and 'bytes' in printed
  assert records.DatasetInfo.load(str(out)).splits['train'][
      'num_examples'] == 2


# ---------------------------------------------------------------------------
# Bad inputs: one error naming the file(s), nothing valid-looking left.


def test_unpaired_files_are_all_listed(tmp_path):
  src, out = tmp_path / 'src', tmp_path / 'out'
  _coco_like(src, 'train', ['a', 'b', 'c'], 100)
  (src / 'train_label' / 'b.png').unlink()
  (src / 'train_inst' / 'c.png').unlink()
  _save(src / 'train_label' / 'z.png', _label(12, 16, 5))
  _coco_like(src, 'val', ['v'], 100)
  with pytest.raises(layouts.PairingError) as e:
    build.build_dataset('coco_stuff', str(src), str(out))
  msg = str(e.value)
  assert '3 unpaired example(s)' in msg
  assert 'z: has label z.png; no image, instance file' in msg
  assert 'b: has image b.jpg, instance b.png; no label file' in msg
  assert 'c: has image c.jpg, label c.png; no instance file' in msg
  assert 'a:' not in msg
  _assert_nothing_valid(out)


def test_missing_split_folder(tmp_path):
  src, out = tmp_path / 'src', tmp_path / 'out'
  _coco_like(src, 'train', ['a'], 12, instance=False)
  with pytest.raises(layouts.PairingError, match='val_img'):
    build.build_dataset('facades', str(src), str(out))
  _assert_nothing_valid(out)


def _corrupt_image(src):
  path = src / 'train_img' / 'b.jpg'
  path.write_bytes(b'not a jpeg at all')
  return path, 'cannot decode image'


def _truncated_image(src):
  path = src / 'train_img' / 'b.jpg'
  _save(path, _image(64, 64, 3))
  path.write_bytes(path.read_bytes()[:300])
  return path, 'cannot decode image'


def _corrupt_label(src):
  path = src / 'train_label' / 'b.png'
  path.write_bytes(path.read_bytes()[:40])
  return path, 'cannot decode the label map'


def _label_size(src):
  path = src / 'train_label' / 'b.png'
  _save(path, _label(12, 15, 5))
  return path, 'size 15x12'


def _instance_size(src):
  path = src / 'train_inst' / 'b.png'
  _save(path, _label(11, 16, 5))
  return path, 'instance size'


def _out_of_range(src):
  path = src / 'train_label' / 'b.png'
  label = _label(12, 16, 5)
  label[3, 3] = 200
  _save(path, label)
  return path, 'class ids 200'


def _rgb_label(src):
  path = src / 'train_label' / 'b.png'
  _save(path, _image(12, 16))
  return path, '--label_format rgb'


@pytest.mark.parametrize('corrupt', [
    _corrupt_image, _truncated_image, _corrupt_label, _label_size,
    _instance_size, _out_of_range, _rgb_label])
def test_bad_file_is_named(tmp_path, corrupt):
  src, out = tmp_path / 'src', tmp_path / 'out'
  _coco_like(src, 'train', ['a', 'b', 'c'], 181)
  bad_path, what = corrupt(src)
  with pytest.raises(build.BuildError) as e:
    build.build_dataset('coco_stuff', str(src), str(out), splits=['train'])
  assert str(bad_path) in str(e.value) and what in str(e.value)
  assert '1 bad example' in str(e.value)
  _assert_nothing_valid(out)


@pytest.mark.parametrize('dataset,bad_value', [
    ('facades', 13), ('facades', 255), ('cityscapes', 255), ('ade20k', 151),
    ('ade20k', 255)])
def test_class_id_range_per_dataset(dataset, bad_value):
  layout = layouts.get_layout(dataset)
  arr = np.zeros((3, 3), np.uint8)
  assert examples.bad_label_values(arr, layout) == []
  arr[1, 1] = bad_value
  assert examples.bad_label_values(arr, layout) == [bad_value]


def test_dontcare_value_allowed_where_the_set_has_it():
  arr = np.array([[0, 181, 255]], np.uint8)
  assert examples.bad_label_values(arr, layouts.get_layout('coco_stuff')) == []
  custom = layouts.custom_layout(5, True, False, 'train')
  assert examples.bad_label_values(arr, custom) == [181]
  assert examples.bad_label_values(
      arr, layouts.custom_layout(5, False, False, 'train')) == [181, 255]


def test_all_bad_files_of_a_split_in_one_error(tmp_path):
  src, out = tmp_path / 'src', tmp_path / 'out'
  _coco_like(src, 'train', ['a', 'b', 'c'], 12, instance=False)
  for name in ('a', 'c'):
    _save(src / 'train_label' / f'{name}.png', _label(12, 16, 20, 1))
  with pytest.raises(build.BuildError) as e:
    build.build_dataset('facades', str(src), str(out), splits=['train'])
  msg = str(e.value)
  assert '2 bad example' in msg
  assert str(src / 'train_label' / 'a.png') in msg
  assert str(src / 'train_label' / 'c.png') in msg
  _assert_nothing_valid(out)


def test_failed_rebuild_keeps_previous_build(tmp_path):
  src, out = tmp_path / 'src', tmp_path / 'out'
  _coco_like(src, 'train', ['a', 'b'], 12, instance=False)
  build.build_dataset('facades', str(src), str(out), splits=['train'])
  folder = pathlib.Path(records.DatasetInfo.load(str(out)).folder)
  before = {p.name: p.read_bytes() for p in folder.iterdir()}
  (src / 'train_img' / 'a.jpg').write_bytes(b'broken')
  with pytest.raises(build.BuildError, match='a.jpg'):
    build.build_dataset('facades', str(src), str(out), splits=['train'],
                        overwrite=True)
  assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
  assert not list(out.glob('.build-*'))


# ---------------------------------------------------------------------------
# Small pieces.


def test_label_colormap_matches_reference_start():
  # util.labelcolormap of the reference: id 0 -> (128, 0, 0), 1 -> (0, 128, 0)
  assert label_maps.label_colormap(4).tolist() == [
      [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
  assert len(label_maps.label_colormap(35)) == 35


def test_unknown_dataset_and_split():
  with pytest.raises(ValueError, match='Unknown data set'):
    layouts.get_layout('imagenet')
  with pytest.raises(ValueError, match='splits'):
    layouts.find_examples(layouts.get_layout('facades'), 'test', 'x')
  with pytest.raises(ValueError, match='label_nc'):
    layouts.custom_layout(None, False, False, 'train')
