"""Where each data set's files live in its released layout, and how they pair.

`find_examples(layout, manual_dir, split)` lists the (image, label, instance)
files of one split, paired by base name. Layouts (relative to `manual_dir`):

  coco_stuff  {split}_img/*.jpg  {split}_label/*.png  {split}_inst/*.png
              (the reference repo's prepared layout), or the official
              release: {split}2017/*.jpg,
              stuffthingmaps_trainval2017/{split}2017/*.png (or
              stuffthingmaps/...), annotations/instances_{split}2017.json
              (instance maps made from it, see `coco_instances.py`)
              splits train, val
  ade20k      ADEChallengeData2016/images/{training,validation}/*.jpg
              ADEChallengeData2016/annotations/{training,validation}/*.png
              splits train (training), val (validation)
  cityscapes  leftImg8bit/{split}/{city}/{name}_leftImg8bit.png
              gtFine/{split}/{city}/{name}_gtFine_labelIds.png
              gtFine/{split}/{city}/{name}_gtFine_instanceIds.png (16-bit)
              splits train, val
  facades     {split}_img/*.jpg  {split}_label/*.png    splits train, val
  custom      label_dir, image_dir, optional instance_dir (any single split)

Paths go through `tf.io.gfile`, so `manual_dir` may also be a cloud bucket.
"""
import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
import tensorflow as tf

from spade_jax import label_maps

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif',
                    '.tiff')
# Label and instance maps must be lossless; non-PNG ones are re-encoded.
MAP_EXTENSIONS = ('.png', '.bmp', '.gif', '.tif', '.tiff')
# Unpaired examples named in a PairingError.
_MAX_LISTED = 50


@dataclasses.dataclass(frozen=True)
class Example:
  """The files of one example."""
  name: str  # Base name shared by the files (no extension, no suffix).
  image_path: str
  label_path: str
  instance_path: Optional[str] = None
  # COCO instances_*.json the instance map is made from (official layout).
  annotation_file: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a data set is and which raw label values it may contain."""
  name: str
  label_nc: int
  contain_dontcare_label: bool
  has_instance: bool
  splits: Tuple[str, ...]
  # Largest valid raw label value. ADE20K stores 0..150 (0 = "other", which
  # the reader's shift turns into don't-care), the others 0..label_nc-1.
  max_raw_label: int
  # Whether the raw value 255 (don't-care) may appear.
  allow_dontcare_value: bool

  def check_label_values(self, values: Sequence[int]) -> List[int]:
    """Returns the values among `values` that are not valid raw labels."""
    return [int(v) for v in values
            if not (0 <= v <= self.max_raw_label or
                    (self.allow_dontcare_value and v == label_maps.DONT_CARE))]


def _layout(name, label_nc, dontcare, instance, splits, max_raw=None,
            allow_255=None) -> Layout:
  return Layout(
      name=name, label_nc=label_nc, contain_dontcare_label=dontcare,
      has_instance=instance, splits=tuple(splits),
      max_raw_label=label_nc - 1 if max_raw is None else max_raw,
      allow_dontcare_value=dontcare if allow_255 is None else allow_255)


LAYOUTS: Dict[str, Layout] = {
    'coco_stuff': _layout('coco_stuff', 182, True, True, ('train', 'val')),
    # Raw 0 ("other") becomes don't-care after the reader's shift; raw 255
    # never occurs (it would shift to a real class), so it is rejected.
    'ade20k': _layout('ade20k', 150, True, False, ('train', 'val'),
                      max_raw=150, allow_255=False),
    'cityscapes': _layout('cityscapes', 35, False, True, ('train', 'val')),
    'facades': _layout('facades', 13, False, False, ('train', 'val')),
}

# Names accepted by `get_layout` (custom is configured by flags).
DATASETS = tuple(LAYOUTS) + ('custom',)


def custom_layout(label_nc: int, contain_dontcare_label: bool,
                  has_instance: bool, split: str) -> Layout:
  """The layout of a custom data set (values 0..label_nc-1, maybe 255)."""
  if label_nc is None or label_nc <= 0:
    raise ValueError(f'custom data sets need a positive --label_nc, got '
                     f'{label_nc!r}.')
  if label_nc > label_maps.DONT_CARE and contain_dontcare_label:
    raise ValueError(f'label_nc {label_nc} collides with the don\'t-care '
                     f'value {label_maps.DONT_CARE}.')
  return _layout('custom', label_nc, contain_dontcare_label, has_instance,
                 (split,))


def get_layout(dataset: str) -> Layout:
  if dataset not in LAYOUTS:
    raise ValueError(f'Unknown data set {dataset!r}; expected one of '
                     f'{", ".join(DATASETS)} (custom takes its own flags).')
  return LAYOUTS[dataset]


class PairingError(ValueError):
  """Files that do not pair up (or are missing) in a data set's layout."""


def _list_files(folder: str, extensions: Sequence[str],
                recursive: bool = False) -> List[str]:
  """Files of `folder` (and sub-folders if `recursive`) with an extension."""
  if not tf.io.gfile.isdir(folder):
    return []
  if recursive:
    paths = _walk_files(folder)
  else:
    paths = [os.path.join(folder, f) for f in tf.io.gfile.listdir(folder)]
  return sorted(p for p in paths
                if os.path.splitext(p)[1].lower() in extensions)


def _is_local(path: str) -> bool:
  return '://' not in path


def _walk_files(folder: str) -> List[str]:
  """Every file under `folder`; each real folder is read once.

  Local symlinks to folders are followed (data sets are often linked in),
  but a folder already read (a `loop -> ..` link, or a second link to the
  same folder) is skipped with a warning, so loops cannot hang the build or
  list files twice. Cloud paths have no links and go through tf.io.gfile.
  """
  if not _is_local(folder):
    paths = []
    for root, _, files in tf.io.gfile.walk(folder):
      paths.extend(os.path.join(root, f) for f in files)
    return paths
  paths, seen, skipped = [], set(), []
  stack = [folder]
  while stack:
    root = stack.pop()
    try:
      st = os.stat(root)
    except OSError as e:
      skipped.append(f'{root} ({e.strerror})')
      continue
    if (st.st_dev, st.st_ino) in seen:
      skipped.append(f'{root} -> {os.path.realpath(root)} (already read)')
      continue
    seen.add((st.st_dev, st.st_ino))
    try:
      entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
      skipped.append(f'{root} ({e.strerror})')
      continue
    subdirs = []
    for entry in entries:
      try:
        is_dir = entry.is_dir()  # Follows links.
      except OSError:
        is_dir = False
      if is_dir:
        subdirs.append(entry.path)
      else:
        paths.append(entry.path)
    stack.extend(reversed(subdirs))
  if skipped:
    logging.warning('Skipped %d folder(s) under %s that are links to folders '
                    'already read (symlink loops or duplicates) or '
                    'unreadable: %s', len(skipped), folder,
                    '; '.join(skipped[:10]) +
                    (' ...' if len(skipped) > 10 else ''))
  return paths


def _key(path: str, suffix: str = '') -> Optional[str]:
  """Base name of `path` without extension and `suffix`; None if no suffix."""
  stem = os.path.splitext(os.path.basename(path))[0]
  if suffix:
    if not stem.endswith(suffix):
      return None
    stem = stem[:-len(suffix)]
  return stem


def _index(paths: Sequence[str], suffix: str, what: str,
           problems: List[str]) -> Dict[str, str]:
  """Maps base name -> path; records duplicate names as problems."""
  index = {}
  for p in paths:
    k = _key(p, suffix)
    if k is None:
      continue
    if k in index:
      problems.append(f'two {what} files named {k!r}: {index[k]} and {p}')
    else:
      index[k] = p
  return index


def pair_files(images: Sequence[str], labels: Sequence[str],
               instances: Optional[Sequence[str]], *, where: str,
               image_suffix: str = '', label_suffix: str = '',
               instance_suffix: str = '') -> List[Example]:
  """Pairs image, label (and instance) files by base name.

  Args:
    images: image file paths.
    labels: label file paths.
    instances: instance file paths, or None when the set has none.
    where: description of the folders, for error messages.
    image_suffix: suffix of the image stems removed to get the base name.
    label_suffix: same for labels.
    instance_suffix: same for instances.

  Returns:
    The examples, sorted by name.

  Raises:
    PairingError: listing every unpaired file and which side lacks what.
  """
  problems = []
  by_image = _index(images, image_suffix, 'image', problems)
  by_label = _index(labels, label_suffix, 'label', problems)
  by_inst = (None if instances is None else
             _index(instances, instance_suffix, 'instance', problems))
  sides = [('image', by_image), ('label', by_label)]
  if by_inst is not None:
    sides.append(('instance', by_inst))
  names = set().union(*(set(d) for _, d in sides))
  if not names:
    raise PairingError(f'No examples found in {where}.')
  unpaired = sorted(n for n in names if not all(n in d for _, d in sides))
  for n in unpaired[:_MAX_LISTED]:
    has = ', '.join(f'{w} {os.path.basename(d[n])}' for w, d in sides
                    if n in d)
    lacks = ', '.join(w for w, d in sides if n not in d)
    problems.append(f'{n}: has {has}; no {lacks} file')
  if len(unpaired) > _MAX_LISTED:
    problems.append(f'... and {len(unpaired) - _MAX_LISTED} more unpaired')
  if unpaired:
    counts = ', '.join(f'{len(names) - len(d)} without {w}'
                       for w, d in sides if len(d) < len(names))
    problems.insert(0, f'{len(unpaired)} unpaired example(s) ({counts}):')
  if problems:
    raise PairingError(f'Files in {where} do not pair up:\n  ' +
                       '\n  '.join(problems))
  return [Example(name=n, image_path=by_image[n], label_path=by_label[n],
                  instance_path=None if by_inst is None else by_inst[n])
          for n in sorted(names)]


def _require_dirs(dirs: Sequence[str]) -> None:
  missing = [d for d in dirs if not tf.io.gfile.isdir(d)]
  if missing:
    raise PairingError('Missing folder(s): ' + ', '.join(missing))


def _folder_examples(image_dir: str, label_dir: str,
                     instance_dir: Optional[str]) -> List[Example]:
  dirs = [image_dir, label_dir] + ([instance_dir] if instance_dir else [])
  _require_dirs(dirs)
  return pair_files(
      _list_files(image_dir, IMAGE_EXTENSIONS),
      _list_files(label_dir, MAP_EXTENSIONS),
      None if instance_dir is None else
      _list_files(instance_dir, MAP_EXTENSIONS),
      where=', '.join(dirs))


def _coco_like(manual_dir: str, split: str, instance: bool) -> List[Example]:
  return _folder_examples(
      os.path.join(manual_dir, f'{split}_img'),
      os.path.join(manual_dir, f'{split}_label'),
      os.path.join(manual_dir, f'{split}_inst') if instance else None)


_COCO_MAP_FOLDERS = ('stuffthingmaps_trainval2017', 'stuffthingmaps')


def _coco_stuff(manual_dir: str, split: str) -> List[Example]:
  """The reference's prepared layout, else the official release's."""
  if tf.io.gfile.isdir(os.path.join(manual_dir, f'{split}_img')):
    return _coco_like(manual_dir, split, True)
  image_dir = os.path.join(manual_dir, f'{split}2017')
  label_dirs = [os.path.join(manual_dir, m, f'{split}2017')
                for m in _COCO_MAP_FOLDERS]
  annotations = os.path.join(manual_dir, 'annotations',
                             f'instances_{split}2017.json')
  label_dir = next((d for d in label_dirs if tf.io.gfile.isdir(d)), None)
  if not tf.io.gfile.isdir(image_dir) or label_dir is None:
    raise PairingError(
        f'{manual_dir} holds neither COCO-Stuff layout for split {split!r}: '
        f'the prepared one ({split}_img, {split}_label, {split}_inst) nor '
        f'the official release ({split}2017/ images, '
        f'{_COCO_MAP_FOLDERS[0]}/{split}2017/ label maps, '
        f'annotations/instances_{split}2017.json).')
  if not tf.io.gfile.exists(annotations):
    raise PairingError(
        f'{annotations} is missing: the official COCO-Stuff layout makes the '
        'instance maps from the COCO annotations (annotations_trainval2017.'
        'zip).')
  examples = pair_files(_list_files(image_dir, IMAGE_EXTENSIONS),
                        _list_files(label_dir, MAP_EXTENSIONS), None,
                        where=f'{image_dir}, {label_dir}')
  return [dataclasses.replace(e, annotation_file=annotations)
          for e in examples]


def _ade20k(manual_dir: str, split: str) -> List[Example]:
  folder = {'train': 'training', 'val': 'validation'}[split]
  root = os.path.join(manual_dir, 'ADEChallengeData2016')
  return _folder_examples(os.path.join(root, 'images', folder),
                          os.path.join(root, 'annotations', folder), None)


def _cityscapes(manual_dir: str, split: str) -> List[Example]:
  image_dir = os.path.join(manual_dir, 'leftImg8bit', split)
  gt_dir = os.path.join(manual_dir, 'gtFine', split)
  _require_dirs([image_dir, gt_dir])
  gt = _list_files(gt_dir, ('.png',), recursive=True)
  return pair_files(
      _list_files(image_dir, ('.png',), recursive=True),
      [p for p in gt if p.endswith('_gtFine_labelIds.png')],
      [p for p in gt if p.endswith('_gtFine_instanceIds.png')],
      where=f'{image_dir}, {gt_dir}', image_suffix='_leftImg8bit',
      label_suffix='_gtFine_labelIds', instance_suffix='_gtFine_instanceIds')


def find_examples(layout: Layout, split: str, manual_dir: Optional[str] = None,
                  *, image_dir: Optional[str] = None,
                  label_dir: Optional[str] = None,
                  instance_dir: Optional[str] = None) -> List[Example]:
  """Lists the examples of one split of a data set, sorted by name.

  Args:
    layout: the data set (`get_layout(...)` or `custom_layout(...)`).
    split: a split name among `layout.splits`.
    manual_dir: root of the released files (not used by custom).
    image_dir: custom only: the images.
    label_dir: custom only: the label maps.
    instance_dir: custom only: the instance maps (optional).

  Returns:
    The examples.

  Raises:
    ValueError: unknown split, or missing directories.
    PairingError: files that do not pair up.
  """
  if split not in layout.splits:
    raise ValueError(f'{layout.name} has splits {", ".join(layout.splits)}; '
                     f'got {split!r}.')
  if layout.name == 'custom':
    if not image_dir or not label_dir:
      raise ValueError('custom data sets need --image_dir and --label_dir.')
    return _folder_examples(image_dir, label_dir, instance_dir or None)
  if not manual_dir:
    raise ValueError(f'{layout.name} needs --manual_dir (the folder holding '
                     'the released files).')
  if layout.name == 'coco_stuff':
    return _coco_stuff(manual_dir, split)
  if layout.name == 'facades':
    return _coco_like(manual_dir, split, layout.has_instance)
  if layout.name == 'ade20k':
    return _ade20k(manual_dir, split)
  if layout.name == 'cityscapes':
    return _cityscapes(manual_dir, split)
  raise ValueError(f'No file layout for {layout.name!r}.')
