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
  OUT/generator.jax_export, OUT/generator_signature.json
                    optional: the serialized generator and its signature
                    (written by `spade_jax.export`, see there)

Written by `spade_jax.convert` and `spade_jax.export`; read by
`Synthesizer.load` and by training's `config.init_from`.

Writing never loses the user's files: a folder is written complete into a
hidden temporary folder beside OUT, then renamed to OUT. An existing OUT is
replaced only when it is a model folder holding nothing but the files above,
and only with `overwrite` (the commands' --overwrite); an empty folder is
taken as it is; anything else, and the source of the model or a folder that
holds it, is refused with an `OutputError` that says what to do.
"""
import contextlib
import json
import os
import shutil
from typing import Dict, Iterator, List, Optional, Sequence, Tuple
import uuid

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'
VARIABLES_DIR = 'variables'
CLASSES_FILE = 'classes.json'
EXPORT_FILE = 'generator.jax_export'
SIGNATURE_FILE = 'generator_signature.json'
# Everything a model folder written by spade_jax holds (and nothing else).
MODEL_ENTRIES = frozenset(
    (CONFIG_FILE, VARIABLES_DIR, CLASSES_FILE, EXPORT_FILE, SIGNATURE_FILE))
_TMP_SUFFIX = '.tmp'  # Of files being written in place (save_classes).


class OutputError(FileExistsError):
  """An output path that cannot be written without losing the user's data."""


def is_model_folder(path: str) -> bool:
  """Whether `path` holds a model folder's config.json and variables/."""
  return os.path.isdir(os.path.join(path, VARIABLES_DIR)) and (
      os.path.isfile(os.path.join(path, CONFIG_FILE)))


def _foreign_entries(path: str) -> List[str]:
  """The entries of a folder that a model folder written by us never holds."""
  own = lambda e: e in MODEL_ENTRIES or (
      e.endswith(_TMP_SUFFIX) and e[:-len(_TMP_SUFFIX)] in MODEL_ENTRIES)
  return sorted(e for e in os.listdir(path) if not own(e))


def _holds(folder: str, path: str) -> bool:
  """Whether `path` is `folder` or inside it (symbolic links resolved)."""
  folder, path = os.path.realpath(folder), os.path.realpath(path)
  return os.path.commonpath([folder, path]) == folder


def check_output(output: str, *, overwrite: bool = False,
                 protect: Sequence[str] = ()) -> None:
  """Raises OutputError unless a model folder can be written at `output`.

  Args:
    output: the model folder to write.
    overwrite: replace an existing model folder written by spade_jax.
    protect: the paths the model is read from (source folders, files):
      `output` may be neither one of them nor a folder that holds one,
      overwrite or not.
  """
  if not output:
    raise OutputError('No output folder given (--output).')
  for path in protect:
    if path and _holds(output, path):
      what = ('is' if os.path.realpath(output) == os.path.realpath(path)
              else 'holds')
      raise OutputError(
          f'--output {output} {what} the source {path}: writing there would '
          'destroy what the model is read from. Choose another --output.')
  if os.path.islink(output):
    raise OutputError(f'--output {output} is a symbolic link: left alone. '
                      'Pass the folder it points to, or another --output.')
  if not os.path.exists(output):
    return
  if not os.path.isdir(output):
    raise OutputError(f'--output {output} exists and is a file, not a model '
                      'folder: left alone. Choose another --output, or move '
                      'the file away yourself.')
  if not os.listdir(output):
    return  # An empty folder: nothing to lose.
  foreign = _foreign_entries(output)
  if not is_model_folder(output) or foreign:
    shown = ', '.join(foreign[:5]) + (', ...' if len(foreign) > 5 else '')
    why = (f'also holds files spade_jax did not write ({shown})'
           if is_model_folder(output) else
           f'is not a spade_jax model folder (it holds {shown})')
    raise OutputError(
        f'--output {output} exists and {why}: left alone, with or without '
        '--overwrite. Choose another --output, or move it away yourself.')
  if not overwrite:
    raise OutputError(
        f'--output {output} already holds a model folder: pass --overwrite '
        'to replace it (it is replaced only once the new one is complete), or '
        'choose another --output.')


def _sibling(path: str, tag: str) -> str:
  """A new hidden name beside `path`: .NAME.TAG-RANDOM."""
  head, base = os.path.split(path)
  return os.path.join(head, f'.{base}.{tag}-{uuid.uuid4().hex[:12]}')


def _commit(tmp: str, output: str) -> None:
  """Moves the complete folder `tmp` to `output` (checked by check_output)."""
  if not os.path.exists(output) or not os.listdir(output):
    os.replace(tmp, output)  # Onto nothing, or onto an empty folder.
    return
  old = _sibling(output, 'old')
  os.rename(output, old)
  try:
    os.rename(tmp, output)
  except OSError:
    os.rename(old, output)
    raise
  shutil.rmtree(old)


@contextlib.contextmanager
def model_writer(output: str, *, overwrite: bool = False,
                 protect: Sequence[str] = ()) -> Iterator[str]:
  """Yields a new temporary folder, which becomes `output` on success.

  `check_output` runs first and again just before the rename; on any error
  the temporary folder is removed and `output` stays as it was.
  """
  check_output(output, overwrite=overwrite, protect=protect)
  output = os.path.abspath(output)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  tmp = _sibling(output, 'tmp')
  os.mkdir(tmp)
  try:
    yield tmp
    check_output(output, overwrite=overwrite, protect=protect)
    _commit(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_model(folder: str, config: ml_collections.ConfigDict,
                variables: Dict) -> None:
  """Writes config.json and variables/ into `folder` (a model_writer's)."""
  with open(os.path.join(folder, CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  variables = jax.tree_util.tree_map(np.asarray, variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(os.path.abspath(folder), VARIABLES_DIR),
               variables)


def save_model(output: str, config: ml_collections.ConfigDict,
               variables: Dict, *, overwrite: bool = False,
               protect: Sequence[str] = ()) -> None:
  """Writes a model folder atomically (see the module docstring)."""
  with model_writer(output, overwrite=overwrite, protect=protect) as tmp:
    write_model(tmp, config, variables)


def _first_line(error: BaseException, limit: int = 300) -> str:
  lines = str(error).strip().splitlines()
  line = lines[0] if lines else ''
  return line if len(line) <= limit else line[:limit] + '...'


def load_config(model_dir: str) -> ml_collections.ConfigDict:
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} not found: {model_dir} is not a spade_jax model folder '
        '(made by `python -m spade_jax.convert` or `python -m '
        'spade_jax.export`).')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f'cannot read {path}: {e}. The model folder '
                     f'{model_dir} is damaged: export or convert it again.'
                     ) from None


def load_model(model_dir: str) -> Tuple[ml_collections.ConfigDict, Dict]:
  """Reads a model folder: (config, variables as numpy arrays)."""
  config = load_config(model_dir)
  path = os.path.join(os.path.abspath(model_dir), VARIABLES_DIR)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(path)
  except Exception as e:  # pylint: disable=broad-except
    # orbax and TensorStore raise many kinds (ValueError, KeyError,
    # FileNotFoundError, JSONDecodeError, ...) for missing or damaged files.
    raise ValueError(
        f'cannot read the variables of the model folder {model_dir} '
        f'({path}): {type(e).__name__}: {_first_line(e)}. The folder is '
        'damaged or incomplete: export or convert it again.') from None
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
