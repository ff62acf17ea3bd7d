r"""Exports a trained (or converted) generator for inference.

  python -m spade_jax.export --workdir DIR [--step N] --output OUT
  python -m spade_jax.export --model CONVERTED --output OUT

`--workdir` is a training folder (its `config.json` and `checkpoints/`); it
may also be a model folder, as `--model` is (e.g. written by
`spade_jax.convert`). OUT is a model folder (see `model_io.py`) holding the
generator's inference variables: parameters, BatchNorm running statistics and
spectral-norm state; the EMA parameters when training kept them (unless
--use_ema=false); the VAE encoder for style images. `Synthesizer.load(OUT)`
reads it. An existing OUT is replaced only with --overwrite and only when it
is a model folder written by spade_jax, never the source or a folder that
holds it; the new folder appears whole, or not at all. Beside it:

  OUT/generator.jax_export       a serialized `jax.export` module of the
                                 generator in eval mode, weights included,
                                 for a fixed batch and label-map size
                                 (--batch_size, --height, --width), float32
                                 matrix products (--matmul_precision)
  OUT/generator_signature.json   its inputs and output (names, shapes, dtypes)
  OUT/classes.json               the classes' names and colours, when known:
                                 from the source model folder's classes.json,
                                 the training data's dataset_info.json
                                 (config.data_dir, or a synthetic run's
                                 WORKDIR/data/synthetic), or the synthetic
                                 set's own (see `model_io.class_metadata`)

The module needs only JAX to run, not spade_jax:

  import json, numpy as np
  from jax import export
  with open('OUT/generator.jax_export', 'rb') as f:
    gen = export.deserialize(bytearray(f.read()))
  images = gen.call(label, instance)   # inputs as in the signature file

Inputs are the raw label ids (int32 (B, H, W); 255 is don't-care when the
model has that class), the instance ids (int32 (B, H, W), unless the model
uses none) and, for VAE models, z (float32 (B, z_dim)). Label maps of another
size than the model's are resized inside the module like the data pipeline
resizes them (PIL nearest), and instance edges are computed inside. The
output is float32 (B, H', W', 3) in [-1, 1] at the model's size. The module
runs on the platforms named by --platforms (default cpu and cuda).
"""
import json
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from spade_jax import generation
from spade_jax import label_maps
from spade_jax import model_io
from spade_jax import models
from spade_jax import train_state

EXPORT_FILE = model_io.EXPORT_FILE
SIGNATURE_FILE = model_io.SIGNATURE_FILE


# ---------------------------------------------------------------------------
# The jax.export module.
# ---------------------------------------------------------------------------
def input_signature(config, batch_size: int, height: int, width: int
                    ) -> Sequence[Tuple[str, Tuple[int, ...], str]]:
  """(name, shape, dtype) of the exported module's inputs, in call order."""
  inputs = [('label', (batch_size, height, width), 'int32')]
  if not config.no_instance:
    inputs.append(('instance', (batch_size, height, width), 'int32'))
  if config.use_vae and config.netG == 'spade':
    inputs.append(('z', (batch_size, config.z_dim), 'float32'))
  return inputs


def make_inference_fn(config, g_vars):
  """f(label, [instance], [z]) -> images, with the variables baked in.

  The eval-mode generator (`generation.make_generate_fn`) after the raw
  don't-care value becomes its class and the maps are resized to the model's
  size like the data pipeline resizes them (PIL nearest).
  """
  generate_fn = generation.make_generate_fn(config)
  size = models.output_size(config)
  g_vars = jax.tree_util.tree_map(jnp.asarray, g_vars)
  use_vae = config.use_vae and config.netG == 'spade'

  def fn(*args):
    args = list(args)
    label = label_maps.resize_nearest(label_maps.dont_care_to_class(
        args.pop(0), label_nc=config.label_nc,
        contain_dontcare_label=config.contain_dontcare_label, xp=jnp), size)
    instance = None
    if not config.no_instance:
      instance = label_maps.resize_nearest(args.pop(0), size)
    z = args.pop(0) if use_vae else None
    return generate_fn(g_vars, label, instance, z)
  return fn


def export_generator(config, g_vars, batch_size: int = 1,
                     size: Optional[Tuple[int, int]] = None,
                     platforms: Optional[Sequence[str]] = None,
                     precision: str = 'highest') -> Tuple[bytes, Dict]:
  """Serializes the eval-mode generator: (module bytes, signature dict).

  `precision` is the matrix-product precision baked into the module:
  'highest' gives float32 results on every platform (on GPUs 'default'
  allows TF32, faster but some pixels then differ from CPU outputs).
  """
  height, width = size or models.output_size(config)
  inputs = input_signature(config, batch_size, height, width)
  fn = make_inference_fn(config, g_vars)
  specs = [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
           for _, shape, dtype in inputs]
  with jax.default_matmul_precision(precision):
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(*specs)
  out_h, out_w = models.output_size(config)
  signature = {
      'inputs': [{'name': n, 'shape': list(s), 'dtype': d}
                 for n, s, d in inputs],
      'output': {'name': 'image', 'shape': [batch_size, out_h, out_w, 3],
                 'dtype': 'float32', 'range': [-1.0, 1.0]},
      'platforms': list(exported.platforms),
      'matmul_precision': precision,
      'label_nc': int(config.label_nc),
      'contain_dontcare_label': bool(config.contain_dontcare_label),
      'dontcare_value': label_maps.DONT_CARE,
  }
  return bytes(exported.serialize()), signature


def _write_file(path: str, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)


def export(source: str, output: str, *, step: Optional[int] = None,
           use_ema: bool = True, batch_size: int = 1,
           size: Optional[Tuple[int, int]] = None,
           platforms: Optional[Sequence[str]] = None,
           precision: str = 'highest',
           with_jax_export: bool = True,
           overwrite: bool = False) -> ml_collections.ConfigDict:
  """Writes the model folder OUT (and the jax.export module); returns config.

  OUT is written whole into a temporary folder, then renamed (see
  `model_io`): an existing OUT must be a model folder and `overwrite` set,
  and OUT may never be `source` or a folder holding it (`OutputError`).
  """
  model_io.check_output(output, overwrite=overwrite, protect=(source,))
  config, variables, step = train_state.load_inference_variables(
      source, step, use_ema)
  classes = model_io.class_metadata(config, source)
  module = signature = None
  if with_jax_export:
    module, signature = export_generator(config, variables['generator'],
                                         batch_size, size, platforms,
                                         precision)
    signature['source'] = os.path.basename(os.path.abspath(source))
    signature['step'] = step
  with model_io.model_writer(output, overwrite=overwrite,
                             protect=(source,)) as tmp:
    model_io.write_model(tmp, config, variables)
    if classes is not None:
      model_io.save_classes(tmp, classes['names'], classes['colors'])
    if module is not None:
      _write_file(os.path.join(tmp, EXPORT_FILE), module)
      _write_file(os.path.join(tmp, SIGNATURE_FILE),
                  json.dumps(signature, indent=1).encode())
  logging.info('Exported %s%s to %s', source,
               '' if step is None else f' (step {step})', output)
  return config


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string('workdir', None, 'Training workdir (or a model folder).')
  flags.DEFINE_string('model', None,
                      'A model folder (e.g. from spade_jax.convert) to export '
                      'instead of a workdir.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string('output', None, 'Model folder to write.')
  flags.DEFINE_bool('use_ema', True,
                    'Export the EMA generator weights when training kept them.')
  flags.DEFINE_integer('batch_size', 1, 'Batch size of the jax.export module.')
  flags.DEFINE_integer('height', 0, 'Label-map height of the jax.export module '
                       '(0: the model\'s image height).')
  flags.DEFINE_integer('width', 0, 'Label-map width of the jax.export module '
                       '(0: the model\'s image width).')
  flags.DEFINE_list('platforms', ['cpu', 'cuda'],
                    'Platforms the jax.export module runs on (cpu, cuda, rocm, '
                    'tpu).')
  flags.DEFINE_enum('matmul_precision', 'highest',
                    ['highest', 'high', 'default'],
                    'Matrix-product precision of the jax.export module: '
                    'highest = float32 everywhere; default lets GPUs use TF32 '
                    '(faster, some pixels differ).')
  flags.DEFINE_bool('jax_export', True, 'Also write the jax.export module.')
  flags.DEFINE_bool('overwrite', False,
                    'Replace --output when it is a model folder written by '
                    'spade_jax (never the source, nor a folder holding it).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if bool(FLAGS.workdir) == bool(FLAGS.model):
    raise app.UsageError('Pass exactly one of --workdir and --model.')
  if FLAGS.batch_size < 1:
    raise app.UsageError('--batch_size must be positive.')
  source = FLAGS.workdir or FLAGS.model
  try:
    size = None
    if FLAGS.height or FLAGS.width:
      config = model_io.load_config(source)
      out_h, out_w = models.output_size(config)
      size = (FLAGS.height or out_h, FLAGS.width or out_w)
    config = export(source, FLAGS.output, step=FLAGS.step,
                    use_ema=FLAGS.use_ema, batch_size=FLAGS.batch_size,
                    size=size, platforms=FLAGS.platforms,
                    precision=FLAGS.matmul_precision,
                    with_jax_export=FLAGS.jax_export,
                    overwrite=FLAGS.overwrite)
  except (OSError, ValueError) as e:  # Named files, what to do.
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'Wrote {FLAGS.output} (netG={config.netG}, label_nc='
        f'{config.label_nc}, image {models.output_size(config)}).')


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['output'])
  app.run(main)
