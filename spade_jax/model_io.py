"""The model folder: a config plus the networks' variables.

  OUT/config.json   the full ml_collections config (JSON)
  OUT/variables/    orbax checkpoint of {'generator': {'params', 'batch_stats'},
                    'discriminator': ..., 'encoder': ...} (those present)

Written by `spade_jax.convert` and `spade_jax.export`; read by
`Synthesizer.load` and by training's `config.init_from`.
"""
import json
import os
import shutil
from typing import Dict, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'
VARIABLES_DIR = 'variables'


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
