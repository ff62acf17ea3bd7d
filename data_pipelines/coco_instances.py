"""COCO-Stuff instance maps from the COCO `instances_*.json` annotations.

The reference SPADE repo makes its `train_inst` / `val_inst` folders with
`datasets/coco_generate_instance_map.py`; this module does the same per
image, so `data_pipelines.build --dataset coco_stuff` can start from the
official release (images, `stuffthingmaps_trainval2017`, annotations):

* the instance map starts as a copy of the label map (the stuff labels, so
  their boundaries are instance edges too);
* the image's annotations are taken in the file's order (crowd ones
  included); each one whose segmentation is a polygon list (crowd RLE
  masks are skipped) paints every polygon with its running number 0, 1,
  2, ... (the number counts painted annotations, not polygons), rasterised
  by `skimage.draw.polygon` at (y - 1, x - 1) as the reference does.

One difference: the reference writes uint8, where a number above 255 would
wrap (or fail with NumPy 2); here such maps are kept exactly (16-bit PNG).

Needs the `coco` extra: pycocotools (reads the annotation file, as the
reference does) and scikit-image (the same polygon rasteriser).
"""
import threading
from typing import Dict, List, Sequence

import numpy as np

# Loaded annotation files: path -> {image file stem: [polygon lists]}.
_CACHE: Dict[str, Dict[str, List[List[List[float]]]]] = {}
_LOCK = threading.Lock()


class AnnotationError(ValueError):
  """An annotation file that cannot be used (the message names it)."""


def _missing_extra(e: ImportError) -> AnnotationError:
  return AnnotationError(
      f'building COCO-Stuff from the official release needs pycocotools and '
      f'scikit-image (pip install "spade_jax[coco]"): {e}')


def read_annotations(path: str) -> Dict[str, List[List[List[float]]]]:
  """An instances_*.json -> {image stem: one polygon list per annotation}.

  Only annotations with polygon segmentations are kept (the ones the
  reference paints), in the file's order. Every image of the file is
  present, with [] when nothing is painted. Cached per path (thread-safe).
  """
  with _LOCK:
    if path in _CACHE:
      return _CACHE[path]
    try:
      from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
    except ImportError as e:  # An optional extra: only this layout needs it.
      raise _missing_extra(e) from None
    try:
      coco = COCO(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise AnnotationError(f'{path}: cannot read the COCO annotations: '
                            f'{e}') from None
    index = {}
    for image_id in coco.getImgIds():
      info = coco.loadImgs(image_id)[0]
      stem = str(info['file_name']).rsplit('.', 1)[0]
      polygons = []
      for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id,
                                              iscrowd=None)):
        segmentation = ann.get('segmentation')
        if isinstance(segmentation, list):
          polygons.append([list(map(float, seg)) for seg in segmentation])
      index[stem] = polygons
    _CACHE[path] = index
    return index


def instance_map(label: np.ndarray,
                 annotations: Sequence[Sequence[Sequence[float]]]
                 ) -> np.ndarray:
  """The reference's instance map of one image; int32 (H, W).

  Args:
    label: the raw label map (H, W).
    annotations: per annotation, its polygons ([x0, y0, x1, y1, ...]).
  """
  try:
    from skimage.draw import polygon  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _missing_extra(e) from None
  inst = np.array(label, np.int32, copy=True)
  h, w = inst.shape
  for count, polygons in enumerate(annotations):
    for seg in polygons:
      xy = np.asarray(seg, np.float64).reshape(-1, 2)
      rr, cc = polygon(xy[:, 1] - 1, xy[:, 0] - 1)
      # COCO polygons lie inside the image; a stray one would make the
      # reference fail with an IndexError, here it is clipped.
      keep = (rr < h) & (cc < w)
      inst[rr[keep], cc[keep]] = count
  return inst
