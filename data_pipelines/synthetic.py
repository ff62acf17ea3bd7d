"""A procedurally generated landscape data set: the default, no download.

The scenes are landscapes of eight classes (sky, cloud, mountain, water,
grass, sand, tree, rock; `scenes.py` draws them) with instance maps.

Scenes are a pure function of (seed, split, index) through numpy's RNG, so
a build is reproducible. Images and maps are stored as PNG (no compression
artefacts). The set is the tfds builder `spade_synthetic`
(`tfds_builders.py`): its config (scenes per split, size, seed) names the
build's folder, DATA/spade_synthetic/CONFIG/VERSION, so a build with other
parameters is another folder, never a reused wrong one, and tfds writes it
atomically (an interrupted build is simply redone).
"""
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

from absl import logging
import tensorflow_datasets as tfds

from data_pipelines import metadata
from data_pipelines import tfds_builders


def builder(data_dir: str, num_train: int, num_val: int, size: int,
            seed: int = 0, num_workers: Optional[int] = None
            ) -> tfds_builders.SpadeSynthetic:
  """The synthetic set's tfds builder (raises ValueError on bad values)."""
  return tfds_builders.SpadeSynthetic(
      data_dir=data_dir, num_workers=num_workers or os.cpu_count(),
      config=tfds_builders.known_config(
          tfds_builders.SpadeSynthetic,
          tfds_builders.synthetic_config(num_train, num_val, size, seed)))


def split_summary(b: tfds.core.DatasetBuilder, seconds: float = 0.0
                  ) -> Dict[str, Dict[str, Any]]:
  """Per split of a prepared build: {'examples', 'shards', 'bytes', 'seconds'}."""
  return {name: {'examples': int(s.num_examples),
                 'shards': len(s.shard_lengths), 'bytes': int(s.num_bytes),
                 'seconds': seconds}
          for name, s in b.info.splits.items()}


def build_synthetic(data_dir: str, num_train: int, num_val: int, size: int,
                    seed: int = 0, num_shards: Optional[int] = None,
                    num_workers: Optional[int] = None
                    ) -> Dict[str, Dict[str, Any]]:
  """Generates the synthetic set under the tfds data_dir `data_dir`.

  Returns per split {'examples', 'shards', 'bytes', 'seconds'} (an existing
  build of the same parameters is reused).
  """
  b = builder(data_dir, num_train, num_val, size, seed, num_workers)
  prepare(b, num_shards)
  return split_summary(b)


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


def ensure_synthetic(data_dir: str, num_train: int, num_val: int, size: int,
                     seed: int = 0, build: bool = True
                     ) -> metadata.DatasetInfo:
  """The synthetic set under the tfds data_dir `data_dir`, generated if needed.

  Args:
    data_dir: the tfds data_dir (the build goes into a folder under it).
    num_train: training scenes.
    num_val: validation scenes.
    size: scene height and width in pixels.
    seed: generator seed.
    build: generate it when absent (False: only find it; processes other
      than the one that builds).

  Returns:
    The data set's info; its `folder` is the build's folder.
  """
  b = builder(data_dir, num_train, num_val, size, seed)
  if build and not os.path.isfile(os.path.join(b.data_dir,
                                               metadata.INFO_FILE)):
    logging.info('Generating the synthetic data set in %s (%d train + %d val '
                 'scenes of %dx%d, seed %d).', b.data_dir, num_train, num_val,
                 size, size, seed)
    prepare(b)
  return metadata.DatasetInfo.load(str(b.data_dir))
