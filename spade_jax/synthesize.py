r"""Label maps in, images out: `python -m spade_jax.synthesize`.

  python -m spade_jax.synthesize --model OUT --labels PATH --output DIR \
      [--instances PATH] [--images PATH] [--num_samples K] [--style IMAGE] \
      [--seed S] [--data_dir DATA]

--model is a model folder (`spade_jax.export` or `spade_jax.convert`).
--labels, --instances and --images are PNG files or folders; instance maps and
real images are matched to label maps by file name (without extension).
Label maps hold the raw ids as the data set stores them (gray 8- or 16-bit
PNGs, or RGB with equal channels; 255 is don't-care, ADE20K ids are shifted as
the data pipeline does), or are RGB maps in the model's class colours (from
--data_dir's dataset_info.json, else the model's classes.json, else the
synthetic set's or the default palette); a colour that is no class colour is
an error naming it. The rules are `label_maps.py`'s.
Maps of any size are brought to the model's size like the data pipeline does
(PIL nearest for label and instance maps, PIL bicubic for images), by default
a plain resize (`--preprocess fixed`, what the reference does at test time);
`--preprocess config` applies the model config's evaluation preprocessing.
A model with instance maps and no --instances uses the label map itself.

VAE models draw `--num_samples` images per label map from random z, or take
the style of `--style IMAGE` through the encoder. Random draws are a function
of --seed and the file name.

DIR gets `synthesized/NAME.png` (`NAME_k.png` for several samples),
`label/NAME.png` (colourised; colours from --data_dir's dataset_info.json, the
synthetic set's own, or a default palette), `real/NAME.png` when --images has
a match, and `index.html` showing them side by side. A file that cannot be
read or used is reported by name; the others are still done, and the exit
status is non-zero at the end, with a summary.
"""
import dataclasses
import html
import os
import sys
import zlib
from typing import List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from PIL import Image
import tensorflow as tf

from data_pipelines import records
from data_pipelines import scenes
from spade_jax import input_pipeline
from spade_jax import label_maps
from spade_jax import model_io
from spade_jax import visualize
from spade_jax import xla_cpu
from spade_jax.synthesizer import Synthesizer

MAP_EXTENSIONS = ('.png',)
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
PREPROCESS_CHOICES = ('fixed', 'config')


class InputError(ValueError):
  """A label map, instance map or image that cannot be used."""


@dataclasses.dataclass
class Result:
  """What happened to one label map."""
  name: str
  label_path: str
  synthesized: List[str] = dataclasses.field(default_factory=list)
  label: Optional[str] = None
  real: Optional[str] = None
  error: Optional[str] = None


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------
def list_files(path: str, extensions: Sequence[str], what: str) -> List[str]:
  """A file, or the files of a folder with one of `extensions`, sorted."""
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
    found = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(tuple(extensions)))
    if not found:
      raise InputError(f'No {what} ({", ".join(extensions)}) in {path}.')
    return found
  raise InputError(f'{what} path {path} does not exist.')


def stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def by_stem(paths: Sequence[str]) -> dict:
  return {stem(p): p for p in paths}


def _which(what: str, path: str) -> str:
  """How messages name a file: the label map's path is said once, outside."""
  return what if what == 'label map' else f'{what} {path}'


def read_map(path: str, what: str, palette: Optional[np.ndarray] = None,
             config=None) -> np.ndarray:
  """A label/instance PNG -> int32 (H, W) of its raw values.

  `label_maps` rules: gray PNGs (or RGB with equal channels) hold the raw
  ids; with `palette` (the model's class colours) a colour map's classes
  become the raw ids of `config`'s data set (ADE20K shift, 255 don't care).
  """
  try:
    ids, by_palette = label_maps.read_label_map(path, palette=palette,
                                                name=_which(what, path))
  except label_maps.LabelMapError as e:
    raise InputError(str(e)) from None
  if by_palette:
    ids = label_maps.class_ids_to_raw(
        ids, dataset=config.dataset,
        label_nc=int(config.label_nc),
        contain_dontcare_label=bool(config.contain_dontcare_label))
  return ids


def read_image(path: str, what: str = 'image') -> np.ndarray:
  """An image file -> uint8 (H, W, 3) RGB."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f'cannot read the {what} {path}: {e}') from None


def label_colors(config, data_dir: Optional[str] = None,
                 model_dir: Optional[str] = None):
  """Colours per class id: a built data set's, the model's classes.json, the
  synthetic set's, or None."""
  if data_dir:
    return records.DatasetInfo.load(data_dir).colors
  classes = model_io.load_classes(model_dir) if model_dir else None
  if classes and classes.get('colors'):
    return classes['colors']
  if config.dataset == 'synthetic':
    return [list(c) for c in scenes.CLASS_COLORS]
  return None


def model_palette(config, colors) -> np.ndarray:
  """The class colours a colour label map is read with (one per class)."""
  n = int(config.label_nc) + (1 if config.contain_dontcare_label else 0)
  return label_maps.palette_for(n, colors)


# ---------------------------------------------------------------------------
# Preprocessing, like the data pipeline.
# ---------------------------------------------------------------------------
def make_preprocess(config, mode: str) -> input_pipeline.Preprocess:
  """'fixed': resize to the model's size; 'config': its eval preprocessing."""
  if mode == 'config':
    return input_pipeline.preprocess_from_config(config, train=False)
  if mode != 'fixed':
    raise ValueError(f'preprocess={mode!r}: expected one of '
                     f'{PREPROCESS_CHOICES}.')
  return input_pipeline.Preprocess(
      mode='fixed', load_size=int(config.crop_size),
      crop_size=int(config.crop_size),
      aspect_ratio=float(config.aspect_ratio))


def prepare(config, pre: input_pipeline.Preprocess, raw_label: np.ndarray,
            instance: Optional[np.ndarray], image: Optional[np.ndarray]):
  """Resizes/crops like the pipeline; maps raw ids to model class ids.

  Returns:
    (label int32 (H, W), instance int32 (H, W) or None, image uint8
    (H, W, 3) or None).
  """
  h, w = raw_label.shape
  if instance is not None and instance.shape != (h, w):
    raise InputError(f'the instance map is {instance.shape[1]}x'
                     f'{instance.shape[0]} but the label map is {w}x{h}.')
  if image is not None and image.shape[:2] != (h, w):
    # The pipeline requires equal sizes; a real image only for display is
    # brought to the label map's size first.
    image = np.asarray(input_pipeline.resize_bicubic(
        tf.constant(image), h, w))
  maps = {'label': tf.constant(raw_label)}
  if instance is not None:
    maps['instance'] = tf.constant(instance)
  base = image if image is not None else np.zeros((h, w, 3), np.uint8)
  out_image, maps = input_pipeline.transform(
      tf.constant(base), maps, pre, tf.constant([0, 0], tf.int64))
  label = label_maps.dataset_to_class_ids(
      maps['label'].numpy().astype(np.int32),
      dataset=config.dataset, label_nc=int(config.label_nc),
      contain_dontcare_label=bool(config.contain_dontcare_label))
  inst = maps['instance'].numpy() if instance is not None else None
  return (label, inst,
          out_image.numpy() if image is not None else None)


def style_code_source(synth: Synthesizer, pre: input_pipeline.Preprocess,
                      path: str) -> np.ndarray:
  """The style image, preprocessed and in [-1, 1]: (1, H, W, 3) float32."""
  image = read_image(path, 'style image')
  out, _ = input_pipeline.transform(tf.constant(image), {}, pre,
                                    tf.constant([0, 0], tf.int64))
  out = input_pipeline.normalize_image(out).numpy()
  if out.shape[:2] != synth.image_size:
    raise InputError(f'the style image {path} is {out.shape[:2]} after '
                     f'preprocessing; the model needs {synth.image_size}.')
  return out[None]


# ---------------------------------------------------------------------------
# Synthesis.
# ---------------------------------------------------------------------------
def _file_rng(seed: int, name: str) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed),
                            zlib.crc32(name.encode()) & 0x7fffffff)


def latents(synth: Synthesizer, name: str, num_samples: int, seed: int,
            style: Optional[np.ndarray]) -> Optional[np.ndarray]:
  """(K, z_dim) codes for a VAE model: random, or encoded from the style."""
  if not synth.config.use_vae:
    return None
  rng = _file_rng(seed, name)
  if style is not None:
    return np.concatenate([
        synth.encode(style, jax.random.fold_in(rng, k))
        for k in range(num_samples)])
  return np.asarray(jax.random.normal(rng, (num_samples,
                                            synth.config.z_dim)))


def synthesize_one(synth: Synthesizer, pre, label_path: str,
                   instance_path: Optional[str], image_path: Optional[str],
                   output_dir: str, *, num_samples: int, seed: int,
                   style: Optional[np.ndarray], colors) -> Result:
  """Generates and writes the images of one label map (raises InputError)."""
  name = stem(label_path)
  result = Result(name=name, label_path=label_path)
  raw = read_map(label_path, 'label map', model_palette(synth.config, colors),
                 synth.config)
  instance = None
  if not synth.config.no_instance:
    instance = (read_map(instance_path, 'instance map') if instance_path
                else raw)
  image = read_image(image_path, 'real image') if image_path else None
  label, instance, image = prepare(synth.config, pre, raw, instance, image)
  if label.shape != synth.image_size:
    raise InputError(
        f'after preprocessing the label map is {label.shape[1]}x'
        f'{label.shape[0]}; the model needs {synth.image_size[1]}x'
        f'{synth.image_size[0]} (use --preprocess fixed).')
  k = num_samples
  labels = np.repeat(label[None], k, axis=0)
  instances = None if instance is None else np.repeat(instance[None], k, 0)
  z = latents(synth, name, k, seed, style)
  try:
    fake = synth(labels, instances, z=z)
  except ValueError as e:
    raise InputError(str(e)) from None

  def write(sub, file_name, array):
    os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    rel = f'{sub}/{file_name}'
    Image.fromarray(array).save(os.path.join(output_dir, rel))
    return rel

  for i, img in enumerate(visualize.image_to_uint8(fake)):
    suffix = '' if k == 1 else f'_{i}'
    result.synthesized.append(write('synthesized', f'{name}{suffix}.png',
                                    img))
  result.label = write('label', f'{name}.png',
                       visualize.colorize_labels(label, colors))
  if image is not None:
    result.real = write('real', f'{name}.png', image)
  return result


def synthesize(model: str, labels: str, output_dir: str, *,
               instances: Optional[str] = None, images: Optional[str] = None,
               num_samples: int = 1, style: Optional[str] = None,
               seed: int = 0, preprocess: str = 'fixed',
               data_dir: Optional[str] = None,
               synth: Optional[Synthesizer] = None) -> List[Result]:
  """Runs every label map; returns one Result each (errors included).

  Raises:
    InputError / ValueError: for problems that concern every file (no label
      maps, a bad style image, num_samples > 1 without a VAE, ...).
  """
  synth = synth or Synthesizer.load(model)
  config = synth.config
  if num_samples < 1:
    raise ValueError(f'num_samples={num_samples}: must be at least 1.')
  if num_samples > 1 and not config.use_vae:
    raise ValueError(f'num_samples={num_samples} needs a VAE model (one with '
                     'use_vae); this one maps each label map to one image.')
  if style and not config.use_vae:
    raise ValueError('--style needs a VAE model with an encoder; this one '
                     'has use_vae=False.')
  pre = make_preprocess(config, preprocess)
  label_paths = list_files(labels, MAP_EXTENSIONS, 'label maps')
  instance_by_name = (by_stem(list_files(instances, MAP_EXTENSIONS,
                                         'instance maps'))
                      if instances else None)
  image_by_name = (by_stem(list_files(images, IMAGE_EXTENSIONS, 'images'))
                   if images else {})
  if not config.no_instance and instances is None:
    logging.warning('The model uses instance maps and none were given: '
                    'using each label map as its instance map.')
  style_images = style_code_source(synth, pre, style) if style else None
  colors = label_colors(config, data_dir, model)
  os.makedirs(output_dir, exist_ok=True)

  results = []
  for path in label_paths:
    name = stem(path)
    try:
      instance_path = None
      if instance_by_name is not None and not config.no_instance:
        instance_path = instance_by_name.get(name)
        if instance_path is None:
          raise InputError(f'no instance map named {name}.png in {instances}.')
      result = synthesize_one(
          synth, pre, path, instance_path, image_by_name.get(name),
          output_dir, num_samples=num_samples, seed=seed,
          style=style_images, colors=colors)
    except (InputError, tf.errors.OpError) as e:
      message = getattr(e, 'message', None) or str(e)
      result = Result(name=name, label_path=path, error=message)
      print(f'ERROR {path}: {message}', file=sys.stderr)
    results.append(result)
  write_index(output_dir, results, config, style)
  return results


# ---------------------------------------------------------------------------
# The results page.
# ---------------------------------------------------------------------------
def write_index(output_dir: str, results: Sequence[Result], config,
                style: Optional[str] = None, width: int = 256) -> str:
  """index.html: label | synthesized image(s) | real image, one row each."""
  esc = html.escape

  def cell(src, caption):
    if src is None:
      return f'<td><p>{esc(caption)}</p><p>&mdash;</p></td>'
    return (f'<td><a href="{esc(src)}"><img src="{esc(src)}" '
            f'style="width:{width}px;image-rendering:pixelated"></a>'
            f'<p>{esc(caption)}</p></td>')

  done = [r for r in results if r.error is None]
  failed = [r for r in results if r.error is not None]
  has_real = any(r.real for r in done)
  rows = []
  for r in done:
    cells = [cell(r.label, 'input_label')]
    for i, src in enumerate(r.synthesized):
      caption = ('synthesized_image' if len(r.synthesized) == 1
                 else f'synthesized_image {i}')
      cells.append(cell(src, caption))
    if has_real:
      cells.append(cell(r.real, 'real_image'))
    rows.append(f'<h3>{esc(r.name)}</h3>\n<table border="1" '
                f'style="table-layout:fixed"><tr>{"".join(cells)}</tr>'
                '</table>')
  info = (f'{len(done)} of {len(results)} label maps; model netG='
          f'{config.netG}, label_nc={config.label_nc}, image '
          f'{config.crop_size} wide' + (
              f'; style from {os.path.basename(style)}' if style else ''))
  parts = ['<!DOCTYPE html>', '<html><head><meta charset="utf-8">',
           '<title>spade_jax synthesis</title></head><body>',
           '<h1>spade_jax synthesis</h1>', f'<p>{esc(info)}</p>']
  if failed:
    parts.append('<h2>Failed</h2><ul>')
    parts += [f'<li>{esc(r.label_path)}: {esc(r.error)}</li>' for r in failed]
    parts.append('</ul>')
  parts += rows + ['</body></html>']
  path = os.path.join(output_dir, 'index.html')
  with open(path, 'w') as f:
    f.write('\n'.join(parts) + '\n')
  return path


def summary(results: Sequence[Result], output_dir: str) -> str:
  failed = [r for r in results if r.error is not None]
  lines = [f'Synthesized {len(results) - len(failed)} of {len(results)} '
           f'label maps into {output_dir} (index.html).']
  if failed:
    lines.append(f'{len(failed)} failed:')
    lines += [f'  {r.label_path}: {r.error}' for r in failed]
  return '\n'.join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string('model', None, 'Model folder (export / convert).')
  flags.DEFINE_string('labels', None, 'Label-map PNG, or a folder of them.')
  flags.DEFINE_string('instances', None,
                      'Instance-map PNG or folder (matched by file name).')
  flags.DEFINE_string('images', None,
                      'Real image(s) to show beside the results (matched by '
                      'file name).')
  flags.DEFINE_string('output', None, 'Folder to write into.')
  flags.DEFINE_integer('num_samples', 1,
                       'Images per label map (VAE models: random z each).')
  flags.DEFINE_string('style', None,
                      'Image whose style the VAE encoder extracts.')
  flags.DEFINE_integer('seed', 0, 'Seed of the random z draws.')
  flags.DEFINE_enum('preprocess', 'fixed', PREPROCESS_CHOICES,
                    'fixed: resize maps to the model\'s size; config: the '
                    'model config\'s evaluation preprocessing (resize/crop).')
  flags.DEFINE_string('data_dir', None,
                      'Built data set whose dataset_info.json colours the '
                      'label maps.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_cpu.apply_cpu_defaults()  # Before anything starts JAX.
  tf.config.set_visible_devices([], 'GPU')
  try:
    results = synthesize(
        FLAGS.model, FLAGS.labels, FLAGS.output, instances=FLAGS.instances,
        images=FLAGS.images, num_samples=FLAGS.num_samples, style=FLAGS.style,
        seed=FLAGS.seed, preprocess=FLAGS.preprocess,
        data_dir=FLAGS.data_dir)
  except (InputError, ValueError, FileNotFoundError) as e:
    print(f'ERROR: {e}', file=sys.stderr)
    return 2
  print(summary(results, FLAGS.output))
  return 1 if any(r.error for r in results) else 0


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['model', 'labels', 'output'])
  app.run(main)
