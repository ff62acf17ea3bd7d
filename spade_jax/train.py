"""Training: the G/D train step and `train_and_evaluate(config, workdir)`.

One iteration does what the reference does: a generator update, then a
discriminator update whose fake image is re-generated (without gradient) by
the UPDATED generator, fake and real going through D as one batch (fake
first). Both updates are one jitted function over a `jax.sharding.Mesh`, the
batch sharded over the `data` axis and everything else replicated, so
BatchNorm statistics are global across devices (and processes). The state is
two flax TrainStates, G's and D's, each with its optimiser
(`train_state.py`). The loop's periodic work (logging, sample images and the
colour error, FID, checkpoints) runs as clu periodic actions after each step.
Checkpoints are saved asynchronously (`checkpoints.Manager`): the loop waits
for a save only at the next save and before exiting (at the end, after the
final checkpoint of a SIGTERM / SIGINT, on an error).
"""
import contextlib
import os
import signal
import threading
import time
from typing import Dict

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data_pipelines import records
from spade_jax import diffaugment
from spade_jax import evaluate
from spade_jax import generation
from spade_jax import input_pipeline
from spade_jax import losses
from spade_jax import metrics as metrics_lib
from spade_jax import models
from spade_jax import run_config
from spade_jax import sharding
from spade_jax import train_state
from spade_jax import vgg as vgg_lib
from spade_jax import visualize

# ---------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------
def _split_fake_real(outputs):
  """D ran on concat(fake, real): split every feature map in two halves."""
  fake = [[f[:f.shape[0] // 2] for f in scale] for scale in outputs]
  real = [[f[f.shape[0] // 2:] for f in scale] for scale in outputs]
  return fake, real


def train_step(state: train_state.TrainState, batch: Dict[str, jax.Array],
               vgg_params, config):
  """One G update then one D update. Returns (new_state, metrics).

  Each network's optimiser is in its own flax TrainState (`state.g`,
  `state.d`); the learning-rate metrics come from their schedules.
  """
  gen = models.make_generator(config)
  disc = models.make_discriminator(config)
  enc = models.make_encoder(config) if config.use_vae else None
  dtype = models.compute_dtype(config)
  label, image = batch['label'], batch['image']
  edges = generation.instance_edges(config, batch['instance'])
  rng = jax.random.fold_in(state.rng, state.step)
  g_rng, d_rng = jax.random.split(rng)
  # DiffAugment draws: their own stream, so turning it on leaves z alone.
  aug_policy = config.diffaugment
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
    # [fake; real] with the labels: by lookup, or the concatenated one-hot
    # (always with DiffAugment: its shifts and cutouts move the label
    # channels with the images).
    d_in, d_seg = models.discriminator_inputs(
        config, label, edges, fake, image, lookup=not aug_policy)
    # The same transform for the fake and the real input of each label map.
    d_in = diffaugment.augment(d_in, aug_rng, aug_policy, paired=True)
    out, d_upd = disc.apply({'params': d_params, 'batch_stats': d_stats},
                            d_in, train=True, seg=d_seg,
                            mutable=['batch_stats'])
    return _split_fake_real(out), d_upd['batch_stats']

  # ---- Generator update.
  def g_loss_fn(g_params):
    fake, g_stats, kld = generate(g_params, state.g.batch_stats, g_rng)
    (pred_fake, pred_real), d_stats = discriminate(
        state.d.params, state.d.batch_stats, fake, g_aug_rng)
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
      g_loss_fn, has_aux=True)(state.g.params)
  g_state = state.g.apply_gradients(grads=g_grads)

  # ---- Discriminator update, on a fake from the UPDATED generator.
  fake, g_stats, _ = generate(g_state.params, g_stats, d_rng)
  fake = jax.lax.stop_gradient(fake)

  def d_loss_fn(d_params):
    (pred_fake, pred_real), new_d_stats = discriminate(d_params, d_stats,
                                                       fake, d_aug_rng)
    terms = {
        'D_Fake': losses.gan_loss(pred_fake, False, True, config.gan_mode),
        'D_real': losses.gan_loss(pred_real, True, True, config.gan_mode)}
    return sum(terms.values()), (terms, new_d_stats)

  (d_total, (d_terms, d_stats)), d_grads = jax.value_and_grad(
      d_loss_fn, has_aux=True)(state.d.params)
  d_state = state.d.apply_gradients(grads=d_grads, batch_stats=d_stats)

  ema = g_state.ema_params
  if ema is not None:
    ema = optax.incremental_update(g_state.params['generator'], ema,
                                   1.0 - config.ema_decay)
  g_state = g_state.replace(batch_stats=g_stats, ema_params=ema)
  metrics = {**g_terms, **d_terms, 'G_total': g_total, 'D_total': d_total,
             'lr_G': state.g.lr_schedule(state.step),
             'lr_D': state.d.lr_schedule(state.step)}
  metrics['finite'] = jnp.isfinite(g_total) & jnp.isfinite(d_total)
  return state.replace(g=g_state, d=d_state), metrics


def compile_train_step(config, mesh):
  """jit(train_step) with the batch on `sharding.BATCH_SPEC`, the rest
  replicated.

  The batch is split over `data` (and, with config.spatial_partitions > 1,
  each image along its height over `spatial`); the step is traced under
  `sharding.mesh_context(mesh)`, where the networks' `constrain_spatial`
  hints take effect.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, sharding.BATCH_SPEC)

  def step_fn(state, batch, vgg_params):
    with sharding.mesh_context(mesh):
      return train_step(state, batch, vgg_params, config)
  return jax.jit(step_fn, in_shardings=(replicated, batch_sharding, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


# ---------------------------------------------------------------------------
# Evaluation-mode generation (samples, colour error).
# ---------------------------------------------------------------------------
def make_generate_fn(config):
  """jit(eval-mode generator)(g_vars, label, instance), z = 0 (the prior's
  mean) for VAE models."""
  return jax.jit(generation.make_generate_fn(config))


def evaluate_color_error(generate, g_vars, eval_batches, num_classes) -> float:
  """Mean per-class colour error of generated vs real images (see metrics)."""
  sums = None
  for batch in eval_batches:
    fake = np.asarray(generate(g_vars, batch['label'], batch['instance']))
    valid = batch.get('valid', np.ones(len(fake), bool))
    part = metrics_lib.class_color_sums(fake[valid], batch['image'][valid],
                                        batch['label'][valid], num_classes)
    sums = part if sums is None else tuple(a + b for a, b in zip(sums, part))
  return metrics_lib.class_color_error(*sums)


def sample_grid(config, generate, g_vars, batch, colors) -> np.ndarray:
  """(1, rows*H, 3*W, 3) uint8: colourised label | real | generated."""
  fake = np.asarray(generate(g_vars, batch['label'], batch['instance']))
  rows = [np.concatenate([visualize.colorize_labels(lab, colors),
                          visualize.image_to_uint8(real),
                          visualize.image_to_uint8(gen)], axis=1)
          for lab, real, gen in zip(batch['label'], batch['image'], fake)]
  return np.concatenate(rows, axis=0)[None]


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
# The loop's periodic work.
# ---------------------------------------------------------------------------
class _Periodic(periodic_actions.PeriodicCallback):
  """`callback_fn(step=, t=, state=)` every `every_steps`, on the last step
  and, with `on_stop`, when a stop is requested."""

  def __init__(self, every_steps: int, last_step: int, callback_fn,
               on_stop: bool = False):
    super().__init__(every_steps=every_steps, on_steps=[last_step],
                     callback_fn=callback_fn)
    self._on_stop = on_stop
    self._stopping = False

  def __call__(self, step: int, state, stopping: bool) -> bool:
    self._stopping = stopping and self._on_stop
    return super().__call__(step, state=state)

  def _should_trigger(self, step: int, t: float) -> bool:
    return self._stopping or super()._should_trigger(step, t)


class _TrainMetrics:
  """The train step's metrics since the last log: checked, averaged, written."""

  def __init__(self, writer, mngr, config, start: int):
    self._writer, self._mngr, self._config = writer, mngr, config
    self._history = []
    self._last_time, self._last_step = time.time(), start

  def add(self, step_metrics) -> None:
    self._history.append(step_metrics)

  def check_finite(self, step: int) -> None:
    """Raises FloatingPointError (naming the last good checkpoint) on NaN."""
    self._history = jax.device_get(self._history)
    if all(bool(m['finite']) for m in self._history):
      return
    bad = next(m for m in self._history if not bool(m['finite']))
    raise FloatingPointError(
        f'Non-finite loss by step {step} (G_total={float(bad["G_total"])}, '
        f'D_total={float(bad["D_total"])}). Training stopped; no checkpoint '
        'was written after this. The last good checkpoint is step '
        f'{self._mngr.latest_step()}. Try a lower learning rate, float32 '
        'compute, or check the input data.')

  def write(self, step: int, t: float, state) -> None:
    del t, state
    self.check_finite(step)
    now = time.time()
    scalars = {f'train/{k}': float(np.mean([m[k] for m in self._history]))
               for k in self._history[0] if k != 'finite'}
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    scalars['train/steps_per_s'] = rate
    scalars['train/images_per_s'] = rate * self._config.batch_size
    self._writer.write_scalars(step, scalars)
    self._history, self._last_time, self._last_step = [], now, step

  def save(self, step: int, t: float, state) -> None:
    del t
    if self._history:
      self.check_finite(step)
    train_state.save_checkpoint(self._mngr, state, self._config)


class _Previews:
  """Samples, colour error and FID of the current generator (process 0)."""

  def __init__(self, config, data_dir, writer, colors):
    self._config, self._writer, self._colors = config, writer, colors
    self._generate = make_generate_fn(config)
    self._eval_batches = list(input_pipeline.numpy_batches(
        input_pipeline.create_split(config, data_dir, config.eval_split,
                                    train=False, process_index=0,
                                    process_count=1)))
    self._sample_batch = {k: v[:8] for k, v in self._eval_batches[0].items()}
    self._fid = (evaluate.TrainingFID(config, data_dir)
                 if config.fid_every_steps > 0 else None)

  def samples_and_error(self, step: int, t: float, state) -> None:
    del t
    g_vars = train_state.generator_variables(state)
    if step:
      self._writer.write_images(step, {'samples': sample_grid(
          self._config, self._generate, g_vars, self._sample_batch,
          self._colors)})
    err = evaluate_color_error(self._generate, g_vars, self._eval_batches,
                               models.num_classes(self._config))
    self._writer.write_scalars(step, {'eval/class_color_error': err})

  def fid(self, step: int, t: float, state) -> None:
    del t
    score = self._fid(train_state.generator_variables(state))
    self._writer.write_scalars(step, {'eval/fid': score})
    logging.info('FID at step %d: %.4f', step, score)


def _periodic_work(config, num_steps, metrics, previews):
  """The actions run after each step, in order: log, previews, checkpoint."""
  last = num_steps
  actions = [_Periodic(config.log_every_steps, last, metrics.write,
                       on_stop=True)]
  if previews is not None:
    actions.append(_Periodic(config.image_every_steps, last,
                             previews.samples_and_error))
    if config.fid_every_steps > 0:
      actions.append(_Periodic(config.fid_every_steps, last, previews.fid))
  actions.append(_Periodic(config.checkpoint_every_steps, last, metrics.save,
                           on_stop=True))
  return actions


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def _closing(mngr):
  """Closes the checkpoint manager on the way out, which waits for the
  checkpoint being saved. When an error propagates, a failure of that save
  is logged rather than raised over it."""
  try:
    yield
  except BaseException:
    try:
      mngr.close()
    except Exception:  # pylint: disable=broad-except
      logging.exception('The checkpoint being saved when training stopped '
                        'with an error could not be finished.')
    raise
  mngr.close()


def _initial_state(config, workdir, mesh, steps_per_epoch):
  """A new state, the newest checkpoint's, or config.init_from's; the
  checkpoint manager."""
  state = train_state.create_train_state(
      config, jax.random.PRNGKey(config.seed), steps_per_epoch)
  mngr = train_state.checkpoint_manager(workdir, config)
  if mngr.latest_step() is not None:
    state = train_state.restore_checkpoint(mngr, state, config, mesh,
                                           set_aside_damaged=True)
  elif config.init_from:
    state = train_state.apply_init_from(state, config)
  parameter_overview.log_parameter_overview(state.g.params,
                                            msg='Generator (and encoder)')
  parameter_overview.log_parameter_overview(state.d.params,
                                            msg='Discriminator')
  return state, mngr


def _num_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return (config.niter + config.niter_decay) * steps_per_epoch


def _stop_requested(stop, step: int, config) -> bool:
  # With several processes, asking is a collective: only at log steps.
  if jax.process_count() == 1 or step % config.log_every_steps == 0:
    return stop.should_stop()
  return False


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> train_state.TrainState:
  """Trains (resuming from `workdir` when it holds checkpoints)."""
  run_config.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  data_dir = run_config.resolve_data_dir(config, workdir)
  steps_per_epoch = input_pipeline.steps_per_epoch(
      data_dir, config.train_split, config.batch_size)
  num_steps = _num_steps(config, steps_per_epoch)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams({k: v for k, v in config.items()
                        if isinstance(v, (int, float, str, bool))})
  mesh = sharding.make_mesh(config)
  state, mngr = _initial_state(config, workdir, mesh, steps_per_epoch)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  vgg_params = (vgg_lib.load_vgg19_params(config.vgg_weights)
                if config.lambda_vgg > 0 else None)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state, vgg_params = jax.device_put((state, vgg_params), replicated)
  step_fn = compile_train_step(config, mesh)
  # Samples, colour error, FID: process 0 alone, on its local devices.
  previews = (_Previews(config, data_dir, writer,
                        records.DatasetInfo.load(data_dir).colors)
              if jax.process_index() == 0 else None)
  start = int(jax.device_get(state.step))
  run_config.note_input_order(
      workdir, run_config.input_order(config, mesh.size), resumed=start > 0)
  train_iter = input_pipeline.numpy_batches(input_pipeline.create_split(
      config, data_dir, config.train_split, train=True, start_step=start))
  metrics = _TrainMetrics(writer, mngr, config, start)
  actions = _periodic_work(config, num_steps, metrics, previews)
  report = periodic_actions.ReportProgress(num_train_steps=num_steps,
                                           writer=writer)
  # Checkpoints are saved in the background: on the way out, the last one is
  # waited for before SIGTERM's handler is removed (a second one meanwhile
  # is only logged).
  with _StopRequest() as stop, metric_writers.ensure_flushes(writer), \
      _closing(mngr):
    if start == 0 and previews is not None:
      previews.samples_and_error(0, 0.0, state)
    for step in range(start + 1, num_steps + 1):
      state, step_metrics = step_fn(
          state, sharding.global_batch(next(train_iter), mesh), vgg_params)
      metrics.add(step_metrics)
      report(step)
      stop_now = _stop_requested(stop, step, config)
      for action in actions:
        action(step, state, stop_now)
      if stop_now:
        logging.warning('Stopped at step %d on request; run the same command '
                        'again to resume.', step)
        break
  return state
