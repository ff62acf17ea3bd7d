"""The training state: both networks, their optimisers, saved and restored.

`TrainState` holds what a run carries from step to step: two flax
TrainStates, G's and D's, each with its optimiser (the reference's Adam
settings and learning-rate schedules, `make_optimizers`), and the random key.
`create_train_state` initialises it for a config, `apply_init_from` starts
it from a model folder, and the orbax checkpoint functions save it and
restore the newest readable step (`checkpoints.py`) on this run's mesh;
`read_checkpoint` reads one for export, evaluation and the server.
`generator_variables` and `inference_variables` take the generator's
inference variables out of it.
Used by training, evaluation, export and the server; it imports neither
TensorFlow nor the losses.
"""
import json
import os
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import flax
from flax.training import train_state as flax_train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from spade_jax import checkpoints
from spade_jax import model_io
from spade_jax import models
from spade_jax import sharding

# Config keys that fix the networks' architecture (checked by init_from).
ARCHITECTURE_KEYS = (
    'netG', 'label_nc', 'contain_dontcare_label', 'no_instance', 'ngf', 'ndf',
    'norm_G', 'norm_D', 'norm_E', 'num_upsampling_layers', 'crop_size',
    'aspect_ratio', 'use_vae', 'z_dim', 'n_layers_D', 'num_D',
    'resnet_n_downsample', 'resnet_n_blocks', 'resnet_kernel_size',
    'resnet_initial_kernel_size')




class NetState(flax_train_state.TrainState):
  """One network's flax TrainState: params, optimiser (tx) and its state.

  `batch_stats` holds the mutable collections the network updates in
  training (BatchNorm running statistics, spectral-norm vectors);
  `lr_schedule` is the schedule inside `tx`, for the learning-rate metrics.
  `apply_fn` is unused (the train step builds its modules from the config).
  """
  batch_stats: Any = None
  lr_schedule: Optional[Callable] = flax.struct.field(pytree_node=False,
                                                      default=None)


class GeneratorState(NetState):
  """The generator's (and encoder's) state; params and batch_stats are
  {'generator': ..., 'encoder': ... (VAE)}, ema_params the EMA of the
  generator's params (or None)."""
  ema_params: Any = None


class DiscriminatorState(NetState):
  """The (multi-scale) discriminator's state."""


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step: G, D, the key."""
  g: GeneratorState
  d: DiscriminatorState
  rng: jax.Array

  @property
  def step(self) -> jax.Array:
    """Iterations done (each updates G then D once)."""
    return self.g.step


# ---------------------------------------------------------------------------
# Optimisation.
# ---------------------------------------------------------------------------
def adam_betas(config) -> Tuple[float, float]:
  """(beta1, beta2) as the reference: the user's, else the mode's default.

  The reference's train options default to beta1 0, beta2 0.9 with TTUR and
  to 0.5, 0.999 with no_TTUR, and its optimisers always use the options'
  values, so a value the user set wins in both modes. Here "not set" is
  None (the config's default); this is the one place it is resolved.
  """
  default = (0.5, 0.999) if config.no_TTUR else (0.0, 0.9)
  b1, b2 = config.beta1, config.beta2
  return (default[0] if b1 is None else float(b1),
          default[1] if b2 is None else float(b2))


def learning_rates(config) -> Tuple[float, float, float, float]:
  """(lr_G, lr_D, beta1, beta2) as the reference: TTUR or not."""
  b1, b2 = adam_betas(config)
  if config.no_TTUR:
    return config.lr, config.lr, b1, b2
  return config.lr / 2, config.lr * 2, b1, b2


def lr_schedule(base_lr: float, steps_per_epoch: int, niter: int,
                niter_decay: int) -> optax.Schedule:
  """Constant for `niter` epochs, then linear decay over `niter_decay` epochs.

  Like the reference, the rate changes at epoch boundaries: during epoch k
  (0-based) it is base_lr * (1 - max(0, k - niter) / niter_decay).
  """
  def schedule(step):
    if niter_decay <= 0:
      return jnp.asarray(base_lr, jnp.float32)
    epoch = step // max(steps_per_epoch, 1)
    decayed = jnp.maximum(epoch - niter, 0) / niter_decay
    return base_lr * jnp.clip(1.0 - decayed, 0.0, 1.0)
  return schedule


def make_optimizers(config, steps_per_epoch: int):
  lr_g, lr_d, b1, b2 = learning_rates(config)
  sched_g = lr_schedule(lr_g, steps_per_epoch, config.niter,
                        config.niter_decay)
  sched_d = lr_schedule(lr_d, steps_per_epoch, config.niter,
                        config.niter_decay)
  eps = config.adam_eps
  return (optax.adam(sched_g, b1=b1, b2=b2, eps=eps),
          optax.adam(sched_d, b1=b1, b2=b2, eps=eps), sched_g, sched_d)


# ---------------------------------------------------------------------------
# State.
# ---------------------------------------------------------------------------
# XLA's backend optimisation level for the networks' init programs on the
# CPU: LLVM's -O1 instead of the default -O2. An init is random-number
# generation and a few power iterations over every parameter, run once; at
# -O1 `create_train_state` compiles and runs in about 0.6x the time (the
# default config: 28 s -> 19 s on a 2-core AMD EPYC; every training run,
# test and benchmark compiles it) and gave the same parameters bit for bit;
# of all its 555 arrays only one spectral-norm power-iteration vector
# differed, by one ulp (-O0 changes parameters by an ulp).
CPU_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


def jit_init(module) -> Callable[..., Any]:
  """jax.jit(module.init), compiled at CPU_INIT_COMPILER_OPTIONS on the CPU.

  Elsewhere, and when called inside another transformation (jit,
  eval_shape: JAX takes compiler options only on the outermost jit), with
  XLA's defaults.
  """
  plain = jax.jit(module.init)
  if jax.default_backend() != 'cpu':
    return plain
  optimised = jax.jit(module.init, compiler_options=CPU_INIT_COMPILER_OPTIONS)

  def init(*args, **kwargs):
    traced = any(isinstance(x, jax.core.Tracer)
                 for x in jax.tree_util.tree_leaves((args, kwargs)))
    return (plain if traced else optimised)(*args, **kwargs)
  return init


def create_train_state(config, rng, steps_per_epoch: int = 1, *,
                       tx: Optional[Tuple[optax.GradientTransformation,
                                          optax.GradientTransformation]] = None
                       ) -> TrainState:
  """Initialises G (+E) and D for the config's crop size, with optimisers.

  The optimisers are the reference's (`make_optimizers`, whose schedules
  need `steps_per_epoch`); `tx` = (tx_G, tx_D) replaces them (tests).
  """
  tx_g, tx_d, sched_g, sched_d = make_optimizers(config, steps_per_epoch)
  if tx is not None:
    tx_g, tx_d = tx
  h, w = models.output_size(config)
  label = jnp.zeros((1, h, w), jnp.int32)
  edges = jnp.zeros((1, h, w), jnp.float32)
  image = jnp.zeros((1, h, w, 3), jnp.float32)
  rng, g_rng, d_rng, e_rng, z_rng = jax.random.split(rng, 5)
  # Each network's init as one compiled program: run eagerly, every
  # primitive of the initialisers and of the forward pass compiles on its own
  # (over a minute for the tiny test model on a 2-core CPU, twice the jitted
  # init), and a jitted one is reused from a persistent compilation cache.
  g_vars = jit_init(models.make_generator(config))(
      {'params': g_rng, 'z': z_rng}, label, edges)
  d_in = jnp.zeros((1, h, w, models.semantic_nc(config) + 3), jnp.float32)
  d_vars = jit_init(models.make_discriminator(config))(d_rng, d_in)
  g_params = {'generator': g_vars['params']}
  g_stats = {'generator': g_vars.get('batch_stats', {})}
  if config.use_vae:
    e_vars = jit_init(models.make_encoder(config))(e_rng, image)
    g_params['encoder'] = e_vars['params']
    g_stats['encoder'] = e_vars.get('batch_stats', {})
  step = lambda: jnp.zeros((), jnp.int32)
  g = GeneratorState(
      step=step(), apply_fn=None, params=g_params, tx=tx_g,
      opt_state=tx_g.init(g_params), batch_stats=g_stats,
      lr_schedule=sched_g,
      ema_params=(_copy(g_params['generator']) if config.ema_decay > 0
                  else None))
  d = DiscriminatorState(
      step=step(), apply_fn=None, params=d_vars['params'], tx=tx_d,
      opt_state=tx_d.init(d_vars['params']),
      batch_stats=d_vars.get('batch_stats', {}), lr_schedule=sched_d)
  return TrainState(g=g, d=d, rng=rng)


def _copy(tree):
  # Own buffers: the train step donates the state, which must not hold the
  # same buffer twice.
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def apply_init_from(state: TrainState, config) -> TrainState:
  """Starts from a model folder (e.g. a converted reference checkpoint)."""
  src_config, variables = model_io.load_model(config.init_from)
  diff = [k for k in ARCHITECTURE_KEYS
          if k in src_config and src_config[k] != config[k]]
  if diff:
    raise ValueError(
        f'config.init_from={config.init_from} was made with a different '
        'architecture: ' + ', '.join(
            f'{k}={src_config[k]!r} there vs {config[k]!r} here' for k in diff))

  def take(name, params, stats):
    if name not in variables:
      logging.warning('init_from: %s has no %s; it starts from scratch.',
                      config.init_from, name)
      return params, stats
    src = variables[name]
    return (jax.tree_util.tree_map(jnp.asarray, src['params']),
            jax.tree_util.tree_map(jnp.asarray, src.get('batch_stats', {})))

  g_params, g_stats = dict(state.g.params), dict(state.g.batch_stats)
  for name in g_params:
    g_params[name], g_stats[name] = take(name, g_params[name], g_stats[name])
  d_params, d_stats = take('discriminator', state.d.params,
                           state.d.batch_stats)
  logging.info('Initialised from %s', config.init_from)
  g = state.g.replace(
      params=g_params, batch_stats=g_stats,
      opt_state=state.g.tx.init(g_params),
      ema_params=(_copy(g_params['generator'])
                  if state.g.ema_params is not None else None))
  d = state.d.replace(params=d_params, batch_stats=d_stats,
                      opt_state=state.d.tx.init(d_params))
  return state.replace(g=g, d=d)


def generator_variables(state: TrainState, use_ema: bool = True) -> Dict:
  """The generator's inference variables (EMA weights when kept), on host."""
  params = state.g.params['generator']
  if use_ema and state.g.ema_params is not None:
    params = state.g.ema_params
  # Replicated global arrays -> this process's copy, so that evaluation runs
  # on local devices only (also with several processes).
  local = lambda x: np.asarray(x.addressable_data(0)) if isinstance(
      x, jax.Array) else np.asarray(x)
  return jax.tree_util.tree_map(
      local, {'params': params, 'batch_stats': state.g.batch_stats['generator']})


def inference_variables(state: TrainState, use_ema: bool = True) -> Dict:
  """The generator's (and encoder's) eval-mode variables, as a model folder
  holds them: {'generator': ..., 'encoder': ... (VAE)}, numpy arrays."""
  params = state.g.params['generator']
  if use_ema and state.g.ema_params is not None:
    params = state.g.ema_params
  out = {'generator': {'params': params,
                       'batch_stats': state.g.batch_stats['generator']}}
  if 'encoder' in state.g.params:
    out['encoder'] = {'params': state.g.params['encoder'],
                      'batch_stats': state.g.batch_stats['encoder']}
  return jax.tree_util.tree_map(np.asarray, out)


# ---------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------
CHECKPOINTS_DIR = 'checkpoints'
# A top-level key of the state in checkpoints written before G and D had
# their own TrainStates (one state with g_params, g_opt_state, ...).
_OLD_LAYOUT_KEY = 'g_opt_state'


def _top_level_keys(step_folder: str) -> set:
  """The first keys of the saved state's tree (empty when unreadable)."""
  try:
    with open(os.path.join(step_folder, 'state', '_METADATA')) as f:
      tree = json.load(f)['tree_metadata']
    return {v['key_metadata'][0]['key'] for v in tree.values()}
  except (OSError, ValueError, KeyError, TypeError, IndexError):
    return set()  # Damaged: `checkpoints.restore_newest` reports it.


def check_layout(mngr: ocp.CheckpointManager) -> None:
  """Raises CheckpointError on checkpoints of the older state layout."""
  for step in sorted(mngr.all_steps(), reverse=True):
    folder = checkpoints.step_folder(mngr, step)
    if _OLD_LAYOUT_KEY in _top_level_keys(folder):
      raise checkpoints.CheckpointError(
          f'The checkpoint {folder} (step {step}) was written by an older '
          'spade_jax, whose training state kept G and D in one TrainState; '
          'this version keeps them in two and cannot read it. Start afresh '
          '(a new workdir, or move its checkpoints folder away), or read it '
          'with the spade_jax version that wrote it (e.g. to export a model '
          'folder, which config.init_from can start from).')


def abstract_train_state(config, sharding_of: jax.sharding.Sharding):
  """Shapes/dtypes (with `sharding_of`) of the state a run with `config`
  checkpoints; computed without running the networks."""
  abstract = jax.eval_shape(lambda: create_train_state(
      config, jax.random.PRNGKey(0)))
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_of),
      abstract)


def read_checkpoint(workdir: str, config, step: Optional[int] = None
                    ) -> Tuple[TrainState, int]:
  """(TrainState, step) of checkpoint `step` (default the newest readable),
  on this process's first device, without writing anything.

  A damaged newest checkpoint is skipped with a warning naming its folder;
  a damaged `step` is an error naming it and the --step to use instead
  (see `checkpoints.restore_newest`).
  """
  ckpt_dir = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'{workdir} has no {CHECKPOINTS_DIR}/ folder: no '
                            'training checkpoint to read.')
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(ckpt_dir, options=options) as mngr:
    check_layout(mngr)
    abstract = abstract_train_state(
        config, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    restored, step, _ = checkpoints.restore_newest(
        mngr, lambda s: mngr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))), step)
  return restored['state'], int(step)


def load_inference_variables(
    path: str, step: Optional[int] = None, use_ema: bool = True,
    config=None) -> Tuple[Any, Dict, Optional[int]]:
  """(config, {'generator', 'encoder'?}, step) of a workdir or model folder.

  Args:
    path: a training workdir or a model folder.
    step: checkpoint step of a workdir (default the latest).
    use_ema: take the EMA generator parameters when training kept them.
    config: the run's config (default: the workdir's config.json).
  """
  if model_io.is_model_folder(path):
    if step is not None:
      raise ValueError(f'{path} is a model folder: it has no steps '
                       '(--step applies to training workdirs).')
    model_config, variables = model_io.load_model(path)
    if 'generator' not in variables:
      raise ValueError(f'The model folder {path} holds no generator.')
    keep = ('generator', 'encoder')
    return model_config, {k: v for k, v in variables.items() if k in keep}, None
  config = config if config is not None else model_io.load_config(path)
  state, step = read_checkpoint(path, config, step)
  return config, inference_variables(state, use_ema), step


def checkpoint_manager(workdir: str, config) -> checkpoints.Manager:
  """The manager training saves WORKDIR/checkpoints/ with.

  Saves are asynchronous (`checkpoints.Manager`): `save_checkpoint` returns
  while the files are written; `close()` (or `wait_until_finished()`) waits
  for them. Folders an earlier process did not finish saving (it was killed
  mid-save) are moved to WORKDIR/damaged_checkpoints/ first.
  """
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
  if jax.process_index() == 0:
    checkpoints.set_aside_unfinished(directory)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('unfinished checkpoints set aside')
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                         create=True,
                                         enable_async_checkpointing=True)
  return checkpoints.Manager(directory, options=options)


def save_checkpoint(mngr, state: TrainState, config) -> None:
  """Starts saving `state` at its step; returns before the files are written.

  orbax copies the state to host memory first, so the caller may go on
  updating (and donating) it. The previous save is waited for first (by
  orbax); the step's file list is written once its save has finished (see
  `checkpoints.Manager`).
  """
  step = int(jax.device_get(state.step))
  meta = {'step': step, 'examples_seen': step * config.batch_size,
          'global_batch_size': config.batch_size, 'seed': config.seed}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(meta)))
  logging.info('Saving checkpoint at step %d (in the background)', step)


def restore_checkpoint(mngr, state: TrainState, config,
                       mesh: Optional[jax.sharding.Mesh] = None, *,
                       set_aside_damaged: bool = False) -> TrainState:
  """The newest readable checkpoint, replicated over `mesh`'s devices.

  The target sharding is this run's (default: `make_mesh(config)`), not the
  one saved with the checkpoint, so a run resumes on any number of devices
  and processes. Damaged newer steps are skipped with a warning naming
  their folders (see `checkpoints.restore_newest`); with
  `set_aside_damaged` (training) they are moved to
  WORKDIR/damaged_checkpoints/ so that training can write those steps again.
  """
  replicated = jax.sharding.NamedSharding(
      mesh if mesh is not None else sharding.make_mesh(config),
      jax.sharding.PartitionSpec())
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      state)
  mngr.wait_until_finished()  # A save of this manager may be under way.
  check_layout(mngr)
  restored, step, damaged = checkpoints.restore_newest(
      mngr, lambda s: mngr.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=ocp.args.JsonRestore())))
  if damaged and set_aside_damaged:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('checkpoint restored')
    if jax.process_index() == 0:
      checkpoints.set_aside(mngr, damaged)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('damaged checkpoints set aside')
      if jax.process_index() > 0:
        mngr.reload()
  meta = restored['data']
  if meta['global_batch_size'] != config.batch_size:
    raise ValueError(
        f'The checkpoint at step {step} was trained with batch_size='
        f"{meta['global_batch_size']}, this run has {config.batch_size}: the "
        'data position would not match. Resume with the same batch size, or '
        'start a new workdir (with config.init_from to keep the weights).')
  logging.info('Resumed from step %d (%d examples seen)', step,
               meta['examples_seen'])
  return restored['state']
