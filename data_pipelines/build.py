r"""Builds a data set from its released files (its tfds builder).

Usage:

  python -m data_pipelines.build --dataset coco_stuff \
      --manual_dir ~/datasets/cocostuff --data_dir ~/tensorflow_datasets
  python -m data_pipelines.build --dataset custom --label_dir L \
      --image_dir I [--instance_dir N] --label_nc 20 \
      [--contain_dontcare_label] [--split train] --data_dir OUT
  python -m data_pipelines.build --dataset synthetic --data_dir OUT
  ... --label_format rgb [--palette colors.json]   colour label maps
  ... --overwrite                                  rebuild an existing build

`--manual_dir` holds the files as released (see `layouts.py` for each data
set's layout, and the builders' MANUAL_DOWNLOAD_INSTRUCTIONS); `--data_dir`
is a tensorflow-datasets data_dir: the build goes into
DATA/spade_NAME[/CONFIG]/VERSION (`tfds_builders.py`), loads with
`tfds.builder('spade_NAME', data_dir=DATA)` and is what
`spade_jax/input_pipeline.py` reads (give it DATA or the build's folder as
config.data_dir).

Every example is checked while building (`examples.py`), and errors name
the file; all bad files of a split are listed in one error (at most 50).
What is stored is described in `examples.py` and `records.py`. tfds writes
the build into a temporary folder renamed when every split succeeded, so a
failed build leaves nothing that looks valid; tfds shuffles each split's
examples across its shards by key, so every shard mixes the whole set. An
existing build is kept (and reported) unless --overwrite is given; then the
new one is made beside it and replaces it only once complete.
"""
import os
import shutil
import sys
import time
from typing import Any, Dict, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from data_pipelines import examples as examples_lib
from data_pipelines import layouts
from data_pipelines import synthetic
from data_pipelines import tfds_builders

BuildError = examples_lib.BuildError
LABEL_FORMATS = examples_lib.LABEL_FORMATS
_TMP_PREFIX = '.build-'


def make_builder(dataset: str, data_dir: str, *,
                 label_dir: Optional[str] = None,
                 image_dir: Optional[str] = None,
                 instance_dir: Optional[str] = None,
                 label_nc: Optional[int] = None,
                 contain_dontcare_label: bool = False,
                 split: str = 'train',
                 splits: Optional[Sequence[str]] = None,
                 num_workers: Optional[int] = None,
                 synthetic_num_train: int = 2000,
                 synthetic_num_val: int = 64,
                 synthetic_size: int = 96,
                 seed: int = 0,
                 label_format: str = 'ids',
                 palette: Optional[str] = None
                 ) -> tfds.core.DatasetBuilder:
  """The tfds builder of `dataset` writing under `data_dir` (values checked)."""
  workers = num_workers or os.cpu_count() or 1
  if dataset == 'synthetic':
    if label_format != 'ids' or palette:
      raise ValueError('--label_format/--palette do not apply to the '
                       'synthetic set (it draws its own maps).')
    return synthetic.builder(data_dir, synthetic_num_train,
                             synthetic_num_val, synthetic_size, seed, workers)
  options = dict(data_dir=data_dir, label_format=label_format,
                 palette=palette, num_workers=workers)
  if dataset == 'custom':
    b = tfds_builders.SpadeCustom(
        config=tfds_builders.known_config(
            tfds_builders.SpadeCustom, tfds_builders.custom_config(
                label_nc, contain_dontcare_label, bool(instance_dir), split)),
        folders=dict(image_dir=image_dir, label_dir=label_dir,
                     instance_dir=instance_dir), **options)
  else:
    layouts.get_layout(dataset)  # A clear error for an unknown name.
    b = tfds_builders.BUILDERS[dataset](splits=splits, **options)
  b.label_format()  # --label_format / --palette checked before any work.
  return b


def _rebuild_beside(make, data_dir: str, manual_dir: Optional[str],
                    num_shards: Optional[int]) -> tfds.core.DatasetBuilder:
  """Builds into a hidden folder of data_dir, then swaps the build in."""
  tmp_root = os.path.join(data_dir, f'{_TMP_PREFIX}{os.getpid()}')
  try:
    fresh = make(tmp_root)
    tfds_builders.prepare(fresh, num_shards, manual_dir)
    final = make(data_dir)
    old = f'{final.data_dir}{_TMP_PREFIX}old'
    os.replace(final.data_dir, old)
    try:
      os.replace(fresh.data_dir, final.data_dir)
    except OSError:
      os.replace(old, final.data_dir)  # The previous build back in place.
      raise
    shutil.rmtree(old)
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  return make(data_dir)


def build_dataset(dataset: str, manual_dir: Optional[str], data_dir: str, *,
                  num_shards: Optional[int] = None, overwrite: bool = False,
                  **options) -> Dict[str, Dict[str, Any]]:
  """Builds `dataset` under the tfds data_dir `data_dir`.

  Args:
    dataset: coco_stuff | ade20k | cityscapes | facades | custom | synthetic.
    manual_dir: the released files (layout in `layouts.py`); unused by
      custom and synthetic.
    data_dir: the tfds data_dir to build under.
    num_shards: shards per split (default: tfds' choice by size).
    overwrite: rebuild an existing build (replaced once the new one is
      complete); without it an existing build is kept and reported.
    **options: `make_builder`'s (custom folders and classes, splits,
      num_workers, synthetic parameters, label_format, palette).

  Returns:
    Per split: {'examples', 'shards', 'bytes', 'seconds'}.

  Raises:
    layouts.PairingError: unpaired or missing files (before writing).
    BuildError: unusable files (nothing valid-looking is left behind).
  """
  start = time.time()
  make = lambda root: make_builder(dataset, root, **options)
  b = make(data_dir)
  if dataset not in ('custom', 'synthetic'):
    if not manual_dir or not os.path.isdir(manual_dir):
      raise ValueError(
          f'--manual_dir {manual_dir!r} is not a folder. ' +
          b.MANUAL_DOWNLOAD_INSTRUCTIONS)
  if tfds_builders.is_prepared(b) and not overwrite:
    logging.warning('%s is already built (%s): kept; pass --overwrite to '
                    'rebuild it.', dataset, b.data_dir)
    return tfds_builders.split_summary(b)
  if tfds_builders.is_prepared(b):
    b = _rebuild_beside(make, data_dir, manual_dir, num_shards)
  else:
    tfds_builders.prepare(b, num_shards, manual_dir)
  summary = tfds_builders.split_summary(b, time.time() - start)
  logging.info('Built %s in %s (%.1f s): %s', dataset, b.data_dir,
               time.time() - start, summary_line(summary))
  return summary


def summary_line(summary: Dict[str, Dict[str, Any]]) -> str:
  parts = [f'{s}: {m["examples"]} examples, {m["shards"]} shards, '
           f'{m["bytes"]} bytes' for s, m in summary.items()]
  total = (f'total {sum(m["examples"] for m in summary.values())} examples, '
           f'{sum(m["shards"] for m in summary.values())} shards, '
           f'{sum(m["bytes"] for m in summary.values())} bytes')
  return '; '.join(parts + [total])


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
  flags.DEFINE_string('data_dir', None, 'The tfds data_dir to build under '
                      '(DATA/spade_NAME/...).')
  flags.DEFINE_string('label_dir', None, 'custom: label maps.')
  flags.DEFINE_string('image_dir', None, 'custom: images.')
  flags.DEFINE_string('instance_dir', None, 'custom: instance maps.')
  flags.DEFINE_integer('label_nc', None, 'custom: number of classes.')
  flags.DEFINE_bool('contain_dontcare_label', False,
                    'custom: the value 255 means don\'t care.')
  flags.DEFINE_string('split', 'train', 'custom: the split name.')
  flags.DEFINE_list('splits', None, 'Splits to build (default: all).')
  flags.DEFINE_integer('num_shards', None, 'Shards per split (default: '
                       'tfds\' choice by size).')
  flags.DEFINE_bool('overwrite', False, 'Rebuild an existing build (it is '
                    'replaced once the new one is complete).')
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
        overwrite=FLAGS.overwrite, splits=FLAGS.splits,
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
