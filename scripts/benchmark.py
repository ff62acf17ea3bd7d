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

train and generate run on real label maps with --config.data_dir (the first
training batch of a data set built by `python -m data_pipelines.build`, e.g.
the COCO-Stuff sample), else on random inputs of the config's shape (blocky
8x8 labels). With the boundary-sparse SPADE path the time depends on the
labels: every record reports the share of boundary pixels and of 8x8 tiles
holding one that it saw at each SPADE resolution (`label_statistics`), and
`flops_per_step_sparse_branch` (XLA counts a lax.cond's costlier branch, the
dense fallback, in `flops_per_step`).

  --variants=dense,sparse  compiles both and alternates their timed steps in
                           one process (the same load for both); one record
                           each, with `variant`.
  --save_every=K           train mode: saves a checkpoint after every K-th
                           timed step with training's own manager and save
                           function (asynchronous, into a temporary folder);
                           reports the median normal step, the median save
                           step and their ratio (`save_step_ratio`).
  --compile_only           train: compile the step for the config's shapes
                           (nothing allocated, no step run or timed) and
                           report the compiled program's per-device memory
                           (`compiled_memory`); e.g. with simulated devices,
                           XLA_FLAGS=--xla_force_host_platform_device_count=8.

Compilation is timed separately (`compile_s`, via
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
from typing import Any, Callable, Dict, List, Optional, Sequence

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
from spade_jax import data_order
from spade_jax import generation
from spade_jax import input_pipeline
from spade_jax import layers
from spade_jax import models
from spade_jax import run_config
from spade_jax import sharding
from spade_jax import train
from spade_jax import train_state
from spade_jax import vgg as vgg_lib
from spade_jax import xla_cpu
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS

# Config keys copied into every record (what was measured).
_CONFIG_KEYS = ('dataset', 'netG', 'label_nc', 'contain_dontcare_label',
                'no_instance', 'crop_size', 'load_size', 'aspect_ratio',
                'preprocess_mode', 'ngf', 'ndf', 'num_D', 'n_layers_D',
                'norm_G', 'norm_D', 'use_vae', 'num_upsampling_layers',
                'batch_size', 'num_devices', 'lambda_vgg', 'compute_dtype',
                'conv_impl', 'spade_sparse_min_size')


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
  flags.DEFINE_list(
      'variants', [], 'train / generate: compile each of these named config '
      f'variants ({", ".join(VARIANTS)}) and time their steps in alternation '
      'in this one process (one record each).')
  flags.DEFINE_integer(
      'process_count', None, 'input mode: read the share of one of this many '
      'processes (default: the processes of this run).')
  flags.DEFINE_integer('process_index', 0, 'input mode: which process\'s '
                       'share (with --process_count).')
  flags.DEFINE_integer('start_step', 0, 'input mode: start (resume) at this '
                       'global step.')
  flags.DEFINE_bool('one_epoch', False, 'input mode: read one epoch of the '
                    'process\'s batches (bytes_read over it) instead of '
                    '--warmup + --steps.')
  flags.DEFINE_integer(
      'save_every', 0, 'train mode: save a checkpoint after every K-th timed '
      'step (training\'s checkpoint manager and save function, into a '
      'temporary folder) and report the save steps beside the normal ones.')
  flags.DEFINE_bool(
      'compile_only', False, 'train mode: compile the step only and report '
      "the compiled program's per-device memory (memory_analysis), without "
      'running or timing steps.')
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
  # input mode: the share of one of `process_count` processes (None: this
  # run's processes), from `start_step`, one epoch of it with `one_epoch`.
  process_count: Optional[int] = None
  process_index: int = 0
  start_step: int = 0
  one_epoch: bool = False


# ---------------------------------------------------------------------------
# Timing and statistics.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Timings:
  """Per-step wall-clock and process CPU (all threads) durations, seconds."""
  wall: List[float]
  cpu: List[float]


def time_alternating(steps: Sequence[Callable[[], Any]], n: int,
                     warmup: int) -> List[Timings]:
  """Runs every step in turn, warmup + n rounds; the timed durations of each.

  Variants timed this way in one process see the same machine load.
  """
  for _ in range(warmup):
    for step in steps:
      step()
  timings = [Timings([], []) for _ in steps]
  for _ in range(n):
    for step, timing in zip(steps, timings):
      start, start_cpu = time.perf_counter(), time.process_time()
      step()
      timing.wall.append(time.perf_counter() - start)
      timing.cpu.append(time.process_time() - start_cpu)
  return timings


def time_steps(step: Callable[[], Any], steps: int, warmup: int) -> Timings:
  """Runs `step` warmup + steps times; returns the timed durations.

  The process CPU time is kept beside the wall time: on a shared machine the
  wall time grows with other processes' load, the CPU time much less.
  """
  return time_alternating([step], steps, warmup)[0]


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
  """Random numpy inputs of the config's shape: blocky labels, instances,
  image."""
  rng = np.random.default_rng(seed)
  h, w = models.output_size(config)
  coarse = (batch_size, -(-h // 8), -(-w // 8))
  label = rng.integers(0, models.num_classes(config), coarse)
  label = label.repeat(8, 1).repeat(8, 2)[:, :h, :w].astype(np.int32)
  instance = (rng.integers(0, 4, coarse).repeat(8, 1).repeat(8, 2)[:, :h, :w]
              + 4 * label).astype(np.int32)
  image = rng.uniform(-1, 1, (batch_size, h, w, 3)).astype(np.float32)
  return {'label': label, 'instance': instance, 'image': image}


def local_batch(config, options: Options) -> Dict[str, Any]:
  """This process's batch: the data set's first, or random of its shape."""
  n = config.batch_size // jax.process_count()
  if not config.data_dir:
    return random_batch(config, n, seed=jax.process_index())
  data_dir = run_config.resolve_data_dir(config, options.workdir)
  ds = input_pipeline.create_split(config, data_dir, config.train_split,
                                   train=True)
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
  """run_config.validate_config, letting --random_vgg_for_timing stand in for VGG."""
  checked = ml_collections.ConfigDict(config.to_dict())
  if options.random_vgg_for_timing and not checked.vgg_weights:
    checked.vgg_weights = '<random weights for timing>'
  run_config.validate_config(checked)


def label_statistics(config, batch: Dict[str, Any],
                     tile: int = 8) -> Dict[str, Any]:
  """Boundary shares of the batch's label maps at each SPADE resolution.

  At each resolution the generator's SPADE layers run at (the label map
  resized with the legacy nearest rule, as the generator does), the share of
  pixels that are not uniform (`layers.uniform_mask`: their 5x5 neighbourhood
  crosses a class or instance boundary or the image border), which the
  boundary-sparse path computes densely, and the share of `tile` x `tile`
  tiles holding such a pixel.
  """
  seg = layers.LabelMap(
      jnp.asarray(batch['label']),
      generation.instance_edges(config, jnp.asarray(batch['instance'])),
      models.num_classes(config))
  kernel_size = (layers.parse_spade_norm(config.norm_G)[1]
                 if config.netG == 'spade' else 3)
  h, w = models.output_size(config)
  pixel, tiles = {}, {}
  while min(h, w) >= 8:
    boundary = ~np.asarray(layers.uniform_mask(seg.resize((h, w)),
                                               kernel_size))
    n = boundary.shape[0]
    th, tw = -(-h // tile), -(-w // tile)
    padded = np.zeros((n, th * tile, tw * tile), bool)
    padded[:, :h, :w] = boundary
    per_tile = padded.reshape(n, th, tile, tw, tile).any(axis=(2, 4))
    key = f'{h}x{w}'
    pixel[key] = float(boundary.mean())
    tiles[key] = float(per_tile.mean())
    if config.netG != 'spade':
      break
    h, w = h // 2, w // 2
  return {'labels': ('data set ' + config.data_dir if config.data_dir
                     else 'random blocky (8x8 blocks)'),
          'boundary_pixel_fraction': pixel,
          f'boundary_tile_fraction_{tile}x{tile}': tiles}


# ---------------------------------------------------------------------------
# Modes.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
  """A compiled step ready to time, and what is known before timing it."""
  step: Callable[[], Any]
  images_per_step: int
  info: Dict[str, Any]  # compile_timed's figures (without the executable)
  extra: Dict[str, Any]  # init_s, label statistics, ...
  state: Optional[Dict[str, Any]] = None  # train: {'state': the current}


def sparse_branch_flops(config, lower: Callable[[Any], Any],
                        training: bool = True):
  """FLOPs of the step with the boundary-sparse branch always taken.

  XLA's cost analysis counts a `lax.switch`'s costliest branch, the dense
  fallback; this compiles the step once more without it (never run) to count
  what a batch within the largest capacity costs. None when the path is off.
  """
  if not models.spade_sparse(config, training) or config.netG != 'spade':
    return None
  counting = ml_collections.ConfigDict(config.to_dict())
  counting.spade_sparse_fallback = False
  cost = lower(counting).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def prepare_train(config: ml_collections.ConfigDict,
                  options: Options) -> Prepared:
  """Compiles one training iteration (G update, then D update)."""
  validate(config, options)
  mesh = sharding.make_mesh(config)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  start = time.perf_counter()
  state = train_state.create_train_state(
      config, jax.random.PRNGKey(config.seed), steps_per_epoch=1000)
  init_s = time.perf_counter() - start
  # Committed, replicated arrays: the shardings the step was compiled for.
  state = jax.device_put(state, replicated)
  vgg_params = jax.device_put(vgg_params_for(config, options), replicated)
  host_batch = local_batch(config, options)
  batch = sharding.global_batch(host_batch, mesh)
  step_fn = train.compile_train_step(config, mesh)
  info = compile_timed(step_fn, state, batch, vgg_params)
  compiled = info.pop('compiled')
  info['flops_per_step_sparse_branch'] = sparse_branch_flops(
      config, lambda c: train.compile_train_step(c, mesh).lower(
          state, batch, vgg_params))
  holder = {'state': state}

  def step():
    holder['state'], metrics = compiled(holder['state'], batch, vgg_params)
    jax.block_until_ready((holder['state'], metrics))

  return Prepared(step, config.batch_size, info,
                  {'init_s': init_s, **label_statistics(config, host_batch)},
                  state=holder)


def prepare_generate(config: ml_collections.ConfigDict,
                     options: Options) -> Prepared:
  """Compiles the eval-mode generator on a batch of the config's size."""
  validate(config, options)
  mesh = sharding.make_mesh(config)
  host_batch = local_batch(config, options)
  batch = sharding.global_batch(host_batch, mesh)
  label, instance = batch['label'], batch['instance']
  h, w = models.output_size(config)
  init_shape = (1, h, w)
  start = time.perf_counter()
  init = train_state.jit_init(models.make_generator(config))  # As training's.
  g_vars = init(
      {'params': jax.random.PRNGKey(config.seed),
       'z': jax.random.PRNGKey(1)},
      jnp.zeros(init_shape, jnp.int32), jnp.zeros(init_shape, jnp.float32))
  g_vars = jax.device_put(g_vars, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  init_s = time.perf_counter() - start
  info = compile_timed(train.make_generate_fn(config), g_vars, label,
                       instance)
  compiled = info.pop('compiled')
  info['flops_per_step_sparse_branch'] = sparse_branch_flops(
      config,
      lambda c: train.make_generate_fn(c).lower(g_vars, label, instance),
      training=False)
  return Prepared(lambda: jax.block_until_ready(compiled(g_vars, label,
                                                         instance)),
                  config.batch_size, info,
                  {'init_s': init_s, **label_statistics(config, host_batch)})


# The compiled program's memory (per device: an SPMD program is one device's),
# memory_analysis() attribute -> record field.
MEMORY_FIELDS = {'temp_size_in_bytes': 'temp_bytes',
                 'argument_size_in_bytes': 'argument_bytes',
                 'output_size_in_bytes': 'output_bytes',
                 'alias_size_in_bytes': 'alias_bytes',
                 'generated_code_size_in_bytes': 'generated_code_bytes'}


def compiled_memory(compiled) -> Dict[str, Optional[int]]:
  """memory_analysis() of a compiled program; None where not reported."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    mem = None  # Not every backend reports it.
  if isinstance(mem, (list, tuple)):  # Older JAX: one per program.
    mem = mem[0] if mem else None
  out = {}
  for attr, field in MEMORY_FIELDS.items():
    value = getattr(mem, attr, None)
    out[field] = None if value is None else int(value)
  return out


def abstract_train_inputs(config, options: Options, mesh):
  """The train step's (state, batch, vgg_params) as shapes: nothing is
  initialised or allocated, so any size compiles."""
  state = jax.eval_shape(lambda: train_state.create_train_state(
      config, jax.random.PRNGKey(config.seed), steps_per_epoch=1000))
  vgg_params = jax.eval_shape(lambda: vgg_params_for(config, options))
  h, w = models.output_size(config)
  b = config.batch_size
  batch_sharding = jax.sharding.NamedSharding(mesh, sharding.BATCH_SPEC)
  shape = lambda s, dtype: jax.ShapeDtypeStruct(s, dtype,
                                                sharding=batch_sharding)
  batch = {'image': shape((b, h, w, 3), jnp.float32),
           'label': shape((b, h, w), jnp.int32),
           'instance': shape((b, h, w), jnp.int32)}
  return state, batch, vgg_params


def compile_train_memory(config: ml_collections.ConfigDict,
                         options: Options) -> Dict[str, Any]:
  """Compiles one training iteration and reports its per-device memory.

  Nothing runs: the record has `compile_s`, `flops_per_step` and the
  compiled program's `temp_bytes`, `argument_bytes`, `output_bytes`,
  `alias_bytes` and `generated_code_bytes` (XLA's memory_analysis; None
  where the backend does not report them), per device.
  """
  validate(config, options)
  mesh = sharding.make_mesh(config)
  args = abstract_train_inputs(config, options, mesh)
  info = compile_timed(train.compile_train_step(config, mesh), *args)
  record = {'compile_only': True, 'compile_s': info['compile_s'],
            'flops_per_step': info['flops_per_step'],
            'images_per_step': config.batch_size,
            'mesh': dict(mesh.shape)}
  record.update(compiled_memory(info['compiled']))
  return record


def format_memory_table(record: Dict[str, Any]) -> str:
  """A --compile_only record's figures as an aligned table."""
  mib = lambda v: '-' if v is None else f'{v / 2**20:.1f}'
  rows = [('mode', f"{record['mode']} (compile only)"),
          ('backend / device', f"{record['backend']} / "
                               f"{record['device_kind']}"),
          ('mesh', record['mesh']),
          ('batch (images/step)', record['images_per_step']),
          ('compile s', f"{record['compile_s']:.1f}")]
  rows += [(f'{field} MiB/device', mib(record[field]))
           for field in MEMORY_FIELDS.values()]
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def timed_record(prepared: Prepared, timings: Timings) -> Dict[str, Any]:
  record = summarize(timings, prepared.images_per_step)
  record.update(prepared.extra)
  return with_compute_figures(record, prepared.info)


def benchmark_train(config: ml_collections.ConfigDict,
                    options: Options) -> Dict[str, Any]:
  """Times one training iteration (G update, then D update)."""
  prepared = prepare_train(config, options)
  return timed_record(prepared, time_steps(prepared.step, options.steps,
                                           options.warmup))


def benchmark_generate(config: ml_collections.ConfigDict,
                       options: Options) -> Dict[str, Any]:
  """Times the eval-mode generator on a batch of the config's size."""
  prepared = prepare_generate(config, options)
  return timed_record(prepared, time_steps(prepared.step, options.steps,
                                           options.warmup))


def benchmark_train_saving(config: ml_collections.ConfigDict,
                           options: Options,
                           save_every: int) -> Dict[str, Any]:
  """Times training steps with a checkpoint saved after every `save_every`-th.

  The saves go through training's own code (`train_state.checkpoint_manager`,
  `train_state.save_checkpoint`: asynchronous, config.keep_checkpoints kept)
  into a temporary workdir, deleted afterwards. A save step is the train
  step plus the save call (orbax copies the state to host memory and writes
  it in the background, while the next steps run); one save during the
  warmup (finished before timing) keeps orbax's first-use costs out.
  `ms_per_step_*` are the normal steps, `ms_per_save_step_*` the save steps;
  `save_step_ratio` = median save step / median normal step;
  `ms_per_step_after_save_median` the normal steps right after a save, which
  run beside most of its writing.
  """
  if not 2 <= save_every <= options.steps:
    raise ValueError(f'--save_every={save_every}: expected 2 to --steps '
                     f'({options.steps}), so that some steps save and some '
                     'do not.')
  prepared = prepare_train(config, options)
  holder = prepared.state
  normal, saving, calls = Timings([], []), Timings([], []), []
  after_save = []  # Wall time of the step after each save (beside its write).
  with tempfile.TemporaryDirectory(prefix='spade_jax_saves_') as workdir:
    mngr = train_state.checkpoint_manager(workdir, config)
    try:
      for _ in range(options.warmup):
        prepared.step()
      if options.warmup:
        train_state.save_checkpoint(mngr, holder['state'], config)
        mngr.wait_until_finished()
      for i in range(1, options.steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        prepared.step()
        timing = normal
        if i % save_every == 0:
          call_start = time.perf_counter()
          train_state.save_checkpoint(mngr, holder['state'], config)
          calls.append(time.perf_counter() - call_start)
          timing = saving
        timing.wall.append(time.perf_counter() - start)
        timing.cpu.append(time.process_time() - start_cpu)
        if i % save_every == 1 and i > 1:
          after_save.append(timing.wall[-1])
      start = time.perf_counter()
      mngr.wait_until_finished()
      final_wait = time.perf_counter() - start
      last = os.path.join(workdir, train_state.CHECKPOINTS_DIR,
                          str(mngr.latest_step()))
      checkpoint_bytes = sum(os.path.getsize(os.path.join(root, name))
                             for root, _, names in os.walk(last)
                             for name in names)
    finally:
      mngr.close()
  record = timed_record(prepared, normal)
  saves = summarize(saving, prepared.images_per_step)
  record.update(
      save_every=save_every, save_steps=len(saving.wall),
      ms_per_save_step_median=saves['ms_per_step_median'],
      ms_per_save_step_min=saves['ms_per_step_min'],
      ms_per_save_step_max=saves['ms_per_step_max'],
      cpu_ms_per_save_step_median=saves['cpu_ms_per_step_median'],
      ms_save_call_median=1000.0 * statistics.median(calls),
      ms_per_step_after_save_median=(1000.0 * statistics.median(after_save)
                                     if after_save else None),
      save_step_ratio=(saves['ms_per_step_median'] /
                       record['ms_per_step_median']),
      ms_final_wait=1000.0 * final_wait,
      checkpoint_bytes=checkpoint_bytes,
      keep_checkpoints=config.keep_checkpoints)
  return record


def run_saving(config: ml_collections.ConfigDict, workdir: str,
               save_every: int, steps: int = 10, warmup: int = 2,
               random_vgg_for_timing: bool = False) -> Dict[str, Any]:
  """`run('train', ...)` saving a checkpoint every `save_every` steps."""
  check_run_args('train', steps, warmup)
  options = Options(workdir, steps, warmup, random_vgg_for_timing)
  record = {'mode': 'train'}
  record.update(benchmark_train_saving(config, options, save_every))
  return finish_record(record, config, random_vgg_for_timing)


def bytes_read() -> int:
  """This process's bytes read so far (rchar of /proc/self/io; -1 if none)."""
  try:
    with open('/proc/self/io') as f:
      for line in f:
        if line.startswith('rchar:'):
          return int(line.split()[1])
  except OSError:
    pass
  return -1


def benchmark_input(config: ml_collections.ConfigDict,
                    options: Options) -> Dict[str, Any]:
  """Times one process's share of the training input pipeline (numpy out).

  `bytes_read` is the rchar delta from building the pipeline to the last
  batch, `bytes_read_first_batch` and `first_batch_s` up to the first one;
  `options.process_count` / `process_index` read one process's share
  without starting the others, `options.start_step` resumes there, and
  `options.one_epoch` reads exactly one epoch of this process's batches
  instead of warmup + steps.
  """
  data_dir = run_config.resolve_data_dir(config, options.workdir)
  count = options.process_count or jax.process_count()
  index = jax.process_index() if options.process_count is None else (
      options.process_index)
  info = records.DatasetInfo.load(data_dir)
  num_examples, num_shards = input_pipeline.split_size(info,
                                                       config.train_split)
  paths = info.shard_files(config.train_split)
  sizes = [os.path.getsize(p) for p in paths]
  local_batch = config.batch_size // count
  lo, hi = data_order.process_range(num_examples, index, count)
  epoch_batches = (hi - lo) // local_batch
  read_before = bytes_read()
  start = time.perf_counter()
  position = options.start_step * local_batch
  epoch = position // (hi - lo)
  ds = input_pipeline.create_split(
      config, data_dir, config.train_split, train=True,
      start_step=options.start_step, process_index=index,
      process_count=count, num_epochs=epoch + 1 if options.one_epoch else None)
  batches = input_pipeline.numpy_batches(ds)
  first = next(batches)
  first_batch_s = time.perf_counter() - start
  read_first = bytes_read() - read_before
  if options.one_epoch:  # The rest of this epoch: the stream ends there.
    steps, warmup = ((epoch + 1) * (hi - lo) - position) // local_batch - 1, 0
  else:
    steps, warmup = options.steps, options.warmup
  timings = (time_steps(lambda: next(batches), steps, warmup) if steps > 0
             else Timings([first_batch_s], [0.0]))
  read_all = bytes_read() - read_before
  record = summarize(timings, first['image'].shape[0])
  record.update(
      height=int(first['image'].shape[1]), width=int(first['image'].shape[2]),
      global_batch_size=int(config.batch_size), data_dir=data_dir,
      split=config.train_split, tf_cpu_threads=os.cpu_count(),
      input_process_count=count, input_process_index=index,
      start_step=options.start_step, batches_read=1 + warmup + steps,
      epoch_batches=epoch_batches, one_epoch=bool(options.one_epoch),
      first_batch_s=first_batch_s, bytes_read_first_batch=read_first,
      bytes_read=read_all, split_bytes=sum(sizes),
      shard_bytes_max=max(sizes), num_shards=num_shards,
      bytes_read_share=read_all / sum(sizes),
      bytes_read_first_batch_shards=read_first / max(sizes))
  return record


# mode -> function(config, options) -> record.
ModeFn = Callable[[ml_collections.ConfigDict, Options], Dict[str, Any]]
MODES: Dict[str, ModeFn] = {
    'train': benchmark_train,
    'generate': benchmark_generate,
    'input': benchmark_input,
}


# Named config overrides that --variants compiles and times alternately.
VARIANTS: Dict[str, Dict[str, Any]] = {
    'dense': {'spade_sparse': False},
    # At the config's spade_sparse_min_size (default 256) and above.
    'sparse': {'spade_sparse': True},
    # From 128x128 up (the default until measured slower: docs/performance.md).
    'sparse128': {'spade_sparse': True, 'spade_sparse_min_size': 128},
    # The config's SPADE path with XLA's own kernel gradients (CPU: without
    # layers.conv2d_matmul_kernel_grad).
    'xla_kernel_grad': {'conv_impl': 'padding_only'},
    # The compute dtype (parameters stay float32).
    'float32': {'compute_dtype': 'float32'},
    'bfloat16': {'compute_dtype': 'bfloat16'},
}
# Modes whose compiled step --variants can alternate.
PREPARE = {'train': prepare_train, 'generate': prepare_generate}


def check_run_args(mode: str, steps: int, warmup: int) -> None:
  if mode not in MODES:
    raise ValueError(f'Unknown --mode={mode!r}; available: '
                     f'{", ".join(sorted(MODES))}.')
  if steps <= 0 or warmup < 0:
    raise ValueError(f'Need steps > 0 and warmup >= 0, got {steps}, '
                     f'{warmup}.')


def finish_record(record: Dict[str, Any], config: ml_collections.ConfigDict,
                  random_vgg_for_timing: bool) -> Dict[str, Any]:
  """Adds what was measured on what: devices, load, config, resolved paths."""
  record.update(peak_memory())
  device = jax.devices()[0]
  used = len(sharding.mesh_devices(config))
  if record['mode'] != 'input' and 'images_per_s' in record:  # Per device.
    record['images_per_s_per_device'] = record['images_per_s'] / used
  record.update(
      backend=jax.default_backend(), device_kind=str(device.device_kind),
      device=str(device.device_kind), device_count=used,
      devices_visible=jax.device_count(),
      process_count=jax.process_count(), cpu_count=os.cpu_count(),
      jax_version=jax.__version__, load_average_1min=os.getloadavg()[0],
      **xla_cpu.cpu_description(),
      xla_flags=os.environ.get('XLA_FLAGS', ''),
      random_vgg_for_timing=bool(random_vgg_for_timing and
                                 config.lambda_vgg > 0 and
                                 not config.vgg_weights),
      time=time.strftime('%Y-%m-%dT%H:%M:%S'))
  record.update({k: config[k] for k in _CONFIG_KEYS if k in config})
  # As resolved.
  record['spade_label_lookup'] = models.label_lookup(config)
  record['spade_sparse'] = models.spade_sparse(
      config, training=record['mode'] == 'train')
  record['spade_sparse_capacity'] = [
      list(entry) for entry in (models.spade_sparse_capacity(config) or
                                models.SPARSE_CAPACITY)]
  return record


def run(mode: str, config: ml_collections.ConfigDict, workdir: str,
        steps: int = 10, warmup: int = 2,
        random_vgg_for_timing: bool = False, **input_options
        ) -> Dict[str, Any]:
  """Runs one benchmark mode and returns its JSON-able record.

  `input_options`: process_count, process_index, start_step, one_epoch (see
  `Options`).
  """
  check_run_args(mode, steps, warmup)
  options = Options(workdir, steps, warmup, random_vgg_for_timing,
                    **input_options)
  record = {'mode': mode}
  record.update(MODES[mode](config, options))
  return finish_record(record, config, random_vgg_for_timing)


def run_compile_only(mode: str, config: ml_collections.ConfigDict,
                     workdir: str,
                     random_vgg_for_timing: bool = False) -> Dict[str, Any]:
  """--compile_only: the train step's compiled per-device memory."""
  if mode != 'train':
    raise ValueError(f'--compile_only needs --mode train, got {mode!r}.')
  options = Options(workdir, random_vgg_for_timing=random_vgg_for_timing)
  record = {'mode': mode}
  record.update(compile_train_memory(config, options))
  record = finish_record(record, config, random_vgg_for_timing)
  record.update(spatial_partitions=sharding.spatial_partitions(config),
                remat=models.remat(config))
  return record


def variant_config(config: ml_collections.ConfigDict,
                   name: str) -> ml_collections.ConfigDict:
  if name not in VARIANTS:
    raise ValueError(f'Unknown variant {name!r}; available: '
                     f'{", ".join(VARIANTS)}.')
  variant = config.copy_and_resolve_references()
  variant.update(VARIANTS[name])
  return variant


def run_variants(mode: str, config: ml_collections.ConfigDict, workdir: str,
                 variants: Sequence[str], steps: int = 10, warmup: int = 2,
                 random_vgg_for_timing: bool = False
                 ) -> List[Dict[str, Any]]:
  """Compiles `mode` for each variant, then times them in alternation.

  Round by round every variant runs one step, so all see the same load; one
  record per variant (with `variant`), in the order given.
  """
  check_run_args(mode, steps, warmup)
  if mode not in PREPARE:
    raise ValueError(f'--variants needs --mode in {sorted(PREPARE)}, '
                     f'got {mode!r}.')
  if len(set(variants)) != len(variants) or not variants:
    raise ValueError(f'--variants: expected distinct names, got {variants}.')
  configs = [variant_config(config, name) for name in variants]
  options = Options(workdir, steps, warmup, random_vgg_for_timing)
  prepared = [PREPARE[mode](c, options) for c in configs]
  timings = time_alternating([p.step for p in prepared], steps, warmup)
  records = []
  for name, c, p, t in zip(variants, configs, prepared, timings):
    record = {'mode': mode, 'variant': name}
    record.update(timed_record(p, t))
    records.append(finish_record(record, c, random_vgg_for_timing))
  return records


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
  if record.get('variant'):
    rows.insert(1, ('variant', record['variant']))
  if record.get('save_every'):
    rows.append((f"save step median (every {record['save_every']})",
                 record['ms_per_save_step_median']))
    rows.append(('save step / step', record['save_step_ratio']))
  if record.get('flops_per_step_sparse_branch'):
    rows.append(('GFLOP/step, sparse branch',
                 record['flops_per_step_sparse_branch'] / 1e9))
  if record['mode'] == 'input':
    rows.append(('process', f"{record['input_process_index']} of "
                            f"{record['input_process_count']}, from step "
                            f"{record['start_step']}"))
    rows.append(('first batch s', record['first_batch_s']))
    rows.append(('MB read, first batch', record['bytes_read_first_batch']
                 / 1e6))
    rows.append((f"MB read, {record['batches_read']} batches",
                 record['bytes_read'] / 1e6))
    rows.append(('  of the split', record['bytes_read_share']))
  if record.get('boundary_pixel_fraction'):
    rows.append(('labels', record['labels']))
    rows.append(('boundary pixels', ', '.join(
        f'{k} {v:.2f}' for k, v in record['boundary_pixel_fraction'].items())))
    rows.append(('boundary 8x8 tiles', ', '.join(
        f'{k} {v:.2f}' for k, v in
        record['boundary_tile_fraction_8x8'].items())))
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {fmt(value)}' for name, value in rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_cpu.apply_cpu_defaults()  # As training and serving set them.
  workdir = FLAGS.workdir or os.path.join(tempfile.gettempdir(),
                                          'spade_jax_benchmark')
  try:
    if FLAGS.compile_only:
      if FLAGS.variants or FLAGS.save_every:
        raise ValueError('--compile_only does not take --variants or '
                         '--save_every.')
      record = run_compile_only(FLAGS.mode, FLAGS.config, workdir,
                                FLAGS.random_vgg_for_timing)
      print(format_memory_table(record))
      if FLAGS.json:
        with open(FLAGS.json, 'a') as f:
          f.write(json.dumps(record, sort_keys=True) + '\n')
      return
    if FLAGS.save_every:
      if FLAGS.mode != 'train' or FLAGS.variants:
        raise ValueError('--save_every needs --mode=train (without '
                         '--variants).')
      recs = [run_saving(FLAGS.config, workdir, FLAGS.save_every, FLAGS.steps,
                         FLAGS.warmup, FLAGS.random_vgg_for_timing)]
    elif FLAGS.variants:
      recs = run_variants(FLAGS.mode, FLAGS.config, workdir, FLAGS.variants,
                          FLAGS.steps, FLAGS.warmup,
                          FLAGS.random_vgg_for_timing)
    else:
      recs = [run(FLAGS.mode, FLAGS.config, workdir, FLAGS.steps,
                  FLAGS.warmup, FLAGS.random_vgg_for_timing,
                  process_count=FLAGS.process_count,
                  process_index=FLAGS.process_index,
                  start_step=FLAGS.start_step, one_epoch=FLAGS.one_epoch)]
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print('\n\n'.join(format_table(record) for record in recs))
  if FLAGS.json:
    with open(FLAGS.json, 'a') as f:
      for record in recs:
        f.write(json.dumps(record, sort_keys=True) + '\n')


if __name__ == '__main__':
  define_flags()
  app.run(main)
