"""Small numpy helpers to turn model inputs and outputs into viewable images."""
from typing import Optional, Sequence

import numpy as np

from spade_jax import label_maps


# The palette lives in `label_maps`; this name stays for the callers.
default_palette = label_maps.default_palette


def colorize_labels(label: np.ndarray,
                    colors: Optional[Sequence[Sequence[int]]] = None
                    ) -> np.ndarray:
  """Colours an integer label map.

  Args:
    label: integer array (..., H, W) of class ids.
    colors: one [r, g, b] per class id (e.g. DatasetInfo.colors); ids beyond
      it, and every id when None, use `default_palette`.

  Returns:
    uint8 (..., H, W, 3).
  """
  label = np.asarray(label)
  if label.size and label.min() < 0:
    raise ValueError(f'Negative class id {label.min()} in label map.')
  num = max(int(label.max()) + 1 if label.size else 1, 1)
  return label_maps.palette_for(max(num, 256), colors)[label]


def image_to_uint8(image: np.ndarray) -> np.ndarray:
  """Maps a float image in [-1, 1] to uint8 [0, 255] (rounded, clipped)."""
  image = (np.asarray(image, np.float32) + 1.0) * 127.5
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def edges_to_uint8(edges: np.ndarray) -> np.ndarray:
  """Maps an edge map in [0, 1] to a uint8 gray image (edges white)."""
  return np.clip(np.round(np.asarray(edges, np.float32) * 255.0), 0,
                 255).astype(np.uint8)
