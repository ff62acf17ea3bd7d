"""mIoU and pixel accuracy from a confusion matrix, as the SPADE paper reports.

The segmentation score of Table 1: a pretrained segmenter labels every
generated image, and its prediction is compared with the label map the image
was generated from. One confusion matrix is accumulated over the whole
evaluation split (not per image); pixels whose ground truth is don't-care
(any value outside [0, num_classes)) are left out. Then

* pixel accuracy = correctly labelled pixels / counted pixels;
* IoU of class c = TP / (TP + FP + FN); mIoU = the mean IoU over the classes
  that occur in the ground truth or the prediction. A class absent from both
  (0 / 0) is excluded; a class predicted but absent from the ground truth
  counts with IoU 0.

This is the computation of the segmenters' own evaluation code
(kazuto1011/deeplab-pytorch `scores`, fyu/drn `fast_hist`/`per_class_iu`
with `nanmean`).
"""
from typing import Dict

import numpy as np


def confusion_matrix(label: np.ndarray, pred: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """(num_classes, num_classes) int64 counts, rows ground truth, cols pred.

  Args:
    label: ground-truth class ids, any shape; values outside
      [0, num_classes) are don't-care and not counted.
    pred: predicted class ids, same shape, in [0, num_classes).
    num_classes: number of classes.

  Raises:
    ValueError: shapes differ or a counted prediction is out of range.
  """
  label = np.asarray(label).reshape(-1).astype(np.int64)
  pred = np.asarray(pred).reshape(-1).astype(np.int64)
  if label.shape != pred.shape:
    raise ValueError(f'label has {label.size} pixels, prediction '
                     f'{pred.size}: they must have the same shape.')
  keep = (label >= 0) & (label < num_classes)
  label, pred = label[keep], pred[keep]
  if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
    raise ValueError(f'Predicted class ids must be in [0, {num_classes}); '
                     f'got {pred.min()}..{pred.max()}.')
  return np.bincount(num_classes * label + pred,
                     minlength=num_classes ** 2).reshape(
                         num_classes, num_classes)


class ConfusionMatrix:
  """Accumulates the confusion matrix of a split, batch by batch."""

  def __init__(self, num_classes: int):
    self.num_classes = int(num_classes)
    self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)
    self.num_images = 0

  def add(self, label: np.ndarray, pred: np.ndarray) -> None:
    """Adds (N, H, W) (or (H, W)) ground truth and predictions."""
    label = np.asarray(label)
    self.matrix += confusion_matrix(label, pred, self.num_classes)
    self.num_images += 1 if label.ndim == 2 else int(label.shape[0])

  def scores(self) -> Dict[str, float]:
    return scores(self.matrix)


def scores(matrix: np.ndarray) -> Dict[str, float]:
  """miou, accuracy (both in [0, 1]), num_classes_present, num_pixels.

  Args:
    matrix: (C, C) confusion matrix, rows ground truth, columns prediction.

  Raises:
    ValueError: not a square matrix, or no counted pixel.
  """
  matrix = np.asarray(matrix, np.float64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f'A confusion matrix is square; got {matrix.shape}.')
  total = matrix.sum()
  if total == 0:
    raise ValueError('The confusion matrix counts no pixel: every ground-'
                     'truth pixel was don\'t-care (or nothing was added).')
  tp = np.diag(matrix)
  union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
  present = union > 0
  iou = tp[present] / union[present]
  return {
      'miou': float(iou.mean()),
      'accuracy': float(tp.sum() / total),
      'num_classes_present': int(present.sum()),
      'num_pixels': int(total),
  }
