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
from typing import Any, Dict, Optional

from absl import logging

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


def build_synthetic(data_dir: str, num_train: int, num_val: int, size: int,
                    seed: int = 0, num_shards: Optional[int] = None,
                    num_workers: Optional[int] = None
                    ) -> Dict[str, Dict[str, Any]]:
  """Generates the synthetic set under the tfds data_dir `data_dir`.

  Returns per split {'examples', 'shards', 'bytes', 'seconds'} (an existing
  build of the same parameters is reused).
  """
  b = builder(data_dir, num_train, num_val, size, seed, num_workers)
  tfds_builders.prepare(b, num_shards)
  return tfds_builders.split_summary(b)


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
  if build and not tfds_builders.is_prepared(b):
    logging.info('Generating the synthetic data set in %s (%d train + %d val '
                 'scenes of %dx%d, seed %d).', b.data_dir, num_train, num_val,
                 size, size, seed)
    tfds_builders.prepare(b)
  return metadata.DatasetInfo.load(str(b.data_dir))
