"""Cheap image metrics computed on the host (numpy).

`class_color_error` measures whether a generator paints each class in the
right colour: for every class, the mean colour of the generated pixels of
that class against the mean colour of the real pixels of that class. It is
what a semantic-synthesis model learns first, so it shows learning early,
long before FID does.
"""
from typing import Tuple

import numpy as np


def class_color_sums(fake: np.ndarray, real: np.ndarray, label: np.ndarray,
                     num_classes: int) -> Tuple[np.ndarray, ...]:
  """Per-class colour sums of (N,H,W,3) fake and real, and pixel counts."""
  label = np.asarray(label).reshape(-1)
  count = np.bincount(label, minlength=num_classes)[:num_classes]
  sums = []
  for images in (fake, real):
    flat = np.asarray(images, np.float64).reshape(-1, 3)
    sums.append(np.stack([np.bincount(label, flat[:, c], minlength=num_classes)
                          [:num_classes] for c in range(3)], axis=-1))
  return sums[0], sums[1], count


def class_color_error(fake_sum: np.ndarray, real_sum: np.ndarray,
                      count: np.ndarray) -> float:
  """Mean over present classes of the mean |channel difference| of colours."""
  present = count > 0
  if not present.any():
    raise ValueError('No labelled pixels to compare.')
  n = count[present, None]
  diff = np.abs(fake_sum[present] / n - real_sum[present] / n)
  return float(diff.mean())
