"""The model folder: a config plus the networks' variables.

  OUT/config.json   the full ml_collections config (JSON)
  OUT/variables/    orbax checkpoint of {'generator': {'params', 'batch_stats'},
                    'discriminator': ..., 'encoder': ...} (those present)
  OUT/classes.json  optional: the classes' names and colours,
                    {"names": [...], "colors": [[r, g, b], ...]}, one entry
                    per class id (0..label_nc-1, then the don't-care class
                    when the model has one); either may be null. Written by
                    `spade_jax.export` when it knows them and by
                    `spade_jax.convert --data_dir`; read by `spade_jax.serve`
                    (whose --classes overrides it).

Written by `spade_jax.convert` and `spade_jax.export`; read by
`Synthesizer.load` and by training's `config.init_from`.
"""
import json
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'
VARIABLES_DIR = 'variables'
CLASSES_FILE = 'classes.json'


def save_model(output: str, config: ml_collections.ConfigDict,
               variables: Dict) -> None:
  """Writes a model folder atomically (a temporary folder, then a rename)."""
  output = os.path.abspath(output)
  tmp = output + '.tmp'
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  variables = jax.tree_util.tree_map(np.asarray, variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, VARIABLES_DIR), variables)
  if os.path.exists(output):
    shutil.rmtree(output)
  os.rename(tmp, output)


def load_config(model_dir: str) -> ml_collections.ConfigDict:
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} not found: {model_dir} is not a spade_jax model folder '
        '(made by `python -m spade_jax.convert` or `python -m '
        'spade_jax.export`).')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_model(model_dir: str) -> Tuple[ml_collections.ConfigDict, Dict]:
  """Reads a model folder: (config, variables as numpy arrays)."""
  config = load_config(model_dir)
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.join(os.path.abspath(model_dir),
                                           VARIABLES_DIR))
  return config, jax.tree_util.tree_map(np.asarray, variables)


def check_classes(classes: Dict, where: str) -> Dict:
  """Validates {'names': [str] | None, 'colors': [[r, g, b]] | None}."""
  if not isinstance(classes, dict):
    raise ValueError(f'{where}: expected a JSON object with "names" and '
                     f'"colors", got {type(classes).__name__}.')
  names = classes.get('names')
  colors = classes.get('colors')
  if names is not None and (not isinstance(names, list) or not all(
      isinstance(n, str) for n in names)):
    raise ValueError(f'{where}: "names" must be a list of strings (or null).')
  if colors is not None:
    ok = isinstance(colors, list) and all(
        isinstance(c, (list, tuple)) and len(c) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
            for v in c) for c in colors)
    if not ok:
      raise ValueError(f'{where}: "colors" must be a list of [r, g, b] '
                       'integers in 0..255 (or null).')
    colors = [list(c) for c in colors]
  return {'names': names, 'colors': colors}


def save_classes(model_dir: str, names: Optional[Sequence[str]],
                 colors: Optional[Sequence[Sequence[int]]]) -> str:
  """Writes OUT/classes.json (atomically); returns its path."""
  classes = check_classes(
      {'names': None if names is None else [str(n) for n in names],
       'colors': None if colors is None else [[int(v) for v in c]
                                              for c in colors]},
      'class metadata')
  path = os.path.join(model_dir, CLASSES_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(classes, f, indent=1)
  os.replace(path + '.tmp', path)
  return path


def read_classes_file(path: str) -> Dict[str, Optional[List]]:
  """A classes.json file (any path) as {'names', 'colors'}, checked."""
  try:
    with open(path) as f:
      classes = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'cannot read {path}: {e}. Fix or delete it (it only '
                     'names and colours the classes).') from None
  return check_classes(classes, path)


def load_classes(model_dir: str) -> Optional[Dict[str, Optional[List]]]:
  """OUT/classes.json as {'names', 'colors'}, or None when absent."""
  path = os.path.join(model_dir, CLASSES_FILE)
  if not os.path.isfile(path):
    return None
  return read_classes_file(path)
