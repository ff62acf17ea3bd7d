"""The exact alternative paths equal the plain computation, forward and grads.

Each switch (config.spade_label_lookup, conv_impl) changes how a function is
computed, never the function or the parameters: outputs and parameter
gradients agree with the plain path to float32 rounding, and the parameter
trees are identical.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from spade_jax import layers
from spade_jax import models

RTOL = 1e-5  # Relative to the largest magnitude: float32 rounding only.
NET_RTOL = 1e-4  # Whole networks: rounding compounds through the norms.
PLAIN = dict(spade_label_lookup=False, conv_impl='xla')
ALL_FAST = dict(spade_label_lookup=True, conv_impl='auto')


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def assert_close(a, b, rtol=RTOL):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  scale = max(float(np.max(np.abs(b))), 1e-30)
  assert float(np.max(np.abs(a - b))) <= rtol * scale, (
      float(np.max(np.abs(a - b))), scale)


def assert_trees_close(a, b, rtol=RTOL):
  """Leaf by leaf, relative to the tree's largest magnitude.

  Some gradients are zero in exact arithmetic (a conv bias that a norm
  removes) and rounding noise in float32; the tree-wide scale covers them.
  """
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  scale = max([float(np.max(np.abs(y))) for y in leaves_b], default=0.0)
  for x, y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape
    assert float(np.max(np.abs(x - y))) <= rtol * max(scale, 1e-30)


def random_semantics(rng, shape, num_classes, with_edges=True):
  """Blocky class ids (all classes present) and float edges."""
  n, h, w = shape
  label = rng.integers(0, num_classes, (n, (h + 1) // 2, (w + 1) // 2))
  label = label.repeat(2, 1).repeat(2, 2)[:, :h, :w]
  label[:, 0, :num_classes] = np.arange(min(num_classes, w))
  edges = rng.uniform(0, 1, shape).astype(np.float32) if with_edges else None
  return label.astype(np.int32), edges


# ---------------------------------------------------------------------------
# Layer level.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('kernel_size,with_edges,out_of_range', [
    (3, True, False), (3, False, False), (1, True, False), (5, True, True)])
def test_label_conv_equals_conv_of_one_hot(kernel_size, with_edges,
                                           out_of_range):
  rng = np.random.default_rng(0)
  nc, cout, pad = 6, 5, kernel_size // 2
  label, edges = random_semantics(rng, (2, 7, 9), nc, with_edges)
  if out_of_range:  # One-hot of these is all zero: they select nothing.
    label[0, 3, 4], label[1, 0, 0] = nc + 3, -1
  seg = layers.LabelMap(jnp.asarray(label),
                        None if edges is None else jnp.asarray(edges), nc)
  cin = seg.channels
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, cin, cout)),
                       jnp.float32)
  bias = jnp.asarray(rng.normal(size=(cout,)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(2, 7, 9, cout)), jnp.float32)

  def plain(k, b):
    return layers.conv2d(seg.one_hot(), k, 1, pad) + b

  def lookup(k, b):
    return layers.label_conv(seg, k, b, pad)

  want, want_vjp = jax.vjp(plain, kernel, bias)
  got, got_vjp = jax.vjp(lookup, kernel, bias)
  assert_close(got, want)
  assert_trees_close(got_vjp(cot), want_vjp(cot))


@pytest.mark.parametrize('shape,kernel_size,strides,padding', [
    # 'auto' pads this one (padding > (k - 1) // 2, stride 1) outside the
    # conv on CPU.
    ((2, 6, 7, 4), 4, 1, 2), ((1, 6, 6, 3), 3, 2, 2)])
def test_auto_conv_equals_xla_conv(shape, kernel_size, strides, padding):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(
      rng.normal(size=(kernel_size, kernel_size, shape[-1], 4)), jnp.float32)
  conv = functools.partial(layers.conv2d, strides=strides, padding=padding)
  want, want_vjp = jax.vjp(functools.partial(conv, impl='xla'), x, kernel)
  got, got_vjp = jax.vjp(functools.partial(conv, impl='auto'), x, kernel)
  assert_close(got, want)
  cot = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  assert_trees_close(got_vjp(cot), want_vjp(cot))


@pytest.mark.parametrize('strides,padding,dtype', [
    (1, 1, jnp.float32), (2, 2, jnp.float32), (1, 1, jnp.bfloat16)])
def test_sigma_conv_equals_conv_of_the_divided_kernel(strides, padding, dtype):
  """Forward and gradients (input, kernel: directly and through sigma =
  spectral_sigma(kernel)) of conv(x, kernel) / sigma equal those of
  conv(x, kernel / sigma)."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 4)), jnp.float32)
  u = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(45,)), jnp.float32)

  def divided_output(x, kernel):
    sigma = layers.spectral_sigma(kernel, u, v, True)[0]
    return layers.sigma_conv(x.astype(dtype), kernel.astype(dtype), sigma,
                             strides, padding).astype(jnp.float32)

  def divided_kernel(x, kernel):
    sigma = layers.spectral_sigma(kernel, u, v, True)[0]
    return layers.conv2d(x.astype(dtype), (kernel / sigma).astype(dtype),
                         strides, padding).astype(jnp.float32)
  got, got_vjp = jax.vjp(divided_output, x, kernel)
  want, want_vjp = jax.vjp(divided_kernel, x, kernel)
  rtol = RTOL if dtype == jnp.float32 else 2e-2
  assert_close(got, want, rtol)
  cot = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  got_dx, got_dk = got_vjp(cot)
  want_dx, want_dk = want_vjp(cot)
  assert_close(got_dx, want_dx, rtol)
  assert_close(got_dk, want_dk, rtol)
  # sigma's own term is in the kernel gradient (5% of it here): the check
  # above would catch its absence.
  sigma = layers.spectral_sigma(kernel, u, v, True)[0]
  plain_dk = jax.vjp(lambda k: layers.conv2d(x, k, strides, padding),
                     kernel / sigma)[1](cot)[0] / sigma
  assert float(np.max(np.abs(want_dk - plain_dk))) > 2 * rtol * float(
      np.max(np.abs(want_dk)))


def test_label_lookup_default_follows_the_backend():
  config = tiny_config()
  assert config.spade_label_lookup is None  # Unset: chosen per backend.
  assert models.label_lookup(config) == (jax.default_backend() == 'cpu')
  config.spade_label_lookup = False
  assert not models.label_lookup(config)
  assert not models.make_generator(config).label_lookup


def test_conv_impl_names_are_checked():
  assert models.conv_impl(tiny_config()) == 'auto'
  assert models.conv_impl(tiny_config(conv_impl='xla')) == 'xla'
  # Removed (measured slower); the same function, so a saved config reads.
  assert models.conv_impl(tiny_config(conv_impl='patches')) == 'auto'
  with pytest.raises(ValueError, match='conv_impl'):
    models.conv_impl(tiny_config(conv_impl='winograd'))
  with pytest.raises(ValueError, match='conv_impl'):
    layers.conv2d(jnp.zeros((1, 3, 3, 1)), jnp.zeros((1, 1, 1, 1)),
                  impl='winograd')


def block_grads(block, variables, x, seg, cot):
  """Block output (training mode) and d(<out, cot>)/d(params)."""
  def loss(params):
    out, _ = block.apply({**variables, 'params': params}, x, seg, train=True,
                         mutable=['batch_stats'])
    return jnp.sum(out * cot), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables['params'])
  return out, grads


def test_block_label_lookup_equals_one_hot():
  rng = np.random.default_rng(2)
  nc = 5
  label, edges = random_semantics(rng, (2, 6, 6), nc)
  full = layers.LabelMap(jnp.asarray(label), jnp.asarray(edges), nc)
  x = jnp.asarray(rng.normal(size=(2, 3, 3, 6)), jnp.float32)
  # fin 6 != fout 4: the learned shortcut's norm_s too. The label map is
  # given at 6x6 and resized to x's 3x3 inside.
  plain = fast = layers.SPADEResnetBlock(4, conv_impl='xla')
  plain_seg, fast_seg = full.one_hot(), full
  variables = plain.init(jax.random.PRNGKey(0), x, plain_seg)
  fast_vars = fast.init(jax.random.PRNGKey(0), x, fast_seg)
  # Same parameter tree and the same initial values.
  assert_trees_close(fast_vars, variables, rtol=0)
  cot = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
  want, want_grads = block_grads(plain, variables, x, plain_seg, cot)
  got, got_grads = block_grads(fast, variables, x, fast_seg, cot)
  assert_close(got, want)
  assert_trees_close(got_grads, want_grads)


def test_discriminator_label_lookup_equals_concatenated_one_hot():
  """Every scale's first conv by lookup (the label map at scale 0, its
  average-pooled one-hot as ids and weights below), one label map for the
  [fake; real] batch: outputs, parameter and image gradients."""
  rng = np.random.default_rng(5)
  nc = 5
  label, edges = random_semantics(rng, (2, 13, 11), nc)
  label[0, 4:7, 2:6], label[1, 0, 0] = 255, -1  # All-zero one-hot.
  seg = layers.LabelMap(jnp.asarray(label), jnp.asarray(edges), nc)
  images = jnp.asarray(rng.uniform(-1, 1, (4, 13, 11, 3)), jnp.float32)
  concatenated = jnp.concatenate(
      [jnp.concatenate([seg.one_hot()] * 2, axis=0), images], axis=-1)
  # Three scales: 13x11, 7x6, 4x3 (pooled twice: 81 source pixels each).
  disc = models.MultiscaleDiscriminator(num_D=3, ndf=4, n_layers_D=2)
  shapes = jax.eval_shape(disc.init, jax.random.PRNGKey(0), concatenated)
  assert jax.eval_shape(disc.init, jax.random.PRNGKey(0), images,
                        seg=seg) == shapes  # The same parameter tree.
  variables = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype), shapes)
  outs = jax.eval_shape(disc.apply, variables, concatenated)
  cots = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), outs)

  def loss(params, x, seg):
    out, _ = disc.apply({**variables, 'params': params}, x, train=True,
                        seg=seg, mutable=['batch_stats'])
    total = sum(jnp.sum(o * c) for o, c in zip(jax.tree_util.tree_leaves(out),
                                               jax.tree_util.tree_leaves(cots)))
    return total, out

  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  # Compiled for speed of compilation (XLA CPU's codegen optimisations off).
  fast = {'xla_backend_optimization_level': 0,
          'xla_llvm_disable_expensive_passes': True}
  run = lambda *args: jax.jit(grad).lower(*args).compile(fast)(*args)
  (_, want), (want_params, want_x) = run(variables['params'], concatenated,
                                         None)
  (_, got), (got_params, got_x) = run(variables['params'], images, seg)
  assert_trees_close(got, want)
  assert_trees_close(got_params, want_params)
  assert_close(got_x, want_x[..., -3:])  # The image channels' gradient.


def test_discriminator_inputs_follow_the_label_lookup():
  rng = np.random.default_rng(6)
  label, edges = random_semantics(rng, (1, 8, 8), 6)
  fake, real = (jnp.asarray(rng.uniform(-1, 1, (1, 8, 8, 3)), jnp.float32)
                for _ in range(2))
  config = tiny_config(spade_label_lookup=True)
  x, seg = models.discriminator_inputs(config, label, edges, fake, real)
  assert isinstance(seg, layers.LabelMap) and x.shape == (2, 8, 8, 3)
  config = tiny_config(spade_label_lookup=False)
  x, seg = models.discriminator_inputs(config, label, edges, fake, real)
  assert seg is None and x.shape == (2, 8, 8, models.semantic_nc(config) + 3)
  assert_close(x[1, ..., -3:], real[0])


# ---------------------------------------------------------------------------
# Network level: every switch on vs every switch off.
# ---------------------------------------------------------------------------
def tiny_config(**overrides):
  config = default.get_config()
  config.update(crop_size=32, ngf=8, ndf=8, label_nc=5,
                contain_dontcare_label=True, no_instance=False)
  config.update(overrides)
  return config


@pytest.mark.parametrize('overrides', [
    {}, dict(no_instance=True, contain_dontcare_label=False,
             norm_G='spadeinstance3x3')])
def test_generator_fast_paths_equal_plain(overrides):
  # Training-mode forward (output and updated statistics); gradients are
  # checked block by block above.
  rng = np.random.default_rng(3)
  fast = models.make_generator(tiny_config(**overrides, **ALL_FAST))
  plain = models.make_generator(tiny_config(**overrides, **PLAIN))
  nc = models.num_classes(tiny_config(**overrides))
  label, edges = random_semantics(rng, (2, 32, 32), nc)
  label[0, 5:9, 5:9] = nc - 1  # The don't-care class, when there is one.
  # Same parameter tree (the block test checks the initial values too);
  # random values rather than Flax's init, which takes long on 2 cores.
  shapes = jax.eval_shape(plain.init, jax.random.PRNGKey(0), label, edges)
  assert jax.eval_shape(fast.init, jax.random.PRNGKey(0), label,
                        edges) == shapes
  variables = {
      'params': jax.tree_util.tree_map(
          lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype),
          shapes['params']),
      'batch_stats': jax.tree_util.tree_map(
          lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype),
          shapes.get('batch_stats', {}))}

  def forward(gen):
    return jax.jit(functools.partial(gen.apply, train=True,
                                     mutable=['batch_stats']))(
                                         variables, label, edges)

  want, want_state = forward(plain)
  got, got_state = forward(fast)
  assert_close(got, want, NET_RTOL)
  assert_trees_close(got_state, want_state, NET_RTOL)


def count_primitive(jaxpr, name: str) -> int:
  """Equations of primitive `name` in a jaxpr and its inner (jit) jaxprs."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for param in eqn.params.values():
      inner = getattr(param, 'jaxpr', param)  # A ClosedJaxpr or a Jaxpr.
      if hasattr(inner, 'eqns'):
        count += count_primitive(inner, name)
  return count


@pytest.mark.parametrize('kernel_size,strides,padding', [
    (3, 1, 1), (4, 2, 2), (4, 2, 1), (3, 2, 1), (1, 1, 0), (4, 1, 1),
    (3, 1, 0)])
def test_matmul_kernel_grad_equals_autodiff(kernel_size, strides, padding):
  """`conv2d_matmul_kernel_grad`: XLA's output, bit for bit; input and kernel
  gradients equal XLA's autodiff to float32 rounding (odd sizes, strides 1
  and 2, the discriminator's 4x4 layers)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 11, 9, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 5, 3)),
                       jnp.float32)

  xla = lambda a, k: layers.conv2d(a, k, strides, padding, 'xla')
  y = xla(x, kernel)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)

  def loss(conv):
    f = lambda a, k: jnp.vdot(conv(a, k), g)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, kernel)

  got_y = layers.conv2d_matmul_kernel_grad(x, kernel, strides, padding)
  np.testing.assert_array_equal(np.asarray(got_y), np.asarray(y))
  want = loss(xla)
  got = loss(lambda a, k: layers.conv2d_matmul_kernel_grad(a, k, strides,
                                                           padding))
  assert_close(got[0], want[0])
  np.testing.assert_array_equal(np.asarray(got[1][0]),
                                np.asarray(want[1][0]))  # XLA's own.
  assert_close(got[1][1], want[1][1])  # Kernel gradient.
  assert float(jnp.abs(want[1][1]).max()) > 1.0  # Not trivially zero.


def test_matmul_kernel_grad_keeps_the_compute_dtype():
  """bfloat16 operands: the products accumulate in float32 and the kernel
  gradient comes back in the kernel's dtype, close to XLA's."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 4)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 2)), jnp.bfloat16)
  conv = lambda a, k: layers.conv2d_matmul_kernel_grad(a, k, 1, 1)
  dk = jax.grad(lambda k: conv(x, k).astype(jnp.float32).sum())(kernel)
  want = jax.grad(lambda k: layers.conv2d(x, k, 1, 1, 'xla').astype(
      jnp.float32).sum())(kernel)
  assert dk.dtype == jnp.bfloat16
  assert_close(dk.astype(jnp.float32), want.astype(jnp.float32), 2e-2)


def test_auto_takes_the_matmul_kernel_grad_on_large_cpu_maps():
  """'auto' on CPU: the products where they were measured faster (enough
  output pixels and input channels), XLA's convolution elsewhere; 'xla'
  and 'padding_only' never."""
  def primitives(impl, x_shape, kernel_shape, strides=1, padding=1):
    jaxpr = jax.make_jaxpr(
        lambda a, k: layers.conv2d(a, k, strides, padding, impl))(
            jnp.zeros(x_shape), jnp.zeros(kernel_shape))
    return [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
  on_cpu = jax.default_backend() == 'cpu'
  large = primitives('auto', (1, 64, 64, 8), (3, 3, 8, 4))
  assert ('custom_vjp_call' in large) == on_cpu
  for impl in ('xla', 'padding_only'):  # XLA's own kernel gradients.
    assert 'custom_vjp_call' not in primitives(impl, (1, 64, 64, 8),
                                               (3, 3, 8, 4))
  # Below the thresholds: 63 x 63 output pixels; one input channel.
  assert 'custom_vjp_call' not in primitives('auto', (1, 63, 63, 8),
                                             (3, 3, 8, 4))
  assert 'custom_vjp_call' not in primitives('auto', (1, 64, 64, 1),
                                             (3, 3, 1, 4))
  # Stride 2 counts the output pixels: 128 x 128 in, 64 x 64 out.
  assert ('custom_vjp_call' in primitives(
      'auto', (1, 128, 128, 8), (4, 4, 8, 4), 2, 1)) == on_cpu


def test_conv_impl_reaches_every_convolution():
  """'auto' pads every stride-1 conv padded beyond (k - 1) // 2 explicitly
  on CPU (the PatchGAN's last two layers, at each scale); 'xla' none."""
  def pads(impl):
    config = tiny_config(conv_impl=impl, spade_label_lookup=False)
    net = models.make_discriminator(config)
    x = np.zeros((1, 32, 32, models.semantic_nc(config) + 3), np.float32)
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)
    return count_primitive(jax.make_jaxpr(net.apply)(shapes, x).jaxpr, 'pad')
  assert pads('xla') == 0
  config = tiny_config()
  want = 2 * config.num_D if jax.default_backend() == 'cpu' else 0
  assert pads('auto') == want
