"""The data sets as tensorflow-datasets builders.

One `tfds.core.GeneratorBasedBuilder` per supported set: `spade_coco_stuff`,
`spade_ade20k`, `spade_cityscapes`, `spade_facades`, `spade_custom` (folders
of your own) and `spade_synthetic` (generated, no download). Each reads the
manually downloaded release (`MANUAL_DOWNLOAD_INSTRUCTIONS`, the layouts of
`layouts.py`) and checks every example (`examples.py`: pairs, sizes, id
ranges with 255 only where the set allows it, 8/16-bit maps); all bad files
of a split are listed in one error, and as tfds writes into a temporary
folder that is renamed only when every split succeeded, a failed build
leaves nothing that looks valid.

A built set is a tfds data set like any other:

  import data_pipelines.tfds_builders  # registers the builders
  builder = tfds.builder('spade_coco_stuff', data_dir=DATA)
  ds = builder.as_dataset(split='train')  # image, label, instance, ...

Its records keep the keys `records.FEATURE_SPEC` parses (image bytes as
released, label and instance maps as grayscale PNGs, file_name, height,
width), so `spade_jax.input_pipeline` reads the same files with its own
decoding and checks; the classes' names and colours and the label
conventions (`metadata.DatasetInfo`) are the data set's tfds metadata
(`metadata.json`). `python -m data_pipelines.build` drives these builders.
"""
import dataclasses
import io
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from data_pipelines import coco_instances
from data_pipelines import examples as examples_lib
from data_pipelines import layouts
from data_pipelines import metadata
from data_pipelines import scenes

VERSION = tfds.core.Version('1.0.0')
RELEASE_NOTES = {
    '1.0.0': 'spade_jax records as a tfds data set: images as released, '
             'label maps 8-bit (16 where the ids need it), instance maps '
             '16-bit grayscale PNGs.',
}
_MAX_REPORTED_ERRORS = 50

_PREPARED_LAYOUT = (
    'Put the files as the reference SPADE repository prepares them (its '
    'datasets/ folder layout) in the manual folder (--manual_dir): ')
INSTRUCTIONS = {
    'coco_stuff': _PREPARED_LAYOUT + (
        'train_img/ train_label/ train_inst/ val_img/ val_label/ val_inst/ '
        '(COCO-Stuff: images from cocodataset.org, stuffthingmaps_trainval2017'
        '.zip labels, instance maps made with the reference\'s script), or '
        'the official release: train2017/ val2017/ '
        'stuffthingmaps_trainval2017/ and annotations/instances_*2017.json '
        '(instance maps are then drawn from the annotations).'),
    'ade20k': _PREPARED_LAYOUT + (
        'ADEChallengeData2016/ from '
        'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip'
        ' (images/ and annotations/, training and validation).'),
    'cityscapes': _PREPARED_LAYOUT + (
        'leftImg8bit/ and gtFine/ from https://www.cityscapes-dataset.com '
        '(leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip; an account '
        'is needed).'),
    'facades': _PREPARED_LAYOUT + (
        'train_img/ train_label/ val_img/ val_label/ (the CMP Facade '
        'database, as pix2pix\'s facades set).'),
    'custom': (
        'No download: pass your folders to `python -m data_pipelines.build '
        '--dataset custom --image_dir I --label_dir L [--instance_dir N] '
        '--label_nc K`; images and maps pair by file name.'),
}


def features(label_bits: int, has_instance: bool) -> tfds.features.FeaturesDict:
  """The features of a built set (their serialized keys: FEATURE_SPEC's)."""
  gray = lambda bits: tfds.features.Image(  # pylint: disable=g-long-lambda
      shape=(None, None, 1), dtype=np.uint8 if bits == 8 else np.uint16,
      encoding_format='png')
  spec = {
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': gray(label_bits),
      'file_name': tfds.features.Text(),
      'height': tfds.features.Scalar(dtype=np.int64),
      'width': tfds.features.Scalar(dtype=np.int64),
  }
  if has_instance:
    spec['instance'] = gray(16)
  return tfds.features.FeaturesDict(spec)


def _bad_split_error(split: str, errors: List[str], stopped: bool
                     ) -> examples_lib.BuildError:
  more = ' (stopped checking there)' if stopped else ''
  return examples_lib.BuildError(
      f'{len(errors)} bad example(s) in split {split!r}{more}:\n  ' +
      '\n  '.join(errors))


class SpadeBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What the real-data builders share: a layout read and checked.

  Construction options (not part of the data set's identity): label_format
  ('ids' | 'rgb'), palette (a palette file for 'rgb'), splits (which to
  build; default all), num_workers (threads reading files), and for custom
  the folders image_dir, label_dir, instance_dir.
  """
  VERSION = VERSION
  RELEASE_NOTES = RELEASE_NOTES
  LAYOUT = ''

  def __init__(self, *, label_format: str = 'ids',
               palette: Optional[str] = None,
               splits: Optional[Sequence[str]] = None,
               num_workers: Optional[int] = None,
               folders: Optional[Dict[str, Optional[str]]] = None, **kwargs):
    self._label_format_name = label_format
    self._palette_file = palette
    self._splits = list(splits) if splits else None
    self._num_workers = num_workers
    self._folders = dict(folders or {})
    super().__init__(**kwargs)

  def layout(self) -> layouts.Layout:
    return layouts.get_layout(self.LAYOUT)

  def label_format(self) -> examples_lib.LabelFormat:
    return examples_lib.make_label_format(self._label_format_name,
                                          self.layout(), self._palette_file)

  def spade_info(self) -> metadata.DatasetInfo:
    """The label conventions, names and colours (tfds metadata)."""
    info = examples_lib.dataset_info_for(self.layout())
    fmt = self.label_format()
    if fmt.palette is not None:
      info = dataclasses.replace(info, colors=fmt.palette.tolist())
    return info

  def _info(self) -> tfds.core.DatasetInfo:
    layout = self.layout()
    return self.dataset_info_from_configs(
        description=f'{layout.name} for SPADE (spade_jax records).',
        features=features(examples_lib.label_bits(layout),
                          layout.has_instance),
        metadata=tfds.core.MetadataDict(
            spade=self.spade_info().fields()))

  def examples(self, split: str, manual_dir: Optional[str]
               ) -> List[layouts.Example]:
    """The split's examples, paired (PairingError lists every problem)."""
    return layouts.find_examples(self.layout(), split, manual_dir,
                                 **self._folders)

  def _manual(self, dl_manager) -> Optional[str]:
    return str(dl_manager.manual_dir)

  def _split_generators(self, dl_manager):
    layout = self.layout()
    manual_dir = self._manual(dl_manager)
    wanted = self._splits or list(layout.splits)
    for split in wanted:
      if split not in layout.splits:
        raise ValueError(f'{layout.name} has no split {split!r}; it has '
                         f'{", ".join(layout.splits)}.')
    found = {s: self.examples(s, manual_dir) for s in wanted}
    for path in sorted({e.annotation_file for exs in found.values()
                        for e in exs if e.annotation_file}):
      logging.info('Reading the COCO annotations %s', path)
      try:
        coco_instances.read_annotations(path)  # Cached for the examples.
      except coco_instances.AnnotationError as e:
        raise examples_lib.BuildError(str(e)) from None
    fmt = self.label_format()
    return {s: self._generate_examples(s, exs, fmt)
            for s, exs in found.items()}

  def _generate_examples(self, split, found, fmt):
    layout = self.layout()
    workers = self._num_workers or 1
    load = lambda e: examples_lib.try_load(  # pylint: disable=g-long-lambda
        lambda x: examples_lib.load_example(x, layout, fmt), e)
    errors = []
    for example, (fields, error) in zip(
        found, examples_lib.ordered_map(load, found, workers)):
      if error is not None:
        errors.append(error)
        if len(errors) >= _MAX_REPORTED_ERRORS:
          break
        continue
      if not errors:
        yield example.name, fields
    if errors:
      raise _bad_split_error(split, errors,
                             len(errors) >= _MAX_REPORTED_ERRORS)


class SpadeCocoStuff(SpadeBuilder):
  """COCO-Stuff (182 classes + don't-care, instance maps)."""
  LAYOUT = 'coco_stuff'
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS['coco_stuff']


class SpadeAde20k(SpadeBuilder):
  """ADE20K (150 classes; raw 0 'other' becomes don't-care when read)."""
  LAYOUT = 'ade20k'
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS['ade20k']


class SpadeCityscapes(SpadeBuilder):
  """Cityscapes (35 label ids, 16-bit instance maps)."""
  LAYOUT = 'cityscapes'
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS['cityscapes']


class SpadeFacades(SpadeBuilder):
  """CMP Facades (13 classes, no instances)."""
  LAYOUT = 'facades'
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS['facades']


@dataclasses.dataclass(eq=False)
class CustomConfig(tfds.core.BuilderConfig):
  """A custom set's identity: its classes, don't-care value, instances."""
  label_nc: int = 1
  contain_dontcare_label: bool = False
  has_instance: bool = False
  split: str = 'train'


def known_config(builder_cls, config: tfds.core.BuilderConfig):
  """`config`, or its name when the class defines it (tfds wants the name)."""
  names = [c.name for c in builder_cls.BUILDER_CONFIGS]
  return config.name if config.name in names else config


def custom_config(label_nc: int, contain_dontcare_label: bool,
                  has_instance: bool, split: str) -> CustomConfig:
  layouts.custom_layout(label_nc, contain_dontcare_label, has_instance,
                        split)  # Checks the values.
  name = (f'{split}_{label_nc}classes' +
          ('_dontcare' if contain_dontcare_label else '') +
          ('_instances' if has_instance else ''))
  return CustomConfig(name=name, label_nc=int(label_nc),
                      contain_dontcare_label=bool(contain_dontcare_label),
                      has_instance=bool(has_instance), split=split)


class SpadeCustom(SpadeBuilder):
  """Your own folders of images, label maps and (optional) instance maps."""
  LAYOUT = 'custom'
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS['custom']
  BUILDER_CONFIGS = [custom_config(1, False, False, 'train')]

  def layout(self) -> layouts.Layout:
    c = self.builder_config
    return layouts.custom_layout(c.label_nc, c.contain_dontcare_label,
                                 c.has_instance, c.split)

  def _manual(self, dl_manager) -> Optional[str]:
    del dl_manager  # The folders are options.
    return None


def scene_fields(seed: int, split: str, index: int, size: int
                 ) -> Dict[str, Any]:
  """The stored fields of one generated scene."""
  image, label, inst = scenes.generate_scene(
      scenes.scene_rng(seed, split, index), size)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return {'image': buf.getvalue(),
          'label': examples_lib.at_depth(b'', label, 8),
          'instance': examples_lib.at_depth(b'', inst, 16),
          'file_name': f'{split}_{index:06d}', 'height': size, 'width': size}


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """The synthetic set's parameters (scenes per split, size, seed)."""
  num_train: int = 2000
  num_val: int = 64
  size: int = 96
  seed: int = 0


def synthetic_config(num_train: int, num_val: int, size: int,
                     seed: int = 0) -> SyntheticConfig:
  if size < 16:
    raise ValueError(f'synthetic scenes need size >= 16, got {size}.')
  if num_train < 0 or num_val < 0 or num_train + num_val == 0:
    raise ValueError(f'Bad scene counts: train {num_train}, val {num_val}.')
  return SyntheticConfig(
      name=f'{num_train}x{num_val}_{size}px_seed{seed}',
      num_train=int(num_train), num_val=int(num_val), size=int(size),
      seed=int(seed))


class SpadeSynthetic(tfds.core.GeneratorBasedBuilder):
  """Generated landscape scenes (`scenes.py`): no download, any size."""
  VERSION = VERSION
  RELEASE_NOTES = RELEASE_NOTES
  BUILDER_CONFIGS = [synthetic_config(2000, 64, 96, 0)]

  def __init__(self, *, num_workers: Optional[int] = None, **kwargs):
    self._num_workers = num_workers
    super().__init__(**kwargs)

  def spade_info(self) -> metadata.DatasetInfo:
    return scenes.dataset_info()

  def _info(self) -> tfds.core.DatasetInfo:
    info = self.spade_info()
    return self.dataset_info_from_configs(
        description='Synthetic landscape scenes for SPADE (spade_jax).',
        features=features(8, info.has_instance),
        metadata=tfds.core.MetadataDict(spade=info.fields()))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {split: self._generate_examples(split, n)
            for split, n in (('train', c.num_train), ('val', c.num_val))
            if n > 0}

  def _generate_examples(self, split: str, n: int):
    c = self.builder_config
    scene = lambda i: (i, scene_fields(c.seed, split, i, c.size))
    for i, fields in examples_lib.ordered_map(scene, range(n),
                                              self._num_workers or 1):
      yield i, fields


def is_prepared(b: tfds.core.DatasetBuilder) -> bool:
  """Whether `b`'s build is complete in its data_dir."""
  return os.path.isfile(os.path.join(b.data_dir, metadata.INFO_FILE))


def prepare(b: tfds.core.DatasetBuilder, num_shards: Optional[int] = None,
            manual_dir: Optional[str] = None) -> None:
  """b.download_and_prepare with nothing downloaded (no downloads/ folder)."""
  downloads = tempfile.mkdtemp(prefix='spade_jax_build_')
  try:
    b.download_and_prepare(
        download_dir=downloads, download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, num_shards=num_shards))
  except AssertionError as e:  # tfds' way to refuse, e.g. too many shards.
    raise ValueError(f'tensorflow-datasets refused to build {b.name} '
                     f'(num_shards={num_shards}): {e}') from None
  finally:
    shutil.rmtree(downloads, ignore_errors=True)


def split_summary(b: tfds.core.DatasetBuilder, seconds: float = 0.0
                  ) -> Dict[str, Dict[str, Any]]:
  """Per split of a prepared build: {'examples', 'shards', 'bytes', 'seconds'}."""
  return {name: {'examples': int(s.num_examples),
                 'shards': len(s.shard_lengths), 'bytes': int(s.num_bytes),
                 'seconds': seconds}
          for name, s in b.info.splits.items()}


BUILDERS: Dict[str, Any] = {
    'coco_stuff': SpadeCocoStuff, 'ade20k': SpadeAde20k,
    'cityscapes': SpadeCityscapes, 'facades': SpadeFacades,
    'custom': SpadeCustom, 'synthetic': SpadeSynthetic,
}
