"""The SPADE paper's segmenters with their projects' own test protocols.

Each segmenter labels generated images; `segmentation_metrics` scores the
labels against the label maps the images were generated from.

| name | data set | network (segmenter_nets) | classes |
|---|---|---|---|
| deeplabv2_cocostuff | COCO-Stuff | DeepLabV2MSC | 182 |
| upernet101_ade20k | ADE20K | UperNet101 | 150 |
| drn105_cityscapes | Cityscapes | DRND105 | 19 (train ids) |

Preprocessing and test protocol, as each project evaluates (default), or
`multi_scale=False`: one pass at the image's own size (no resize, no flip):

* deeplabv2_cocostuff (deeplab-pytorch `main.py test`): BGR, minus the mean
  (B 104.008, G 116.669, R 122.675), no std; the MSC model (the image, 0.5x
  and 0.75x, pixel-wise max of the logits); logits resized bilinearly to the
  label's size; argmax. Single scale: the base network alone.
* upernet101_ade20k (semantic-segmentation-pytorch `eval.py`, config
  ade20k-resnet101-upernet): RGB / 255, ImageNet mean/std; for each short
  side in (300, 375, 450, 525, 600) (long side at most 1000), the image
  resized with PIL bilinear to that scale, each side rounded up to a multiple
  of 32; the logits resized bilinearly to the label's size, softmax, averaged
  over the five sizes; argmax.
* drn105_cityscapes (fyu/drn `segment.py test --ms`): RGB / 255, mean
  (0.2901, 0.3281, 0.2870), std (0.1830, 0.1866, 0.1845) (its Cityscapes
  info.json); the image and its PIL bicubic resizes by 0.5, 0.75, 1.25, 1.5,
  1.75; the log-probabilities resized bilinearly to the image size, summed;
  argmax.

Label conventions (`labels_from_annotation` for the data sets' own files,
`labels_from_spade` for spade_jax's label ids); -1 marks don't-care:

* COCO-Stuff stuffthingmaps PNGs: 0..181 the classes, 255 unlabeled.
* ADE20K annotations: 0 unlabeled, k = class k - 1.
* Cityscapes gtFine `*_labelIds.png`: label ids mapped to the 19 train ids
  (the others don't-care).
"""
import dataclasses
import functools
from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from spade_jax import segmenter_nets
from spade_jax import torch_weights

IGNORE = -1


@dataclasses.dataclass(frozen=True)
class SegmenterInfo:
  name: str
  dataset: str  # spade_jax's config.dataset
  num_classes: int
  how_to_get: str  # Which weight file(s), from where.
  paper_miou: float
  paper_accuracy: float
  paper_fid: float


DEEPLAB_FILE = 'deeplabv2_resnet101_msc-cocostuff164k-100000.pth'
UPERNET_URL = ('http://sceneparsing.csail.mit.edu/model/pytorch/'
               'ade20k-resnet101-upernet/')

SEGMENTERS: Dict[str, SegmenterInfo] = {
    'deeplabv2_cocostuff': SegmenterInfo(
        'deeplabv2_cocostuff', 'coco_stuff', 182,
        f'COCO-Stuff is scored with DeepLab v2: get `{DEEPLAB_FILE}` from '
        'https://github.com/kazuto1011/deeplab-pytorch/releases/download/'
        f'v1.0/{DEEPLAB_FILE} and pass its path.', 37.4, 67.9, 22.6),
    'upernet101_ade20k': SegmenterInfo(
        'upernet101_ade20k', 'ade20k', 150,
        'ADE20K is scored with UperNet-101: get `encoder_epoch_50.pth` and '
        f'`decoder_epoch_50.pth` from {UPERNET_URL} and pass both paths as '
        '`ENCODER.pth,DECODER.pth`.', 38.5, 79.9, 33.9),
    'drn105_cityscapes': SegmenterInfo(
        'drn105_cityscapes', 'cityscapes', 19,
        'Cityscapes is scored with DRN-D-105: get the DRN-D-105 Cityscapes '
        'segmentation weights (a `DRNSeg` state dict) from the link in '
        'https://github.com/fyu/drn#testing (http://go.yf.io/drn-cityscapes-'
        'models) and pass its path.', 62.3, 81.9, 71.8),
}
DATASET_SEGMENTER = {info.dataset: name for name, info in SEGMENTERS.items()}

# Cityscapes label id -> train id (cityscapesScripts labels.py); others -1.
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7,
                         21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
                         28: 15, 31: 16, 32: 17, 33: 18}


def _cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
  table = np.full(max(256, int(label_ids.max(initial=0)) + 1), IGNORE,
                  np.int32)
  for label_id, train_id in _CITYSCAPES_TRAIN_IDS.items():
    table[label_id] = train_id
  label_ids = np.asarray(label_ids, np.int64)
  return np.where(label_ids >= 0, table[np.maximum(label_ids, 0)], IGNORE)


def labels_from_annotation(name: str, raw: np.ndarray) -> np.ndarray:
  """The data set's own annotation values -> segmenter classes (-1: ignore)."""
  raw = np.asarray(raw, np.int64)
  if name == 'deeplabv2_cocostuff':
    return np.where(raw < 182, raw, IGNORE).astype(np.int32)
  if name == 'upernet101_ade20k':
    return np.where((raw >= 1) & (raw <= 150), raw - 1, IGNORE).astype(
        np.int32)
  if name == 'drn105_cityscapes':
    return _cityscapes_train_ids(raw).astype(np.int32)
  raise ValueError(f'Unknown segmenter {name!r}; one of {sorted(SEGMENTERS)}.')


def labels_from_spade(name: str, label: np.ndarray) -> np.ndarray:
  """spade_jax label ids (input_pipeline.map_labels) -> segmenter classes.

  COCO-Stuff ids are the stuffthingmaps values (182 = don't-care); ADE20K
  ids are annotation - 1 (150 = "other", unlabeled); Cityscapes ids are the
  label ids.
  """
  label = np.asarray(label, np.int64)
  if name == 'deeplabv2_cocostuff':
    return np.where(label < 182, label, IGNORE).astype(np.int32)
  if name == 'upernet101_ade20k':
    return np.where(label < 150, label, IGNORE).astype(np.int32)
  if name == 'drn105_cityscapes':
    return _cityscapes_train_ids(label).astype(np.int32)
  raise ValueError(f'Unknown segmenter {name!r}; one of {sorted(SEGMENTERS)}.')


def resize_labels_nearest(label: np.ndarray, size: Tuple[int, int]
                          ) -> np.ndarray:
  """PIL-NEAREST resize of an (H, W) id map to (height, width) (SPADE's)."""
  label = np.asarray(label)
  if label.shape == tuple(size):
    return label
  rows = np.minimum(((np.arange(size[0]) + 0.5) * label.shape[0]
                     / size[0]).astype(np.int64), label.shape[0] - 1)
  cols = np.minimum(((np.arange(size[1]) + 0.5) * label.shape[1]
                     / size[1]).astype(np.int64), label.shape[1] - 1)
  return label[rows[:, None], cols[None, :]]


def _pil_resize(images: np.ndarray, size_hw: Tuple[int, int],
                resample) -> np.ndarray:
  """(N, H, W, 3) uint8 resized with PIL to (h, w), as the projects do."""
  if images.shape[1:3] == tuple(size_hw):
    return images
  return np.stack([np.asarray(Image.fromarray(im).resize(
      (size_hw[1], size_hw[0]), resample)) for im in images])


# ---------------------------------------------------------------------------
# Networks, their weights and per-scale forward passes.

_DEEPLAB_MEAN_BGR = np.array([104.008, 116.669, 122.675], np.float32)
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_DRN_MEAN = np.array([0.29010095242892997, 0.32808144844279574,
                      0.28696394422942517], np.float32)
_DRN_STD = np.array([0.1829540508368939, 0.18656561047509476,
                     0.18447508988480435], np.float32)
UPERNET_SHORT_SIDES = (300, 375, 450, 525, 600)
UPERNET_MAX_SIDE = 1000
UPERNET_PADDING = 32
DRN_SCALES = (0.5, 0.75, 1.25, 1.5, 1.75)


def make_network(name: str):
  """The Flax network of segmenter `name`."""
  if name == 'deeplabv2_cocostuff':
    return segmenter_nets.DeepLabV2MSC(182)
  if name == 'upernet101_ade20k':
    return segmenter_nets.UperNet101(150)
  if name == 'drn105_cityscapes':
    return segmenter_nets.DRND105(19)
  raise ValueError(f'Unknown segmenter {name!r}; one of {sorted(SEGMENTERS)}.')


def read_weights(name: str, weights: str) -> Dict[str, np.ndarray]:
  """The published file(s) as one state dict keyed like the network."""
  info = SEGMENTERS[name]
  if name == 'upernet101_ade20k':
    paths = [p.strip() for p in (weights or '').split(',') if p.strip()]
    if len(paths) != 2:
      raise FileNotFoundError(
          f'UperNet needs two weight files, ENCODER.pth,DECODER.pth; got '
          f'{weights!r}. {info.how_to_get}')
    state = segmenter_nets.with_prefix(
        torch_weights.read_state_dict(paths[0], info.how_to_get), 'encoder.')
    state.update(segmenter_nets.with_prefix(
        torch_weights.read_state_dict(paths[1], info.how_to_get),
        'decoder.'))
    return state
  state = torch_weights.read_state_dict(weights, info.how_to_get)
  if name == 'deeplabv2_cocostuff' and not any(k.startswith('base.')
                                               for k in state):
    # The DeepLabV2 base alone (without the MSC wrapper) has the same keys
    # less the `base.` prefix.
    state = segmenter_nets.with_prefix(state, 'base.')
  return state


def load_variables(name: str, weights: str) -> Dict:
  """Flax variables of segmenter `name` from its published weight file(s)."""
  if name not in SEGMENTERS:
    raise ValueError(f'Unknown segmenter {name!r}; one of '
                     f'{sorted(SEGMENTERS)}.')
  state = read_weights(name, weights)
  template = segmenter_nets.variable_shapes(make_network(name),
                                            (1, 64, 64, 3))
  return segmenter_nets.variables_from_state_dict(
      template, state, f'{name} weights {weights}',
      SEGMENTERS[name].how_to_get)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 5))
def _scale_scores(net, name: str, multi_scale: bool, variables, x, out_hw):
  """Per-class scores of one input scale at out_hw (summed over scales).

  DeepLab: logits (MSC inside the network); UperNet: softmax probabilities;
  DRN: log-probabilities, each resized bilinearly to out_hw, as the
  projects combine them.
  """
  if name == 'deeplabv2_cocostuff':
    logits = net.apply(variables, x, multi_scale=multi_scale)
    return segmenter_nets.resize_bilinear(logits, out_hw)
  if name == 'upernet101_ade20k':
    logits = net.apply(variables, x)
    return jax.nn.softmax(segmenter_nets.resize_bilinear(logits, out_hw),
                          axis=-1)
  return segmenter_nets.resize_bilinear(net.apply(variables, x), out_hw)


class Segmenter:
  """Labels uint8 RGB images with one of the paper's segmenters.

  `predict(images)` takes (N, H, W, 3) uint8 RGB images of one size and
  returns (N, H, W) int32 class ids, by the project's own protocol
  (multi_scale=True) or one pass at the images' size. `network` replaces
  the segmenter's network (same inputs and outputs; for tests).
  """

  def __init__(self, name: str, variables: Dict, multi_scale: bool = True,
               network=None):
    if name not in SEGMENTERS:
      raise ValueError(f'Unknown segmenter {name!r}; one of '
                       f'{sorted(SEGMENTERS)}.')
    self.name = name
    self.info = SEGMENTERS[name]
    self.multi_scale = multi_scale
    self._variables = jax.device_put(variables)
    self._net = network if network is not None else make_network(name)

  @classmethod
  def load(cls, name: str, weights: str, multi_scale: bool = True):
    return cls(name, load_variables(name, weights), multi_scale)

  def inputs(self, images: np.ndarray) -> List[np.ndarray]:
    """The network inputs (float32 NHWC), one per scale of the protocol."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'Expected (N, H, W, 3) uint8 RGB images, got '
                       f'{images.shape} {images.dtype}.')
    h, w = images.shape[1:3]
    if self.name == 'deeplabv2_cocostuff':
      # MSC resizes inside the network.
      return [images[..., ::-1].astype(np.float32) - _DEEPLAB_MEAN_BGR]
    if self.name == 'upernet101_ade20k':
      sizes = [(h, w)]
      if self.multi_scale:
        sizes = []
        for short in UPERNET_SHORT_SIDES:
          scale = min(short / min(h, w), UPERNET_MAX_SIDE / max(h, w))
          sizes.append(tuple(-(-int(n * scale) // UPERNET_PADDING)
                             * UPERNET_PADDING for n in (h, w)))
      return [(_pil_resize(images, s, Image.BILINEAR).astype(np.float32)
               / 255 - _IMAGENET_MEAN) / _IMAGENET_STD for s in sizes]
    sizes = [(h, w)]
    if self.multi_scale:
      sizes += [(int(h * s), int(w * s)) for s in DRN_SCALES]
    return [(_pil_resize(images, s, Image.BICUBIC).astype(np.float32)
             / 255 - _DRN_MEAN) / _DRN_STD for s in sizes]

  def class_scores(self, images: np.ndarray) -> jax.Array:
    """(N, H, W, classes): the fused per-scale scores argmax is taken of.

    UperNet: the mean of the scales' probabilities; DRN: the sum of their
    log-probabilities; DeepLab: the MSC logits.
    """
    out_hw = tuple(np.shape(images)[1:3])
    inputs = self.inputs(images)
    total = None
    for x in inputs:
      s = _scale_scores(self._net, self.name, self.multi_scale,
                        self._variables, jnp.asarray(x), out_hw)
      total = s if total is None else total + s
    if self.name == 'upernet101_ade20k':
      total = total / len(inputs)
    return total

  def predict(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.argmax(self.class_scores(images), axis=-1),
                      np.int32)
