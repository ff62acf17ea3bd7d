"""Reads a published PyTorch weights file (a state dict) into numpy arrays.

The one `.pth` reader of spade_jax: reference SPADE checkpoints
(`convert.py`), torchvision's VGG19 (`vgg.py`), pytorch-fid's Inception
(`inception.py`) and the segmenters (`segmenters.py`). `.pth` files are read with
`torch.load(path, map_location='cpu', weights_only=True)` (torch, an optional
dependency, is imported only then; no pickled code is run), `.npz` files with
numpy. Checkpoints that wrap their state dict (`{'state_dict': {...}, ...}`)
and keys saved from `nn.DataParallel` (every key starting with `module.`) are
unwrapped.
"""
import os
import pickle
import re
from typing import Dict, Mapping

import numpy as np

_DATA_PARALLEL_PREFIX = 'module.'


class WeightsFileError(ValueError):
  """A weights file that cannot be read as a state dict (the message says
  which file and why)."""


def _refusal_message(path: str, torch_message: str) -> str:
  """Our message for a file that torch's weights-only unpickler refused.

  Torch's own message advises loading with weights_only=False, which runs
  whatever code the file names: it is not repeated.
  """
  advice = ('Published checkpoints and weight files are plain state dicts of '
            'tensors, which load. Take the file from its original source; '
            'only if you trust where this file comes from, re-save its '
            'tensors as a plain state dict in PyTorch and use that.')
  found = re.search(r'GLOBAL ([\w.]+)', torch_message)
  if found:
    return (f'{path} was refused: it holds Python objects other than '
            f'tensors (it names {found.group(1)}), and loading those could '
            f'run arbitrary code. {advice}')
  return (f'Could not read {path}: the safe (weights-only) loader refused '
          'it. It is damaged, not a PyTorch checkpoint, or it holds Python '
          f'objects other than tensors, which could run code. {advice}')


def _unwrap(loaded, path: str, how_to_get: str) -> Mapping:
  if isinstance(loaded, Mapping) and isinstance(loaded.get('state_dict'),
                                                Mapping):
    loaded = loaded['state_dict']
  if not isinstance(loaded, Mapping):
    raise WeightsFileError(f'{path} holds a {type(loaded).__name__}, not a '
                           f'state dict. {how_to_get}')
  return loaded


def _strip_data_parallel(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  if state and all(k.startswith(_DATA_PARALLEL_PREFIX) for k in state):
    return {k[len(_DATA_PARALLEL_PREFIX):]: v for k, v in state.items()}
  return state


def read_state_dict(path: str, how_to_get: str = '',
                    npz_hint: str = '') -> Dict[str, np.ndarray]:
  """The arrays of a `.pth` state dict (or an `.npz` with the same keys).

  Args:
    path: the weights file. Names ending in `.npz` are read with numpy,
      anything else with torch.load(weights_only=True).
    how_to_get: appended to error messages: which file to get and where.
    npz_hint: appended to the message for a `.pth` without torch installed
      (e.g. how to make an `.npz` of it where torch is).

  Returns:
    key -> numpy array (floating tensors as float32, others as they are).

  Raises:
    FileNotFoundError: no path or no such file.
    ImportError: a `.pth` file and no torch installed.
    WeightsFileError: the file cannot be read as a state dict: damaged, not
      a checkpoint, or refused by the weights-only loader (never with
      advice to load it unsafely).
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
      raise WeightsFileError(f'Could not read {path} as an .npz file ({e}). '
                             f'{how_to_get}') from e
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'Reading the PyTorch weights file {path} needs torch, which is not '
        'installed: `pip install "spade_jax[torch]"` (or `pip install '
        f'torch`){npz_hint}.') from e
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise WeightsFileError(_refusal_message(path, str(e))) from None
  except Exception as e:  # pylint: disable=broad-except
    # Not a checkpoint, or a damaged one: zip errors (RuntimeError),
    # truncated pickles (EOFError, KeyError), ...
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ''
    if 'weights_only' in detail:
      detail = ''
    raise WeightsFileError(
        f'Could not read {path}: it is not a PyTorch checkpoint, or it is '
        f'damaged or truncated ({type(e).__name__}{": " if detail else ""}'
        f'{detail[:300]}). {how_to_get or "Copy it again from its source."}'
    ) from None
  loaded = _unwrap(loaded, path, how_to_get)
  state = {}
  for key, value in loaded.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      state[key] = (value.float().numpy() if value.is_floating_point()
                    else value.numpy())
  return _strip_data_parallel(state)
