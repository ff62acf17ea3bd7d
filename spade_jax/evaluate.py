r"""Evaluation: FID, mIoU and pixel accuracy of generated images.

  python -m spade_jax.main --config CONFIG --workdir DIR --mode eval \
      --config.inception_weights=pt_inception-2015-12-05-6726825d.pth \
      [--config.segmenter_weights=W]

Generates one image per label map of `config.eval_split` (the first
`config.fid_num_images`, or all) with the latest checkpoint's eval-mode
generator (EMA weights when training kept them; VAE models draw z from the
prior, seeded by config.seed), and computes the FID between the generated and
the real images with the standard pytorch-fid Inception features (see
`fid.py`). Both sets are quantised to uint8 first, as image files would be.
With config.fid_real_stats (a pytorch-fid .npz, e.g. from `python -m
spade_jax.fid --real DIR --save_stats F.npz`) the real images' statistics
come from that file instead. The score goes to TensorBoard (`eval/fid` at
the checkpoint's step, in the workdir) and is printed.

With `config.segmenter_weights` (the published weights of the data set's
segmenter, see `segmenters.py`: DeepLab v2 for coco_stuff, UperNet-101 for
ade20k, DRN-D-105 for cityscapes), the same generated images are also
segmented and scored against the label maps they were generated from: mIoU
and pixel accuracy over the split (`segmentation_metrics.py`), written as
`eval/miou` and `eval/accuracy` and printed. `config.segmenter_single_scale`
runs one pass at the images' size instead of the segmenter's own protocol.

For folders of generated images (e.g. made by the reference's test.py):

  python -m spade_jax.evaluate --segmenter NAME --weights W \
      --images DIR --labels DIR [--single_scale]

NAME: deeplabv2_cocostuff, upernet101_ade20k or drn105_cityscapes; W the
published weights file (for UperNet `ENCODER.pth,DECODER.pth`). --labels
holds the data set's own annotation files (COCO-Stuff stuffthingmaps, ADE20K
annotations, Cityscapes `*_labelIds.png`), paired with the images by file
name stem (a `_gtFine_labelIds` / `_leftImg8bit` suffix is ignored), each
resized to its image's size with nearest-neighbour (as SPADE resizes the
label maps it generates from). The result is printed last as one JSON line:
miou, accuracy (in [0, 1]), num_images, ...
"""
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np
from PIL import Image

from spade_jax import fid
from spade_jax import generation
from spade_jax import inception
from spade_jax import input_pipeline
from spade_jax import model_io
from spade_jax import run_config
from spade_jax import segmentation_metrics
from spade_jax import segmenters
from spade_jax import train_state
from spade_jax import visualize


def load_inception(config: ml_collections.ConfigDict) -> Dict:
  """The FID Inception variables named by config.inception_weights."""
  path = config.inception_weights
  if not path:
    raise FileNotFoundError(
        'Evaluation computes FID and needs config.inception_weights. '
        + inception.HOW_TO_GET)
  return inception.load_inception_params(path)


def load_segmenter(config: ml_collections.ConfigDict
                   ) -> Optional[segmenters.Segmenter]:
  """The data set's segmenter when config.segmenter_weights is set."""
  weights = config.segmenter_weights
  if not weights:
    return None
  name = segmenters.DATASET_SEGMENTER.get(config.dataset)
  if name is None:
    raise ValueError(
        f'config.segmenter_weights is set, but data set '
        f'{config.dataset!r} has no segmenter of the paper\'s '
        'protocol (coco_stuff, ade20k and cityscapes do); unset it.')
  return segmenters.Segmenter.load(
      name, weights,
      multi_scale=not config.segmenter_single_scale)


def check_same_architecture(config, workdir: str) -> None:
  """The run's saved config and this one must build the same networks."""
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    return
  saved = model_io.load_config(workdir)
  diff = [k for k in train_state.ARCHITECTURE_KEYS
          if k in saved and k in config and saved[k] != config[k]]
  # Whether the checkpoints hold EMA weights changes their structure (a
  # model folder holds the inference weights only).
  if not model_io.is_model_folder(workdir) and (
      (saved.ema_decay > 0) != (config.ema_decay > 0)):
    diff.append('ema_decay')
  if diff:
    raise ValueError(
        f'{workdir} was trained with another architecture than this config: '
        + ', '.join(f'{k}={saved[k]!r} there vs {config[k]!r} here'
                    for k in diff)
        + '. Evaluate with the config the run was trained with.')


def make_generate_fn(config):
  """jit(eval-mode generator)(g_vars, label, instance, rng); VAE models draw
  z ~ N(0, 1) from `rng`."""
  generate = generation.make_generate_fn(config)

  @jax.jit
  def generate_sampled(g_vars, label, instance, rng):
    return generate(g_vars, label, instance,
                    generation.prior_z(config, label.shape[0], rng))
  return generate_sampled


def real_statistics_file(config) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """config.fid_real_stats as (mu, sigma), or None when not set."""
  path = config.fid_real_stats
  return fid.load_statistics(path) if path else None


def fid_statistics(config, g_vars, data_dir: str,
                   extractor: fid.FeatureExtractor,
                   num_images: int = 0, with_real: bool = True,
                   on_generated: Optional[Callable[[np.ndarray, np.ndarray],
                                                   None]] = None
                   ) -> Tuple[fid.RunningStatistics,
                              Optional[fid.RunningStatistics]]:
  """Inception statistics of (generated, real) images of the eval split.

  `with_real=False` skips the real images (returns None for them): training
  computes their statistics once and reuses them. `on_generated(images,
  labels)`, when given, also gets each batch of generated uint8 images with
  the label maps they were generated from.
  """
  generate = make_generate_fn(config)
  dataset = input_pipeline.create_split(
      config, data_dir, config.eval_split, train=False, process_index=0,
      process_count=1)
  fake_stats, real_stats = fid.RunningStatistics(), fid.RunningStatistics()
  rng = jax.random.PRNGKey(config.seed)
  for i, batch in enumerate(input_pipeline.numpy_batches(dataset)):
    keep = np.array(batch['valid'], bool)
    if num_images:
      keep &= np.cumsum(keep) <= num_images - fake_stats.count
    if not keep.any():
      break
    fake = np.asarray(generate(g_vars, batch['label'], batch['instance'],
                               jax.random.fold_in(rng, i)))
    fake_uint8 = visualize.image_to_uint8(fake[keep])
    fake_stats.add(extractor(fake_uint8))
    if on_generated is not None:
      on_generated(fake_uint8, np.asarray(batch['label'])[keep])
    if with_real:
      real_stats.add(extractor(visualize.image_to_uint8(
          batch['image'][keep])))
    if num_images and fake_stats.count >= num_images:
      break
  return fake_stats, real_stats if with_real else None


class TrainingFID:
  """FID every `config.fid_every_steps` training steps (process 0 only).

  Loads the Inception weights once, computes the real images' statistics at
  the first call and reuses them; each call generates the eval images with
  the current generator variables.
  """

  def __init__(self, config: ml_collections.ConfigDict, data_dir: str):
    self._config = config
    self._data_dir = data_dir
    self._num_images = int(config.fid_num_images)
    self._extractor = fid.FeatureExtractor(load_inception(config),
                                           batch_size=config.batch_size)
    self._real = real_statistics_file(config)

  def __call__(self, g_vars) -> float:
    fake, real = fid_statistics(self._config, g_vars, self._data_dir,
                                self._extractor, self._num_images,
                                with_real=self._real is None)
    if self._real is None:
      self._real = real.mean_cov()
    return fid.frechet_distance(*self._real, *fake.mean_cov())


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             step: Optional[int] = None) -> Dict[str, float]:
  """FID (and mIoU, accuracy) of checkpoint `step` (default the latest).

  `workdir` may also be a model folder (`spade_jax.convert` or `export`
  output, e.g. a converted reference checkpoint; its scores are written at
  step 0). Returns {'fid': ...} plus 'miou' and 'accuracy' with a
  segmenter; each is written to TensorBoard as eval/NAME and printed.
  """
  inception_vars = load_inception(config)  # Fails early without weights.
  segmenter = load_segmenter(config)
  real_file = real_statistics_file(config)  # And with a bad statistics file.
  run_config.validate_config(config)
  check_same_architecture(config, workdir)
  _, variables, step = train_state.load_inference_variables(
      workdir, step=step, use_ema=True, config=config)
  data_dir = run_config.resolve_data_dir(config, workdir)
  extractor = fid.FeatureExtractor(inception_vars,
                                   batch_size=config.batch_size)
  confusion, on_generated = None, None
  if segmenter is not None:
    confusion = segmentation_metrics.ConfusionMatrix(
        segmenter.info.num_classes)

    def score_batch(images, labels):
      confusion.add(segmenters.labels_from_spade(segmenter.name, labels),
                    segmenter.predict(images))
    on_generated = score_batch
  fake_stats, real_stats = fid_statistics(
      config, variables['generator'], data_dir, extractor,
      int(config.fid_num_images), with_real=real_file is None,
      on_generated=on_generated)
  real = real_file or real_stats.mean_cov()
  score = fid.frechet_distance(*real, *fake_stats.mean_cov())
  results = {'fid': score}
  source = (f'checkpoint step {step}' if step is not None
            else f'model folder {workdir}')
  real_what = (f'the real statistics {config.fid_real_stats}' if real_file
               else f'{real_stats.count} real images')
  message = (f'FID {score:.4f}: {fake_stats.count} generated vs '
             f'{real_what} of split {config.eval_split!r}, {source}.')
  if confusion is not None:
    seg = confusion.scores()
    results.update(miou=seg['miou'], accuracy=seg['accuracy'])
    protocol = 'multi-scale' if segmenter.multi_scale else 'single-scale'
    message += (f' mIoU {100 * seg["miou"]:.2f}, accuracy '
                f'{100 * seg["accuracy"]:.2f} ({segmenter.name}, {protocol}, '
                f'{confusion.num_images} images).')
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  with metric_writers.ensure_flushes(writer):
    writer.write_scalars(0 if step is None else step,
                         {f'eval/{k}': v for k, v in results.items()})
  logging.info(message)
  if jax.process_index() == 0:
    print(message)
  return results


# ---------------------------------------------------------------------------
# Folders of generated images: `python -m spade_jax.evaluate ...`.

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
# Dropped from file name stems before pairing images with labels.
_NAME_SUFFIXES = ('_gtFine_labelIds', '_leftImg8bit', '_labelIds')


def _stem(filename: str) -> str:
  stem = os.path.splitext(os.path.basename(filename))[0]
  for suffix in _NAME_SUFFIXES:
    if stem.endswith(suffix):
      return stem[:-len(suffix)]
  return stem


def _by_stem(folder: str, what: str) -> Dict[str, str]:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'{what} folder not found: {folder!r}.')
  out = {}
  for name in sorted(os.listdir(folder)):
    if not name.lower().endswith(IMAGE_EXTENSIONS):
      continue
    stem = _stem(name)
    if stem in out:
      raise ValueError(f'{what} folder {folder} has two files for '
                       f'{stem!r}: {os.path.basename(out[stem])} and {name}.')
    out[stem] = os.path.join(folder, name)
  if not out:
    raise ValueError(f'{what} folder {folder} holds no image file '
                     f'({", ".join(IMAGE_EXTENSIONS)}).')
  return out


def pair_images_with_labels(images_dir: str, labels_dir: str
                            ) -> List[Tuple[str, str]]:
  """(image, label) paths matched by file name stem; every image needs one."""
  images = _by_stem(images_dir, 'Images')
  labels = _by_stem(labels_dir, 'Labels')
  unmatched = [os.path.basename(images[s]) for s in images if s not in labels]
  if unmatched:
    raise ValueError(
        f'{len(unmatched)} image(s) of {images_dir} have no label file of '
        f'the same name in {labels_dir}, e.g. {unmatched[:5]}.')
  return [(images[s], labels[s]) for s in images]


def read_label_map(path: str) -> np.ndarray:
  """A single-channel annotation PNG as integer ids."""
  with Image.open(path) as im:
    label = np.asarray(im)
  if label.ndim != 2:
    raise ValueError(
        f'{path} is not a single-channel id map (shape {label.shape}): '
        "--labels needs the data set's annotation files (class ids), not "
        'colour renderings.')
  return label


def evaluate_folders(name: str, weights: str, images_dir: str,
                     labels_dir: str, multi_scale: bool = True
                     ) -> Dict[str, object]:
  """mIoU and pixel accuracy of a folder of generated images.

  Args:
    name: segmenter (segmenters.SEGMENTERS).
    weights: its published weights (UperNet: `ENCODER.pth,DECODER.pth`).
    images_dir: generated RGB images.
    labels_dir: the data set's annotation files of the same names.
    multi_scale: the segmenter project's own protocol (else one pass at the
      image's size).

  Returns:
    segmenter, multi_scale, miou, accuracy, num_images, num_classes_present,
    num_pixels.
  """
  if name not in segmenters.SEGMENTERS:
    raise ValueError(f'Unknown --segmenter {name!r}; one of '
                     f'{sorted(segmenters.SEGMENTERS)}.')
  pairs = pair_images_with_labels(images_dir, labels_dir)
  segmenter = segmenters.Segmenter.load(name, weights, multi_scale)
  confusion = segmentation_metrics.ConfusionMatrix(
      segmenter.info.num_classes)
  for i, (image_path, label_path) in enumerate(pairs):
    with Image.open(image_path) as im:
      image = np.asarray(im.convert('RGB'))
    label = segmenters.resize_labels_nearest(read_label_map(label_path),
                                             image.shape[:2])
    confusion.add(segmenters.labels_from_annotation(name, label),
                  segmenter.predict(image[None])[0])
    if (i + 1) % 100 == 0:
      logging.info('%d / %d images segmented', i + 1, len(pairs))
  result = {'segmenter': name, 'multi_scale': multi_scale}
  result.update(confusion.scores())
  result['num_images'] = confusion.num_images
  return result


def define_flags() -> None:
  """The folder-evaluation flags (only when run as a program)."""
  flags.DEFINE_enum('segmenter', None, sorted(segmenters.SEGMENTERS),
                    'Which segmenter (the data set\'s).')
  flags.DEFINE_string('weights', None, 'Its published weights file; for '
                      'UperNet ENCODER.pth,DECODER.pth.')
  flags.DEFINE_string('images', None, 'Folder of generated images.')
  flags.DEFINE_string('labels', None, "Folder of the data set's annotation "
                      'files, named like the images.')
  flags.DEFINE_bool('single_scale', False, "One pass at the images' own size "
                    "instead of the segmenter project's multi-scale test.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  fl = flags.FLAGS
  try:
    result = evaluate_folders(fl.segmenter, fl.weights, fl.images, fl.labels,
                              multi_scale=not fl.single_scale)
  except (FileNotFoundError, ValueError) as e:
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'{result["segmenter"]}: mIoU {100 * result["miou"]:.2f}, '
        f'accuracy {100 * result["accuracy"]:.2f} on '
        f'{result["num_images"]} images.')
  print(json.dumps(result))


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['segmenter', 'weights', 'images', 'labels'])
  app.run(main)
