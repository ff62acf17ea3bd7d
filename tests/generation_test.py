"""Tests of spade_jax/generation.py: the one eval-mode generator function."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from spade_jax import generation
from spade_jax import label_maps
from spade_jax import layers
from spade_jax import models


def tiny_config(**overrides):
  config = default_config.get_config()
  config.update(crop_size=32, load_size=32, ngf=4, label_nc=5,
                contain_dontcare_label=True, use_vae=True, z_dim=8)
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def model():
  config = tiny_config()
  gen = models.make_generator(config)
  rng = np.random.default_rng(0)
  label = rng.integers(0, 6, (2, 4, 4)).repeat(8, 1).repeat(8, 2)
  instance = label * 3 + rng.integers(0, 3, (2, 32, 32)) // 2
  # Random variables of the init's shapes (an eager init is slow on CPU).
  abstract = jax.eval_shape(lambda: gen.init(
      {'params': jax.random.PRNGKey(0), 'z': jax.random.PRNGKey(1)},
      jnp.zeros((1, 32, 32), jnp.int32), jnp.zeros((1, 32, 32))))

  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', ''))
    if name == 'var':
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in),
                       leaf.dtype)
  g_vars = jax.tree_util.tree_map_with_path(fill, abstract)
  return config, gen, g_vars, label.astype(np.int32), instance.astype(
      np.int32)


def test_generate_is_the_generator_on_device_edges(model):
  config, gen, g_vars, label, instance = model
  z = jax.random.normal(jax.random.PRNGKey(2), (2, config.z_dim))
  apply = jax.jit(functools.partial(gen.apply, train=False))
  want = apply(g_vars, label, layers.instance_edges(instance), z=z)
  generate = jax.jit(generation.make_generate_fn(config))
  np.testing.assert_allclose(generate(g_vars, label, instance, z), want,
                             atol=1e-6)
  # Without z, the prior's mean.
  mean = apply(g_vars, label, layers.instance_edges(instance),
               z=jnp.zeros((2, config.z_dim)))
  np.testing.assert_allclose(generate(g_vars, label, instance), mean,
                             atol=1e-6)


def test_instance_edges_need_an_instance_map_unless_no_instance():
  instance = jnp.asarray([[[1, 1, 2], [1, 1, 2], [3, 3, 3]]])
  np.testing.assert_array_equal(
      generation.instance_edges(tiny_config(), instance),
      [[[0, 1, 1], [1, 1, 1], [1, 1, 1]]])
  assert generation.instance_edges(tiny_config(no_instance=True),
                                   instance) is None
  with pytest.raises(ValueError, match='pass \\(N, H, W\\) instance ids'):
    generation.instance_edges(tiny_config(), None)


def test_prior_z():
  assert generation.prior_z(tiny_config(use_vae=False), 2) is None
  np.testing.assert_array_equal(generation.prior_z(tiny_config(), 2),
                                np.zeros((2, 8)))
  drawn = generation.prior_z(tiny_config(), 3, jax.random.PRNGKey(0))
  assert drawn.shape == (3, 8) and float(jnp.std(drawn)) > 0.5


@pytest.mark.parametrize('dontcare', [True, False])
def test_dont_care_in_a_jax_graph_equals_numpy(dontcare):
  ids = np.array([[0, 4, 5, 255, 17]], np.int32)
  kw = dict(label_nc=5, contain_dontcare_label=dontcare)
  np.testing.assert_array_equal(
      jax.jit(lambda x: label_maps.dont_care_to_class(x, xp=jnp, **kw))(ids),
      label_maps.dont_care_to_class(ids, **kw))
  np.testing.assert_array_equal(
      label_maps.dataset_to_class_ids(jnp.asarray(ids), dataset='ade20k',
                                      xp=jnp, **kw),
      label_maps.dataset_to_class_ids(ids, dataset='ade20k', **kw))
