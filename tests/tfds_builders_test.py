"""The data sets as tfds builders: built sets load with the usual tfds calls."""
import io

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from data_pipelines import build
from data_pipelines import metadata
from data_pipelines import records
from data_pipelines import tfds_builders


def test_every_builder_has_a_version_and_instructions():
  for name, cls in tfds_builders.BUILDERS.items():
    assert issubclass(cls, tfds.core.GeneratorBasedBuilder), name
    assert str(cls.VERSION) == '1.0.0' and cls.RELEASE_NOTES
    if name != 'synthetic':
      assert len(cls.MANUAL_DOWNLOAD_INSTRUCTIONS) > 40, name
  assert tfds_builders.SpadeCocoStuff.name == 'spade_coco_stuff'


def test_coco_sample_loads_with_tfds_builder_and_as_dataset(coco_sample_dir,
                                                           tmp_path):
  out = tmp_path / 'tfds'
  build.build_dataset('coco_stuff', str(coco_sample_dir), str(out))
  builder = tfds.builder('spade_coco_stuff', data_dir=str(out))
  assert builder.info.splits['val'].num_examples == 8
  assert builder.info.metadata['spade']['label_nc'] == 182
  for ex in tfds.as_numpy(builder.as_dataset(split='val')):
    name = ex['file_name'].decode()
    label = np.asarray(Image.open(coco_sample_dir / 'val_label' /
                                  f'{name}.png'))
    inst = np.asarray(Image.open(coco_sample_dir / 'val_inst' /
                                 f'{name}.png'))
    np.testing.assert_array_equal(ex['label'][..., 0], label)
    np.testing.assert_array_equal(ex['instance'][..., 0], inst)
    jpeg = (coco_sample_dir / 'val_img' / f'{name}.jpg').read_bytes()
    assert ex['image'].shape == np.asarray(Image.open(io.BytesIO(jpeg))).shape
  # The pipeline's metadata reader finds the same build from the data_dir.
  info = records.DatasetInfo.load(str(out))
  assert info.tfds_name == 'spade_coco_stuff' and info.folder == str(
      builder.data_dir)
  assert len(info.shard_files('train')) == info.splits['train']['num_shards']


def test_a_missing_manual_dir_says_what_to_download(tmp_path):
  with pytest.raises(ValueError, match='ADEChallengeData2016'):
    build.build_dataset('ade20k', str(tmp_path / 'nowhere'),
                        str(tmp_path / 'out'))


def test_several_builds_under_one_data_dir_are_chosen_by_name(tmp_path):
  for name in ('facades', 'coco_stuff'):
    (tmp_path / f'spade_{name}' / '1.0.0').mkdir(parents=True)
  for name, nc in (('facades', 13), ('coco_stuff', 182)):
    folder = tmp_path / f'spade_{name}' / '1.0.0'
    metadata.DatasetInfo(name, nc, False, False).save(str(folder))
  with pytest.raises(ValueError, match='several builds'):
    metadata.find_build(str(tmp_path))
  assert metadata.DatasetInfo.load(str(tmp_path), 'facades').label_nc == 13
