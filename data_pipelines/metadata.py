"""A built data set's metadata: `dataset_info.json` (see `records.py`).

Classes, names, colours and splits of a data set, read and written without
TensorFlow (etils.epath: local folders and cloud paths alike), so the model
readers (export, the web app) need no TensorFlow.
"""
import dataclasses
import json
from typing import Dict, List, Optional

from etils import epath

INFO_FILE = 'dataset_info.json'


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

  def save(self, data_dir: str) -> None:
    folder = epath.Path(data_dir)
    tmp = folder / (INFO_FILE + '.tmp')
    tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
    tmp.replace(folder / INFO_FILE)

  @classmethod
  def load(cls, data_dir: str) -> 'DatasetInfo':
    path = epath.Path(data_dir) / INFO_FILE
    if not path.exists():
      raise FileNotFoundError(
          f'{path} not found: {data_dir} does not hold a built data set. '
          'Build one with `python -m data_pipelines.build --dataset NAME '
          '--manual_dir SRC --data_dir OUT`.')
    return cls(**json.loads(path.read_text()))
