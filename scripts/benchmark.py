r"""Benchmarks parts of spade_jax and writes one JSON record per run.

  python scripts/benchmark.py --mode input --config configs/default.py \
      --config.dataset=coco_stuff --config.data_dir=DATA \
      --config.label_nc=182 --config.contain_dontcare_label=True \
      --config.load_size=286 --config.crop_size=256 --steps 50 --json out.json

Modes:
  input  the input pipeline alone (training split, training preprocessing):
         decoded, preprocessed batches per second as numpy arrays.

Every mode returns a record with at least `mode`, `images_per_s`,
`ms_per_step_median` and `backend`. A new mode is a function
`(config, workdir, steps, warmup) -> record` added to `MODES`; `time_steps`
and `summarize` do the timing and the statistics.
"""
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as a script from anywhere: make the repository importable.
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from data_pipelines import records
from spade_jax import input_pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  config_flags.DEFINE_config_file(
      'config', os.path.join(_REPO_ROOT, 'configs', 'default.py'),
      'Configuration file; override keys with --config.key=value.')
  flags.DEFINE_string('mode', 'input', 'What to time: input.')
  flags.DEFINE_integer('steps', 50, 'Timed steps.')
  flags.DEFINE_integer('warmup', 5, 'Untimed steps first.')
  flags.DEFINE_string('json', None, 'Write the record to this file.')
  flags.DEFINE_string(
      'workdir', None, 'Where the synthetic data set is generated when '
      'config.data_dir is empty (default: a folder under the temp dir).')


def time_steps(step: Callable[[], Any], steps: int,
               warmup: int) -> List[float]:
  """Runs `step` warmup + steps times; returns the timed durations (s)."""
  for _ in range(warmup):
    step()
  durations = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    durations.append(time.perf_counter() - start)
  return durations


def summarize(durations: List[float], images_per_step: int) -> Dict[str, Any]:
  """Throughput and per-step statistics of timed steps."""
  total = sum(durations)
  return {
      'steps': len(durations),
      'images_per_step': images_per_step,
      'images_per_s': images_per_step * len(durations) / total,
      'ms_per_step_median': 1000.0 * statistics.median(durations),
      'ms_per_step_min': 1000.0 * min(durations),
      'ms_per_step_max': 1000.0 * max(durations),
  }


def resolve_data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """config.data_dir, or the synthetic set generated under `workdir`."""
  if config.data_dir:
    records.DatasetInfo.load(config.data_dir)  # Clear error when absent.
    return config.data_dir
  if config.dataset != 'synthetic':
    raise ValueError(
        f'dataset={config.dataset!r} needs --config.data_dir: the folder '
        'written by `python -m data_pipelines.build`.')
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  data_dir = os.path.join(workdir, 'data', 'synthetic')
  synthetic.ensure_synthetic(data_dir, config.synthetic_num_train,
                             config.synthetic_num_val, config.synthetic_size,
                             seed=0)
  return data_dir


def benchmark_input(config: ml_collections.ConfigDict, workdir: str,
                    steps: int, warmup: int) -> Dict[str, Any]:
  """Times the training input pipeline alone (numpy batches out)."""
  data_dir = resolve_data_dir(config, workdir)
  ds = input_pipeline.create_split(config, data_dir, config.train_split,
                                   train=True)
  batches = input_pipeline.numpy_batches(ds)
  first = next(batches)
  durations = time_steps(lambda: next(batches), steps, warmup)
  local_batch = first['image'].shape[0]
  record = summarize(durations, local_batch)
  record.update(
      height=int(first['image'].shape[1]), width=int(first['image'].shape[2]),
      global_batch_size=int(config.batch_size), data_dir=data_dir,
      split=config.train_split, tf_cpu_threads=os.cpu_count())
  return record


# mode -> function(config, workdir, steps, warmup) -> record.
ModeFn = Callable[[ml_collections.ConfigDict, str, int, int], Dict[str, Any]]
MODES: Dict[str, ModeFn] = {'input': benchmark_input}


def run(mode: str, config: ml_collections.ConfigDict, workdir: str,
        steps: int = 50, warmup: int = 5) -> Dict[str, Any]:
  """Runs one benchmark mode and returns its JSON-able record."""
  if mode not in MODES:
    raise ValueError(f'Unknown --mode={mode!r}; available: '
                     f'{", ".join(sorted(MODES))}.')
  if steps <= 0 or warmup < 0:
    raise ValueError(f'Need steps > 0 and warmup >= 0, got {steps}, '
                     f'{warmup}.')
  record = {'mode': mode}
  record.update(MODES[mode](config, workdir, steps, warmup))
  record.update(
      backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
      process_count=jax.process_count(), dataset=config.dataset,
      preprocess_mode=config.preprocess_mode, load_size=config.load_size,
      crop_size=config.crop_size, time=time.strftime('%Y-%m-%dT%H:%M:%S'))
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = FLAGS.workdir or os.path.join(tempfile.gettempdir(),
                                          'spade_jax_benchmark')
  try:
    record = run(FLAGS.mode, FLAGS.config, workdir, FLAGS.steps, FLAGS.warmup)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  text = json.dumps(record, indent=1, sort_keys=True)
  print(text)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  define_flags()
  app.run(main)
