"""Our networks against the reference's recorded outputs (../shared fixtures)."""
import functools
import json

import jax
import numpy as np
import pytest

from spade_jax import convert
from spade_jax import layers
from spade_jax import models
import reference_cases as rc

TOL = 1e-4


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def max_rel_err(ours, ref_nchw):
  ref = np.transpose(ref_nchw, (0, 2, 3, 1))
  ours = np.asarray(ours)
  assert ours.shape == ref.shape
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope='module')
def reference(reference_dir):
  opt = json.loads((reference_dir / 'opt.json').read_text())
  config = convert.config_from_options(opt)
  states = {'G': convert.load_torch_state(str(reference_dir / 'net_G.pth')),
            'D': convert.load_torch_state(str(reference_dir / 'net_D.pth'))}
  variables = convert.convert_state_dicts(config, states)
  io = dict(np.load(reference_dir / 'io.npz'))
  return config, variables, io


def test_semantics_builder_is_exact(reference):
  config, _, io = reference
  edges = layers.instance_edges(io['instance'])
  sem = layers.one_hot_semantics(io['label'], edges,
                                 models.num_classes(config))
  np.testing.assert_array_equal(np.asarray(sem),
                                io['semantics'].transpose(0, 2, 3, 1))


def test_generator_eval_matches_reference(reference):
  config, variables, io = reference
  gen = models.make_generator(config)
  out = rc.jit(functools.partial(gen.apply, train=False))(
      variables['generator'], io['label'],
      layers.instance_edges(io['instance']))
  assert max_rel_err(out, io['G_eval']) < TOL


def test_generator_train_matches_reference(reference):
  config, variables, io = reference
  gen = models.make_generator(config)
  out, updated = rc.jit(functools.partial(
      gen.apply, train=True, mutable=['batch_stats']))(
          variables['generator'], io['label'],
          layers.instance_edges(io['instance']))
  assert max_rel_err(out, io['G_train']) < TOL
  # The training forward moved every running statistic and spectral vector.
  before = jax.tree_util.tree_leaves(variables['generator']['batch_stats'])
  after = jax.tree_util.tree_leaves(updated['batch_stats'])
  assert len(before) == len(after)
  assert all(not np.allclose(a, b) for a, b in zip(before, after))


def test_discriminator_eval_matches_every_feature_map(reference):
  config, variables, io = reference
  disc = models.make_discriminator(config)
  d_in = np.concatenate([io['semantics'], io['G_eval']], axis=1)
  outs = rc.jit(disc.apply)(variables['discriminator'],
                            d_in.transpose(0, 2, 3, 1))
  assert len(outs) == config.num_D == 2
  for i, feats in enumerate(outs):
    assert len(feats) == config.n_layers_D + 1
    for j, feat in enumerate(feats):
      assert max_rel_err(feat, io[f'D_eval_{i}_{j}']) < TOL, (i, j)


def test_legacy_nearest_differs_from_half_pixel():
  # PyTorch legacy nearest picks floor(dst * in / out): 0, 2, 5 for 8 -> 3.
  np.testing.assert_array_equal(layers.legacy_nearest_indices(8, 3), [0, 2, 5])
  np.testing.assert_array_equal(layers.legacy_nearest_indices(2, 4),
                                [0, 0, 1, 1])
  x = np.arange(64).reshape(1, 8, 8)
  out = np.asarray(layers.legacy_nearest_resize(x, (3, 3)))
  np.testing.assert_array_equal(out[0, :, 0], [0, 16, 40])


def test_instance_edges_four_neighbourhood():
  inst = np.array([[[1, 1, 2],
                    [1, 1, 2],
                    [3, 3, 3]]])
  want = np.array([[[0, 1, 1],
                    [1, 1, 1],
                    [1, 1, 1]]], np.float32)
  np.testing.assert_array_equal(np.asarray(layers.instance_edges(inst)), want)


def test_batch_norm_running_stats_follow_pytorch():
  x = np.random.RandomState(0).randn(2, 3, 4, 5).astype(np.float32)
  bn = layers.BatchNorm()
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, updated = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  mean = x.mean(axis=(0, 1, 2))
  var_biased = x.var(axis=(0, 1, 2))
  var_unbiased = x.var(axis=(0, 1, 2), ddof=1)
  np.testing.assert_allclose(updated['batch_stats']['mean'], 0.1 * mean,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updated['batch_stats']['var'],
                             0.9 + 0.1 * var_unbiased, rtol=1e-5)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var_biased + 1e-5),
                             rtol=1e-4, atol=1e-5)


def test_spectral_norm_power_iteration_only_in_training():
  rng = np.random.RandomState(1)
  conv = layers.Conv(4, 3, spectral=True)
  x = rng.randn(1, 5, 5, 2).astype(np.float32)
  variables = conv.init(jax.random.PRNGKey(0), x)
  kernel = np.asarray(variables['params']['kernel'])
  u0 = np.asarray(variables['batch_stats']['sn_u'])

  w = kernel.reshape(-1, 4)  # (rows, out) = PyTorch's matrix transposed
  _, eval_state = conv.apply(variables, x, train=False, mutable=['batch_stats'])
  np.testing.assert_array_equal(eval_state['batch_stats']['sn_u'], u0)
  _, state = conv.apply(variables, x, train=True, mutable=['batch_stats'])
  v1 = w @ u0
  v1 /= np.linalg.norm(v1)
  u1 = w.T @ v1
  u1 /= np.linalg.norm(u1)
  np.testing.assert_allclose(state['batch_stats']['sn_v'], v1, rtol=1e-5)
  np.testing.assert_allclose(state['batch_stats']['sn_u'], u1, rtol=1e-5)


@pytest.mark.parametrize('overrides,size', [
    (dict(num_upsampling_layers='more'), (64, 64)),
    (dict(num_upsampling_layers='most', crop_size=128), (128, 128)),
    (dict(aspect_ratio=2.0, crop_size=64), (32, 64)),
    (dict(norm_G='spadeinstance3x3', no_instance=True), (64, 64)),
    (dict(netG='pix2pixhd', norm_G='instance', resnet_n_blocks=2,
          resnet_n_downsample=2), (64, 64)),
])
def test_generator_variants_produce_images(overrides, size):
  from configs import default
  config = default.get_config()
  config.ngf = 8
  config.update(overrides)
  assert models.output_size(config) == size
  gen = models.make_generator(config)
  label = np.zeros((2,) + size, np.int32)
  edges = np.zeros((2,) + size, np.float32)
  variables = rc.jit(gen.init)(jax.random.PRNGKey(0), label, edges)
  out = rc.jit(gen.apply)(variables, label, edges)
  assert out.shape == (2,) + size + (3,)
  assert np.all(np.abs(np.asarray(out)) <= 1)
