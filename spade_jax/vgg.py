"""VGG19 `features` trunk (up to relu5_1) for the perceptual loss, and loaders.

The network mirrors torchvision's `vgg19().features` indices 0..29 and the
reference SPADE `VGG19` module: 3x3 convolutions with padding 1, ReLU, and
2x2 / stride 2 max-pooling, in NHWC layout. It returns the activations after
relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1 (torchvision slices 0-1, 2-6,
7-11, 12-20 and 21-29).

Parameters are stored under the names `conv{i}`, where `i` is the torchvision
`features` index of the convolution, so `features.{i}.weight` (out, in, 3, 3)
maps to `params['conv{i}']['kernel']` (3, 3, in, out).

The pretrained ImageNet weights come from torchvision's `vgg19` weights file
(`vgg19-dcbb9e9d.pth`). Read it with `load_vgg19_params`, which needs torch; or
convert it once to `.npz` (needs torch once, never again):

  python -m spade_jax.vgg vgg19-dcbb9e9d.pth vgg19.npz
"""
import os
import sys
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spade_jax import torch_weights

# One entry per conv layer used, in order: torchvision `features` index, input
# channels, output channels, and whether a 2x2 max-pool comes right before it.
VGG19_CONVS: Tuple[Tuple[int, int, int, bool], ...] = (
    (0, 3, 64, False),
    (2, 64, 64, False),
    (5, 64, 128, True),
    (7, 128, 128, False),
    (10, 128, 256, True),
    (12, 256, 256, False),
    (14, 256, 256, False),
    (16, 256, 256, False),
    (19, 256, 512, True),
    (21, 512, 512, False),
    (23, 512, 512, False),
    (25, 512, 512, False),
    (28, 512, 512, True),
)
# torchvision `features` indices of the convs whose ReLU output ends a slice:
# relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
SLICE_END_CONVS: Tuple[int, ...] = (0, 5, 10, 19, 28)

WEIGHTS_FILE_NAME = 'vgg19-dcbb9e9d.pth'
_HOW_TO_GET = (
    'The VGG perceptual loss needs the torchvision ImageNet VGG19 weights, '
    f'file `{WEIGHTS_FILE_NAME}` (torchvision.models.vgg19(weights='
    "'IMAGENET1K_V1'), downloaded from "
    f'https://download.pytorch.org/models/{WEIGHTS_FILE_NAME}); pass its path '
    '(or an .npz made from it with `python -m spade_jax.vgg IN.pth OUT.npz`), '
    'or set lambda_vgg=0 to turn the VGG loss off.')


class VGG19(nn.Module):
  """VGG19 `features` up to relu5_1, returning the five slice outputs.

  Attributes:
    dtype: compute dtype of the convolutions and activations (e.g.
      jnp.bfloat16). Parameters always stay float32.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> Tuple[jax.Array, ...]:
    """Runs the trunk.

    Args:
      x: images, NHWC with 3 channels. Fed as they are (SPADE feeds [-1, 1]
        images with no ImageNet normalisation).

    Returns:
      A tuple of the relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1
      activations, NHWC, in `dtype`.
    """
    x = jnp.asarray(x, self.dtype)
    outputs = []
    for index, _, features, pool_before in VGG19_CONVS:
      if pool_before:
        x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2),
                        padding='VALID')
      x = nn.Conv(features, kernel_size=(3, 3), strides=(1, 1),
                  padding=((1, 1), (1, 1)), dtype=self.dtype,
                  param_dtype=jnp.float32, name=f'conv{index}')(x)
      x = nn.relu(x)
      if index in SLICE_END_CONVS:
        outputs.append(x)
    return tuple(outputs)


def expected_torch_shapes() -> Dict[str, Tuple[int, ...]]:
  """The torchvision state-dict keys VGG19 needs, with their shapes."""
  shapes = {}
  for index, cin, cout, _ in VGG19_CONVS:
    shapes[f'features.{index}.weight'] = (cout, cin, 3, 3)
    shapes[f'features.{index}.bias'] = (cout,)
  return shapes


def params_from_state_dict(
    state_dict: Mapping[str, Any]) -> Dict[str, Dict[str, Dict[str, Any]]]:
  """Converts torchvision-keyed VGG19 arrays to Flax variables.

  Args:
    state_dict: mapping from `features.{i}.weight` (out, in, 3, 3) and
      `features.{i}.bias` (out,) to numpy arrays. Other keys (the classifier,
      features past relu5_1) are ignored.

  Returns:
    `{'params': {'conv{i}': {'kernel': (3, 3, in, out), 'bias': (out,)}}}`,
    float32 numpy arrays, ready for `VGG19().apply`.

  Raises:
    ValueError: when keys are missing or shapes are wrong (each is named).
  """
  expected = expected_torch_shapes()
  missing = [k for k in expected if k not in state_dict]
  if missing:
    present = sorted(state_dict)[:8]
    raise ValueError(
        f'VGG19 weights are missing {len(missing)} key(s): {missing}. '
        f'Expected a torchvision vgg19 state dict (keys like '
        f"'features.0.weight'); found keys such as {present}. " + _HOW_TO_GET)
  bad = []
  for key, shape in expected.items():
    got = tuple(np.shape(state_dict[key]))
    if got != shape:
      bad.append(f'{key}: expected {shape}, got {got}')
  if bad:
    raise ValueError('VGG19 weights have wrong shapes: ' + '; '.join(bad))
  params = {}
  for index, _, _, _ in VGG19_CONVS:
    weight = np.asarray(state_dict[f'features.{index}.weight'], np.float32)
    bias = np.asarray(state_dict[f'features.{index}.bias'], np.float32)
    params[f'conv{index}'] = {
        'kernel': np.ascontiguousarray(weight.transpose(2, 3, 1, 0)),
        'bias': bias,
    }
  return {'params': params}


def state_dict_from_params(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Inverse of `params_from_state_dict`: Flax variables to torchvision keys.

  Args:
    params: `{'params': {...}}` or the inner `{'conv{i}': ...}` mapping.

  Returns:
    `{'features.{i}.weight': (out, in, 3, 3), 'features.{i}.bias': (out,)}`
    float32 numpy arrays.
  """
  inner = params['params'] if 'params' in params else params
  out = {}
  for index, _, _, _ in VGG19_CONVS:
    layer = inner[f'conv{index}']
    kernel = np.asarray(layer['kernel'], np.float32)
    out[f'features.{index}.weight'] = np.ascontiguousarray(
        kernel.transpose(3, 2, 0, 1))
    out[f'features.{index}.bias'] = np.asarray(layer['bias'], np.float32)
  return out


def load_vgg19_params(path: str) -> Dict[str, Dict[str, Dict[str, Any]]]:
  """Loads VGG19 weights for `VGG19` from a torchvision `.pth` or an `.npz`.

  Args:
    path: a torchvision `vgg19` state-dict file (e.g. `vgg19-dcbb9e9d.pth`,
      read with torch, an optional dependency), or an `.npz` holding the same
      keys and layouts (`features.{i}.weight` (out, in, 3, 3),
      `features.{i}.bias`), as written by `save_vgg19_npz`. Chosen by the file
      name: `.npz` is read with numpy, anything else with torch.

  Returns:
    `{'params': {'conv{i}': {'kernel', 'bias'}}}` float32 numpy arrays.

  Raises:
    FileNotFoundError: no such file (the message says how to get it).
    ImportError: a `.pth` file and no torch installed.
    ValueError: unreadable file, missing keys or wrong shapes.
  """
  path = os.fspath(path)
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'VGG19 weights file not found: {path!r}. '
                            + _HOW_TO_GET)
  return params_from_state_dict(torch_weights.read_state_dict(
      path, _HOW_TO_GET, npz_hint=(
          ', or convert the file to .npz once on a machine with torch: '
          '`python -m spade_jax.vgg IN.pth OUT.npz`')))


def save_vgg19_npz(params: Mapping[str, Any], path: str) -> None:
  """Writes VGG19 Flax variables as an `.npz` with torchvision keys/layouts."""
  path = os.fspath(path)
  with open(path, 'wb') as f:
    np.savez(f, **state_dict_from_params(params))


def convert_pth_to_npz(pth_path: str, npz_path: str) -> None:
  """Converts a torchvision `vgg19` `.pth` to an `.npz` (needs torch once)."""
  save_vgg19_npz(load_vgg19_params(pth_path), npz_path)


def main(argv: Sequence[str]) -> int:
  """Command line: `python -m spade_jax.vgg IN.pth OUT.npz`."""
  if len(argv) != 3:
    print(f'usage: python -m spade_jax.vgg IN.pth OUT.npz\n\n{__doc__}',
          file=sys.stderr)
    return 2
  convert_pth_to_npz(argv[1], argv[2])
  print(f'wrote {argv[2]}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
