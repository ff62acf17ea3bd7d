"""Building blocks shared by the SPADE networks (Flax Linen, NHWC).

Everything here computes what the reference PyTorch SPADE computes:
PyTorch's legacy `nearest` resizing, BatchNorm with momentum 0.1 and an
unbiased running variance, and spectral normalisation that runs one power
iteration per training forward and none in eval mode.
"""
import functools
import re
from typing import Any, Optional, Sequence, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
LRELU_SLOPE = 0.2
NORM_EPS = 1e-5
BN_MOMENTUM = 0.1
SN_EPS = 1e-12


# ---------------------------------------------------------------------------
# Initialisers (reference `init_type xavier`, `init_variance 0.02`).
# ---------------------------------------------------------------------------
def xavier_normal(gain: float = 0.02):
  """torch.nn.init.xavier_normal_(w, gain): std = gain * sqrt(2 / (in + out))."""
  return nn.initializers.variance_scaling(gain**2, 'fan_avg', 'normal')


# PyTorch's default Conv/Linear weight init, kaiming_uniform(a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The reference's xavier init does not reach
# spectral-normalised layers, which keep this one.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in',
                                                      'uniform')


# ---------------------------------------------------------------------------
# Resizing.
# ---------------------------------------------------------------------------
def legacy_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of PyTorch's legacy `nearest`: floor(dst * in / out)."""
  if in_size == out_size:
    return np.arange(out_size)
  if out_size == 2 * in_size:
    return np.arange(out_size) >> 1
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def legacy_nearest_resize(x: jnp.ndarray, size: Tuple[int, int]) -> jnp.ndarray:
  """Resizes (N, H, W, ...) to `size` like F.interpolate(mode='nearest')."""
  h, w = x.shape[1], x.shape[2]
  if (h, w) == tuple(size):
    return x
  rows = legacy_nearest_indices(h, size[0])
  cols = legacy_nearest_indices(w, size[1])
  return x[:, rows][:, :, cols]


def upsample2x(x: jnp.ndarray) -> jnp.ndarray:
  """Nearest 2x upsampling of an NHWC tensor (nn.Upsample(scale_factor=2))."""
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
  return x.reshape(n, 2 * h, 2 * w, c)


def avg_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  """avg_pool2d(3, stride 2, padding 1, count_include_pad=False), NHWC."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  window, strides = (1, 3, 3, 1), (1, 2, 2, 1)
  summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
  return summed / count


# ---------------------------------------------------------------------------
# Semantic input.
# ---------------------------------------------------------------------------
def instance_edges(instance: jnp.ndarray) -> jnp.ndarray:
  """4-neighbourhood instance boundaries of (N, H, W) maps, as float32 0/1.

  A pixel is an edge if its id differs from its right, left, lower or upper
  neighbour (both sides of each boundary are marked), as in the reference.
  """
  dx = instance[:, :, 1:] != instance[:, :, :-1]
  dy = instance[:, 1:, :] != instance[:, :-1, :]
  no_pad = (0, 0)
  edge = (jnp.pad(dx, (no_pad, no_pad, (1, 0))) |
          jnp.pad(dx, (no_pad, no_pad, (0, 1))) |
          jnp.pad(dy, (no_pad, (1, 0), no_pad)) |
          jnp.pad(dy, (no_pad, (0, 1), no_pad)))
  return edge.astype(jnp.float32)


def one_hot_semantics(label: jnp.ndarray, edges: Optional[jnp.ndarray],
                      num_classes: int, dtype: Dtype = jnp.float32):
  """(N,H,W) class ids (+ optional (N,H,W) edges) -> (N,H,W,C) semantics."""
  sem = jax.nn.one_hot(label, num_classes, dtype=dtype)
  if edges is not None:
    sem = jnp.concatenate([sem, edges[..., None].astype(dtype)], axis=-1)
  return sem


class _SemanticMap:
  """What the label maps below share: `num_classes` and optional `edges`."""

  @property
  def channels(self) -> int:
    """Channels of the one-hot map it stands for: classes (+ the edges)."""
    return self.num_classes + (0 if self.edges is None else 1)


@flax.struct.dataclass
class LabelMap(_SemanticMap):
  """The semantic map before its one-hot: class ids and optional edges.

  What the SPADE layers take on the label-lookup path (`label_conv`); the
  one-hot map it stands for is `one_hot_semantics(label, edges, num_classes)`.
  """
  label: jnp.ndarray  # (N, H, W) integer class ids
  edges: Optional[jnp.ndarray]  # (N, H, W) instance edges, or None
  num_classes: int = flax.struct.field(pytree_node=False)

  @property
  def size(self) -> Tuple[int, int]:
    return self.label.shape[1:3]

  def resize(self, size: Tuple[int, int]) -> 'LabelMap':
    """Legacy-nearest resize of ids and edges (same rule as the one-hot)."""
    if tuple(self.size) == tuple(size):
      return self
    edges = (None if self.edges is None
             else legacy_nearest_resize(self.edges, size))
    return LabelMap(legacy_nearest_resize(self.label, size), edges,
                    self.num_classes)

  def one_hot(self, dtype: Dtype = jnp.float32) -> jnp.ndarray:
    return one_hot_semantics(self.label, self.edges, self.num_classes, dtype)


# A SPADE layer's semantic input: the one-hot map (N, H, W, C) or a LabelMap.
Semantics = Any


def semantic_channels(seg: Semantics) -> int:
  return seg.channels if isinstance(seg, LabelMap) else seg.shape[-1]


def resize_semantics(seg: Semantics, size: Tuple[int, int]) -> Semantics:
  if isinstance(seg, LabelMap):
    return seg.resize(size)
  return legacy_nearest_resize(seg, size)


# ---------------------------------------------------------------------------
# Convolution with the reference's spectral normalisation.
# ---------------------------------------------------------------------------
def _l2_normalize(v: jnp.ndarray) -> jnp.ndarray:
  """F.normalize(v, dim=0, eps=1e-12)."""
  return v / jnp.maximum(jnp.linalg.norm(v), SN_EPS)


def spectral_sigma(kernel: jnp.ndarray, u: jnp.ndarray, v: jnp.ndarray,
                   power_iteration: bool):
  """Returns (sigma, u, v) as torch.nn.utils.spectral_norm computes them.

  The kernel's matrix view is (rows, out) = kernel.reshape(-1, out), the
  transpose of PyTorch's (out, rows) view up to the order of the rows.
  Products with its transpose are written as `vector @ w`: `w.T @ vector`
  made XLA CPU copy the transposed kernel on every call (31 ms for a 3x3,
  1024 -> 1024 kernel, more than that convolution at 16x16).
  """
  w = kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32)
  if power_iteration:
    w_ng = jax.lax.stop_gradient(w)
    v = _l2_normalize(w_ng @ u)
    u = _l2_normalize(v @ w_ng)
  return jnp.dot(u, v @ w), u, v


class Conv(nn.Module):
  """2-D convolution (or transposed convolution), optionally spectral-normed.

  The input is an (N, H, W, C) array or a `LabelMap`, which takes the label
  lookup (`label_conv`): the same function as on its one-hot map.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    strides: stride.
    padding: zero padding on every side (ignored when `transpose`).
    use_bias: whether to add a bias.
    spectral: spectral normalisation with the reference's semantics; the u and
      v vectors live in the `batch_stats` collection.
    init_kind: 'xavier' (reference init_weights) or 'torch' (PyTorch default,
      which spectral layers keep in the reference). (Not `init`: that would
      hide Module.init.)
    transpose: ConvTranspose2d(kernel, stride 2, padding 1, output_padding 1).
    dtype: compute dtype.
    impl: one of CONV_IMPLS (`conv2d`; not for `transpose`).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int = 1
  use_bias: bool = True
  spectral: bool = False
  init_kind: str = 'xavier'
  transpose: bool = False
  dtype: Dtype = jnp.float32
  impl: str = 'xla'

  def weights(self, in_features: int, train: bool = False):
    """(kernel, bias or None) as the convolution uses them, in float32.

    The kernel is (k, k, in_features, features), spectral-normalised when
    `spectral` (one power iteration in training, which updates u and v).
    """
    kernel, sigma, bias = self.raw_weights(in_features, train)
    return (kernel if sigma is None else kernel / sigma), bias

  @nn.compact
  def raw_weights(self, in_features: int, train: bool = False):
    """(kernel, sigma or None, bias or None): `weights` before kernel / sigma.

    The convolution divides its output by sigma instead of its kernel
    (`sigma_conv`).
    """
    k = self.kernel_size
    init = (xavier_normal() if self.init_kind == 'xavier'
            else torch_default_init)
    kernel = self.param('kernel', init, (k, k, in_features, self.features),
                        jnp.float32)
    if self.spectral:
      u_var = self.variable(
          'batch_stats', 'sn_u',
          lambda: _l2_normalize(jax.random.normal(self.make_rng('params'),
                                                  (self.features,))))
      v_var = self.variable(
          'batch_stats', 'sn_v',
          lambda: _l2_normalize(jax.random.normal(self.make_rng('params'),
                                                  (k * k * in_features,))))
      sigma, u, v = spectral_sigma(kernel, u_var.value, v_var.value,
                                   power_iteration=train)
      if train and not self.is_initializing():
        u_var.value, v_var.value = u, v
    else:
      sigma = None
    bias = (self.param('bias', nn.initializers.zeros, (self.features,),
                       jnp.float32) if self.use_bias else None)
    return kernel, sigma, bias

  def __call__(self, x, train: bool = False):
    kernel, sigma, bias = self.raw_weights(semantic_channels(x), train)
    if sigma is not None and (self.transpose or isinstance(x, LabelMap)):
      kernel, sigma = kernel / sigma, None
    if not self.transpose:
      return biased_conv(x, kernel, bias, self.padding, self.strides,
                         self.impl, self.dtype, sigma)
    # Transposed conv = input-dilated conv; the kernel here is stored in the
    # forward-conv orientation (already flipped), so no flip is needed.
    lo = self.kernel_size - 1 - self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (1, 1),
        [(lo, lo + 1)] * 2, lhs_dilation=(self.strides, self.strides),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y if bias is None else y + bias.astype(self.dtype)


def biased_conv(x: Semantics, kernel: jnp.ndarray,
                bias: Optional[jnp.ndarray], padding: int, strides: int = 1,
                impl: str = 'xla', dtype: Dtype = jnp.float32,
                sigma: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """conv2d(x, kernel) (/ sigma) (+ bias) in `dtype`.

  The label lookup for a LabelMap (which takes no `sigma`: divide the
  kernel).
  """
  if isinstance(x, LabelMap):
    if sigma is not None:
      raise ValueError('biased_conv: a LabelMap takes kernel / sigma.')
    if bias is None:
      bias = jnp.zeros(kernel.shape[-1], jnp.float32)
    return label_conv(x, kernel, bias, padding, strides).astype(dtype)
  if sigma is None:
    y = conv2d(x.astype(dtype), kernel.astype(dtype), strides, padding, impl)
  else:
    y = sigma_conv(x.astype(dtype), kernel.astype(dtype),
                   sigma.astype(jnp.float32), strides, padding, impl)
  return y if bias is None else y + bias.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def sigma_conv(x: jnp.ndarray, kernel: jnp.ndarray, sigma: jnp.ndarray,
               strides: int = 1, padding: int = 0,
               impl: str = 'xla') -> jnp.ndarray:
  """conv2d(x, kernel / sigma), computed as conv2d(x, kernel) / sigma.

  Dividing the output spares writing a scaled copy of the kernel on every
  call (15 ms for a 3x3, 1024 -> 1024 kernel on this CPU, about what that
  convolution costs at 16x16). The gradients are the kernel / sigma form's,
  computed as it computes them: sigma's is -<dK, kernel> / sigma^2 with dK
  the gradient of the divided kernel, a sum over the kernel. Autodiff of
  the divided output would keep the undivided output for it (one more
  activation-sized residual) and sum output x output gradient over every
  pixel. `sigma` is a float32 scalar; the result is in x's dtype.
  """
  y = conv2d(x, kernel, strides, padding, impl)
  return (y / sigma).astype(y.dtype)


def _sigma_conv_fwd(x, kernel, sigma, strides, padding, impl):
  return sigma_conv(x, kernel, sigma, strides, padding, impl), (x, kernel,
                                                                sigma)


def _sigma_conv_bwd(strides, padding, impl, residuals, g):
  x, kernel, sigma = residuals
  _, pullback = jax.vjp(lambda a, k: conv2d(a, k, strides, padding, impl),
                        x, kernel)
  dx, dk = pullback(g)  # dk: the gradient of kernel / sigma.
  dsigma = -jnp.vdot(dk.astype(jnp.float32),
                     kernel.astype(jnp.float32)) / jnp.square(sigma)
  return ((dx / sigma).astype(dx.dtype), (dk / sigma).astype(dk.dtype),
          dsigma.astype(sigma.dtype))


sigma_conv.defvjp(_sigma_conv_fwd, _sigma_conv_bwd)


# ---------------------------------------------------------------------------
# Convolution: XLA's, with CPU workarounds ('auto').
# ---------------------------------------------------------------------------
CONV_IMPLS = ('auto', 'xla', 'padding_only')
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _explicit_excess_padding(x, kernel, strides: int, padding: int):
  """On CPU, pads stride-1 convs beyond (k - 1) // 2 outside the conv.

  XLA's CPU kernel gradient of a stride-1 convolution whose padding exceeds
  (k - 1) // 2 (the output is larger than the input, e.g. the PatchGAN's
  4x4 / padding 2 layers) is 20-40x slower than for the same convolution on
  an explicitly zero-padded input. Same function; returns (x, paddings).
  """
  pads = [(padding, padding)] * 2
  if strides != 1 or jax.default_backend() != 'cpu':
    return x, pads
  excess = [max(padding - (k - 1) // 2, 0) for k in kernel.shape[:2]]
  if not any(excess):
    return x, pads
  x = jnp.pad(x, ((0, 0), (excess[0],) * 2, (excess[1],) * 2, (0, 0)))
  return x, [(padding - e, padding - e) for e in excess]


def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, strides: int = 1,
           padding: int = 0, impl: str = 'xla') -> jnp.ndarray:
  """NHWC x HWIO convolution with symmetric zero padding.

  impl 'xla': XLA's convolution as is; 'auto': the same function with the
  CPU workarounds, the excess padding outside the convolution
  (`_explicit_excess_padding`) and the kernel gradient as matrix products
  where they are faster (`conv2d_matmul_kernel_grad`); 'padding_only': the
  first workaround alone, XLA's own kernel gradients (to time the products
  against them: `scripts/benchmark.py --variants xla_kernel_grad,...`).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl={impl!r}: expected one of {CONV_IMPLS}.')
  pads = [(padding, padding)] * 2
  if impl != 'xla' and jax.default_backend() == 'cpu':
    x, pads = _explicit_excess_padding(x, kernel, strides, padding)
    if impl == 'auto' and _matmul_kernel_grad_pays(x, kernel, strides,
                                                   pads[0][0]):
      return conv2d_matmul_kernel_grad(x, kernel, strides, pads[0][0])
  return jax.lax.conv_general_dilated(x, kernel, (strides, strides), pads,
                                      dimension_numbers=_DIMS)


# Where the products beat XLA CPU's kernel-gradient convolution (measured,
# docs/performance.md): enough output pixels and input channels.
_MATMUL_GRAD_MIN_PIXELS = 4096
_MATMUL_GRAD_MIN_CHANNELS = 8


def _matmul_kernel_grad_pays(x, kernel, strides: int, padding: int) -> bool:
  n, h, w, cin = x.shape
  ho = (h + 2 * padding - kernel.shape[0]) // strides + 1
  wo = (w + 2 * padding - kernel.shape[1]) // strides + 1
  return (n * ho * wo >= _MATMUL_GRAD_MIN_PIXELS
          and cin >= _MATMUL_GRAD_MIN_CHANNELS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_matmul_kernel_grad(x: jnp.ndarray, kernel: jnp.ndarray,
                              strides: int, padding: int) -> jnp.ndarray:
  """XLA's convolution; its kernel gradient computed as kh * kw products.

  The kernel gradient's tap (i, j) is sum over output pixels p of
  dy[p] (x) padded_x[p * strides + (i, j)]: one matrix product of the
  output gradient, transposed once to (out, pixels), with a strided slice
  of the padded input, (pixels, in). (With the input transposed instead,
  XLA CPU transposes each of the kh * kw slices, 2-3x slower.) XLA CPU's
  own kernel-gradient convolution runs at 50-110 GFLOP/s on the large
  maps of SPADE's layers where these products reach 150-240 (3x3,
  64 -> 32 on f32[2, 128, 128, 64] after a ReLU: 23.8 vs 11.5 ms); on
  small maps with many channels it is the faster one, hence
  `_matmul_kernel_grad_pays`. The same sums in another order (float32
  rounding); the input gradient is XLA's own.
  """
  return conv2d(x, kernel, strides, padding, 'xla')


def _matmul_kernel_grad_fwd(x, kernel, strides, padding):
  return conv2d_matmul_kernel_grad(x, kernel, strides, padding), (x, kernel)


def _matmul_kernel_grad_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  _, pullback = jax.vjp(
      lambda a: conv2d(a, kernel, strides, padding, 'xla'), x)
  dx, = pullback(g)
  kh, kw = kernel.shape[:2]
  ho, wo = g.shape[1], g.shape[2]
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding),
                       (0, 0)))
  over_pixels = (((0, 1, 2), (0, 1, 2)), ((), ()))
  taps = [[jax.lax.dot_general(
      g, padded[:, i:i + strides * (ho - 1) + 1:strides,
                j:j + strides * (wo - 1) + 1:strides], over_pixels,
      preferred_element_type=jnp.float32) for j in range(kw)]
          for i in range(kh)]  # Each (out, in).
  dk = jnp.stack([jnp.stack(row) for row in taps]).transpose(0, 1, 3, 2)
  return dx, dk.astype(kernel.dtype)


conv2d_matmul_kernel_grad.defvjp(_matmul_kernel_grad_fwd,
                                 _matmul_kernel_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_forward_form_grads(x: jnp.ndarray, kernel: jnp.ndarray,
                              padding: int) -> jnp.ndarray:
  """conv2d(x, kernel, 1, padding), its gradients written as forward convs.

  For a convolution inside a `lax.cond` branch. XLA's CPU compiler leaves
  the gradient convolutions of a branch in the raw form autodiff makes them
  (kernel gradient `f01b_i01o->01bf`) instead of the transposed, library-run
  form it gives them at the top level: the kernel gradient of a 3x3,
  128 -> 256 convolution on f32[2, 128, 128, 128] took 66 s in a branch vs
  0.6 s outside. Here both gradients are plain NHWC x HWIO convolutions of
  transposed operands (the same sums; the input gradient is bit-identical,
  the kernel gradient equal to float32 rounding), which run as fast in a
  branch as outside (0.78 s vs 0.68 s for the whole gradient). Stride 1,
  symmetric `padding`.
  """
  return jax.lax.conv_general_dilated(x, kernel, (1, 1),
                                      [(padding, padding)] * 2,
                                      dimension_numbers=_DIMS)


def _forward_form_fwd(x, kernel, padding):
  return conv2d_forward_form_grads(x, kernel, padding), (x, kernel)


def _forward_form_bwd(padding, residuals, g):
  x, kernel = residuals
  back = kernel.shape[0] - 1 - padding  # Input gradient: flipped kernel.
  dx = jax.lax.conv_general_dilated(
      g, kernel[::-1, ::-1].transpose(0, 1, 3, 2), (1, 1), [(back, back)] * 2,
      dimension_numbers=_DIMS)
  # Kernel gradient: in-channels as the batch, the batch as the features,
  # the output gradient as a (H, W, N, out) kernel over the padded input.
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding),
                       (0, 0)))
  dk = jax.lax.conv_general_dilated(
      padded.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), 'VALID',
      dimension_numbers=_DIMS)
  return dx, dk.transpose(1, 2, 0, 3).astype(kernel.dtype)


conv2d_forward_form_grads.defvjp(_forward_form_fwd, _forward_form_bwd)


def label_conv(seg: LabelMap, kernel: jnp.ndarray, bias: jnp.ndarray,
               padding: int, strides: int = 1) -> jnp.ndarray:
  """conv2d(seg.one_hot(), kernel) + bias without building the one-hot.

  A one-hot pixel of class c picks row c of the kernel, so offset (dy, dx)
  contributes kernel[dy, dx, class id of the shifted pixel]: the output is a
  sum of kh*kw gathered kernel rows. Zero padding, and ids outside
  [0, num_classes) (whose one-hot is all zero), select an appended zero row.
  The edge channel, when present, is a 1-channel convolution. Computed in
  float32; returns (N, H', W', cout).

  The kh*kw rows of a pixel are gathered by ONE gather (offset-major table,
  indices offset * (num_classes + 1) + id) and summed by a reduction: with
  kh*kw separate gathers and adds, XLA CPU fused the adds into every
  consumer of the result and re-read all kh*kw gathered maps there (the
  SPADE block backward ran 1.8x slower).
  """
  kh, kw, _, cout = kernel.shape
  nc, p, s = seg.num_classes, padding, strides
  ids = jnp.pad(label_ids(seg), ((0, 0), (p, p), (p, p)), constant_values=nc)
  ho, wo = (ids.shape[1] - kh) // s + 1, (ids.shape[2] - kw) // s + 1
  kernel = kernel.astype(jnp.float32)
  table = _offset_major_table(kernel[:, :, :nc])
  rows = jnp.stack([ids[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s]
                    + (i * kw + j) * (nc + 1)
                    for i in range(kh) for j in range(kw)], axis=-1)
  y = jnp.take(table, rows, axis=0).sum(axis=-2) + bias.astype(jnp.float32)
  if seg.edges is not None:
    edges = seg.edges[..., None].astype(jnp.float32)
    y = y + conv2d(edges, kernel[:, :, nc:nc + 1], s, p)
  return y


def _offset_major_table(class_kernel: jnp.ndarray) -> jnp.ndarray:
  """(kh, kw, nc, cout) -> (kh * kw * (nc + 1), cout) with zero rows appended.

  Row (i * kw + j) * (nc + 1) + c is class_kernel[i, j, c]; row ... + nc is
  zero (padding and ids outside the classes).
  """
  kh, kw, _, cout = class_kernel.shape
  table = jnp.concatenate(
      [class_kernel, jnp.zeros((kh, kw, 1, cout), class_kernel.dtype)], axis=2)
  return table.reshape(-1, cout)


@flax.struct.dataclass
class PooledLabelMap(_SemanticMap):
  """A label map's one-hot after `avg_pool_3x3_s2` (once or more), as ids.

  Each pixel of the pooled one-hot is a weighted sum of the one-hot of M
  source pixels: sum over m of weights[..., m] * one_hot(ids[..., m]), with
  id num_classes for the zero padding and for ids outside the classes (as
  `label_ids`). Pooling once gives M = 9 and weights 1 / (pixels inside the
  window); each further pooling multiplies M by 9. The edges (one channel)
  are pooled densely. What the discriminator's first convolution takes at
  its coarser scales (`pooled_label_conv`).
  """
  ids: jnp.ndarray  # (N, H, W, M) int32
  weights: jnp.ndarray  # (1, H, W, M) float32
  edges: Optional[jnp.ndarray]  # (N, H, W) pooled edges, or None
  num_classes: int = flax.struct.field(pytree_node=False)

  @classmethod
  def of(cls, seg: LabelMap) -> 'PooledLabelMap':
    """The unpooled map (M = 1, weight 1)."""
    ids = label_ids(seg)[..., None]
    return cls(ids, jnp.ones((1,) + ids.shape[1:], jnp.float32), seg.edges,
               seg.num_classes)

  def pool(self) -> 'PooledLabelMap':
    """avg_pool_3x3_s2 (count_include_pad=False) of the one-hot it stands for."""
    n, h, w, m = self.ids.shape
    nc = self.num_classes
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    ids = jnp.pad(self.ids, pad, constant_values=nc)
    weights = jnp.pad(self.weights, pad)
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    window = lambda a, i, j: a[:, i:i + 2 * (ho - 1) + 1:2,
                               j:j + 2 * (wo - 1) + 1:2]
    offsets = [(i, j) for i in range(3) for j in range(3)]
    ids = jnp.concatenate([window(ids, i, j) for i, j in offsets], axis=-1)
    weights = jnp.concatenate([window(weights, i, j) for i, j in offsets],
                              axis=-1)
    inside = lambda size, out: (np.minimum(2 * np.arange(out) + 1, size - 1) -
                                np.maximum(2 * np.arange(out) - 1, 0) + 1)
    count = np.outer(inside(h, ho), inside(w, wo))  # Pixels in each window.
    weights = weights / jnp.asarray(count, jnp.float32)[None, :, :, None]
    edges = (None if self.edges is None
             else avg_pool_3x3_s2(self.edges[..., None])[..., 0])
    return PooledLabelMap(ids, weights, edges, nc)


def pooled_label_conv(seg: PooledLabelMap, kernel: jnp.ndarray,
                      bias: jnp.ndarray, padding: int,
                      strides: int = 1) -> jnp.ndarray:
  """conv2d(the pooled one-hot, kernel) + bias without building it.

  Offset (dy, dx) at an output pixel contributes sum over m of
  weights[m] * kernel[dy, dx, ids[m]] of the shifted pooled pixel: one
  gather of kh * kw * M kernel rows per output pixel, a weighted sum. The
  edge channel is a 1-channel convolution. Float32; (N, H', W', cout).
  """
  kh, kw, _, cout = kernel.shape
  nc, p, s = seg.num_classes, padding, strides
  pad = ((0, 0), (p, p), (p, p), (0, 0))
  ids = jnp.pad(seg.ids, pad, constant_values=nc)
  weights = jnp.pad(seg.weights, pad)
  ho, wo = (ids.shape[1] - kh) // s + 1, (ids.shape[2] - kw) // s + 1
  window = lambda a, i, j: a[:, i:i + s * (ho - 1) + 1:s,
                             j:j + s * (wo - 1) + 1:s]
  kernel = kernel.astype(jnp.float32)
  table = _offset_major_table(kernel[:, :, :nc])
  taps = [(i, j) for i in range(kh) for j in range(kw)]
  rows = jnp.concatenate([window(ids, i, j) + (i * kw + j) * (nc + 1)
                          for i, j in taps], axis=-1)
  tap_weights = jnp.concatenate([window(weights, i, j) for i, j in taps],
                                axis=-1)
  # A product and a reduction XLA fuses with the gather (as in label_conv).
  y = (jnp.take(table, rows, axis=0) * tap_weights[..., None]).sum(axis=-2)
  y = y + bias.astype(jnp.float32)
  if seg.edges is not None:
    edges = seg.edges[..., None].astype(jnp.float32)
    y = y + conv2d(edges, kernel[:, :, nc:nc + 1], s, p)
  return y


def label_ids(seg: LabelMap) -> jnp.ndarray:
  """(N, H, W) int32 ids; those outside [0, num_classes) become num_classes.

  Such ids have an all-zero one-hot; they form one more "class" whose
  kernel row is zero (as in `label_conv`).
  """
  nc = seg.num_classes
  label = seg.label
  return jnp.where((label >= 0) & (label < nc), label, nc).astype(jnp.int32)


def uniform_mask(seg: LabelMap, kernel_size: int) -> jnp.ndarray:
  """(N, H, W) bool: where SPADE's gamma and beta are their per-class value.

  mlp_shared's activation at a pixel depends on the kernel_size x
  kernel_size neighbourhood of (class id, edge) values and on the zero
  padding; mlp_gamma / mlp_beta see that activation's neighbourhood, so their
  output at a pixel depends on its (2k - 1) x (2k - 1) neighbourhood. A pixel
  is uniform when that neighbourhood lies inside the image, has one class id
  (`label_ids`) and no nonzero edge value.
  """
  r = 2 * (kernel_size // 2)
  ids = label_ids(seg)
  if seg.edges is not None:  # An edge pixel never matches a uniform centre.
    ids = jnp.where(seg.edges != 0, -2, ids)
  ids = jnp.pad(ids, ((0, 0), (r, r), (r, r)), constant_values=-1)
  window, strides = (1, 2 * r + 1, 2 * r + 1), (1, 1, 1)
  info = jnp.iinfo(jnp.int32)
  hi = jax.lax.reduce_window(ids, info.min, jax.lax.max, window, strides,
                             'VALID')
  lo = jax.lax.reduce_window(ids, info.max, jax.lax.min, window, strides,
                             'VALID')
  return (hi == lo) & (lo >= 0)


def sparse_capacity(fraction: float, shape: Sequence[int]) -> int:
  """Boundary pixels the sparse path holds: ceil(fraction * N * H * W)."""
  total = int(np.prod(shape))
  return min(total, max(1, int(np.ceil(fraction * total))))


def boundary_sparse_conv(seg: LabelMap, actv: jnp.ndarray,
                         shared: Tuple[jnp.ndarray, jnp.ndarray],
                         kernel: jnp.ndarray, bias: jnp.ndarray,
                         capacity, dense_fn,
                         dtype: Dtype = jnp.float32,
                         fallback: bool = True) -> jnp.ndarray:
  """conv2d(actv, kernel, padding k // 2) + bias, exactly, sparse on boundaries.

  `actv` must be relu(conv(seg.one_hot(), shared kernel) + shared bias), the
  SPADE layer's mlp_shared activation (same padding). Where `uniform_mask`
  holds, the output is a per-class vector: the activation of a pixel whose
  neighbourhood is all class c is a_c = relu(sum over taps of the shared
  kernel's row c + bias) (edge channel zero), so the output there is
  a_c @ sum over taps of `kernel`, plus `bias`. The other pixels' k x k
  patches of `actv` are gathered, at most `capacity` of them for the whole
  batch, and multiplied by kernel.reshape(k * k * hidden, cout); the results
  are scattered over the per-class map. `capacity` may be a sequence of
  capacities (buckets): the smallest that holds the batch's boundary pixels
  runs (`lax.switch`), so a batch pays for about the pixels it has. When a
  batch has more boundary pixels than the largest, `dense_fn(actv)` (the
  dense convolution) runs instead. `fallback=False` (only for counting the
  largest sparse branch's FLOPs: XLA's cost analysis counts a switch's
  costliest branch) runs that branch alone and returns NaN for a batch over
  its capacity. Gradients follow
  by autodiff and equal the
  dense path's for the parameters and for anything upstream of `actv`; the
  edge values are treated as data (no gradient reaches them at uniform
  pixels, whose output does not depend on them).
  """
  kh, kw, hidden, cout = kernel.shape
  n, h, w, _ = actv.shape
  nc, p = seg.num_classes, kh // 2
  total = n * h * w
  ids = label_ids(seg)
  boundary = ~uniform_mask(seg, kh).reshape(total)
  count = boundary.sum()
  capacities = sorted({int(c) for c in np.atleast_1d(capacity)})

  def sparse(capacity, actv):
    shared_kernel, shared_bias = shared
    rows = shared_kernel.astype(jnp.float32)[:, :, :nc].sum(axis=(0, 1))
    rows = jnp.concatenate([rows, jnp.zeros((1, hidden), jnp.float32)])
    class_actv = nn.relu((rows + shared_bias.astype(jnp.float32)).astype(
        dtype))
    tap_sum = kernel.astype(jnp.float32).sum(axis=(0, 1)).astype(dtype)
    table = class_actv @ tap_sum + bias.astype(dtype)  # (nc + 1, cout)
    base = jnp.take(table, ids.reshape(total), axis=0)
    (idx,) = jnp.nonzero(boundary, size=capacity, fill_value=total)
    safe = jnp.minimum(idx, total - 1)
    b, rest = safe // (h * w), safe % (h * w)
    hp, wp = h + 2 * p, w + 2 * p
    origin = b * (hp * wp) + (rest // w) * wp + rest % w
    offsets = np.array([i * wp + j for i in range(kh) for j in range(kw)])
    padded = jnp.pad(actv, ((0, 0), (p, p), (p, p), (0, 0)))
    patches = jnp.take(padded.reshape(n * hp * wp, hidden),
                       origin[:, None] + offsets, axis=0, mode='clip')
    values = (patches.reshape(capacity, kh * kw * hidden) @
              kernel.reshape(kh * kw * hidden, cout).astype(dtype) +
              bias.astype(dtype))
    out = base.at[idx].set(values, mode='drop')
    return out.reshape(n, h, w, cout)

  if not fallback:
    largest = capacities[-1]
    return jnp.where(count <= largest, sparse(largest, actv), jnp.nan)
  # Branch i < len(capacities): the i-th capacity; the last one: dense.
  index = sum((count > c).astype(jnp.int32) for c in capacities)
  branches = [functools.partial(sparse, c) for c in capacities] + [dense_fn]
  return jax.lax.switch(index, branches, actv)


# ---------------------------------------------------------------------------
# Normalisation.
# ---------------------------------------------------------------------------
def instance_norm(x: jnp.ndarray) -> jnp.ndarray:
  """InstanceNorm2d(affine=False): per sample and channel over H, W."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(axis=(1, 2), keepdims=True)
  var = jnp.square(x32 - mean).mean(axis=(1, 2), keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + NORM_EPS)).astype(x.dtype)


class BatchNorm(nn.Module):
  """BatchNorm2d with PyTorch's running statistics, optionally affine.

  Statistics are over the whole (global) batch: under `jax.jit` with the batch
  sharded over a mesh, XLA reduces across devices, so this is SyncBatchNorm.
  Running mean/var (`batch_stats`) use momentum 0.1 and the unbiased variance;
  normalisation uses the biased batch variance, as in PyTorch.
  """
  affine: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if train:
      mean = x32.mean(axis=(0, 1, 2))
      var = jnp.square(x32 - mean).mean(axis=(0, 1, 2))
      if not self.is_initializing():
        n = x.size // c
        ra_mean.value = (1 - BN_MOMENTUM) * ra_mean.value + BN_MOMENTUM * mean
        ra_var.value = ((1 - BN_MOMENTUM) * ra_var.value +
                        BN_MOMENTUM * var * (n / max(n - 1, 1)))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x32 - mean) * jax.lax.rsqrt(var + NORM_EPS)
    if self.affine:
      y = y * self.param('scale', nn.initializers.ones, (c,), jnp.float32)
      y = y + self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return y.astype(x.dtype)


def parse_spade_norm(norm_G: str) -> Tuple[str, int]:
  """'spectralspadesyncbatch3x3' -> ('syncbatch', 3)."""
  text = norm_G.replace('spectral', '')
  match = re.fullmatch(r'spade(\D+)(\d)x\d', text)
  if not match or match.group(1) not in ('syncbatch', 'batch', 'instance'):
    raise ValueError(
        f'norm_G={norm_G!r} is not a SPADE norm: expected '
        "'[spectral]spade{syncbatch|batch|instance}{k}x{k}', e.g. "
        "'spectralspadesyncbatch3x3'.")
  return match.group(1), int(match.group(2))


def parse_plain_norm(norm: str) -> Tuple[bool, str]:
  """'spectralinstance' -> (True, 'instance'); sub-norm may be 'none' or ''."""
  spectral = norm.startswith('spectral')
  sub = norm[len('spectral'):] if spectral else norm
  sub = {'sync_batch': 'syncbatch', '': 'none'}.get(sub, sub)
  if sub not in ('instance', 'batch', 'syncbatch', 'none'):
    raise ValueError(
        f'norm {norm!r} is not recognised: expected [spectral]'
        '{instance|batch|sync_batch|none}, e.g. spectralinstance.')
  return spectral, sub


class ParamFreeNorm(nn.Module):
  """The SPADE layer's normalisation without affine parameters."""
  kind: str  # syncbatch | batch | instance

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.kind == 'instance':
      return instance_norm(x)
    return BatchNorm(affine=False, name='bn')(x, train)


class NormConv(nn.Module):
  """A conv followed by the reference's non-SPADE norm (`norm_D`, `norm_E`).

  As in the reference, the conv loses its bias when a norm follows it.
  """
  features: int
  kernel_size: int
  strides: int
  padding: int
  norm: str
  dtype: Dtype = jnp.float32
  transpose: bool = False
  impl: str = 'xla'

  @nn.compact
  def __call__(self, x, train: bool = False):
    spectral, sub = parse_plain_norm(self.norm)
    x = Conv(self.features, self.kernel_size, self.strides, self.padding,
             use_bias=(sub == 'none'), spectral=spectral,
             init_kind='torch' if spectral else 'xavier',
             transpose=self.transpose,
             dtype=self.dtype, impl=self.impl, name='conv')(x, train)
    if sub == 'instance':
      x = instance_norm(x)
    elif sub in ('batch', 'syncbatch'):
      x = BatchNorm(affine=True, name='norm')(x, train)
    return x


# ---------------------------------------------------------------------------
# SPADE.
# ---------------------------------------------------------------------------
class SPADE(nn.Module):
  """Spatially-adaptive normalisation: norm(x) * (1 + gamma(seg)) + beta(seg).

  As the reference's: actv = relu(mlp_shared(seg)), gamma = mlp_gamma(actv),
  beta = mlp_beta(actv), 3x3 (kernel_size) convolutions. `seg` is the
  semantic map, the one-hot (N, h, w, C) or a `LabelMap` (mlp_shared by the
  label lookup, `label_conv`); it is resized to x's size with the
  reference's legacy nearest rule (a no-op when the caller already did).

  With `sparse_fraction` set and a `LabelMap`, mlp_gamma and mlp_beta are
  computed by `sparse_gamma_beta` instead: the same values, dense only near
  label boundaries. Off by default.

  Attributes:
    features: channels of x (the reference's norm_nc).
    sparse_fraction: the boundary-sparse path's capacity, as a share of the
      batch's pixels, or a tuple of such shares (buckets, see
      `boundary_sparse_conv`); None: dense.
    sparse_fallback: False only to count the sparse branch's FLOPs
      (`boundary_sparse_conv`).
  """
  features: int
  norm_type: str = 'syncbatch'
  kernel_size: int = 3
  hidden: int = 128
  sparse_fraction: Optional[Union[float, Tuple[float, ...]]] = None
  sparse_fallback: bool = True
  conv_impl: str = 'xla'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, seg: Semantics, train: bool = False):
    normalized = ParamFreeNorm(self.norm_type, name='param_free_norm')(x,
                                                                       train)
    seg = resize_semantics(seg, x.shape[1:3])
    conv = functools.partial(Conv, kernel_size=self.kernel_size,
                             padding=self.kernel_size // 2, dtype=self.dtype,
                             impl=self.conv_impl)
    mlp_shared = conv(self.hidden, name='mlp_shared')
    mlp_gamma = conv(self.features, name='mlp_gamma')
    mlp_beta = conv(self.features, name='mlp_beta')
    actv = nn.relu(mlp_shared(seg))
    capacity = self._sparse_capacity(seg, x.shape[:3])
    if capacity is None:
      gamma, beta = mlp_gamma(actv), mlp_beta(actv)
    else:
      gamma, beta = sparse_gamma_beta(
          seg, actv, mlp_shared.weights(seg.channels),
          [mlp_gamma.weights(self.hidden), mlp_beta.weights(self.hidden)],
          capacity, self.conv_impl, self.dtype, self.sparse_fallback)
    return normalized * (1 + gamma) + beta

  def _sparse_capacity(self, seg: Semantics,
                       shape) -> Optional[Tuple[int, ...]]:
    """Boundary pixels each sparse bucket holds here; None: run dense."""
    if self.sparse_fraction is None or not isinstance(seg, LabelMap):
      return None
    capacities = sorted({sparse_capacity(f, shape)
                         for f in np.atleast_1d(self.sparse_fraction)})
    capacities = [c for c in capacities if c < np.prod(shape)]
    return tuple(capacities) or None


def sparse_gamma_beta(seg: LabelMap, actv: jnp.ndarray,
                      shared: Tuple[jnp.ndarray, jnp.ndarray],
                      weights: Sequence[Tuple[jnp.ndarray, jnp.ndarray]],
                      capacity, impl: str = 'xla',
                      dtype: Dtype = jnp.float32, fallback: bool = True):
  """SPADE's (gamma, beta) by `boundary_sparse_conv`, both convs at once.

  `shared` is mlp_shared's (kernel, bias), `weights` mlp_gamma's and
  mlp_beta's; the dense fallback computes each as SPADE's dense path does.
  """
  pad = weights[0][0].shape[0] // 2
  if jax.default_backend() == 'cpu':  # The fallback runs in a switch branch.
    conv = lambda a, k: conv2d_forward_form_grads(a, k, pad)
  else:
    conv = lambda a, k: conv2d(a, k, 1, pad, impl)
  dense = lambda a: jnp.concatenate(
      [conv(a.astype(dtype), k.astype(dtype)) + b.astype(dtype)
       for k, b in weights], axis=-1)
  out = boundary_sparse_conv(
      seg, actv, shared, jnp.concatenate([k for k, _ in weights], axis=-1),
      jnp.concatenate([b for _, b in weights]), capacity, dense, dtype,
      fallback)
  return jnp.split(out, [weights[0][1].shape[0]], axis=-1)


class SPADEResnetBlock(nn.Module):
  """The reference's SPADE residual block (fin -> fout).

  `sparse_fraction`: the SPADE layers' boundary-sparse path (`SPADE`).
  """
  features: int
  norm_G: str = 'spectralspadesyncbatch3x3'
  sparse_fraction: Optional[Union[float, Tuple[float, ...]]] = None
  sparse_fallback: bool = True
  conv_impl: str = 'xla'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, seg: Semantics, train: bool = False):
    fin, fout = x.shape[-1], self.features
    fmiddle = min(fin, fout)
    spectral = 'spectral' in self.norm_G
    norm_type, ks = parse_spade_norm(self.norm_G)
    spade = functools.partial(SPADE, norm_type=norm_type, kernel_size=ks,
                              sparse_fraction=self.sparse_fraction,
                              sparse_fallback=self.sparse_fallback,
                              conv_impl=self.conv_impl, dtype=self.dtype)
    conv = functools.partial(Conv, spectral=spectral,
                             init_kind='torch' if spectral else 'xavier',
                             dtype=self.dtype, impl=self.conv_impl)
    act = functools.partial(nn.leaky_relu, negative_slope=LRELU_SLOPE)
    # Every SPADE layer here works at x's size (conv_0 keeps it).
    seg = resize_semantics(seg, x.shape[1:3])
    x_s = x
    if fin != fout:
      x_s = spade(fin, name='norm_s')(x, seg, train)
      x_s = conv(fout, 1, padding=0, use_bias=False, name='conv_s')(x_s, train)
    dx = act(spade(fin, name='norm_0')(x, seg, train))
    dx = conv(fmiddle, 3, padding=1, name='conv_0')(dx, train)
    dx = act(spade(fmiddle, name='norm_1')(dx, seg, train))
    dx = conv(fout, 3, padding=1, name='conv_1')(dx, train)
    return x_s + dx
