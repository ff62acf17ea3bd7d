"""Training: the G/D train step and `train_and_evaluate(config, workdir)`.

One iteration does what the reference does: a generator update, then a
discriminator update whose fake image is re-generated (without gradient) by
the UPDATED generator, fake and real going through D as one batch (fake
first). Both updates are one jitted function over a `jax.sharding.Mesh`, the
batch sharded over the `data` axis and everything else replicated, so
BatchNorm statistics are global across devices (and processes).
"""
import functools
import os
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from data_pipelines import records
from spade_jax import diffaugment
from spade_jax import input_pipeline
from spade_jax import layers
from spade_jax import losses
from spade_jax import metrics as metrics_lib
from spade_jax import model_io
from spade_jax import models
from spade_jax import vgg as vgg_lib
from spade_jax import visualize

# Config keys that fix the networks' architecture (checked by init_from).
ARCHITECTURE_KEYS = (
    'netG', 'label_nc', 'contain_dontcare_label', 'no_instance', 'ngf', 'ndf',
    'norm_G', 'norm_D', 'norm_E', 'num_upsampling_layers', 'crop_size',
    'aspect_ratio', 'use_vae', 'z_dim', 'n_layers_D', 'num_D',
    'resnet_n_downsample', 'resnet_n_blocks', 'resnet_kernel_size',
    'resnet_initial_kernel_size')


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step."""
  step: jax.Array
  g_params: Dict[str, Any]  # {'generator': ..., 'encoder': ... (VAE)}
  g_stats: Dict[str, Any]   # their batch_stats (BN running stats, SN vectors)
  d_params: Any
  d_stats: Any
  g_opt_state: Any
  d_opt_state: Any
  ema_params: Any  # EMA of the generator's params, or None
  rng: jax.Array


# ---------------------------------------------------------------------------
# Config checks.
# ---------------------------------------------------------------------------
def validate_config(config: ml_collections.ConfigDict) -> None:
  """Stops at start-up with a clear message on settings that cannot work."""
  try:
    models.make_generator(config)
    models.make_discriminator(config)
    if config.use_vae:
      models.make_encoder(config)
  except ValueError as e:
    raise ValueError(f'Invalid model config: {e}') from None
  want = (round(config.crop_size / config.aspect_ratio), config.crop_size)
  got = models.output_size(config)
  if got != want or min(got) < 1:
    n = {'normal': 5, 'more': 6, 'most': 7}[config.num_upsampling_layers]
    raise ValueError(
        f'crop_size={config.crop_size} with aspect_ratio='
        f'{config.aspect_ratio} needs a {want[0]}x{want[1]} image, but '
        f'num_upsampling_layers={config.num_upsampling_layers!r} '
        f'({n} upsamplings) produces {got[0]}x{got[1]}: use a crop_size that '
        f'is a multiple of {2**n} (and an aspect ratio that keeps the height '
        'one), or another num_upsampling_layers.')
  diffaugment.parse_policy(config.get('diffaugment', ''))
  num_devices = len(mesh_devices(config))
  if config.batch_size % num_devices:
    raise ValueError(
        f'batch_size={config.batch_size} is not divisible by the '
        f'{num_devices} devices: the batch is split evenly over them.')
  if config.get('fid_every_steps', 0) > 0 and not config.get(
      'inception_weights', ''):
    from spade_jax import inception  # pylint: disable=g-import-not-at-top
    raise ValueError(
        f'fid_every_steps={config.fid_every_steps} computes FID during '
        'training and needs config.inception_weights (or set '
        'fid_every_steps=0). ' + inception.HOW_TO_GET)
  if not config.get('adam_eps', 1e-8) > 0:
    raise ValueError(f'adam_eps={config.adam_eps} must be positive.')
  if config.gan_mode not in losses.GAN_MODES:
    raise ValueError(f'gan_mode={config.gan_mode!r}: expected one of '
                     f'{losses.GAN_MODES}.')
  if config.lambda_vgg > 0 and not config.vgg_weights:
    raise ValueError(
        f'lambda_vgg={config.lambda_vgg} needs pretrained VGG19 weights: set '
        '--config.vgg_weights to torchvision\'s ImageNet vgg19 state-dict file '
        f'({vgg_lib.WEIGHTS_FILE_NAME}, from the torchvision model zoo) or an '
        '.npz made from it with `python -m spade_jax.vgg IN.pth OUT.npz`; or '
        'turn the perceptual loss off with --config.lambda_vgg=0.')


def resolve_data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The TFRecord folder; the synthetic set is generated there if needed."""
  if config.dataset == 'synthetic':
    data_dir = config.data_dir or os.path.join(workdir, 'data', 'synthetic')
    if jax.process_index() == 0:
      from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
      synthetic.ensure_synthetic(data_dir, config.synthetic_num_train,
                                 config.synthetic_num_val,
                                 config.synthetic_size, seed=0)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('synthetic data ready')
    return data_dir
  if not config.data_dir:
    raise ValueError(
        f'dataset={config.dataset!r} needs --config.data_dir: the folder '
        'written by `python -m data_pipelines.build --dataset '
        f'{config.dataset} --manual_dir SRC --data_dir OUT`.')
  records.DatasetInfo.load(config.data_dir)  # Clear error when absent.
  return config.data_dir


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
  b1 = config.get('beta1')
  b2 = config.get('beta2')
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
  eps = config.get('adam_eps', 1e-8)
  return (optax.adam(sched_g, b1=b1, b2=b2, eps=eps),
          optax.adam(sched_d, b1=b1, b2=b2, eps=eps), sched_g, sched_d)


# ---------------------------------------------------------------------------
# State.
# ---------------------------------------------------------------------------
def create_train_state(config, rng, tx_g, tx_d) -> TrainState:
  """Initialises G (+E) and D for the config's crop size."""
  h, w = models.output_size(config)
  label = jnp.zeros((1, h, w), jnp.int32)
  edges = jnp.zeros((1, h, w), jnp.float32)
  image = jnp.zeros((1, h, w, 3), jnp.float32)
  rng, g_rng, d_rng, e_rng, z_rng = jax.random.split(rng, 5)
  g_vars = models.make_generator(config).init(
      {'params': g_rng, 'z': z_rng}, label, edges)
  d_in = jnp.zeros((1, h, w, models.semantic_nc(config) + 3), jnp.float32)
  d_vars = models.make_discriminator(config).init(d_rng, d_in)
  g_params = {'generator': g_vars['params']}
  g_stats = {'generator': g_vars.get('batch_stats', {})}
  if config.use_vae:
    e_vars = models.make_encoder(config).init(e_rng, image)
    g_params['encoder'] = e_vars['params']
    g_stats['encoder'] = e_vars.get('batch_stats', {})
  return TrainState(
      step=jnp.zeros((), jnp.int32), g_params=g_params, g_stats=g_stats,
      d_params=d_vars['params'], d_stats=d_vars.get('batch_stats', {}),
      g_opt_state=tx_g.init(g_params), d_opt_state=tx_d.init(d_vars['params']),
      ema_params=(_copy(g_params['generator']) if config.ema_decay > 0
                  else None),
      rng=rng)


def _copy(tree):
  # Own buffers: the train step donates the state, which must not hold the
  # same buffer twice.
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def apply_init_from(state: TrainState, config, tx_g, tx_d) -> TrainState:
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

  g_params, g_stats = dict(state.g_params), dict(state.g_stats)
  for name in g_params:
    g_params[name], g_stats[name] = take(name, g_params[name], g_stats[name])
  d_params, d_stats = take('discriminator', state.d_params, state.d_stats)
  logging.info('Initialised from %s', config.init_from)
  return state.replace(
      g_params=g_params, g_stats=g_stats, d_params=d_params, d_stats=d_stats,
      g_opt_state=tx_g.init(g_params), d_opt_state=tx_d.init(d_params),
      ema_params=(_copy(g_params['generator']) if state.ema_params is not None
                  else None))


# ---------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------
def _split_fake_real(outputs):
  """D ran on concat(fake, real): split every feature map in two halves."""
  fake = [[f[:f.shape[0] // 2] for f in scale] for scale in outputs]
  real = [[f[f.shape[0] // 2:] for f in scale] for scale in outputs]
  return fake, real


def train_step(state: TrainState, batch: Dict[str, jax.Array], vgg_params,
               *, config, tx_g, tx_d, sched_g, sched_d):
  """One G update then one D update. Returns (new_state, metrics)."""
  gen = models.make_generator(config)
  disc = models.make_discriminator(config)
  enc = models.make_encoder(config) if config.use_vae else None
  dtype = models.compute_dtype(config)
  label, image = batch['label'], batch['image']
  edges = None if config.no_instance else batch['instance_edges']
  semantics = layers.one_hot_semantics(label, edges,
                                       models.num_classes(config), dtype)
  rng = jax.random.fold_in(state.rng, state.step)
  g_rng, d_rng = jax.random.split(rng)
  # DiffAugment draws: their own stream, so turning it on leaves z alone.
  aug_policy = config.get('diffaugment', '')
  g_aug_rng, d_aug_rng = jax.random.split(jax.random.fold_in(rng, 0x0a09))

  def generate(g_params, g_stats, rng):
    """Generator (and encoder) in training mode; returns fake, stats, KLD."""
    new_stats = dict(g_stats)
    z, kld = None, jnp.zeros((), jnp.float32)
    if enc is not None:
      (mu, logvar), e_upd = enc.apply(
          {'params': g_params['encoder'], 'batch_stats': g_stats['encoder']},
          image, train=True, mutable=['batch_stats'])
      new_stats['encoder'] = e_upd['batch_stats']
      z = mu + jax.random.normal(rng, mu.shape) * jnp.exp(0.5 * logvar)
      kld = losses.kl_loss(mu, logvar, config.lambda_kld)
    fake, g_upd = gen.apply(
        {'params': g_params['generator'], 'batch_stats': g_stats['generator']},
        label, edges, z=z, train=True, mutable=['batch_stats'])
    new_stats['generator'] = g_upd['batch_stats']
    return fake, new_stats, kld

  def discriminate(d_params, d_stats, fake, aug_rng):
    d_in = jnp.concatenate([
        jnp.concatenate([semantics, fake.astype(dtype)], axis=-1),
        jnp.concatenate([semantics, image.astype(dtype)], axis=-1)], axis=0)
    # The same transform for the fake and the real input of each label map.
    d_in = diffaugment.augment(d_in, aug_rng, aug_policy, paired=True)
    out, d_upd = disc.apply({'params': d_params, 'batch_stats': d_stats},
                            d_in, train=True, mutable=['batch_stats'])
    return _split_fake_real(out), d_upd['batch_stats']

  # ---- Generator update.
  def g_loss_fn(g_params):
    fake, g_stats, kld = generate(g_params, state.g_stats, g_rng)
    (pred_fake, pred_real), d_stats = discriminate(
        state.d_params, state.d_stats, fake, g_aug_rng)
    terms = {'G_GAN': losses.gan_loss(pred_fake, True, for_discriminator=False,
                                      gan_mode=config.gan_mode)}
    if not config.no_ganFeat_loss:
      terms['G_GAN_Feat'] = losses.feature_matching_loss(
          pred_fake, pred_real, config.lambda_feat)
    if config.lambda_vgg > 0:
      terms['G_VGG'] = config.lambda_vgg * losses.vgg_loss(
          vgg_params, fake, image, dtype=dtype)
    if enc is not None:
      terms['KLD'] = kld
    total = sum(terms.values())
    return total, (terms, g_stats, d_stats)

  (g_total, (g_terms, g_stats, d_stats)), g_grads = jax.value_and_grad(
      g_loss_fn, has_aux=True)(state.g_params)
  g_updates, g_opt_state = tx_g.update(g_grads, state.g_opt_state,
                                       state.g_params)
  g_params = optax.apply_updates(state.g_params, g_updates)

  # ---- Discriminator update, on a fake from the UPDATED generator.
  fake, g_stats, _ = generate(g_params, g_stats, d_rng)
  fake = jax.lax.stop_gradient(fake)

  def d_loss_fn(d_params):
    (pred_fake, pred_real), new_d_stats = discriminate(d_params, d_stats,
                                                       fake, d_aug_rng)
    terms = {
        'D_Fake': losses.gan_loss(pred_fake, False, True, config.gan_mode),
        'D_real': losses.gan_loss(pred_real, True, True, config.gan_mode)}
    return sum(terms.values()), (terms, new_d_stats)

  (d_total, (d_terms, d_stats)), d_grads = jax.value_and_grad(
      d_loss_fn, has_aux=True)(state.d_params)
  d_updates, d_opt_state = tx_d.update(d_grads, state.d_opt_state,
                                       state.d_params)
  d_params = optax.apply_updates(state.d_params, d_updates)

  ema = state.ema_params
  if ema is not None:
    ema = optax.incremental_update(g_params['generator'], ema,
                                   1.0 - config.ema_decay)
  metrics = {**g_terms, **d_terms, 'G_total': g_total, 'D_total': d_total,
             'lr_G': sched_g(state.step), 'lr_D': sched_d(state.step)}
  metrics['finite'] = jnp.isfinite(g_total) & jnp.isfinite(d_total)
  new_state = state.replace(
      step=state.step + 1, g_params=g_params, g_stats=g_stats,
      d_params=d_params, d_stats=d_stats, g_opt_state=g_opt_state,
      d_opt_state=d_opt_state, ema_params=ema)
  return new_state, metrics


def mesh_devices(config) -> List[jax.Device]:
  """All devices, or the first config.num_devices (single process only)."""
  devices = jax.devices()
  n = config.get('num_devices', 0) or 0
  if n == 0 or n == len(devices):
    return devices
  if not 0 < n < len(devices):
    raise ValueError(
        f'num_devices={n}, but {len(devices)} {devices[0].platform} '
        f'device(s) are visible: use 1..{len(devices)}, or 0 for all.')
  if jax.process_count() > 1:
    raise ValueError(
        f'num_devices={n} with {jax.process_count()} processes: several '
        'processes train on all their devices (num_devices=0).')
  return devices[:n]


def make_mesh(config) -> jax.sharding.Mesh:
  """The 1-D `data` mesh over `mesh_devices(config)`."""
  return jax.sharding.Mesh(np.asarray(mesh_devices(config)), ('data',))


def compile_train_step(config, mesh, tx_g, tx_d, sched_g, sched_d):
  """jit(train_step) with the batch sharded on `data`, the rest replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data'))
  step_fn = functools.partial(train_step, config=config, tx_g=tx_g, tx_d=tx_d,
                              sched_g=sched_g, sched_d=sched_d)
  return jax.jit(step_fn, in_shardings=(replicated, batch_sharding, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def global_batch(batch: Dict[str, np.ndarray], mesh) -> Dict[str, jax.Array]:
  """This process's share of the batch -> global arrays sharded on `data`."""
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec('data'))
  keys = ('image', 'label', 'instance_edges')
  return {k: jax.make_array_from_process_local_data(sharding, batch[k])
          for k in keys}


# ---------------------------------------------------------------------------
# Evaluation-mode generation (samples, colour error).
# ---------------------------------------------------------------------------
def generator_variables(state: TrainState, use_ema: bool = True) -> Dict:
  """The generator's inference variables (EMA weights when kept), on host."""
  params = state.g_params['generator']
  if use_ema and state.ema_params is not None:
    params = state.ema_params
  # Replicated global arrays -> this process's copy, so that evaluation runs
  # on local devices only (also with several processes).
  local = lambda x: np.asarray(x.addressable_data(0)) if isinstance(
      x, jax.Array) else np.asarray(x)
  return jax.tree_util.tree_map(
      local, {'params': params, 'batch_stats': state.g_stats['generator']})


def make_generate_fn(config):
  """jit(eval-mode generator), z = 0 (the prior's mean) for VAE models."""
  gen = models.make_generator(config)

  @jax.jit
  def generate(g_vars, label, edges):
    z = (jnp.zeros((label.shape[0], config.z_dim)) if config.use_vae
         else None)
    return gen.apply(g_vars, label, None if config.no_instance else edges,
                     z=z, train=False)
  return generate


def evaluate_color_error(generate, g_vars, eval_batches, num_classes) -> float:
  """Mean per-class colour error of generated vs real images (see metrics)."""
  sums = None
  for batch in eval_batches:
    fake = np.asarray(generate(g_vars, batch['label'], batch['instance_edges']))
    valid = batch.get('valid', np.ones(len(fake), bool))
    part = metrics_lib.class_color_sums(fake[valid], batch['image'][valid],
                                        batch['label'][valid], num_classes)
    sums = part if sums is None else tuple(a + b for a, b in zip(sums, part))
  return metrics_lib.class_color_error(*sums)


def sample_grid(config, generate, g_vars, batch, colors) -> np.ndarray:
  """(1, rows*H, 3*W, 3) uint8: colourised label | real | generated."""
  fake = np.asarray(generate(g_vars, batch['label'], batch['instance_edges']))
  rows = [np.concatenate([visualize.colorize_labels(lab, colors),
                          visualize.image_to_uint8(real),
                          visualize.image_to_uint8(gen)], axis=1)
          for lab, real, gen in zip(batch['label'], batch['image'], fake)]
  return np.concatenate(rows, axis=0)[None]


# ---------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------
def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                         create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir),
                                            'checkpoints'), options=options)


def save_checkpoint(mngr, state: TrainState, config) -> None:
  step = int(jax.device_get(state.step))
  meta = {'step': step, 'examples_seen': step * config.batch_size,
          'global_batch_size': config.batch_size, 'seed': config.seed}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()
  logging.info('Saved checkpoint at step %d', step)


def restore_checkpoint(mngr, state: TrainState, config) -> TrainState:
  step = mngr.latest_step()
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
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


class _StopRequest:
  """Set by SIGTERM / SIGINT: save a checkpoint and leave after this step."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning('Received signal %d: saving a checkpoint and stopping.',
                    signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self) -> bool:
    if jax.process_count() > 1:
      return bool(np.any(multihost_utils.process_allgather(
          np.asarray(self.requested))))
    return self.requested


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------
def _check_finite(history, step: int, mngr) -> None:
  if all(bool(m['finite']) for m in history):
    return
  bad = next(m for m in history if not bool(m['finite']))
  last = mngr.latest_step()
  raise FloatingPointError(
      f'Non-finite loss by step {step} (G_total={float(bad["G_total"])}, '
      f'D_total={float(bad["D_total"])}). Training stopped; no checkpoint was '
      f'written after this. The last good checkpoint is step {last}. Try a '
      'lower learning rate, float32 compute, or check the input data.')


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> TrainState:
  """Trains (resuming from `workdir` when it holds checkpoints)."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  data_dir = resolve_data_dir(config, workdir)
  info = records.DatasetInfo.load(data_dir)
  steps_per_epoch = input_pipeline.steps_per_epoch(
      data_dir, config.train_split, config.batch_size)
  num_steps = config.num_train_steps
  if num_steps <= 0:
    num_steps = (config.niter + config.niter_decay) * steps_per_epoch
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams({k: v for k, v in config.items()
                        if isinstance(v, (int, float, str, bool))})

  mesh = make_mesh(config)
  tx_g, tx_d, sched_g, sched_d = make_optimizers(config, steps_per_epoch)
  state = create_train_state(config, jax.random.PRNGKey(config.seed), tx_g,
                             tx_d)
  mngr = checkpoint_manager(workdir, config)
  if mngr.latest_step() is not None:
    state = restore_checkpoint(mngr, state, config)
  elif config.init_from:
    state = apply_init_from(state, config, tx_g, tx_d)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  parameter_overview.log_parameter_overview(state.g_params,
                                            msg='Generator (and encoder)')
  parameter_overview.log_parameter_overview(state.d_params,
                                            msg='Discriminator')
  vgg_params = None
  if config.lambda_vgg > 0:
    vgg_params = vgg_lib.load_vgg19_params(config.vgg_weights)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put(state, replicated)
  vgg_params = jax.device_put(vgg_params, replicated)
  step_fn = compile_train_step(config, mesh, tx_g, tx_d, sched_g, sched_d)
  # Samples and the colour error: process 0 alone, on its local devices.
  chief = jax.process_index() == 0
  generate = make_generate_fn(config)
  if chief:
    eval_batches = list(input_pipeline.numpy_batches(
        input_pipeline.create_split(config, data_dir, config.eval_split,
                                    train=False, process_index=0,
                                    process_count=1)))
    sample_batch = {k: v[:8] for k, v in eval_batches[0].items()}

  fid_every = int(config.get('fid_every_steps', 0))
  training_fid = None
  if chief and fid_every > 0:
    from spade_jax import evaluate  # pylint: disable=g-import-not-at-top
    training_fid = evaluate.TrainingFID(config, data_dir)

  def write_samples_and_error(step):
    if not chief:
      return
    g_vars = generator_variables(state)
    if step:
      writer.write_images(step, {'samples': sample_grid(
          config, generate, g_vars, sample_batch, info.colors)})
    err = evaluate_color_error(generate, g_vars, eval_batches,
                               models.num_classes(config))
    writer.write_scalars(step, {'eval/class_color_error': err})

  def write_fid(step):
    if training_fid is None:
      return
    score = training_fid(generator_variables(state))
    writer.write_scalars(step, {'eval/fid': score})
    logging.info('FID at step %d: %.4f', step, score)

  start = int(jax.device_get(state.step))
  train_iter = input_pipeline.numpy_batches(input_pipeline.create_split(
      config, data_dir, config.train_split, train=True, start_step=start))
  report = periodic_actions.ReportProgress(num_train_steps=num_steps,
                                           writer=writer)
  history = []
  last_log_time, last_log_step = time.time(), start
  with _StopRequest() as stop, metric_writers.ensure_flushes(writer):
    if start == 0:
      write_samples_and_error(0)
    step = start
    while step < num_steps:
      batch = global_batch(next(train_iter), mesh)
      state, step_metrics = step_fn(state, batch, vgg_params)
      history.append(step_metrics)
      step += 1
      report(step)
      is_last = step == num_steps
      stop_now = stop.should_stop() if (jax.process_count() == 1 or
                                        step % config.log_every_steps == 0
                                        ) else False
      if step % config.log_every_steps == 0 or is_last or stop_now:
        history = jax.device_get(history)
        _check_finite(history, step, mngr)
        now = time.time()
        scalars = {f'train/{k}': float(np.mean([m[k] for m in history]))
                   for k in history[0] if k != 'finite'}
        rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
        scalars['train/steps_per_s'] = rate
        scalars['train/images_per_s'] = rate * config.batch_size
        writer.write_scalars(step, scalars)
        history, last_log_time, last_log_step = [], now, step
      if step % config.image_every_steps == 0 or is_last:
        write_samples_and_error(step)
      if fid_every > 0 and (step % fid_every == 0 or is_last):
        write_fid(step)
      if step % config.checkpoint_every_steps == 0 or is_last or stop_now:
        if history:
          history = jax.device_get(history)
          _check_finite(history, step, mngr)
        save_checkpoint(mngr, state, config)
      if stop_now:
        logging.warning('Stopped at step %d on request; run the same command '
                        'again to resume.', step)
        break
  mngr.close()
  return state
