"""A built data set's metadata, found and read without TensorFlow.

Two layouts are read (etils.epath: local folders and cloud paths alike), so
the model readers (export, the web app) need no TensorFlow:

* a tensorflow-datasets build (`tfds_builders.py`, what
  `python -m data_pipelines.build` writes): DATA/spade_NAME[/CONFIG]/VERSION/
  with tfds' own dataset_info.json (splits, shard lengths, file names) and
  metadata.json, whose 'spade' entry is this module's `DatasetInfo` fields;
* the earlier spade_jax layout: one folder with a dataset_info.json of
  `DatasetInfo` and shards named {split}.tfrecord-{i:05d}-of-{n:05d}
  (still read; nothing writes it but tests).

`DatasetInfo.load` takes either folder, or a tfds data_dir above one
(`find_build` picks the build, by data set name where there are several).
"""
import dataclasses
import json
from typing import Dict, List, Optional

from etils import epath

INFO_FILE = 'dataset_info.json'
TFDS_METADATA_FILE = 'metadata.json'
TFDS_PREFIX = 'spade_'
_TFDS_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'


def legacy_shard_name(split: str, index: int, num_shards: int) -> str:
  return f'{split}.tfrecord-{index:05d}-of-{num_shards:05d}'


def _is_build(folder: epath.Path) -> bool:
  return (folder / INFO_FILE).exists() and 'incomplete.' not in folder.name


def find_build(path: str, dataset: Optional[str] = None) -> epath.Path:
  """The folder holding a built set's dataset_info.json and shards.

  `path` is that folder, or a tfds data_dir holding spade_NAME builds; with
  several, `dataset` (NAME) chooses.
  """
  root = epath.Path(path)
  if _is_build(root):
    return root
  found = []
  if root.is_dir():
    for top in sorted(root.iterdir()):
      if top.name.startswith(TFDS_PREFIX):
        # NAME/VERSION or NAME/CONFIG/VERSION.
        infos = list(top.glob(f'*/{INFO_FILE}')) + list(
            top.glob(f'*/*/{INFO_FILE}'))
        found += [i.parent for i in sorted(infos) if _is_build(i.parent)]
  named = [f for f in found
           if dataset and f.relative_to(root).parts[0] == TFDS_PREFIX + dataset]
  if len(found) > 1 and named:
    found = named
  if len(found) == 1:
    return found[0]
  if not found:
    raise FileNotFoundError(
        f'{root / INFO_FILE} not found: {path} does not hold a built data '
        'set. Build one with `python '
        '-m data_pipelines.build --dataset NAME --manual_dir SRC --data_dir '
        f'{path}`.')
  raise ValueError(
      f'{path} holds several builds: ' + ', '.join(map(str, found)) +
      '. Pass the folder of the one to read as the data_dir.')


@dataclasses.dataclass
class DatasetInfo:
  """What a reader needs to know about a built data set."""
  dataset: str  # coco_stuff | ade20k | cityscapes | facades | custom | synthetic
  label_nc: int
  contain_dontcare_label: bool
  has_instance: bool
  # split name -> {'num_examples': int, 'num_shards': int}
  splits: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)
  class_names: Optional[List[str]] = None
  # One [r, g, b] per class id (0..label_nc-1, plus the don't-care class).
  colors: Optional[List[List[int]]] = None
  # Where it was read from, and the tfds name when it is a tfds build.
  folder: Optional[str] = dataclasses.field(default=None, compare=False)
  tfds_name: Optional[str] = dataclasses.field(default=None, compare=False)
  shard_lengths: Dict[str, List[int]] = dataclasses.field(
      default_factory=dict, compare=False)

  def fields(self) -> Dict:
    """The stored fields (those of the earlier layout's dataset_info.json)."""
    out = dataclasses.asdict(self)
    for key in ('folder', 'tfds_name', 'shard_lengths'):
      out.pop(key)
    return out

  def save(self, data_dir: str) -> None:
    """Writes the earlier layout's dataset_info.json (test data sets)."""
    folder = epath.Path(data_dir)
    tmp = folder / (INFO_FILE + '.tmp')
    tmp.write_text(json.dumps(self.fields(), indent=1))
    tmp.replace(folder / INFO_FILE)

  def shard_files(self, split: str) -> List[str]:
    """The shard files of `split`, in order."""
    n = int(self.splits[split]['num_shards'])
    folder = epath.Path(self.folder or '.')
    if self.tfds_name:
      return [str(folder / f'{self.tfds_name}-{split}.tfrecord-'
                           f'{i:05d}-of-{n:05d}') for i in range(n)]
    return [str(folder / legacy_shard_name(split, i, n)) for i in range(n)]

  @classmethod
  def load(cls, data_dir: str, dataset: Optional[str] = None
           ) -> 'DatasetInfo':
    folder = find_build(data_dir, dataset)
    path = folder / INFO_FILE
    try:
      raw = json.loads(path.read_text())
    except ValueError as e:
      raise ValueError(f'cannot read {path}: {e}. Rebuild the data set '
                       '(python -m data_pipelines.build).') from None
    if 'label_nc' in raw:  # The earlier spade_jax layout.
      return cls(**raw, folder=str(folder))
    return cls._from_tfds(folder, raw)

  @classmethod
  def _from_tfds(cls, folder: epath.Path, raw: Dict) -> 'DatasetInfo':
    meta_path = folder / TFDS_METADATA_FILE
    try:
      spade = json.loads(meta_path.read_text())['spade']
    except (OSError, ValueError, KeyError, TypeError):
      raise ValueError(
          f'{folder} is a tensorflow-datasets build without spade_jax '
          f'metadata ({meta_path} with a "spade" entry): build it with '
          '`python -m data_pipelines.build`.') from None
    if raw.get('fileFormat', 'tfrecord') != 'tfrecord':
      raise ValueError(f'{folder}: file format {raw["fileFormat"]!r}; the '
                       'input pipeline reads tfrecord builds.')
    splits, lengths = {}, {}
    for entry in raw.get('splits', []):
      template = entry.get('filepathTemplate', _TFDS_TEMPLATE)
      if template != _TFDS_TEMPLATE:
        raise ValueError(f'{folder}: split {entry["name"]} uses the file '
                         f'template {template!r}; expected {_TFDS_TEMPLATE}.')
      shard = [int(n) for n in entry.get('shardLengths', [])]
      splits[entry['name']] = {'num_examples': sum(shard),
                               'num_shards': len(shard)}
      lengths[entry['name']] = shard
    spade = {k: v for k, v in spade.items()
             if k not in ('folder', 'tfds_name', 'shard_lengths')}
    spade['splits'] = splits
    return cls(**spade, folder=str(folder), tfds_name=raw['name'],
               shard_lengths=lengths)
