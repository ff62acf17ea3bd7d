"""The Inception-v3 network of FID (pytorch-fid's), in Flax, NHWC.

This is the network the standard FID code (pytorch-fid, itself a port of the
TensorFlow FID code) runs: torchvision's Inception-v3 layout with the FID
variants of its blocks, namely

* every average pool inside the Inception blocks ignores the zero padding
  (TensorFlow's `count_include_pad=False` behaviour), and
* the last block (Mixed_7c) pools its input with a 3x3 MAX pool instead of an
  average pool.

Images in [0, 1] are resized to 299x299 (bilinear, half-pixel centres, no
antialiasing: PyTorch's `interpolate(..., align_corners=False)`), mapped to
[-1, 1] and run up to the final global average pool: 2048 features per image.

Parameters are named after the PyTorch modules (`Mixed_6b/branch7x7_2/conv`,
`.../bn`), so the published weights file `pt_inception-2015-12-05-6726825d.pth`
maps onto them one to one. Read it with `load_inception_params` (torch, an
optional dependency, reads the `.pth`), or convert it once to `.npz`:

  python -m spade_jax.inception pt_inception-2015-12-05-6726825d.pth fid.npz
"""
import functools
import os
import sys
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spade_jax import torch_weights

WEIGHTS_FILE_NAME = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/'
               f'fid_weights/{WEIGHTS_FILE_NAME}')
HOW_TO_GET = (
    'FID needs the Inception-v3 weights that the pytorch-fid package '
    f'publishes, file `{WEIGHTS_FILE_NAME}` (download {WEIGHTS_URL}); pass '
    'its path with --config.inception_weights=PATH (an .npz made from it '
    'with `python -m spade_jax.inception IN.pth OUT.npz` works too).')
INPUT_SIZE = 299
NUM_FEATURES = 2048
BN_EPS = 1e-3

_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""
  features: int
  kernel_size: Any
  strides: int = 1
  padding: Any = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                dtype=self.dtype, precision=_HIGHEST, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS,
                     dtype=self.dtype, name='bn')(x)
    return nn.relu(x)


def avg_pool_3x3_same(x):
  """3x3 / stride 1 average pool, padding 1, padded zeros not counted."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def max_pool_3x3_same(x):
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """Mixed_5b/c/d: 1x1 | 5x5 | double 3x3 | avg pool + 1x1."""
  pool_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, dtype=self.dtype)
    b1 = conv(64, 1, name='branch1x1')(x)
    b5 = conv(48, 1, name='branch5x5_1')(x)
    b5 = conv(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = conv(64, 1, name='branch3x3dbl_1')(x)
    b3 = conv(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = conv(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, 1, name='branch_pool')(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35 -> 17."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, dtype=self.dtype)
    b3 = conv(384, 3, strides=2, name='branch3x3')(x)
    bd = conv(64, 1, name='branch3x3dbl_1')(x)
    bd = conv(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = conv(96, 3, strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..e: factorised 7x7 convolutions."""
  channels_7x7: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, dtype=self.dtype)
    c7 = self.channels_7x7
    b1 = conv(192, 1, name='branch1x1')(x)
    b7 = conv(c7, 1, name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = conv(c7, 1, name='branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = conv(192, 1, name='branch_pool')(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17 -> 8."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, dtype=self.dtype)
    b3 = conv(192, 1, name='branch3x3_1')(x)
    b3 = conv(320, 3, strides=2, name='branch3x3_2')(b3)
    b7 = conv(192, 1, name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, 3, strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/c: expanded filter bank; `pool` is 'avg' (7b) or 'max' (7c)."""
  pool: str = 'avg'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, dtype=self.dtype)
    b1 = conv(320, 1, name='branch1x1')(x)
    b3 = conv(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = conv(448, 1, name='branch3x3dbl_1')(x)
    bd = conv(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)],
                         axis=-1)
    pooled = (max_pool_3x3_same(x) if self.pool == 'max'
              else avg_pool_3x3_same(x))
    bp = conv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
  """(N, H, W, C) -> (N, size, size, C), like PyTorch's bilinear interpolate.

  Half-pixel centres, no antialiasing when shrinking, edge samples clamped
  (`F.interpolate(x, (size, size), mode='bilinear', align_corners=False)`).
  """
  if images.shape[1:3] == (size, size):
    return images
  return jax.image.resize(images, images.shape[:1] + (size, size) +
                          images.shape[3:], 'bilinear', antialias=False)


class FIDInceptionV3(nn.Module):
  """Images (N, H, W, 3) in [0, 1] -> pool features (N, 2048).

  Attributes:
    resize_to: side the input is resized to (299 for standard FID; smaller
      sizes, at least 75, only make tests faster).
    dtype: compute dtype (parameters stay float32).
  """
  resize_to: int = INPUT_SIZE
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = resize_bilinear(jnp.asarray(images, jnp.float32), self.resize_to)
    x = (2.0 * x - 1.0).astype(self.dtype)
    conv = functools.partial(BasicConv, dtype=self.dtype)
    x = conv(32, 3, strides=2, name='Conv2d_1a_3x3')(x)
    x = conv(32, 3, name='Conv2d_2a_3x3')(x)
    x = conv(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = max_pool_3x3_s2(x)
    x = conv(80, 1, name='Conv2d_3b_1x1')(x)
    x = conv(192, 3, name='Conv2d_4a_3x3')(x)
    x = max_pool_3x3_s2(x)
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64),
                                ('Mixed_5d', 64)):
      x = InceptionA(pool_features, self.dtype, name=name)(x)
    x = InceptionB(self.dtype, name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160),
                     ('Mixed_6e', 192)):
      x = InceptionC(c7, self.dtype, name=name)(x)
    x = InceptionD(self.dtype, name='Mixed_7a')(x)
    x = InceptionE('avg', self.dtype, name='Mixed_7b')(x)
    x = InceptionE('max', self.dtype, name='Mixed_7c')(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# ---------------------------------------------------------------------------
# Weights: PyTorch state-dict keys <-> Flax variables.
# ---------------------------------------------------------------------------
# Flax leaf -> (collection, PyTorch suffix).
_LEAVES = {
    ('conv', 'kernel'): ('params', 'conv.weight'),
    ('bn', 'scale'): ('params', 'bn.weight'),
    ('bn', 'bias'): ('params', 'bn.bias'),
    ('bn', 'mean'): ('batch_stats', 'bn.running_mean'),
    ('bn', 'var'): ('batch_stats', 'bn.running_var'),
}


# (collection, Flax path, Flax shape) of one variable.
_Leaf = Tuple[str, Tuple[str, ...], Tuple[int, ...]]


@functools.lru_cache(maxsize=None)
def _variable_shapes() -> Dict[str, Any]:
  shapes = jax.eval_shape(
      lambda: FIDInceptionV3(resize_to=INPUT_SIZE).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3))))
  return dict(shapes)


def _torch_key(collection: str, path: Tuple[str, ...]) -> str:
  for (layer, leaf), (coll, suffix) in _LEAVES.items():
    if coll == collection and path[-2:] == (layer, leaf):
      return '.'.join(path[:-2] + (suffix,))
  raise KeyError(f'No PyTorch name for {collection}/{"/".join(path)}')


def _flat_variables() -> Dict[str, _Leaf]:
  """PyTorch key -> (collection, Flax path, Flax shape), for every leaf."""
  out = {}
  for collection, tree in _variable_shapes().items():
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      path = tuple(k.key for k in key_path)
      out[_torch_key(collection, path)] = (collection, path,
                                           tuple(leaf.shape))
  return out


def _to_torch_shape(flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
  if len(flax_shape) == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)
  return flax_shape


def expected_torch_shapes() -> Dict[str, Tuple[int, ...]]:
  """The state-dict keys of the FID Inception weights file, with shapes.

  The published file also holds `fc.*` (1008 classes) and, in some saves,
  `*.num_batches_tracked`; those are not needed for the pool features.
  """
  return {k: _to_torch_shape(shape)
          for k, (_, _, shape) in _flat_variables().items()}


def variables_from_state_dict(state_dict: Mapping[str, Any]) -> Dict:
  """pytorch-fid-keyed arrays -> `{'params', 'batch_stats'}` for the module.

  Raises:
    ValueError: missing keys or wrong shapes (each named), with how to get
      the right file.
  """
  table = _flat_variables()
  missing = [k for k in table if k not in state_dict]
  if missing:
    raise ValueError(
        f'The Inception weights lack {len(missing)} of the {len(table)} '
        f'expected arrays, e.g. {missing[:5]}; keys found include '
        f'{sorted(state_dict)[:5]}. ' + HOW_TO_GET)
  bad = []
  for key, (_, _, shape) in table.items():
    got = tuple(np.shape(state_dict[key]))
    if got != _to_torch_shape(shape):
      bad.append(f'{key}: expected {_to_torch_shape(shape)}, got {got}')
  if bad:
    raise ValueError('The Inception weights have wrong shapes: '
                     + '; '.join(bad[:10]) + '. ' + HOW_TO_GET)
  variables = {'params': {}, 'batch_stats': {}}
  for key, (collection, path, shape) in table.items():
    value = np.asarray(state_dict[key], np.float32)
    if len(shape) == 4:
      value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    node = variables[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return variables


def state_dict_from_variables(variables: Mapping[str, Any]
                              ) -> Dict[str, np.ndarray]:
  """Inverse of `variables_from_state_dict` (PyTorch layouts, numpy)."""
  out = {}
  for key, (collection, path, shape) in _flat_variables().items():
    node = variables[collection]
    for name in path:
      node = node[name]
    value = np.asarray(node, np.float32)
    if len(shape) == 4:
      value = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    out[key] = value
  return out


def load_inception_params(path: str) -> Dict:
  """Loads the FID Inception weights from the pytorch-fid `.pth` or an `.npz`.

  Args:
    path: `pt_inception-2015-12-05-6726825d.pth` (read with
      torch.load(weights_only=True); torch is an optional dependency) or an
      `.npz` with the same keys and layouts (see `save_inception_npz`).

  Returns:
    `{'params': ..., 'batch_stats': ...}` float32 numpy arrays for
    `FIDInceptionV3().apply`.

  Raises:
    FileNotFoundError: no path given or no such file (says what to get).
    ImportError: a `.pth` file and no torch.
    ValueError: unreadable file, missing keys or wrong shapes.
  """
  path = os.fspath(path or '')
  if not path:
    raise FileNotFoundError('No Inception weights file given. ' + HOW_TO_GET)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Inception weights file not found: {path!r}. '
                            + HOW_TO_GET)
  state_dict = torch_weights.read_state_dict(path, HOW_TO_GET, npz_hint=(
      ', or convert the file to .npz once where torch is installed: '
      '`python -m spade_jax.inception IN.pth OUT.npz`'))
  return variables_from_state_dict(
      {k: v for k, v in state_dict.items() if v.dtype.kind == 'f'})


def save_inception_npz(variables: Mapping[str, Any], path: str) -> None:
  with open(os.fspath(path), 'wb') as f:
    np.savez(f, **state_dict_from_variables(variables))


def main(argv: Sequence[str]) -> int:
  """Command line: `python -m spade_jax.inception IN.pth OUT.npz`."""
  if len(argv) != 3:
    print(f'usage: python -m spade_jax.inception IN.pth OUT.npz\n\n{__doc__}',
          file=sys.stderr)
    return 2
  save_inception_npz(load_inception_params(argv[1]), argv[2])
  print(f'wrote {argv[2]}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
