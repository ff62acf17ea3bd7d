"""The boundary-sparse SPADE modulation equals the dense one, forward and grads.

`layers.boundary_sparse_conv` computes mlp_gamma / mlp_beta as per-class
values where the 5x5 label neighbourhood is uniform and as a dense
convolution on the gathered other pixels, with a dense fallback (lax.cond)
when a batch has more of them than the capacity. Each test checks which
branch the batch takes and that the output, the parameter gradients and the
input gradient equal the dense path's to float32 rounding.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from spade_jax import layers
from spade_jax import models
from fast_paths_test import assert_close
from fast_paths_test import assert_trees_close
from fast_paths_test import NET_RTOL

NC = 5  # Classes in the label maps below.


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def blocks(rng, shape, block, num_classes=NC):
  """Blocky class ids: `block` x `block` squares of random classes."""
  n, h, w = shape
  coarse = rng.integers(0, num_classes, (n, -(-h // block), -(-w // block)))
  return coarse.repeat(block, 1).repeat(block, 2)[:, :h, :w].astype(np.int32)


def label_map(kind, rng, shape=(2, 23, 21)):
  """(label, edges) of a named kind of map; odd sizes by default."""
  n, h, w = shape
  edges = np.zeros(shape, np.float32)
  if kind == 'uniform':  # One class: only the border is not uniform.
    label = np.full(shape, 3, np.int32)
  elif kind == 'all_boundary':  # A checkerboard: no pixel is uniform.
    label = (np.indices((h, w)).sum(0) % 2).astype(np.int32)
    label = np.broadcast_to(label, shape).copy()
  elif kind == 'instances':  # Large regions with instance edges inside.
    label = blocks(rng, shape, 8)
    instance = blocks(rng, shape, 12, 2) + 10 * label
    edges = np.asarray(layers.instance_edges(jnp.asarray(instance)))
  elif kind == 'dontcare':  # Out-of-range ids (255, -1): all-zero one-hot.
    label = blocks(rng, shape, 8)
    label[0, 2:11, 1:10] = 255
    label[1, -7:, -7:] = -1
  elif kind == 'soft_edges':  # Non-binary edge values, sparse.
    label = blocks(rng, shape, 8)
    edges[0, 6, 5], edges[1, 3, 9] = 0.5, 2.0
  else:
    raise ValueError(kind)
  return label, edges


def labelmap(label, edges, num_classes=NC):
  return layers.LabelMap(jnp.asarray(label), jnp.asarray(edges), num_classes)


def brute_force_uniform(label, edges, num_classes, kernel_size):
  """The uniform predicate written out: one class and no edge in the
  (2k - 1) x (2k - 1) neighbourhood, which lies inside the image."""
  ids = np.where((label >= 0) & (label < num_classes), label, num_classes)
  n, h, w = label.shape
  r = 2 * (kernel_size // 2)
  out = np.zeros((n, h, w), bool)
  for b in range(n):
    for i in range(r, h - r):
      for j in range(r, w - r):
        win = (slice(i - r, i + r + 1), slice(j - r, j + r + 1))
        out[b, i, j] = (np.all(ids[b][win] == ids[b, i, j]) and
                        not np.any(edges[b][win]))
  return out


@pytest.mark.parametrize('kind', ['uniform', 'all_boundary', 'instances',
                                  'dontcare', 'soft_edges'])
@pytest.mark.parametrize('kernel_size', [3, 5])
def test_uniform_mask_is_the_neighbourhood_predicate(kind, kernel_size):
  label, edges = label_map(kind, np.random.default_rng(0), (2, 17, 15))
  got = np.asarray(layers.uniform_mask(labelmap(label, edges), kernel_size))
  np.testing.assert_array_equal(
      got, brute_force_uniform(label, edges, NC, kernel_size))
  if kind == 'all_boundary':
    assert not got.any()
  if kind == 'uniform':  # Everything but the 2(k // 2)-pixel border.
    assert got.sum() == 2 * (17 - 4 * (kernel_size // 2)) * (
        15 - 4 * (kernel_size // 2))


def random_variables(module, rng, *args, scale=0.5):
  """Random values for every parameter (Flax's init leaves biases zero)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype),
      shapes['params'])
  stats = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype),
      shapes.get('batch_stats', {}))
  return {'params': params, 'batch_stats': stats}


# XLA CPU's codegen optimisations off: these programs run once, on tiny
# inputs, and compile ~3x faster; the numbers differ by rounding at most.
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}


def run_once(fn, *args):
  """fn(*args), jitted and compiled for speed of compilation."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def outputs_and_grads(module, variables, x, seg, cot, train):
  """Output and d<out, cot>/d(params, x), jitted."""
  def loss(params, x):
    out, _ = module.apply({**variables, 'params': params}, x, seg,
                          train=train, mutable=['batch_stats'])
    return jnp.sum(out * cot), out
  (_, out), grads = run_once(jax.value_and_grad(loss, argnums=(0, 1),
                                                has_aux=True),
                             variables['params'], x)
  return out, grads


def boundary_count(seg, kernel_size=3):
  return int((~layers.uniform_mask(seg, kernel_size)).sum())


# (map, capacity share, norm, which branch the batch takes).
SPADE_CASES = [
    ('uniform', 0.7, 'instance', 'sparse'),
    ('instances', 0.95, 'syncbatch', 'sparse'),
    ('dontcare', 0.95, 'instance', 'sparse'),
    ('soft_edges', 0.95, 'batch', 'sparse'),
    ('all_boundary', 0.5, 'instance', 'fallback'),
    ('instances', 0.3, 'syncbatch', 'fallback'),
]


@pytest.mark.parametrize('kind,fraction,norm,branch', SPADE_CASES)
def test_sparse_spade_equals_dense(kind, fraction, norm, branch):
  rng = np.random.default_rng(1)
  label, edges = label_map(kind, rng)
  seg = labelmap(label, edges)
  n, h, w = label.shape
  capacity = layers.sparse_capacity(fraction, (n, h, w))
  count = boundary_count(seg)
  assert (count <= capacity) == (branch == 'sparse'), (count, capacity)
  if branch == 'sparse':
    assert count < n * h * w  # Some pixels take the per-class values.
  features = 4
  dense = layers.SPADE(features, norm_type=norm)
  sparse = layers.SPADE(features, norm_type=norm, sparse_fraction=fraction)
  x = jnp.asarray(rng.normal(size=(n, h, w, features)), jnp.float32)
  variables = random_variables(dense, rng, x, seg)
  assert (jax.tree_util.tree_structure(
      jax.eval_shape(sparse.init, jax.random.PRNGKey(0), x, seg)) ==
          jax.tree_util.tree_structure(
              jax.eval_shape(dense.init, jax.random.PRNGKey(0), x, seg)))
  cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  train = norm != 'instance'
  want, want_grads = outputs_and_grads(dense, variables, x, seg, cot, train)
  got, got_grads = outputs_and_grads(sparse, variables, x, seg, cot, train)
  assert_close(got, want)
  assert_trees_close(got_grads[0], want_grads[0])  # Parameters.
  assert_close(got_grads[1], want_grads[1])  # The input x.
  if branch == 'fallback':
    # Without the fallback the over-full batch is flagged, not silently
    # wrong: what the fallback prevented.
    counting = layers.SPADE(features, norm_type=norm,
                            sparse_fraction=fraction, sparse_fallback=False)
    out, _ = counting.apply(variables, x, seg, train=train,
                            mutable=['batch_stats'])
    assert np.isnan(np.asarray(out)).all()


def marked_sparse_conv(kind, seed):
  """(run, want, count): run(capacity) is boundary_sparse_conv on a `kind`
  map with a marker dense_fn (all 7.0) that shows when the fallback ran;
  want is the dense convolution; count the map's boundary pixels."""
  rng = np.random.default_rng(seed)
  label, edges = label_map(kind, rng)
  seg = labelmap(label, edges)
  hidden, cout = 6, 4
  shared = (jnp.asarray(rng.normal(size=(3, 3, NC + 1, hidden)), jnp.float32),
            jnp.asarray(rng.normal(size=(hidden,)), jnp.float32))
  actv = jax.nn.relu(layers.label_conv(seg, *shared, 1))
  kernel = jnp.asarray(rng.normal(size=(3, 3, hidden, cout)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(cout,)), jnp.float32)
  want = layers.conv2d(actv, kernel, 1, 1) + bias
  marker = lambda a: jnp.full(want.shape, 7.0, want.dtype)
  count = boundary_count(seg)
  run = lambda capacity: np.asarray(layers.boundary_sparse_conv(
      seg, actv, shared, kernel, bias, capacity, marker))
  return run, want, count


@pytest.mark.parametrize('kind', ['all_boundary', 'instances'])
def test_fallback_runs_exactly_when_the_count_exceeds_the_capacity(kind):
  """Which branch runs: a marker dense_fn shows the lax.cond's choice, at
  capacities one below, at and one above the batch's boundary count."""
  run, want, count = marked_sparse_conv(kind, seed=2)
  for capacity in (count - 1, count, count + 1):
    got = run(capacity)
    if capacity < count:
      assert (got == 7.0).all()  # The fallback ran.
    else:
      assert_close(got, want)  # The sparse branch, exact.


@pytest.mark.parametrize('kernel_size,padding', [(3, 1), (5, 2), (1, 0),
                                                (3, 0), (4, 2), (3, 2)])
@pytest.mark.parametrize('in_cond', [False, True])
def test_forward_form_gradients_equal_autodiff(kernel_size, padding,
                                               in_cond):
  """The fallback's convolution (`conv2d_forward_form_grads`): the same
  values and the same input and kernel gradients as XLA's convolution under
  autodiff, at the top level and inside a lax.cond branch (where it is
  used), odd sizes, several paddings."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 9, 7, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 5, 3)),
                       jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 9 + 2 * padding - kernel_size + 1,
                                   7 + 2 * padding - kernel_size + 1, 3)),
                  jnp.float32)

  def loss(conv):
    def f(x, kernel):
      if in_cond:  # A predicate XLA cannot fold: the branch stays a branch.
        y = jax.lax.cond(x.sum() > -1e9, lambda a: conv(a, kernel),
                         lambda a: -conv(a, kernel), x)
      else:
        y = conv(x, kernel)
      return jnp.vdot(y, g)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, kernel)

  want = loss(lambda a, k: layers.conv2d(a, k, 1, padding))
  got = loss(lambda a, k: layers.conv2d_forward_form_grads(a, k, padding))
  assert_close(got[0], want[0])
  assert_close(got[1][0], want[1][0])  # Input gradient.
  assert_close(got[1][1], want[1][1])  # Kernel gradient.
  assert float(jnp.abs(want[1][1]).max()) > 0.1  # Not trivially zero.


@pytest.mark.parametrize('kind', ['all_boundary', 'instances'])
def test_the_smallest_bucket_that_holds_the_batch_runs(kind):
  """Capacity buckets (lax.switch): the bucket count - 1 would drop the last
  boundary pixel (its output would be the per-class value, which differs on
  these maps), so exact results with (count - 1, count + 1) show the larger
  bucket ran; (count, count + 5) is exact; over every bucket the marker
  dense_fn runs."""
  run, want, count = marked_sparse_conv(kind, seed=3)
  assert_close(run((count - 1, count + 1)), want)
  assert_close(run((count, count + 5)), want)
  assert (run((count - 3, count - 1)) == 7.0).all()  # Dense fallback.


def test_block_with_shortcut_equals_dense():
  """The residual block (fin != fout: norm_s too)."""
  rng = np.random.default_rng(3)
  label, edges = label_map('instances', rng, (2, 12, 14))
  seg = labelmap(label, edges)
  x = jnp.asarray(rng.normal(size=(2, 12, 14, 6)), jnp.float32)
  dense = layers.SPADEResnetBlock(4)
  sparse = layers.SPADEResnetBlock(4, sparse_fraction=0.95)
  assert boundary_count(seg) <= layers.sparse_capacity(0.95, (2, 12, 14))
  variables = random_variables(dense, rng, x, seg, scale=0.3)
  cot = jnp.asarray(rng.normal(size=(2, 12, 14, 4)), jnp.float32)
  want, want_grads = outputs_and_grads(dense, variables, x, seg, cot, True)
  got, got_grads = outputs_and_grads(sparse, variables, x, seg, cot, True)
  assert_close(got, want)
  assert_trees_close(got_grads[0], want_grads[0])
  assert_close(got_grads[1], want_grads[1])


# ---------------------------------------------------------------------------
# The generator.
# ---------------------------------------------------------------------------
def tiny_config(**overrides):
  config = default.get_config()
  config.update(crop_size=32, ngf=2, label_nc=NC - 1,
                contain_dontcare_label=True, no_instance=False)
  config.update(overrides)
  return config


def test_sparse_config_and_resolution_policy():
  config = tiny_config()
  assert config.spade_sparse is None
  # Unset: on for the CPU backend (measured faster there), else dense.
  on_cpu = jax.default_backend() == 'cpu'
  assert models.spade_sparse(config) == on_cpu
  assert models.make_generator(config).sparse == on_cpu
  assert models.spade_sparse(config, training=False) == on_cpu
  assert models.make_generator(config, training=False).sparse == on_cpu
  # Not with images split over devices (untested there) unless asked for.
  assert not models.spade_sparse(tiny_config(spatial_partitions=2))
  assert models.spade_sparse(tiny_config(spatial_partitions=2,
                                         spade_sparse=True))
  assert not models.make_generator(tiny_config(spade_sparse=False)).sparse
  gen = models.make_generator(tiny_config(spade_sparse=True))
  assert gen.sparse_fraction((256, 256)) == (0.25, 0.4)  # Two buckets.
  assert gen.sparse_fraction((128, 192)) is None  # Below min_size (256).
  gen = models.make_generator(tiny_config(spade_sparse=True,
                                          spade_sparse_min_size=128))
  assert gen.sparse_fraction((128, 192)) == models.SPARSE_CAPACITY[1][1]
  assert gen.sparse_fraction((64, 64)) is None  # Below spade_sparse_min_size.
  gen = models.make_generator(tiny_config(
      spade_sparse=True, spade_sparse_capacity=0.3, spade_sparse_min_size=8))
  assert gen.sparse_fraction((8, 8)) == 0.3
  assert gen.sparse_fraction((4, 8)) is None
  with pytest.raises(ValueError, match='spade_sparse_capacity'):
    models.make_generator(tiny_config(spade_sparse=True,
                                      spade_sparse_capacity=1.5))


def generator_case(upsampling, crop, rng):
  """Configs (dense, sparse at every resolution >= 8) and COCO-like labels:
  large regions with instance edges and a don't-care patch."""
  common = dict(crop_size=crop, num_upsampling_layers=upsampling,
                spade_label_lookup=True)
  dense = tiny_config(**common, spade_sparse=False)
  sparse = tiny_config(**common, spade_sparse=True, spade_sparse_capacity=0.9,
                       spade_sparse_min_size=8)
  h, w = models.output_size(dense)
  label = blocks(rng, (1, h, w), crop // 2)
  label[0, :crop // 8, -crop // 8:] = NC - 1  # The don't-care class.
  instance = blocks(rng, (1, h, w), crop // 4, 2) + 10 * label
  edges = np.asarray(layers.instance_edges(jnp.asarray(instance)))
  return dense, sparse, label, edges


def sparse_levels(config, label, edges):
  """The SPADE resolutions where the sparse branch runs (count <= capacity),
  and those where the fallback does."""
  gen = models.make_generator(config)
  full = labelmap(label, edges)
  taken, fallback = [], []
  h, w = models.output_size(config)
  while min(h, w) >= 8:
    fraction = gen.sparse_fraction((h, w))
    count = boundary_count(full.resize((h, w)))
    capacity = layers.sparse_capacity(fraction, (1, h, w))
    if capacity < h * w:
      (taken if count <= capacity else fallback).append(h)
    h, w = h // 2, w // 2
  return taken, fallback


@pytest.mark.parametrize('upsampling,crop', [('normal', 32), ('more', 64),
                                             ('most', 128)])
def test_generator_sparse_equals_dense(upsampling, crop):
  rng = np.random.default_rng(4)
  dense_cfg, sparse_cfg, label, edges = generator_case(upsampling, crop, rng)
  taken, fallback = sparse_levels(sparse_cfg, label, edges)
  assert taken and fallback, (taken, fallback)  # Both branches are used.
  dense = models.make_generator(dense_cfg)
  sparse = models.make_generator(sparse_cfg)
  variables = random_variables(dense, rng, label, edges, scale=0.3)

  def forward(gen, params):
    out, state = gen.apply({**variables, 'params': params}, label, edges,
                           train=True, mutable=['batch_stats'])
    return out, state

  cot = jnp.asarray(rng.normal(size=(1,) + label.shape[1:] + (3,)),
                    jnp.float32)

  def loss(gen, params):
    out, state = forward(gen, params)
    return jnp.sum(out * cot), (out, state)

  if upsampling == 'normal':  # Parameter gradients through the network.
    run = lambda gen: run_once(jax.value_and_grad(
        functools.partial(loss, gen), has_aux=True), variables['params'])
    (_, (want, want_state)), want_grads = run(dense)
    (_, (got, got_state)), got_grads = run(sparse)
    assert_trees_close(got_grads, want_grads, NET_RTOL)
  else:  # The other variants differ only in the resolutions: forward.
    run = lambda gen: run_once(functools.partial(forward, gen),
                               variables['params'])
    want, want_state = run(dense)
    got, got_state = run(sparse)
  assert_close(got, want, NET_RTOL)
  assert_trees_close(got_state, want_state, NET_RTOL)


def test_bfloat16_sparse_spade_matches_dense_to_bf16_rounding():
  rng = np.random.default_rng(7)
  label, edges = label_map('instances', rng)
  seg = labelmap(label, edges)
  x = jnp.asarray(rng.normal(size=label.shape + (4,)), jnp.float32)
  dense = layers.SPADE(4, norm_type='instance', dtype=jnp.bfloat16)
  sparse = layers.SPADE(4, norm_type='instance', dtype=jnp.bfloat16,
                        sparse_fraction=0.95)
  variables = random_variables(dense, rng, x, seg)
  want = dense.apply(variables, x, seg)
  got = sparse.apply(variables, x, seg)
  assert got.dtype == want.dtype
  assert_close(got.astype(jnp.float32), want.astype(jnp.float32), 2e-2)
