r"""Benchmarks parts of spade_jax: the train step, the generator, the input.

  python scripts/benchmark.py --config configs/default.py --mode train \
      --config.label_nc=182 --config.contain_dontcare_label=True \
      --config.crop_size=256 --config.ngf=64 --config.ndf=64 \
      --config.batch_size=1 --config.lambda_vgg=10 --random_vgg_for_timing \
      --steps 2 --warmup 1 --json runs.jsonl

Modes:
  train     one full G + D iteration (`train.compile_train_step`), on the
            config's model, sharded over all devices like training.
  generate  the eval-mode generator (`train.make_generate_fn`).
  input     the input pipeline alone (training split, training preprocessing):
            decoded, preprocessed batches per second as numpy arrays.

train and generate feed random inputs of the config's shape (the time does not
depend on the content) unless --config.data_dir is set, in which case the first
training batch is used. Compilation is timed separately (`compile_s`, via
jit(...).lower().compile()), `warmup` untimed steps follow, then `steps` timed
ones. FLOPs per step come from XLA's cost analysis of the compiled program.
Peak memory is the device's `peak_bytes_in_use` where the backend reports it,
else the process's peak resident set size (CPU).

Every mode returns a record with at least `mode`, `images_per_s`,
`ms_per_step_median` and `backend`; --json appends it to FILE as one JSON line.
A new mode is a function `(config, options) -> record` added to `MODES`;
`time_steps` and `summarize` do the timing and the statistics.
"""
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as a script from anywhere: make the repository importable.
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from data_pipelines import records
from spade_jax import input_pipeline
from spade_jax import layers
from spade_jax import models
from spade_jax import train
from spade_jax import vgg as vgg_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS

# Config keys copied into every record (what was measured).
_CONFIG_KEYS = ('dataset', 'netG', 'label_nc', 'contain_dontcare_label',
                'no_instance', 'crop_size', 'load_size', 'aspect_ratio',
                'preprocess_mode', 'ngf', 'ndf', 'num_D', 'n_layers_D',
                'norm_G', 'norm_D', 'use_vae', 'num_upsampling_layers',
                'batch_size', 'num_devices', 'lambda_vgg', 'compute_dtype',
                'spade_fuse_shared', 'spade_fuse_gamma_beta', 'conv_impl')


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  config_flags.DEFINE_config_file(
      'config', os.path.join(_REPO_ROOT, 'configs', 'default.py'),
      'Configuration file; override keys with --config.key=value.')
  flags.DEFINE_enum('mode', 'train', sorted(MODES), 'What to time.')
  flags.DEFINE_integer('steps', 10, 'Timed steps.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_string('json', None, 'Append the record to this file as one '
                      'JSON line.')
  flags.DEFINE_bool(
      'random_vgg_for_timing', False,
      'train mode with lambda_vgg > 0 and no config.vgg_weights: use randomly '
      'initialised VGG19 weights. Only for timing: the loss is meaningless.')
  flags.DEFINE_string(
      'workdir', None, 'Where the synthetic data set is generated when '
      'config.data_dir is empty (input mode; default: a folder under the '
      'temp dir).')


@dataclasses.dataclass(frozen=True)
class Options:
  """What a mode needs besides the config."""
  workdir: str
  steps: int = 10
  warmup: int = 2
  random_vgg_for_timing: bool = False


# ---------------------------------------------------------------------------
# Timing and statistics.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Timings:
  """Per-step wall-clock and process CPU (all threads) durations, seconds."""
  wall: List[float]
  cpu: List[float]


def time_steps(step: Callable[[], Any], steps: int, warmup: int) -> Timings:
  """Runs `step` warmup + steps times; returns the timed durations.

  The process CPU time is kept beside the wall time: on a shared machine the
  wall time grows with other processes' load, the CPU time much less.
  """
  for _ in range(warmup):
    step()
  timings = Timings([], [])
  for _ in range(steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    step()
    timings.wall.append(time.perf_counter() - start)
    timings.cpu.append(time.process_time() - start_cpu)
  return timings


def summarize(timings: Timings, images_per_step: int) -> Dict[str, Any]:
  """Throughput and per-step statistics of timed steps."""
  wall = timings.wall
  return {
      'steps': len(wall),
      'images_per_step': images_per_step,
      'images_per_s': images_per_step * len(wall) / sum(wall),
      'ms_per_step_median': 1000.0 * statistics.median(wall),
      'ms_per_step_min': 1000.0 * min(wall),
      'ms_per_step_max': 1000.0 * max(wall),
      'ms_per_step_stdev': (1000.0 * statistics.stdev(wall)
                            if len(wall) > 1 else 0.0),
      'cpu_ms_per_step_median': 1000.0 * statistics.median(timings.cpu),
  }


def peak_memory() -> Dict[str, Any]:
  """Peak device memory if the backend tracks it, else the peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return {'peak_memory_bytes': int(stats['peak_bytes_in_use']),
            'peak_memory_source': 'device peak_bytes_in_use'}
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
  return {'peak_memory_bytes': int(rss_kib) * 1024,
          'peak_memory_source': 'process peak RSS'}


def compile_timed(jitted, *args) -> Dict[str, Any]:
  """AOT-compiles `jitted` for `args`: the executable and its cost figures."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  info = {'compiled': compiled, 'compile_s': time.perf_counter() - start}
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  info['flops_per_step'] = float(cost['flops']) if cost and 'flops' in cost \
      else None
  try:
    mem = compiled.memory_analysis()
    info['xla_temp_bytes'] = int(mem.temp_size_in_bytes)
    info['xla_argument_bytes'] = int(mem.argument_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass  # Not every backend reports it.
  return info


def with_compute_figures(record: Dict[str, Any],
                         info: Dict[str, Any]) -> Dict[str, Any]:
  """Adds compile time, FLOPs and achieved FLOP/s to a timed record."""
  record.update({k: v for k, v in info.items() if k != 'compiled'})
  flops = info['flops_per_step']
  record['achieved_flops_per_s'] = (
      flops / (record['ms_per_step_median'] / 1000.0) if flops else None)
  return record


# ---------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------
def random_batch(config, batch_size: int, seed: int = 0) -> Dict[str, Any]:
  """Random numpy inputs of the config's shape: blocky labels, edges, image."""
  rng = np.random.default_rng(seed)
  h, w = models.output_size(config)
  coarse = (batch_size, -(-h // 8), -(-w // 8))
  label = rng.integers(0, models.num_classes(config), coarse)
  label = label.repeat(8, 1).repeat(8, 2)[:, :h, :w].astype(np.int32)
  instance = (rng.integers(0, 4, coarse).repeat(8, 1).repeat(8, 2)[:, :h, :w]
              + 4 * label)
  edges = np.asarray(layers.instance_edges(instance), np.float32)
  image = rng.uniform(-1, 1, (batch_size, h, w, 3)).astype(np.float32)
  return {'label': label, 'instance_edges': edges, 'image': image}


def local_batch(config, options: Options) -> Dict[str, Any]:
  """This process's batch: the data set's first, or random of its shape."""
  n = config.batch_size // jax.process_count()
  if not config.data_dir:
    return random_batch(config, n, seed=jax.process_index())
  ds = input_pipeline.create_split(config, resolve_data_dir(config,
                                                            options.workdir),
                                   config.train_split, train=True)
  return next(input_pipeline.numpy_batches(ds))


def vgg_params_for(config, options: Options) -> Optional[Any]:
  """Pretrained VGG19 weights, random ones (timing only), or None."""
  if config.lambda_vgg <= 0:
    return None
  if config.vgg_weights:
    return vgg_lib.load_vgg19_params(config.vgg_weights)
  if not options.random_vgg_for_timing:
    raise ValueError('unreachable: validate_config checks vgg_weights')
  return vgg_lib.VGG19().init(jax.random.PRNGKey(0),
                              jnp.zeros((1, 32, 32, 3), jnp.float32))


def validate(config, options: Options) -> None:
  """train.validate_config, letting --random_vgg_for_timing stand in for VGG."""
  checked = ml_collections.ConfigDict(config.to_dict())
  if options.random_vgg_for_timing and not checked.vgg_weights:
    checked.vgg_weights = '<random weights for timing>'
  train.validate_config(checked)


# ---------------------------------------------------------------------------
# Modes.
# ---------------------------------------------------------------------------
def benchmark_train(config: ml_collections.ConfigDict,
                    options: Options) -> Dict[str, Any]:
  """Times one training iteration (G update, then D update)."""
  validate(config, options)
  mesh = train.make_mesh(config)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tx_g, tx_d, sched_g, sched_d = train.make_optimizers(config, 1000)
  start = time.perf_counter()
  state = train.create_train_state(config, jax.random.PRNGKey(config.seed),
                                   tx_g, tx_d)
  init_s = time.perf_counter() - start
  # Committed, replicated arrays: the shardings the step was compiled for.
  state = jax.device_put(state, replicated)
  vgg_params = jax.device_put(vgg_params_for(config, options), replicated)
  batch = train.global_batch(local_batch(config, options), mesh)
  step_fn = train.compile_train_step(config, mesh, tx_g, tx_d, sched_g,
                                     sched_d)
  info = compile_timed(step_fn, state, batch, vgg_params)
  compiled = info['compiled']
  holder = {'state': state}

  def step():
    holder['state'], metrics = compiled(holder['state'], batch, vgg_params)
    jax.block_until_ready((holder['state'], metrics))

  timings = time_steps(step, options.steps, options.warmup)
  record = summarize(timings, config.batch_size)
  record['init_s'] = init_s
  return with_compute_figures(record, info)


def benchmark_generate(config: ml_collections.ConfigDict,
                       options: Options) -> Dict[str, Any]:
  """Times the eval-mode generator on a batch of the config's size."""
  validate(config, options)
  mesh = train.make_mesh(config)
  batch = train.global_batch(local_batch(config, options), mesh)
  label, edges = batch['label'], batch['instance_edges']
  h, w = models.output_size(config)
  init_shape = (1, h, w)
  start = time.perf_counter()
  g_vars = models.make_generator(config).init(
      {'params': jax.random.PRNGKey(config.seed),
       'z': jax.random.PRNGKey(1)},
      jnp.zeros(init_shape, jnp.int32), jnp.zeros(init_shape, jnp.float32))
  g_vars = jax.device_put(g_vars, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  init_s = time.perf_counter() - start
  info = compile_timed(train.make_generate_fn(config), g_vars, label, edges)
  compiled = info['compiled']
  timings = time_steps(
      lambda: jax.block_until_ready(compiled(g_vars, label, edges)),
      options.steps, options.warmup)
  record = summarize(timings, config.batch_size)
  record['init_s'] = init_s
  return with_compute_figures(record, info)


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


def benchmark_input(config: ml_collections.ConfigDict,
                    options: Options) -> Dict[str, Any]:
  """Times the training input pipeline alone (numpy batches out)."""
  data_dir = resolve_data_dir(config, options.workdir)
  ds = input_pipeline.create_split(config, data_dir, config.train_split,
                                   train=True)
  batches = input_pipeline.numpy_batches(ds)
  first = next(batches)
  timings = time_steps(lambda: next(batches), options.steps, options.warmup)
  batch_size = first['image'].shape[0]
  record = summarize(timings, batch_size)
  record.update(
      height=int(first['image'].shape[1]), width=int(first['image'].shape[2]),
      global_batch_size=int(config.batch_size), data_dir=data_dir,
      split=config.train_split, tf_cpu_threads=os.cpu_count())
  return record


# mode -> function(config, options) -> record.
ModeFn = Callable[[ml_collections.ConfigDict, Options], Dict[str, Any]]
MODES: Dict[str, ModeFn] = {
    'train': benchmark_train,
    'generate': benchmark_generate,
    'input': benchmark_input,
}


def run(mode: str, config: ml_collections.ConfigDict, workdir: str,
        steps: int = 10, warmup: int = 2,
        random_vgg_for_timing: bool = False) -> Dict[str, Any]:
  """Runs one benchmark mode and returns its JSON-able record."""
  if mode not in MODES:
    raise ValueError(f'Unknown --mode={mode!r}; available: '
                     f'{", ".join(sorted(MODES))}.')
  if steps <= 0 or warmup < 0:
    raise ValueError(f'Need steps > 0 and warmup >= 0, got {steps}, '
                     f'{warmup}.')
  options = Options(workdir, steps, warmup, random_vgg_for_timing)
  record = {'mode': mode}
  record.update(MODES[mode](config, options))
  record.update(peak_memory())
  device = jax.devices()[0]
  used = len(train.mesh_devices(config))
  if mode != 'input':  # Per accelerator: the measure of the device count.
    record['images_per_s_per_device'] = record['images_per_s'] / used
  record.update(
      backend=jax.default_backend(), device_kind=str(device.device_kind),
      device=str(device.device_kind), device_count=used,
      devices_visible=jax.device_count(),
      process_count=jax.process_count(), cpu_count=os.cpu_count(),
      jax_version=jax.__version__, load_average_1min=os.getloadavg()[0],
      random_vgg_for_timing=bool(random_vgg_for_timing and
                                 config.lambda_vgg > 0 and
                                 not config.vgg_weights),
      time=time.strftime('%Y-%m-%dT%H:%M:%S'))
  record.update({k: config[k] for k in _CONFIG_KEYS if k in config})
  record['spade_label_lookup'] = models.label_lookup(config)  # As resolved.
  return record


def format_table(record: Dict[str, Any]) -> str:
  """The headline numbers of a record as an aligned two-column table."""
  def fmt(value):
    if value is None:
      return '-'
    if isinstance(value, float):
      return f'{value:.4g}'
    return str(value)

  rows = [('mode', record['mode']),
          ('backend / device', f"{record['backend']} / "
                               f"{record['device_kind']}"),
          ('batch (images/step)', record['images_per_step']),
          ('ms/step median', record['ms_per_step_median']),
          ('ms/step min..max', f"{fmt(record['ms_per_step_min'])} .. "
                               f"{fmt(record['ms_per_step_max'])}"),
          ('images/s', record['images_per_s']),
          ('images/s per device', record.get('images_per_s_per_device')),
          ('compile s', record.get('compile_s')),
          ('GFLOP/step', (record['flops_per_step'] / 1e9
                          if record.get('flops_per_step') else None)),
          ('achieved GFLOP/s', (record['achieved_flops_per_s'] / 1e9
                                if record.get('achieved_flops_per_s')
                                else None)),
          ('peak memory MiB', record['peak_memory_bytes'] / 2**20),
          ('  (from)', record['peak_memory_source'])]
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {fmt(value)}' for name, value in rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = FLAGS.workdir or os.path.join(tempfile.gettempdir(),
                                          'spade_jax_benchmark')
  try:
    record = run(FLAGS.mode, FLAGS.config, workdir, FLAGS.steps, FLAGS.warmup,
                 FLAGS.random_vgg_for_timing)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(format_table(record))
  if FLAGS.json:
    with open(FLAGS.json, 'a') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')


if __name__ == '__main__':
  define_flags()
  app.run(main)
