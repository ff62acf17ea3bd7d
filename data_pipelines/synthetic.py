"""A procedurally generated landscape data set: the default, no download.

The scenes are landscapes of eight classes (sky, cloud, mountain, water,
grass, sand, tree, rock; `scenes.py` draws them) with instance maps.

Scenes are a pure function of (seed, split, index) through numpy's RNG, so
a build is reproducible byte for byte. Images and maps are stored as PNG (no
compression artefacts). `ensure_synthetic` builds through the same TFRecord
writer as the real data sets (`writer.py`), atomically, and records its
parameters in `synthetic_params.json` so a build with other parameters is
redone rather than reused.
"""
import io
import json
import os
from typing import Any, Dict, Optional

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf

from data_pipelines import records
from data_pipelines import scenes
from data_pipelines import writer

PARAMS_FILE = 'synthetic_params.json'
# Bump when the generator's output changes, so old builds are redone.
GENERATOR_VERSION = 1
_EXAMPLES_PER_SHARD = 500


def _png(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='PNG', compress_level=6)
  return buf.getvalue()


def scene_record(seed: int, split: str, index: int, size: int) -> bytes:
  """The serialized TFRecord example of one scene."""
  image, label, inst = scenes.generate_scene(scenes.scene_rng(seed, split, index), size)
  return records.encode_example(_png(image), _png(label), _png(inst),
                                f'{split}_{index:06d}', size, size)


# ---------------------------------------------------------------------------
# Building.


def _params(num_train: int, num_val: int, size: int,
            seed: int) -> Dict[str, Any]:
  return {'num_train': int(num_train), 'num_val': int(num_val),
          'size': int(size), 'seed': int(seed),
          'generator_version': GENERATOR_VERSION}


def _read_params(data_dir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(data_dir, PARAMS_FILE)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  except ValueError:
    return None


def _is_complete(data_dir: str, params: Dict[str, Any]) -> bool:
  """Whether `data_dir` holds a finished build made with `params`."""
  if not tf.io.gfile.exists(os.path.join(data_dir, records.INFO_FILE)):
    return False
  if _read_params(data_dir) != params:
    return False
  try:
    info = records.DatasetInfo.load(data_dir)
  except (ValueError, TypeError):
    return False
  expected = {'train': params['num_train'], 'val': params['num_val']}
  expected = {k: v for k, v in expected.items() if v > 0}
  if info.dataset != 'synthetic' or set(info.splits) != set(expected):
    return False
  for split, n in expected.items():
    meta = info.splits[split]
    if meta['num_examples'] != n or not all(
        tf.io.gfile.exists(p) for p in records.shard_paths(
            data_dir, split, meta['num_shards'])):
      return False
  return True


def build_synthetic(data_dir: str, num_train: int, num_val: int, size: int,
                    seed: int = 0, num_shards: Optional[int] = None,
                    examples_per_shard: Optional[int] = None,
                    num_workers: Optional[int] = None
                    ) -> Dict[str, Dict[str, Any]]:
  """Generates and writes the synthetic set (always; see ensure_synthetic).

  Returns:
    Per split: {'examples', 'shards', 'bytes', 'seconds'}.

  Raises:
    ValueError: bad parameters, or `data_dir` holds another data set.
  """
  if size < 16:
    raise ValueError(f'synthetic scenes need size >= 16, got {size}.')
  if num_train < 0 or num_val < 0 or num_train + num_val == 0:
    raise ValueError(f'Bad scene counts: train {num_train}, val {num_val}.')
  if tf.io.gfile.exists(os.path.join(data_dir, records.INFO_FILE)):
    try:
      existing = records.DatasetInfo.load(data_dir).dataset
    except (ValueError, TypeError):
      existing = 'synthetic'  # Unreadable: ours to replace.
    if existing != 'synthetic':
      raise ValueError(f'{data_dir} holds the {existing} data set; refusing '
                       'to replace it with the synthetic one.')
  workers = num_workers or os.cpu_count() or 1
  plan = {}
  for split, n in (('train', num_train), ('val', num_val)):
    if n <= 0:
      continue
    shards = writer.resolve_num_shards(
        n, 0, num_shards,
        examples_per_shard or (None if num_shards else _EXAMPLES_PER_SHARD))
    gen = lambda i, split=split: (scene_record(seed, split, i, size), None)
    plan[split] = (n, shards, lambda _, n=n, gen=gen: writer.ordered_map(
        gen, range(n), workers))
  params = _params(num_train, num_val, size, seed)

  def write_params(tmp_dir: str):
    with tf.io.gfile.GFile(os.path.join(tmp_dir, PARAMS_FILE), 'w') as f:
      json.dump(params, f, indent=1)
    return [PARAMS_FILE]

  return writer.build_splits(data_dir, scenes.dataset_info(), plan,
                            keep_other_splits=False, write_extra=write_params)


def ensure_synthetic(data_dir: str, num_train: int, num_val: int, size: int,
                     seed: int = 0) -> records.DatasetInfo:
  """Returns the synthetic set in `data_dir`, generating it if needed.

  Generates when `data_dir` has no complete build or one made with other
  parameters (recorded in `synthetic_params.json`); the build is atomic, so
  an interrupted one is simply redone.

  Args:
    data_dir: the folder of the built set.
    num_train: training scenes.
    num_val: validation scenes.
    size: scene height and width in pixels.
    seed: generator seed.

  Returns:
    The data set's info.
  """
  params = _params(num_train, num_val, size, seed)
  if _is_complete(data_dir, params):
    return records.DatasetInfo.load(data_dir)
  logging.info('Generating the synthetic data set in %s (%d train + %d val '
               'scenes of %dx%d, seed %d).', data_dir, num_train, num_val,
               size, size, seed)
  summary = build_synthetic(data_dir, num_train, num_val, size, seed)
  logging.info('Synthetic data set: %s', writer.summary_line(summary))
  return records.DatasetInfo.load(data_dir)
