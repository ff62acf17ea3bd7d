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
`Synthesizer.load` and by training's `config.init_from`. `load_config` is
the one config loader (a model folder's or a training workdir's config.json
merged over the default config); `class_metadata` and `read_class_source`
find the classes' names and colours.

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

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from configs import default as default_config
from data_pipelines import metadata
from data_pipelines import scenes

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


def merge_config(saved: Dict) -> ml_collections.ConfigDict:
  """A saved config (a dict) over the default config.

  Keys added to the default config since it was saved take their default
  values, so older runs and model folders still load, and code reads every
  key as `config.KEY`. Integers saved for float keys become floats; a value
  of a type the default does not have replaces it.
  """
  config = default_config.get_config()
  with config.unlocked():
    for key, value in saved.items():
      if key in config and isinstance(config[key], float) and isinstance(
          value, int) and not isinstance(value, bool):
        value = float(value)
      if key in config and not isinstance(value, type(config[key])):
        config[key] = None  # A type the default does not have: take it.
      config[key] = value
  return config


def load_config(folder: str) -> ml_collections.ConfigDict:
  """The config.json of a model folder or a training workdir, merged over
  the default config (see `merge_config`)."""
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} not found: {folder} is neither a training workdir (written '
        'by `python -m spade_jax.main`) nor a spade_jax model folder (made by '
        '`python -m spade_jax.convert` or `python -m spade_jax.export`).')
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError(f'expected a JSON object, got {type(saved).__name__}')
  except (OSError, ValueError) as e:
    how = ('export or convert it again' if is_model_folder(folder) else
           'training writes it at start; restore it from a copy (the same '
           'config as the run)')
    raise ValueError(f'cannot read {path}: {e}. {folder} is damaged: {how}.'
                     ) from None
  return merge_config(saved)


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


def _info_classes(data_dir: str) -> Optional[Dict]:
  """Names and colours from a built data set's dataset_info.json, or None."""
  if not data_dir:
    return None
  try:
    info = metadata.DatasetInfo.load(data_dir)
  except FileNotFoundError:
    return None
  except (OSError, ValueError, TypeError) as e:
    logging.warning('Cannot read the class names and colours of %s: %s',
                    data_dir, e)
    return None
  if not info.class_names and not info.colors:
    return None
  return {'names': info.class_names, 'colors': info.colors}


def read_class_source(path: str, label_nc: int) -> Dict:
  """{'names', 'colors'} of a built data set folder or a classes.json file.

  `path` is a data set folder (its dataset_info.json, from
  `data_pipelines.build` or the synthetic set) whose label_nc must equal the
  model's `label_nc`, or a classes.json file (`model_io` format) whose names
  and colours cover label_nc classes (label_nc + 1 with a don't-care entry).
  Raises FileNotFoundError or ValueError naming the file and both numbers.
  """
  label_nc = int(label_nc)
  if os.path.isdir(path):
    try:
      info = metadata.DatasetInfo.load(path)
    except FileNotFoundError:
      raise FileNotFoundError(
          f'{path} is not a built data set folder (no {metadata.INFO_FILE} '
          'in it or a tfds build under it). Pass one (python -m '
          f'data_pipelines.build ... --data_dir DIR) or a {CLASSES_FILE} '
          'file.') from None
    except (ValueError, TypeError) as e:
      raise ValueError(f'cannot read the data set {path}: {e}') from None
    info_path = os.path.join(info.folder, metadata.INFO_FILE)
    if int(info.label_nc) != label_nc:
      raise ValueError(
          f'the data set {path} has {info.label_nc} classes (label_nc in '
          f'{metadata.INFO_FILE}) but the model has label_nc={label_nc}: '
          'pass the data set the model was trained on.')
    return check_classes(
        {'names': info.class_names, 'colors': info.colors}, info_path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} does not exist: pass a built data set folder (with '
        f'{metadata.INFO_FILE}) or a {CLASSES_FILE} file.')
  classes = read_classes_file(path)
  for key, what in (('names', 'class names'), ('colors', 'colours')):
    entries = classes[key]
    if entries is not None and not label_nc <= len(entries) <= label_nc + 1:
      raise ValueError(
          f'{path} has {len(entries)} {what} but the model has label_nc='
          f'{label_nc}: expected {label_nc} (or {label_nc + 1} with the '
          "don't-care class).")
  return classes


def class_metadata(config: ml_collections.ConfigDict,
                   source: str) -> Optional[Dict]:
  """{'names', 'colors'} of the model's classes (either may be None), or None.

  Looked up, in order: `source`'s classes.json when it is a model folder; the
  training data's dataset_info.json (config.data_dir, or for a synthetic run
  without one, `source`/data/synthetic where training generated it); the
  synthetic set's own names and colours for dataset='synthetic'.
  """
  if is_model_folder(source):
    found = load_classes(source)
    if found is not None:
      return found
  data_dir = config.data_dir
  if (not data_dir and config.dataset == 'synthetic'
      and not is_model_folder(source)):
    data_dir = os.path.join(source, 'data', 'synthetic')
  found = _info_classes(data_dir)
  if found is not None:
    return found
  if config.dataset == 'synthetic':
    info = scenes.dataset_info()
    return {'names': info.class_names, 'colors': info.colors}
  return None
