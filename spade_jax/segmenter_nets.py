"""Flax ports (NHWC) of the three segmenters the SPADE paper evaluates with.

* `DeepLabV2MSC`: DeepLab v2, ResNet-101 + ASPP, multi-scale inputs, as
  kazuto1011/deeplab-pytorch's `DeepLabV2_ResNet101_MSC` (COCO-Stuff 164k,
  182 classes). Caffe-style bottlenecks (the stride is in the first 1x1
  conv), a 7x7 stem with a ceil-mode 3x3 max pool, layers 4 and 5 dilated 2
  and 4 (output stride 8), ASPP = the sum of four 3x3 convs dilated 6, 12,
  18, 24. MSC: the logits of the input and of its 0.5x and 0.75x bilinear
  resizes, brought to the first's size, pixel-wise max.
* `UperNet101`: CSAILVision semantic-segmentation-pytorch `resnet101` encoder
  (deep stem: three 3x3 convs) + `upernet` decoder (PPM over pool scales 1,
  2, 3, 6 on the last feature map, FPN over the four stages, 512 channels),
  ADE20K, 150 classes. Returns the logits at 1/4 of the input size.
* `DRND105`: fyu/drn `DRNSeg('drn_d_105', 19)`: the DRN-D-105 trunk (output
  stride 8), a 1x1 classifier and a fixed depthwise 16x16 / stride 8
  transposed conv upsampling, then log-softmax (Cityscapes, 19 train ids).

Parameter paths are the PyTorch state-dict keys: the Flax module path joined
with '.' plus the tensor name (`kernel`/`scale` -> weight, `bias`, `mean` ->
running_mean, `var` -> running_var), so `variables_from_state_dict` maps a
published file onto a network with one rule. BatchNorm uses its running
statistics (eps 1e-5); resizes are PyTorch's `interpolate(mode='bilinear',
align_corners=False)`.
"""
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
BN_EPS = 1e-5


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0,
         dilation: int = 1, bias: bool = False, name: Optional[str] = None):
  """A PyTorch-style Conv2d (explicit symmetric padding), NHWC."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 kernel_dilation=(dilation, dilation), use_bias=bias,
                 precision=_HIGHEST, name=name)


def batch_norm(name: str):
  return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name=name)


def max_pool_3x3_s2(x: jax.Array, ceil_mode: bool = False) -> jax.Array:
  """PyTorch MaxPool2d(3, stride=2, padding=1, ceil_mode=ceil_mode)."""
  pads = []
  for n in x.shape[1:3]:
    if ceil_mode:
      out = -(-(n + 2 - 3) // 2) + 1
      if (out - 1) * 2 >= n + 1:  # The last window must start inside.
        out -= 1
    else:
      out = (n + 2 - 3) // 2 + 1
    pads.append((1, max((out - 1) * 2 + 3 - n - 1, 0)))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                               (1, 2, 2, 1), ((0, 0), pads[0], pads[1],
                                              (0, 0)))


def _source_index(in_n: int, out_n: int, scale: Optional[float]):
  ratio = 1.0 / scale if scale else in_n / out_n
  src = np.maximum((np.arange(out_n) + 0.5) * ratio - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int32), in_n - 1)
  i1 = np.minimum(i0 + 1, in_n - 1)
  w1 = (src - i0).astype(np.float32)
  return i0, i1, w1


def resize_bilinear(x: jax.Array, size: Tuple[int, int],
                    scale: Optional[float] = None) -> jax.Array:
  """PyTorch `interpolate(x, size, mode='bilinear', align_corners=False)`.

  Args:
    x: (N, H, W, C).
    size: output (height, width).
    scale: the `scale_factor` PyTorch was given instead of a size (it then
      maps coordinates with 1 / scale, not in / out); size must be
      floor(in * scale).
  """
  for axis, out_n in ((1, size[0]), (2, size[1])):
    in_n = x.shape[axis]
    if in_n == out_n and not scale:
      continue
    i0, i1, w1 = _source_index(in_n, out_n, scale)
    shape = [1] * x.ndim
    shape[axis] = out_n
    w1 = jnp.asarray(w1).reshape(shape).astype(x.dtype)
    x = (jnp.take(x, i0, axis=axis) * (1 - w1)
         + jnp.take(x, i1, axis=axis) * w1)
  return x


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """PyTorch AdaptiveAvgPool2d(size): bins [floor(i n / s), ceil((i+1) n / s))."""
  def bins(n):
    return [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]
  rows = []
  for h0, h1 in bins(x.shape[1]):
    rows.append(jnp.concatenate(
        [x[:, h0:h1, w0:w1].mean(axis=(1, 2), keepdims=True)
         for w0, w1 in bins(x.shape[2])], axis=2))
  return jnp.concatenate(rows, axis=1)


# ---------------------------------------------------------------------------
# DeepLab v2 (kazuto1011/deeplab-pytorch).


class _DLConvBnReLU(nn.Module):
  """`_ConvBnReLU`: children `conv` (no bias) and `bn`."""
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  relu: bool = True

  @nn.compact
  def __call__(self, x):
    x = conv(self.features, self.kernel, self.stride, self.padding,
             self.dilation, name='conv')(x)
    x = batch_norm('bn')(x)
    return nn.relu(x) if self.relu else x


class _DLBottleneck(nn.Module):
  """reduce (1x1, stride) -> conv3x3 (dilated) -> increase; + shortcut."""
  features: int
  stride: int
  dilation: int
  downsample: bool

  @nn.compact
  def __call__(self, x):
    mid = self.features // 4
    h = _DLConvBnReLU(mid, 1, self.stride, name='reduce')(x)
    h = _DLConvBnReLU(mid, 3, 1, self.dilation, self.dilation,
                      name='conv3x3')(h)
    h = _DLConvBnReLU(self.features, 1, relu=False, name='increase')(h)
    if self.downsample:
      x = _DLConvBnReLU(self.features, 1, self.stride, relu=False,
                        name='shortcut')(x)
    return nn.relu(h + x)


class _DLResLayer(nn.Module):
  num_blocks: int
  features: int
  stride: int
  dilation: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_blocks):
      x = _DLBottleneck(self.features, self.stride if i == 0 else 1,
                        self.dilation, i == 0, name=f'block{i + 1}')(x)
    return x


class DeepLabV2(nn.Module):
  """DeepLab v2 ResNet-101 + ASPP: logits at 1/8 of the input (ceil)."""
  num_classes: int = 182
  num_blocks: Sequence[int] = (3, 4, 23, 3)
  atrous_rates: Sequence[int] = (6, 12, 18, 24)

  @nn.compact
  def __call__(self, x):
    x = _DLConvBnReLU(64, 7, 2, 3, name='layer1.conv1')(x)
    x = max_pool_3x3_s2(x, ceil_mode=True)
    x = _DLResLayer(self.num_blocks[0], 256, 1, 1, name='layer2')(x)
    x = _DLResLayer(self.num_blocks[1], 512, 2, 1, name='layer3')(x)
    x = _DLResLayer(self.num_blocks[2], 1024, 1, 2, name='layer4')(x)
    x = _DLResLayer(self.num_blocks[3], 2048, 1, 4, name='layer5')(x)
    return sum(conv(self.num_classes, 3, 1, r, r, bias=True,
                    name=f'aspp.c{i}')(x)
               for i, r in enumerate(self.atrous_rates))


class DeepLabV2MSC(nn.Module):
  """`MSC(DeepLabV2)`: max over the logits of the input and its rescalings.

  Input: BGR, mean-subtracted (see `segmenters.py`). `multi_scale=False`
  runs the base network on the input only.
  """
  num_classes: int = 182
  scales: Sequence[float] = (0.5, 0.75)

  @nn.compact
  def __call__(self, x, multi_scale: bool = True):
    base = DeepLabV2(self.num_classes, name='base')
    logits = base(x)
    if not multi_scale:
      return logits
    outputs = [logits]
    height, width = x.shape[1:3]
    for p in self.scales:
      h = resize_bilinear(x, (int(height * p), int(width * p)), scale=p)
      outputs.append(resize_bilinear(base(h), logits.shape[1:3]))
    return jnp.max(jnp.stack(outputs), axis=0)


# ---------------------------------------------------------------------------
# UperNet, ResNet-101 encoder (CSAILVision semantic-segmentation-pytorch).


class _ResNetBottleneck(nn.Module):
  """torchvision-style bottleneck (stride in the 3x3 conv), `dilation` on it.

  Children conv1/bn1, conv2/bn2, conv3/bn3 and `downsample.0`/`.1`.
  """
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x):
    out = nn.relu(batch_norm('bn1')(conv(self.planes, 1, name='conv1')(x)))
    out = conv(self.planes, 3, self.stride, self.dilation, self.dilation,
               name='conv2')(out)
    out = nn.relu(batch_norm('bn2')(out))
    out = batch_norm('bn3')(conv(self.planes * 4, 1, name='conv3')(out))
    if self.downsample:
      x = conv(self.planes * 4, 1, self.stride, name='downsample.0')(x)
      x = batch_norm('downsample.1')(x)
    return nn.relu(out + x)


def _resnet_stage(x, name: str, num_blocks: int, planes: int, stride: int = 1,
                  dilation: int = 1):
  """`_make_layer`: blocks `{name}.{i}`; the first one downsamples."""
  for i in range(num_blocks):
    x = _ResNetBottleneck(planes, stride if i == 0 else 1, dilation, i == 0,
                          name=f'{name}.{i}')(x)
  return x


class UperNetEncoder(nn.Module):
  """mit-semseg `Resnet(resnet101)`: returns the four stages' outputs."""
  num_blocks: Sequence[int] = (3, 4, 23, 3)

  @nn.compact
  def __call__(self, x):
    for i, features in enumerate((64, 64, 128)):
      x = conv(features, 3, 2 if i == 0 else 1, 1, name=f'conv{i + 1}')(x)
      x = nn.relu(batch_norm(f'bn{i + 1}')(x))
    x = max_pool_3x3_s2(x)
    features = []
    for j, (n, planes) in enumerate(zip(self.num_blocks, (64, 128, 256, 512))):
      x = _resnet_stage(x, f'layer{j + 1}', n, planes, 1 if j == 0 else 2)
      features.append(x)
    return features


def _conv_bn_relu(x, features: int, kernel: int, conv_name: str,
                  bn_name: str):
  x = conv(features, kernel, 1, kernel // 2, name=conv_name)(x)
  return nn.relu(batch_norm(bn_name)(x))


class UperNetDecoder(nn.Module):
  """mit-semseg `UPerNet` (fc_dim 2048): logits at the first stage's size."""
  num_classes: int = 150
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  fpn_dim: int = 512  # mit-semseg 'upernet' (256 is its 'upernet_lite').

  @nn.compact
  def __call__(self, features):
    conv5 = features[-1]
    size5 = conv5.shape[1:3]
    ppm = [conv5]
    for i, s in enumerate(self.pool_scales):
      pooled = resize_bilinear(adaptive_avg_pool(conv5, s), size5)
      ppm.append(_conv_bn_relu(pooled, 512, 1, f'ppm_conv.{i}.0',
                               f'ppm_conv.{i}.1'))
    f = _conv_bn_relu(jnp.concatenate(ppm, axis=-1), self.fpn_dim, 3,
                      'ppm_last_conv.0', 'ppm_last_conv.1')
    pyramid = [f]
    for i in reversed(range(len(features) - 1)):
      lateral = _conv_bn_relu(features[i], self.fpn_dim, 1, f'fpn_in.{i}.0',
                              f'fpn_in.{i}.1')
      f = lateral + resize_bilinear(f, lateral.shape[1:3])
      pyramid.append(_conv_bn_relu(f, self.fpn_dim, 3, f'fpn_out.{i}.0.0',
                                   f'fpn_out.{i}.0.1'))
    pyramid.reverse()
    size = pyramid[0].shape[1:3]
    fused = jnp.concatenate(
        [pyramid[0]] + [resize_bilinear(p, size) for p in pyramid[1:]],
        axis=-1)
    x = _conv_bn_relu(fused, self.fpn_dim, 3, 'conv_last.0.0',
                      'conv_last.0.1')
    return conv(self.num_classes, 1, bias=True, name='conv_last.1')(x)


class UperNet101(nn.Module):
  """Encoder + decoder; input RGB normalised with the ImageNet mean/std."""
  num_classes: int = 150

  @nn.compact
  def __call__(self, x):
    return UperNetDecoder(self.num_classes, name='decoder')(
        UperNetEncoder(name='encoder')(x))


# ---------------------------------------------------------------------------
# DRN-D-105 (fyu/drn).


def bilinear_up_kernel(size: int, channels: int) -> np.ndarray:
  """fyu/drn `fill_up_weights` as a (size, size, 1, channels) kernel."""
  f = math.ceil(size / 2)
  c = (2 * f - 1 - f % 2) / (2.0 * f)
  r = 1 - np.abs(np.arange(size) / f - c)
  k = np.outer(r, r).astype(np.float32)
  return np.repeat(k[:, :, None, None], channels, axis=3)


class _DepthwiseUp(nn.Module):
  """ConvTranspose2d(C, C, 16, stride=8, padding=4, groups=C, bias=False)."""
  channels: int
  kernel_size: int = 16
  stride: int = 8
  padding: int = 4

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param(
        'kernel', lambda *_: jnp.asarray(bilinear_up_kernel(k,
                                                            self.channels)))
    pad = k - 1 - self.padding
    return jax.lax.conv_general_dilated(
        x, kernel[::-1, ::-1], window_strides=(1, 1),
        padding=((pad, pad), (pad, pad)),
        lhs_dilation=(self.stride, self.stride),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=self.channels, precision=_HIGHEST)


class DRND105(nn.Module):
  """`DRNSeg('drn_d_105', num_classes)`: per-pixel log-probabilities.

  Input RGB in [0, 1] normalised with the Cityscapes mean/std of fyu/drn's
  info.json. Output at 8x the trunk's 1/8 resolution (the input size when
  it is a multiple of 8).
  """
  num_classes: int = 19

  @nn.compact
  def __call__(self, x):
    # layer0..layer2: conv-bn-relu (7x7 16, 3x3 16, 3x3 32 / 2).
    for i, (features, kernel, stride) in enumerate(
        ((16, 7, 1), (16, 3, 1), (32, 3, 2))):
      x = conv(features, kernel, stride, kernel // 2, name=f'base.{i}.0')(x)
      x = nn.relu(batch_norm(f'base.{i}.1')(x))
    x = _resnet_stage(x, 'base.3', 3, 64, stride=2)
    x = _resnet_stage(x, 'base.4', 4, 128, stride=2)
    x = _resnet_stage(x, 'base.5', 23, 256, dilation=2)
    x = _resnet_stage(x, 'base.6', 3, 512, dilation=4)
    for i, dilation in ((7, 2), (8, 1)):
      x = conv(512, 3, 1, dilation, dilation, name=f'base.{i}.0')(x)
      x = nn.relu(batch_norm(f'base.{i}.1')(x))
    x = conv(self.num_classes, 1, bias=True, name='seg')(x)
    return jax.nn.log_softmax(_DepthwiseUp(self.num_classes, name='up')(x),
                              axis=-1)


# ---------------------------------------------------------------------------
# Published state dicts -> Flax variables.

_TORCH_NAME = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
               'mean': 'running_mean', 'var': 'running_var'}


def torch_key(path: Sequence[str]) -> str:
  """The state-dict key of a Flax variable path (collection excluded)."""
  return '.'.join(path[:-1]) + '.' + _TORCH_NAME[path[-1]]


def _to_flax(value: np.ndarray) -> np.ndarray:
  value = np.asarray(value, np.float32)
  if value.ndim == 4:  # (out, in, kh, kw) -> (kh, kw, in, out)
    value = value.transpose(2, 3, 1, 0)
  return np.ascontiguousarray(value)


def variable_shapes(module: nn.Module, input_shape: Tuple[int, ...],
                    **kwargs) -> Dict[Tuple[str, ...], Any]:
  """(collection, *path) -> ShapeDtypeStruct of `module`'s variables."""
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0),
                          jnp.zeros(input_shape, jnp.float32), **kwargs))
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))


def variables_from_state_dict(template: Mapping[Tuple[str, ...], Any],
                              state: Mapping[str, np.ndarray], what: str,
                              how_to_get: str = '') -> Dict:
  """Fills the variables of `template` (see `variable_shapes`) from `state`.

  Args:
    template: flat variable shapes of the network.
    state: the published state dict (keys as the project saves them).
    what: names the network and file in error messages.
    how_to_get: appended to errors: which file the user should get.

  Returns:
    `{'params': ..., 'batch_stats': ...}` float32 numpy arrays.

  Raises:
    ValueError: keys missing or shapes wrong (each named).
  """
  out, missing, bad, used = {}, [], [], set()
  for (collection, *path), leaf in template.items():
    key = torch_key(path)
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    value = _to_flax(state[key])
    if value.shape != tuple(leaf.shape):
      bad.append(f'{key}: {tuple(np.shape(state[key]))} in the file, the '
                 f'network expects {tuple(leaf.shape)} (flax layout)')
      continue
    out[(collection, *path)] = value
  if missing:
    raise ValueError(
        f'{what}: the weights lack {len(missing)} of the network\'s '
        f'{len(template)} tensors, e.g. {missing[:4]}; the file has keys '
        f'such as {sorted(state)[:4]}. {how_to_get}')
  if bad:
    raise ValueError(f'{what}: wrong shapes: ' + '; '.join(bad[:6])
                     + f'. {how_to_get}')
  extra = sorted(k for k in state if k not in used
                 and not k.endswith('num_batches_tracked'))
  if extra:
    logging.warning('%s: %d key(s) of the file are not used, e.g. %s',
                    what, len(extra), extra[:4])
  return flax.traverse_util.unflatten_dict(out)


def state_dict_from_variables(variables: Mapping[str, Any],
                              prefix: str = '') -> Dict[str, np.ndarray]:
  """Inverse of `variables_from_state_dict` (PyTorch layouts)."""
  out = {}
  for (_, *path), value in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(variables)).items():
    value = np.asarray(value, np.float32)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    out[prefix + torch_key(path)] = np.ascontiguousarray(value)
  return out


def with_prefix(state: Mapping[str, np.ndarray], prefix: str
                ) -> Dict[str, np.ndarray]:
  return {prefix + k: v for k, v in state.items()}

