"""Reads a published PyTorch weights file (a state dict) into numpy arrays.

One reader for the pretrained networks spade_jax ports (the segmenters of
`segmenters.py`): `.pth` files are read with
`torch.load(path, map_location='cpu', weights_only=True)` (torch, an optional
dependency, is imported only then; no pickled code is run), `.npz` files with
numpy. Checkpoints that wrap their state dict (`{'state_dict': {...}, ...}`)
and keys saved from `nn.DataParallel` (every key starting with `module.`) are
unwrapped.
"""
import os
from typing import Dict, Mapping

import numpy as np

_DATA_PARALLEL_PREFIX = 'module.'


def _unwrap(loaded, path: str, how_to_get: str) -> Mapping:
  if isinstance(loaded, Mapping) and isinstance(loaded.get('state_dict'),
                                                Mapping):
    loaded = loaded['state_dict']
  if not isinstance(loaded, Mapping):
    raise ValueError(f'{path} holds a {type(loaded).__name__}, not a state '
                     f'dict. {how_to_get}')
  return loaded


def _strip_data_parallel(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  if state and all(k.startswith(_DATA_PARALLEL_PREFIX) for k in state):
    return {k[len(_DATA_PARALLEL_PREFIX):]: v for k, v in state.items()}
  return state


def read_state_dict(path: str, how_to_get: str = '') -> Dict[str, np.ndarray]:
  """The arrays of a `.pth` state dict (or an `.npz` with the same keys).

  Args:
    path: the weights file. Names ending in `.npz` are read with numpy,
      anything else with torch.load(weights_only=True).
    how_to_get: appended to error messages: which file to get and where.

  Returns:
    key -> numpy array (floating tensors as float32, others as they are).

  Raises:
    FileNotFoundError: no path or no such file.
    ImportError: a `.pth` file and no torch installed.
    ValueError: the file cannot be read as a state dict.
  """
  path = os.fspath(path or '')
  if not path:
    raise FileNotFoundError(f'No weights file given. {how_to_get}')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Weights file not found: {path!r}. {how_to_get}')
  if path.lower().endswith('.npz'):
    try:
      with np.load(path, allow_pickle=False) as data:
        return _strip_data_parallel({k: data[k] for k in data.files})
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'Could not read {path} as an .npz file ({e}). '
                       f'{how_to_get}') from e
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'Reading the PyTorch weights file {path} needs torch, which is not '
        'installed: `pip install "spade_jax[torch]"` (or `pip install '
        'torch`).') from e
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'Could not read {path} as a PyTorch state dict ({e}). '
                     f'{how_to_get}') from e
  loaded = _unwrap(loaded, path, how_to_get)
  state = {}
  for key, value in loaded.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      state[key] = (value.float().numpy() if value.is_floating_point()
                    else value.numpy())
  return _strip_data_parallel(state)
