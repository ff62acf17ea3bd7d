"""Training: schedule, config checks, sharding, multi-host, resume, learning.

The heavier checks run `python -m spade_jax.main` or a worker function of this
file in subprocesses (8 simulated CPU devices, 2 processes with gloo
collectives), sharing one small synthetic data set and a persistent
compilation cache.
"""
import functools
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest
import tensorflow as tf

from async_checkpoint_test import assert_listed
from configs import default
from data_pipelines import scenes
from data_pipelines import synthetic
from spade_jax import layers
from spade_jax import run_config
from spade_jax import sharding
from spade_jax import train
from spade_jax import train_state
from spade_jax import xla_cpu

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)

# A tiny model on the default config's synthetic data.
TINY = dict(crop_size=32, load_size=36, ngf=8, ndf=8, batch_size=4,
            synthetic_num_train=64, synthetic_num_val=8, synthetic_size=48,
            log_every_steps=2, image_every_steps=4, checkpoint_every_steps=4)


def tiny_config(**changes):
  config = default.get_config()
  config.update({**TINY, **changes})
  return config


def _flags(values):
  return [f'--config.{k}={v}' for k, v in values.items()]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('synthetic'))
  synthetic.ensure_synthetic(path, TINY['synthetic_num_train'],
                             TINY['synthetic_num_val'],
                             TINY['synthetic_size'], seed=0)
  return path


@pytest.fixture(scope='module')
def env():
  """Environment of the subprocesses: CPU; every program they compile goes
  to the test run's compilation cache (conftest.py)."""
  e = dict(os.environ, JAX_PLATFORMS='cpu',
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
           PYTHONPATH=os.pathsep.join([REPO_DIR, TESTS_DIR] + [
               p for p in [os.environ.get('PYTHONPATH')] if p]),
           TF_CPP_MIN_LOG_LEVEL='2')
  e.pop('XLA_FLAGS', None)
  return e


def _with_devices(env, n):
  """`env` with n CPU devices and the entry points' XLA CPU defaults (as
  in this process: conftest.py), so that programs compiled here and in
  the subprocesses share the compilation cache."""
  env = dict(env, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')
  xla_cpu.apply_cpu_defaults(env)
  return env


def _main_cmd(workdir, data_dir, **changes):
  values = {**TINY, 'data_dir': data_dir, **changes}
  return [sys.executable, '-m', 'spade_jax.main', '--config',
          os.path.join(REPO_DIR, 'configs', 'default.py'), '--workdir',
          str(workdir)] + _flags(values)


def _run_together(cmds_envs, timeout=1200):
  """Runs the (cmd, env) pairs as concurrent processes (their compilations
  overlap on the 2 cores); returns their stderr texts, all having succeeded."""
  procs = [subprocess.Popen(cmd, env=env, cwd=REPO_DIR,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for cmd, env in cmds_envs]
  try:
    errs = [p.communicate(timeout=timeout)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-5000:]
  return errs


def _compile_init_here(config):
  """Compiles the config's initialisation in this process, into the test
  run's compilation cache (conftest.py), before subprocesses that start
  together need it: otherwise each compiles it itself, at the same time."""
  train_state.create_train_state(config, jax.random.PRNGKey(config.seed))


def _run(cmd, env, timeout=600):
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=REPO_DIR, check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc


def _final_state(workdir, config):
  """The state in the latest checkpoint of `workdir`, as numpy."""
  state = train_state.create_train_state(config, jax.random.PRNGKey(0))
  mngr = train_state.checkpoint_manager(str(workdir), config)
  step = mngr.latest_step()
  state = train_state.restore_checkpoint(mngr, state, config)
  mngr.close()
  return step, jax.tree_util.tree_map(np.asarray, state)


def _groups(state):
  """The state's params and batch_stats of G (+E) and D, by name."""
  return {'g_params': state.g.params, 'g_stats': state.g.batch_stats,
          'd_params': state.d.params, 'd_stats': state.d.batch_stats}


def _assert_trees_equal(a, b, rtol=0.0, atol=0.0):
  fa = jax.tree_util.tree_flatten_with_path(a)[0]
  fb = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------
# Schedule and optimiser settings.
# ---------------------------------------------------------------------------
def test_lr_schedule_is_constant_then_linear_by_epoch():
  sched = train_state.lr_schedule(1.0, steps_per_epoch=10, niter=2, niter_decay=4)
  got = [float(sched(s)) for s in (0, 19, 20, 29, 30, 45, 59, 60, 100)]
  # Epochs 0-1 at 1; epoch 2 -> 1 - 0/4; epoch 3 -> 0.75; 4 -> 0.5; 5 -> 0.25.
  np.testing.assert_allclose(got, [1, 1, 1, 1, 0.75, 0.5, 0.25, 0, 0])
  flat = train_state.lr_schedule(0.5, steps_per_epoch=10, niter=2, niter_decay=0)
  assert float(flat(1000)) == 0.5


def test_adam_eps_is_used_and_checked():
  config = tiny_config(lr=2e-4, adam_eps=1.0)
  tx_g, tx_d, _, _ = train_state.make_optimizers(config, steps_per_epoch=10)
  grads = {'w': jnp.array([1e-3, -2.0, 0.0])}
  # First step with beta1=0: -lr * g / (|g| + eps).
  for tx, lr in ((tx_g, 1e-4), (tx_d, 4e-4)):
    updates, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(updates['w'], -lr * grads['w'] / (
        np.abs(grads['w']) + 1.0), rtol=1e-5)
  with pytest.raises(ValueError, match='adam_eps=0.0 must be positive'):
    run_config.validate_config(tiny_config(adam_eps=0.0))


def test_ttur_and_plain_adam_settings():
  config = tiny_config(lr=2e-4)
  assert train_state.learning_rates(config) == (1e-4, 4e-4, 0.0, 0.9)
  config.no_TTUR, config.beta1, config.beta2 = True, 0.5, 0.999
  assert train_state.learning_rates(config) == (2e-4, 2e-4, 0.5, 0.999)


# ---------------------------------------------------------------------------
# Config errors at start-up.
# ---------------------------------------------------------------------------
def test_crop_size_the_upsamplings_cannot_produce_is_rejected():
  with pytest.raises(ValueError, match=r'crop_size=48.*multiple of 32'):
    run_config.validate_config(tiny_config(crop_size=48))


def test_batch_not_divisible_by_devices_is_rejected(monkeypatch):
  monkeypatch.setattr(jax, 'devices', lambda: jax.local_devices()[:1] * 3)
  with pytest.raises(ValueError, match=r'batch_size=4 .* 3 devices'):
    run_config.validate_config(tiny_config())
  # The first two of the three divide it.
  run_config.validate_config(tiny_config(num_devices=2))
  assert len(sharding.mesh_devices(tiny_config(num_devices=2))) == 2
  with pytest.raises(ValueError, match=r'num_devices=4, but 3 cpu .*1\.\.3'):
    run_config.validate_config(tiny_config(num_devices=4))
  with pytest.raises(ValueError, match=r'num_devices=-1'):
    sharding.mesh_devices(tiny_config(num_devices=-1))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match=r'num_devices=2 with 2 processes'):
    sharding.mesh_devices(tiny_config(num_devices=2))
  assert len(sharding.mesh_devices(tiny_config())) == 3


def test_vgg_loss_without_weights_says_how_to_get_them():
  with pytest.raises(ValueError) as info:
    run_config.validate_config(tiny_config(lambda_vgg=10.0))
  message = str(info.value)
  assert 'vgg_weights' in message and 'lambda_vgg=0' in message
  assert 'vgg19' in message


def test_missing_data_dir_is_named(tmp_path):
  config = tiny_config(dataset='coco_stuff', label_nc=182)
  with pytest.raises(ValueError, match='data_dir'):
    run_config.resolve_data_dir(config, str(tmp_path))
  config.data_dir = str(tmp_path / 'nowhere')
  with pytest.raises(Exception, match='nowhere'):
    run_config.resolve_data_dir(config, str(tmp_path))


def test_fid_during_training_without_weights_says_what_to_get():
  with pytest.raises(ValueError) as info:
    run_config.validate_config(tiny_config(fid_every_steps=100))
  message = str(info.value)
  assert 'inception_weights' in message and 'fid_every_steps=0' in message
  assert 'pt_inception' in message


def test_unknown_gan_mode_is_rejected():
  with pytest.raises(ValueError, match='gan_mode'):
    run_config.validate_config(tiny_config(gan_mode='wasserstein-ish'))


# ---------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------
def _random_batch(config, seed=0):
  rs = np.random.RandomState(seed)
  b, s = config.batch_size, config.crop_size
  return {'image': rs.uniform(-1, 1, (b, s, s, 3)).astype(np.float32),
          'label': rs.randint(0, config.label_nc, (b, s, s)).astype(np.int32),
          # Blocky instances: edges on part of the pixels.
          'instance': rs.randint(0, 8, (b, -(-s // 4), -(-s // 4))).repeat(
              4, 1).repeat(4, 2)[:, :s, :s].astype(np.int32)}


def _scene_batch(config, seed):
  """A batch of synthetic landscape scenes at the crop size (real-looking
  labels, images and instance edges; random noise images make the
  discriminator's real and fake gradients nearly cancel)."""
  drawn = [scenes.generate_scene(scenes.scene_rng(seed, 'train', i),
                                 config.crop_size)
           for i in range(config.batch_size)]
  image, label, inst = (np.stack(x) for x in zip(*drawn))
  return {'image': (image.astype(np.float32) / 127.5 - 1.0),
          'label': label.astype(np.int32),
          'instance': inst.astype(np.int32)}


def _run_steps(config, num_steps, batches=None, sgd_lr=None, perturb=None):
  """`num_steps` of the compiled train step on the local devices.

  Returns the final state and the metrics; with `perturb` (a function of an
  array, applied to the images of every batch), the initial state, the
  state after each step and the metrics: (init, states, history).
  """
  state = train_state.create_train_state(
      config, jax.random.PRNGKey(config.seed), 100,
      tx=(optax.sgd(sgd_lr),) * 2 if sgd_lr else None)
  if perturb:
    init = jax.device_get(state)
  mesh = sharding.make_mesh(config)
  state = jax.device_put(state, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  step_fn = train.compile_train_step(config, mesh)
  history, states = [], []
  for i in range(num_steps):
    batch = batches[i] if batches else _random_batch(config, i)
    if perturb:
      batch = dict(batch, image=perturb(batch['image']))
    state, metrics = step_fn(state, sharding.global_batch(batch, mesh), None)
    history.append(jax.device_get(metrics))
    if perturb:
      states.append(jax.device_get(state))
  if perturb:
    return init, states, history
  return jax.device_get(state), history


@pytest.fixture(scope='module')
def float32_two_steps():
  return _run_steps(tiny_config(), 2)


def test_train_step_updates_both_networks_and_stats(float32_two_steps):
  config = tiny_config()
  init = jax.device_get(train_state.create_train_state(
      config, jax.random.PRNGKey(config.seed), 100))
  state, history = float32_two_steps
  assert int(state.step) == 2
  assert int(state.g.step) == int(state.d.step) == 2
  for key in ('G_GAN', 'G_GAN_Feat', 'D_Fake', 'D_real', 'G_total',
              'D_total', 'lr_G', 'lr_D'):
    assert np.isfinite(history[-1][key]), key
  np.testing.assert_allclose(history[0]['lr_G'], 1e-4)
  np.testing.assert_allclose(history[0]['lr_D'], 4e-4)
  changed = lambda a, b: any(
      not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                jax.tree_util.tree_leaves(b)))
  assert changed(init.g.params, state.g.params)
  assert changed(init.d.params, state.d.params)
  # BatchNorm running statistics of the SPADE layers and the spectral-norm
  # vectors moved.
  g_stats = state.g.batch_stats['generator']
  bn = g_stats['head_0']['norm_0']['param_free_norm']['bn']
  assert not np.allclose(bn['mean'], 0.0)
  assert changed(init.g.batch_stats, state.g.batch_stats)
  assert changed(init.d.batch_stats, state.d.batch_stats)


def test_vae_and_ema_train_step():
  # The reference encoder needs crop_size >= 256 for its fc layers, ours is
  # size-agnostic only at its own resolution: use the smallest legal model.
  config = tiny_config(use_vae=True, ema_decay=0.9, z_dim=8)
  state, history = _run_steps(config, 1)
  assert np.isfinite(history[0]['KLD']) and history[0]['KLD'] > 0
  assert 'encoder' in state.g.params
  # EMA after one step: 0.9 * init + 0.1 * updated.
  init = jax.device_get(train_state.create_train_state(
      config, jax.random.PRNGKey(config.seed), 100))
  want = jax.tree_util.tree_map(lambda a, b: 0.9 * a + 0.1 * b,
                                init.g.params['generator'],
                                state.g.params['generator'])
  _assert_trees_equal(state.g.ema_params, want, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(
    float32_two_steps):
  config = tiny_config(compute_dtype='bfloat16')
  state, history = _run_steps(config, 1)
  for leaf in jax.tree_util.tree_leaves(_groups(state)):
    assert leaf.dtype == np.float32
  assert np.isfinite(history[0]['G_total']) and np.isfinite(
      history[0]['D_total'])
  # The same step as float32 up to bf16 rounding of the activations.
  _, f32_history = float32_two_steps
  np.testing.assert_allclose(history[0]['G_GAN_Feat'],
                             f32_history[0]['G_GAN_Feat'], rtol=5e-2)
  np.testing.assert_allclose(history[0]['D_total'], f32_history[0]['D_total'],
                             rtol=5e-2)


def _one_ulp_perturbed(tree, seed):
  """Every float32 leaf moved one ulp up or down (random per element)."""
  rs = np.random.RandomState(seed)

  def perturb(x):
    x = np.asarray(x)
    if x.dtype != np.float32:
      return x
    towards = np.where(rs.rand(*x.shape) < 0.5, -np.inf, np.inf)
    return np.nextafter(x, towards.astype(np.float32))
  return jax.tree_util.tree_map(perturb, tree)


class _PerDeviceBatchNorm(nn.Module):
  """A deliberately unsynchronised BatchNorm (the bug the tests must catch).

  Training statistics over each device's share of the batch only, as a
  per-replica BatchNorm would compute them; same variables as layers.BatchNorm.
  """
  affine: bool = False
  groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    n, h, w, c = x.shape
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    groups = self.groups if n % self.groups == 0 else 1  # 1 at init.
    g = x.astype(jnp.float32).reshape(groups, n // groups, h, w, c)
    if train:
      mean = g.mean(axis=(1, 2, 3), keepdims=True)
      var = jnp.square(g - mean).mean(axis=(1, 2, 3), keepdims=True)
      if not self.is_initializing():
        m = layers.BN_MOMENTUM
        ra_mean.value = (1 - m) * ra_mean.value + m * mean.mean(axis=(0, 1, 2, 3))
        ra_var.value = (1 - m) * ra_var.value + m * var.mean(axis=(0, 1, 2, 3))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = ((g - mean) * jax.lax.rsqrt(var + layers.NORM_EPS)).reshape(x.shape)
    if self.affine:
      y = y * self.param('scale', nn.initializers.ones, (c,), jnp.float32)
      y = y + self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return y.astype(x.dtype)


# Large enough that no BatchNorm sees 2x2 planes: the generator starts from
# 4x4 maps (crop / 32), so every batch statistic is over >= 128 values. The
# dense SPADE path: the boundary-sparse one (the CPU training default from
# 128x128 up) equals it to rounding (sparse_spade_test.py), and its gather
# buffers take ~6.5 GB per process here, more than five side-by-side
# training processes fit in.
SHARDING_CONFIG = dict(batch_size=8, crop_size=128, load_size=144,
                       spade_sparse=False)


def _sharding_worker(out_path, variants):
  """Two train steps on fixed global batches, for each of `variants`:

  'plain': the real train step; 'perturbed<k>': the same with the images
  moved by one ulp (seed k), which measures how this network amplifies
  float32 rounding; 'unsynced': with _PerDeviceBatchNorm.
  Saves, per variant, what the steps changed in each group of the state
  (after the first step: 'step1/<group>', and after both: '<group>'; minus
  its own initial value) and the losses.

  Plain SGD: Adam divides each gradient by its own magnitude, so gradients
  that are zero up to rounding (biases in front of a BatchNorm) turn into
  +-lr steps whose sign is rounding noise; SGD keeps the comparison about the
  sharded computation itself.
  """
  config = tiny_config(**SHARDING_CONFIG)
  arrays = {'devices': jax.device_count()}
  for variant in variants:
    perturb = (functools.partial(_one_ulp_perturbed,
                                 seed=int(variant[len('perturbed'):]))
               if variant.startswith('perturbed') else lambda tree: tree)
    if variant == 'unsynced':
      layers.BatchNorm = functools.partial(_PerDeviceBatchNorm,
                                           groups=jax.device_count())
    batches = [_scene_batch(config, seed) for seed in range(2)]
    init, states, history = _run_steps(config, 2, batches, sgd_lr=0.01,
                                       perturb=perturb)
    layers.BatchNorm = _SYNCED_BATCH_NORM
    for prefix, state in (('step1/', states[0]), ('', states[1])):
      for field, trees in _groups(state).items():
        for net, tree in trees.items():
          before = [np.ravel(x) for x in jax.tree_util.tree_leaves(
              _groups(init)[field][net])]
          after = [np.ravel(x) for x in jax.tree_util.tree_leaves(tree)]
          if after:
            arrays[f'{variant}/{prefix}{field}/{net}'] = (
                np.concatenate(after) - np.concatenate(before))
            if variant == 'plain' and not prefix:
              arrays[f'init/{field}/{net}'] = np.concatenate(before)
    for i, metrics in enumerate(history):
      arrays.update({f'{variant}/metrics{i}/{k}': np.asarray(v)
                     for k, v in metrics.items()})
  np.savez(out_path, **arrays)


_SYNCED_BATCH_NORM = layers.BatchNorm
# How far a correct sharded run may stray from the 1-device run, in units of
# the float32 noise measured in the same test: the largest change that a
# one-ulp perturbation of the images or another summation order (the same
# steps on 2 devices) makes. The one-ulp spread alone proved fragile (with
# the discriminator's label lookup it fell to the float32 floor while 8
# devices still differed from 1 by ~8e-4 in the generator); the 2-device run
# sums in another order, as 8 devices do. An unsynchronised BatchNorm
# differs by over 1000x the one-ulp spread in the generator.
NOISE_FACTOR = 30.0


def _relative_change(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def _sharding_tolerances(one):
  """Per state group / loss: NOISE_FACTOR x the measured float32 noise."""
  seeds = sorted({k.split('/')[0] for k in one
                  if k.startswith(('perturbed', 'reordered'))})
  assert len(seeds) >= 3, sorted(one)
  tolerances = {}
  for key in one:
    if not key.startswith('plain/'):
      continue
    name = key[len('plain/'):]
    if name.startswith('metrics'):
      # Losses: absolute; at least a few float32 ulps of the value.
      spread = max(abs(float(one[key]) - float(one[f'{s}/{name}']))
                   for s in seeds)
      floor = 4 * np.finfo(np.float32).eps * abs(float(one[key]))
    else:
      spread = max(_relative_change(one[key], one[f'{s}/{name}'])
                   for s in seeds)
      floor = 4 * np.finfo(np.float32).eps
    tolerances[name] = NOISE_FACTOR * max(spread, floor)
  return tolerances


def _sharding_errors(one, eight, variant):
  errors = {}
  for name in _sharding_tolerances(one):
    a, b = one['plain/' + name], eight[f'{variant}/{name}']
    errors[name] = (abs(float(a) - float(b)) if name.startswith('metrics')
                    else _relative_change(a, b))
  return errors


@pytest.fixture(scope='module')
def one_and_eight_devices(tmp_path_factory, env):
  """The sharding worker on 1 device (plain + two one-ulp perturbations), 2
  devices (plain: another summation order) and 8 devices (plain +
  unsynchronised BatchNorm), side by side."""
  tmp = tmp_path_factory.mktemp('sharding')
  _compile_init_here(tiny_config(**SHARDING_CONFIG))
  code = 'import train_test; train_test._sharding_worker({!r}, {!r})'
  variants = {1: ['plain', 'perturbed0', 'perturbed1'], 2: ['plain'],
              8: ['plain', 'unsynced']}
  _run_together([
      ([sys.executable, '-c', code.format(str(tmp / f'{n}.npz'), variants[n])],
       _with_devices(env, n)) for n in variants])
  results = {n: dict(np.load(tmp / f'{n}.npz')) for n in variants}
  for n in variants:
    assert int(results[n].pop('devices')) == n
  one = results[1]
  one.update({'reordered/' + k[len('plain/'):]: v
              for k, v in results[2].items() if k.startswith('plain/')})
  return one, results[8]


def test_one_device_and_eight_devices_agree(one_and_eight_devices):
  """Same global batch on 1 and 8 devices: same losses, params, BN stats,
  within NOISE_FACTOR x the float32 noise measured on the 1-device run."""
  one, eight = one_and_eight_devices
  for key in one:
    if key.startswith('init/'):
      np.testing.assert_array_equal(one[key], eight[key], err_msg=key)
  tolerances = _sharding_tolerances(one)
  assert {'g_params/generator', 'g_stats/generator', 'd_params/discriminator_0',
          'step1/g_params/generator', 'step1/d_params/discriminator_0',
          'd_stats/discriminator_0', 'metrics1/D_Fake',
          'metrics1/G_GAN_Feat'} <= set(tolerances)
  errors = _sharding_errors(one, eight, 'plain')
  for name, tol in tolerances.items():
    if not name.startswith('metrics'):
      assert np.linalg.norm(one['plain/' + name]) > 0, name
    assert errors[name] <= tol, (name, errors[name], tol)


def test_unsynchronised_batch_norm_fails_the_sharding_tolerances(
    one_and_eight_devices):
  """The same tolerances catch a real sharding bug: per-device BatchNorm
  statistics on 8 devices exceed them in the generator by a wide margin.

  Judged after the first step (and on the first losses): each step
  amplifies float32 noise (the discriminator's real and fake gradients
  nearly cancel, so a rounding difference in the generator's update comes
  out ~30x larger, relatively, in the discriminator's), and after two
  steps the device-count spread of the generator's update is 1-2% with
  some correct summation orders (dividing a spectral conv's output by
  sigma instead of its kernel), too close to the unsynchronised error
  (~100%) for a 10x margin. After one step, with that rewrite: noise
  7e-5, tolerance 2.1e-3, unsynchronised error 0.70.
  """
  one, eight = one_and_eight_devices
  tolerances = _sharding_tolerances(one)
  errors = _sharding_errors(one, eight, 'unsynced')
  for name in ('step1/g_params/generator', 'step1/g_stats/generator',
               'metrics0/G_GAN_Feat'):
    assert errors[name] > 10 * tolerances[name], (name, errors[name],
                                                  tolerances[name])


# ---------------------------------------------------------------------------
# End to end through `python -m spade_jax.main`.
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, data_dir, env):
  """8 steps without interruption; reused by several tests.

  With FID every 4 steps on 4 images (random Inception weights): it runs on
  process 0 beside training and leaves the training state untouched (the
  resume test compares this run bit for bit).
  """
  from evaluate_test import write_random_inception  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('straight')
  weights = write_random_inception(
      tmp_path_factory.mktemp('inception') / 'inception.pth')
  proc = _run(_main_cmd(workdir, data_dir, num_train_steps=8,
                        fid_every_steps=4, fid_num_images=4,
                        inception_weights=weights), env)
  return workdir, proc


def test_main_writes_events_images_and_checkpoints(straight_run):
  workdir, proc = straight_run
  events = glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert events
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.IMAGES: 0,
                                   event_accumulator.TENSORS: 0})
  acc.Reload()
  tags = acc.Tags()
  scalar_tags = set(tags.get('tensors', [])) | set(tags.get('scalars', []))
  for tag in ('train/G_GAN', 'train/G_GAN_Feat', 'train/D_Fake',
              'train/D_real', 'train/lr_G', 'train/lr_D',
              'train/steps_per_s', 'train/images_per_s',
              'eval/class_color_error'):
    assert tag in scalar_tags, (tag, tags)
  image_tags = set(tags.get('images', [])) | {
      t for t in scalar_tags if 'samples' in t}
  assert any('samples' in t for t in image_tags), tags
  fids = acc.Tensors('eval/fid') if 'eval/fid' in tags.get(
      'tensors', []) else acc.Scalars('eval/fid')
  assert [e.step for e in fids] == [4, 8], tags
  values = [float(tf.make_ndarray(e.tensor_proto)) if hasattr(
      e, 'tensor_proto') else e.value for e in fids]
  assert all(np.isfinite(v) and v >= 0 for v in values), values
  assert 'FID at step 8: ' in proc.stderr
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(
      os.path.join(workdir, 'checkpoints', '*')) if
                 os.path.basename(p).isdigit())
  assert steps == [4, 8]
  for step in steps:  # Saved in the background, listed once finished.
    assert_listed(os.path.join(workdir, 'checkpoints'), step)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['crop_size'] == 32
  assert 'ETA' in proc.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_sigterm_saves_and_resume_is_bit_identical(tmp_path, straight_run,
                                                   data_dir, env):
  straight_dir, _ = straight_run
  workdir = tmp_path / 'interrupted'
  # Long enough that the signal lands mid-run; a stop checkpoint is written.
  cmd = _main_cmd(workdir, data_dir, num_train_steps=8,
                  checkpoint_every_steps=1000, image_every_steps=1000)
  proc = subprocess.Popen(cmd, env=env, cwd=REPO_DIR, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True)
  log = []
  for line in proc.stderr:
    log.append(line)
    if 'train/G_GAN' in line:  # The first log line, at step 2.
      proc.send_signal(signal.SIGTERM)
      break
  log.extend(proc.stderr)
  assert proc.wait(timeout=300) == 0, ''.join(log)[-5000:]
  config = tiny_config(data_dir=data_dir)
  stopped_at, _ = _final_state(workdir, config)
  assert 2 <= stopped_at < 8, ''.join(log)[-3000:]
  # The stop checkpoint was finished (and listed) before the process exited.
  assert_listed(os.path.join(workdir, 'checkpoints'), stopped_at)
  assert 'Stopped at step' in ''.join(log)
  # The same command again resumes and finishes.
  proc = _run(cmd, env)
  assert f'Resumed from step {stopped_at}' in proc.stderr
  final_step, resumed = _final_state(workdir, config)
  straight_step, straight = _final_state(straight_dir, config)
  assert final_step == straight_step == 8
  _assert_trees_equal(resumed, straight)  # Bit-identical.


def test_killed_mid_save_resumes_from_the_newest_complete_step(
    tmp_path, straight_run, data_dir, env):
  """SIGKILL while step 4 is being saved (its final rename held): the rerun
  sets the partial folder aside, resumes from step 2 and ends where the
  straight run does."""
  straight_dir, _ = straight_run
  workdir = tmp_path / 'killed'
  cmd = _main_cmd(workdir, data_dir, num_train_steps=8,
                  checkpoint_every_steps=2, image_every_steps=1000)
  log = tmp_path / 'killed.log'
  with open(log, 'w') as err:
    proc = subprocess.Popen(
        [sys.executable, '-c', 'import async_checkpoint_test as t; '
         f't.run_main_holding(4, {cmd[3:]!r})'], env=env, cwd=REPO_DIR,
        stdout=subprocess.PIPE, stderr=err, text=True)
  try:
    line = proc.stdout.readline()  # Once step 4 is written but not renamed.
    assert line.strip() == 'HELD 4', log.read_text()[-5000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  partial = '4.orbax-checkpoint-tmp'
  assert sorted(os.listdir(ckpt_dir)) == ['2', partial]
  assert_listed(ckpt_dir, 2)
  proc = _run(cmd, env)
  assert 'Resumed from step 2' in proc.stderr, proc.stderr[-3000:]
  assert os.path.isdir(os.path.join(workdir, 'damaged_checkpoints', partial))
  assert sorted(os.listdir(ckpt_dir)) == ['4', '6', '8']  # keep 3
  for step in (4, 6, 8):
    assert_listed(ckpt_dir, step)
  config = tiny_config(data_dir=data_dir)
  final_step, resumed = _final_state(workdir, config)
  straight_step, straight = _final_state(straight_dir, config)
  assert final_step == straight_step == 8
  _assert_trees_equal(resumed, straight)  # Bit-identical.


def test_two_processes_match_one_process(tmp_path, data_dir, env):
  """2 processes x 2 CPU devices (gloo on 127.0.0.1) == 1 process x 4.

  Each process reads its own share of the shared data set; the
  one-process runs read in the order of two processes
  (config.data_order_processes=2), so all train on the same batches (a
  2 x 2 run resumed by one process is the same). What differs is the order
  of float32 summations, so the tolerance is measured, not tuned: two more
  runs, 1 process x 1 device and 1 x 2, sum in yet other orders, and the
  2 x 2 run may differ from the 1 x 4 run by at most NOISE_FACTOR x the
  larger of their distances from it (one such distance alone can be far
  below the typical spread by chance: 1e-6 where others are 1e-4; a
  process that read the wrong records or normalised with its own
  statistics differs by far more;
  test_unsynchronised_batch_norm_fails_the_sharding_tolerances shows that
  for BatchNorm). Kept well-conditioned:
  - crop 128 (SHARDING_CONFIG): no BatchNorm over 2x2 maps.
  - adam_eps=1, far above the gradients: Adam's first steps are otherwise
    about lr * sign(gradient), and gradients that are zero up to rounding
    (biases in front of a BatchNorm) take full steps of either sign.
  - the plain one-hot convolution (spade_label_lookup=False): the lookup
    rounds differently from the convolution depending on how XLA partitions
    the program; it equals the plain path to rounding (fast_paths_test.py),
    and 1 vs 8 devices with the lookup is test_one_device_and_eight_devices_agree.
  """
  changes = dict(num_train_steps=2, checkpoint_every_steps=2,
                 image_every_steps=1000, adam_eps=1.0, lr=0.5,
                 spade_label_lookup=False, data_order_processes=2,
                 **SHARDING_CONFIG)
  config = tiny_config(data_dir=data_dir, **changes)
  init = jax.device_get(train_state.create_train_state(  # Compiled here once.
      config, jax.random.PRNGKey(config.seed)))
  address = f'127.0.0.1:{_free_port()}'
  # Five processes on two cores: a generous deadline (about 4 minutes quiet).
  one_err, single_err, pair_err, *errs = _run_together(
      [(_main_cmd(tmp_path / 'one', data_dir, **changes),
        _with_devices(env, 4)),
       (_main_cmd(tmp_path / 'single', data_dir, **changes),
        _with_devices(env, 1)),
       (_main_cmd(tmp_path / 'pair', data_dir, **changes),
        _with_devices(env, 2))] + [
            (_main_cmd(tmp_path / 'two', data_dir, **changes) + [
                f'--coordinator_address={address}', '--num_processes=2',
                f'--process_id={i}'], _with_devices(env, 2)) for i in range(2)],
      timeout=1500)
  assert 'process 1 / 2, 2 local devices of 4' in errs[1], errs[1][-3000:]

  # The losses of the log line of step 2 (printed to 6 digits).
  def losses_at_step_2(text):
    line = [l for l in text.splitlines() if '] [2] train/' in l]
    assert len(line) == 1, text[-3000:]
    pairs = [kv.split('=') for kv in line[0].split('] [2] ')[1].split(', ')]
    return {k: float(v) for k, v in pairs
            if k not in ('train/images_per_s', 'train/steps_per_s')}
  one_losses, single_losses, pair_losses, two_losses = (
      losses_at_step_2(e) for e in (one_err, single_err, pair_err, errs[0]))
  assert {'train/G_GAN_Feat', 'train/D_Fake'} <= one_losses.keys()
  assert one_losses.keys() == two_losses.keys() == single_losses.keys()
  for key, value in one_losses.items():
    noise = max(abs(value - single_losses[key]),
                abs(value - pair_losses[key]))
    tol = NOISE_FACTOR * max(noise, 1e-6 * abs(value))
    assert abs(two_losses[key] - value) <= tol, (
        key, value, two_losses[key], tol, one_losses, single_losses,
        pair_losses, two_losses)

  flat = lambda tree: np.concatenate(
      [np.ravel(x) for x in jax.tree_util.tree_leaves(tree)]).astype(
          np.float64)
  changed = {}  # Run -> field -> what the two steps changed.
  for run in ('one', 'single', 'pair', 'two'):
    step, state = _final_state(tmp_path / run, config)
    assert step == 2, run
    changed[run] = {f: flat(tree) - flat(_groups(init)[f])
                    for f, tree in _groups(state).items()}
  for field, a in changed['one'].items():
    assert np.linalg.norm(a) > 0, field
    noise = max(_relative_change(a, changed['single'][field]),
                _relative_change(a, changed['pair'][field]))
    tol = NOISE_FACTOR * max(noise, 4 * np.finfo(np.float32).eps)
    err = _relative_change(a, changed['two'][field])
    assert err <= tol, (field, err, tol, noise)


def test_non_finite_loss_stops_without_overwriting(tmp_path, straight_run,
                                                   data_dir, env):
  # Continue the straight run (checkpoints 4 and 8) with an absurd learning
  # rate: the losses blow up before the next checkpoint is due.
  workdir = tmp_path / 'nan'
  shutil.copytree(straight_run[0], workdir)
  proc = subprocess.run(
      _main_cmd(workdir, data_dir, num_train_steps=16, lr=1e30,
                checkpoint_every_steps=4),
      env=env, cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode != 0
  assert 'Non-finite loss' in proc.stderr
  assert 'The last good checkpoint is step 8' in proc.stderr
  config = tiny_config(data_dir=data_dir)
  step, state = _final_state(workdir, config)
  assert step == 8
  for leaf in jax.tree_util.tree_leaves((state.g.params, state.d.params)):
    assert np.all(np.isfinite(leaf))


def test_init_programs_get_their_compiler_options(monkeypatch):
  """jit_init is the module's jitted init, compiled with
  CPU_INIT_COMPILER_OPTIONS on the CPU: the same values, and an option XLA
  does not know is refused (so the options do reach the compiler)."""
  module = nn.Dense(16)
  x = jnp.ones((2, 8))
  key = jax.random.PRNGKey(3)
  _assert_trees_equal(train_state.jit_init(module)(key, x),
                      jax.jit(module.init)(key, x))
  # Inside another transformation: JAX's defaults (it refuses options on
  # a nested jit).
  shapes = jax.eval_shape(lambda k: train_state.jit_init(module)(k, x), key)
  assert shapes['params']['kernel'].shape == (8, 16)
  monkeypatch.setattr(train_state, 'CPU_INIT_COMPILER_OPTIONS',
                      {'xla_no_such_option_here': 1})
  if jax.default_backend() == 'cpu':
    with pytest.raises(Exception, match='xla_no_such_option_here'):
      train_state.jit_init(module)(key, x)
  else:  # Only the CPU's init programs get them.
    train_state.jit_init(module)(key, x)


def test_init_from_a_model_folder(tmp_path, data_dir):
  from spade_jax import model_io  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir=data_dir, num_train_steps=0)
  source = jax.device_get(train_state.create_train_state(
      config, jax.random.PRNGKey(123)))
  folder = str(tmp_path / 'model')
  model_io.save_model(folder, config, {
      'generator': {'params': source.g.params['generator'],
                    'batch_stats': source.g.batch_stats['generator']},
      'discriminator': {'params': source.d.params,
                        'batch_stats': source.d.batch_stats}})
  fresh = train_state.create_train_state(config, jax.random.PRNGKey(0))
  started = train_state.apply_init_from(fresh, _with_init(config, folder))
  _assert_trees_equal(jax.device_get(started.g.params), source.g.params)
  _assert_trees_equal(jax.device_get(started.d.params), source.d.params)
  other = _with_init(tiny_config(ngf=16), folder)
  with pytest.raises(ValueError, match='ngf=8 there vs 16 here'):
    train_state.apply_init_from(fresh, other)


def _with_init(config, folder):
  config = config.copy_and_resolve_references()
  config.init_from = folder
  return config


# ---------------------------------------------------------------------------
# Learning.
# ---------------------------------------------------------------------------
def test_default_config_learns_class_colours(tmp_path, data_dir):
  """200 steps lower the per-class colour error on held-out scenes.

  The default config at a test-sized resolution and width (crop 32, ngf 8).
  """
  config = tiny_config(data_dir=data_dir, num_train_steps=200,
                       log_every_steps=100, image_every_steps=200,
                       checkpoint_every_steps=200)
  train.train_and_evaluate(config, str(tmp_path))
  errors = color_errors(tmp_path)
  assert set(errors) == {0, 200}
  assert errors[200] < 0.6 * errors[0], errors


def color_errors(workdir):
  """{step: eval/class_color_error} from a run's TensorBoard events."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  return {e.step: float(_tensor_value(e))
          for e in acc.Tensors('eval/class_color_error')}


def _tensor_value(event):
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  return tensor_util.make_ndarray(event.tensor_proto)
