r"""Writes the first examples of a built split exactly as the model sees them.

  python -m data_pipelines.preview --data_dir OUT --dataset coco_stuff \
      --split val --num 8 --output /tmp/preview \
      [--preprocess_mode M --load_size L --crop_size C --aspect_ratio A]

Examples are preprocessed as for evaluation (no random crop or flip). For each
example i it writes `{i:03d}_{file_name}_image.png`, `..._label.png` (class
colours from dataset_info.json, or a fixed palette) and `..._edges.png`, and
one `examples.npz` holding the arrays the model receives: `image` float32
(N, H, W, 3) in [-1, 1], `label` int32 (N, H, W), `instance` int32
(N, H, W), `instance_edges` float32 (N, H, W) (the generator computes them
from the instance ids) and
`file_name` (N,) str. When the examples differ in size (modes without a crop)
each array is stored per example instead, as `image_0`, ...

The config is configs/default.py with label_nc, contain_dontcare_label and
no_instance taken from the data set's dataset_info.json, then the flags.
"""
import os
from typing import Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from configs import default as default_config
from data_pipelines import records
from spade_jax import input_pipeline
from spade_jax import layers
from spade_jax import visualize

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string('data_dir', None, 'Folder of a built data set.')
  flags.DEFINE_string(
      'dataset', None, 'Data set name; must match dataset_info.json if given.')
  flags.DEFINE_string('split', 'val', 'Split to read.')
  flags.DEFINE_integer('num', 8, 'Number of examples to write.')
  flags.DEFINE_string('output', None, 'Folder to write into.')
  flags.DEFINE_enum('preprocess_mode', None, input_pipeline.PREPROCESS_MODES,
                    'Overrides config.preprocess_mode.')
  flags.DEFINE_integer('load_size', None, 'Overrides config.load_size.')
  flags.DEFINE_integer('crop_size', None, 'Overrides config.crop_size.')
  flags.DEFINE_float('aspect_ratio', None, 'Overrides config.aspect_ratio.')


def config_for_dataset(data_dir: str, dataset: Optional[str] = None,
                       **overrides) -> ml_collections.ConfigDict:
  """The default config adapted to the built data set in `data_dir`.

  Args:
    data_dir: folder of a built data set.
    dataset: expected data set name (checked against dataset_info.json).
    **overrides: config keys to set when not None (e.g. crop_size=256).

  Returns:
    A ConfigDict for `input_pipeline.create_split`.
  """
  info = records.DatasetInfo.load(data_dir)
  if dataset and dataset != info.dataset:
    raise ValueError(f'--dataset={dataset} but {data_dir} holds '
                     f'{info.dataset}.')
  config = default_config.get_config()
  config.dataset = info.dataset
  config.data_dir = data_dir
  config.label_nc = info.label_nc
  config.contain_dontcare_label = info.contain_dontcare_label
  config.no_instance = not info.has_instance
  for key, value in overrides.items():
    if value is not None:
      config[key] = value
  return config


def collect_examples(config: ml_collections.ConfigDict, data_dir: str,
                     split: str, num: int) -> List[Dict[str, np.ndarray]]:
  """The first `num` examples of a split, preprocessed as for evaluation."""
  ds = input_pipeline.create_split(
      config, data_dir, split, train=False, batch_size=1, process_index=0,
      process_count=1, with_metadata=True)
  examples = []
  for batch in ds.as_numpy_iterator():
    if len(examples) >= num:
      break
    if not batch['valid'][0]:
      continue
    examples.append({
        'image': batch['image'][0],
        'label': batch['label'][0],
        'instance': batch['instance'][0],
        'instance_edges': np.asarray(
            layers.instance_edges(batch['instance']))[0],
        'file_name': batch['file_name'][0].decode('utf-8'),
    })
  return examples


def _stack(examples: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
  """Arrays for examples.npz: stacked when shapes agree, else per example."""
  arrays = {'file_name': np.array([e['file_name'] for e in examples])}
  for key in ('image', 'label', 'instance', 'instance_edges'):
    shapes = {e[key].shape for e in examples}
    if len(shapes) == 1:
      arrays[key] = np.stack([e[key] for e in examples])
    else:
      arrays.update({f'{key}_{i}': e[key] for i, e in enumerate(examples)})
  return arrays


def write_examples(examples: Sequence[Dict[str, np.ndarray]],
                   output_dir: str,
                   colors: Optional[Sequence[Sequence[int]]] = None) -> str:
  """Writes PNGs and examples.npz; returns the npz path."""
  os.makedirs(output_dir, exist_ok=True)
  for i, ex in enumerate(examples):
    stem = os.path.join(output_dir, f'{i:03d}_{ex["file_name"]}')
    Image.fromarray(visualize.image_to_uint8(ex['image'])).save(
        stem + '_image.png')
    Image.fromarray(visualize.colorize_labels(ex['label'], colors)).save(
        stem + '_label.png')
    Image.fromarray(visualize.edges_to_uint8(ex['instance_edges'])).save(
        stem + '_edges.png')
  path = os.path.join(output_dir, 'examples.npz')
  if examples:
    np.savez(path, **_stack(examples))
  return path


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  if not FLAGS.data_dir or not FLAGS.output:
    raise app.UsageError('--data_dir and --output are required.')
  config = config_for_dataset(
      FLAGS.data_dir, FLAGS.dataset, preprocess_mode=FLAGS.preprocess_mode,
      load_size=FLAGS.load_size, crop_size=FLAGS.crop_size,
      aspect_ratio=FLAGS.aspect_ratio)
  examples = collect_examples(config, FLAGS.data_dir, FLAGS.split, FLAGS.num)
  if not examples:
    raise app.UsageError(f'Split {FLAGS.split} yielded no examples.')
  info = records.DatasetInfo.load(FLAGS.data_dir)
  path = write_examples(examples, FLAGS.output, info.colors)
  logging.info('Wrote %d examples (%s, %s) to %s', len(examples),
               config.preprocess_mode, examples[0]['image'].shape, path)


if __name__ == '__main__':
  define_flags()
  app.run(main)
