r"""Converts reference PyTorch SPADE checkpoints into spade_jax model folders.

  python -m spade_jax.convert --reference_dir DIR --opt DIR/opt.txt \
      --output OUT [--which_epoch latest] [--data_dir DATA] [--overwrite]

DIR holds the reference's `latest_net_G.pth` (or `net_G.pth`, or
`{epoch}_net_G.pth` with --which_epoch) and, when present, the D and E files.
--opt is the reference's `opt.txt` as its training run saved it beside the
checkpoints (or a JSON object of the same options); unknown options, options
of the wrong type, and an opt.txt lacking options that shape the networks
are errors that name them. The output is a
model folder (see `model_io.py`) that `Synthesizer.load`, training's
`config.init_from` and `spade_jax.serve` read.

Reference checkpoints carry no class names. With --data_dir, a built data set
folder (`python -m data_pipelines.build ... --data_dir DATA`; its
dataset_info.json), OUT also gets classes.json: the data set's class names
and colours, which `spade_jax.serve` shows. The data set's label_nc must be
the model's (an error names both otherwise; nothing is written).

OUT appears whole or not at all. An existing OUT is replaced only with
--overwrite and only when it is a model folder written by spade_jax; never
the reference folder or a folder that holds it. Checkpoints are read with
PyTorch's weights-only loader: a file holding other Python objects is
refused.
"""
import json
import os
import re
import sys
from typing import Dict, Optional, Tuple

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from configs import default as default_config
from spade_jax import model_io
from spade_jax import models
from spade_jax import torch_weights

# Reference options that map onto our config, by the same name.
MODEL_OPTIONS = (
    'label_nc', 'contain_dontcare_label', 'no_instance', 'ngf', 'ndf',
    'norm_G', 'norm_D', 'norm_E', 'num_upsampling_layers', 'crop_size',
    'aspect_ratio', 'use_vae', 'z_dim', 'n_layers_D', 'num_D', 'netG',
    'resnet_n_downsample', 'resnet_n_blocks', 'resnet_kernel_size',
    'resnet_initial_kernel_size', 'preprocess_mode', 'load_size', 'no_flip',
    'gan_mode', 'lambda_feat', 'lambda_vgg', 'lambda_kld', 'no_ganFeat_loss',
    'lr', 'no_TTUR', 'beta1', 'beta2', 'niter', 'niter_decay')
# Reference options that are checked but have no config key of their own.
CHECKED_OPTIONS = ('semantic_nc', 'output_nc', 'netD', 'netD_subarch', 'netE',
                   'init_type', 'init_variance', 'no_vgg_loss', 'batchSize',
                   'dataset_mode', 'nef')
# Reference options about its own runs (paths, logging, devices): ignored.
IGNORED_OPTIONS = (
    'name', 'gpu_ids', 'checkpoints_dir', 'model', 'phase', 'dataroot',
    'serial_batches', 'nThreads', 'max_dataset_size', 'load_from_opt_file',
    'cache_filelist_write', 'cache_filelist_read', 'display_winsize', 'isTrain',
    'display_freq', 'print_freq', 'save_latest_freq', 'save_epoch_freq',
    'no_html', 'debug', 'tf_log', 'continue_train', 'which_epoch', 'optimizer',
    'D_steps_per_G', 'results_dir', 'how_many', 'coco_no_portraits',
    'label_dir', 'image_dir', 'instance_dir', 'no_pairing_check',
    'cityscapes_dir', 'ade20k_dir', 'nef', 'use_gpu', 'verbose', 'niter_fix')

_DATASET_BY_MODE = {'coco': 'coco_stuff', 'ade20k': 'ade20k',
                    'cityscapes': 'cityscapes', 'facades': 'facades',
                    'custom': 'custom'}


class ConversionError(ValueError):
  """A reference checkpoint or option file that cannot be converted."""


# ---------------------------------------------------------------------------
# Options.
# ---------------------------------------------------------------------------
# What an opt.txt must hold: the options that shape the networks (the
# reference writes every option, so a file without them is not one of its).
ARCHITECTURE_OPTIONS = (
    'label_nc', 'contain_dontcare_label', 'no_instance', 'ngf', 'ndf',
    'norm_G', 'norm_D', 'norm_E', 'num_upsampling_layers', 'crop_size',
    'aspect_ratio', 'use_vae', 'z_dim', 'n_layers_D', 'num_D', 'netG')
_DEFAULT_SUFFIX = '\t[default:'


def _literal(text: str):
  """A value as the reference's option printer wrote it (`str(v)`)."""
  if text in ('True', 'False'):
    return text == 'True'
  if text == 'None':
    return None
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def _option_type(key: str) -> type:
  """The type of our config's key (placeholders such as beta1 included)."""
  return default_config.get_config().get_ref(key).get_type()


def _typed(key: str, text: str, path: str, line_no: int):
  """An opt.txt value, typed as our config's key when it has one."""
  if key not in MODEL_OPTIONS:
    return _literal(text)
  expected = _option_type(key)
  try:
    if expected is bool:
      if text not in ('True', 'False'):
        raise ValueError(text)
      return text == 'True'
    if expected in (int, float):
      return expected(text)
  except ValueError:
    raise ConversionError(
        f'{path}, line {line_no}: option {key}={text!r}: expected a '
        f'{expected.__name__}.') from None
  return text


def parse_opt_txt(text: str, path: str = 'opt.txt') -> Dict:
  """The reference's opt.txt (its option printer's format) -> options.

  One `name: value` line per option (name right-aligned, value `str(v)`),
  `\t[default: ...]` after values that differ from the default; the
  printed form's `---- Options ----` / `---- End ----` lines and blank lines
  are skipped.
  """
  opt = {}
  for line_no, line in enumerate(text.splitlines(), 1):
    stripped = line.strip()
    if not stripped or stripped.startswith('---'):
      continue
    body = line.split(_DEFAULT_SUFFIX, 1)[0]
    name, colon, value = body.partition(':')
    name = name.strip()
    if not colon or not name or ' ' in name:
      raise ConversionError(
          f'{path}, line {line_no}: {stripped[:80]!r} is not a `name: value` '
          "line of the reference's option file.")
    if name in opt:
      raise ConversionError(f'{path}, line {line_no}: option {name} is given '
                            'twice.')
    opt[name] = _typed(name, value.strip(), path, line_no)
  if not opt:
    raise ConversionError(f'{path} holds no options.')
  missing = [k for k in ARCHITECTURE_OPTIONS if k not in opt]
  if missing:
    raise ConversionError(
        f'{path} lacks the option(s) {missing}: the reference writes every '
        'option into opt.txt, so this file is incomplete or not one of its.')
  return opt


def read_options(path: str) -> Dict:
  """The reference's options from its opt.txt, or from a JSON object."""
  try:
    with open(path) as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ConversionError(f'Cannot read the option file {path}: {e}') from None
  if path.endswith('.json') or text.lstrip().startswith('{'):
    try:
      opt = json.loads(text)
    except json.JSONDecodeError as e:
      raise ConversionError(
          f'Cannot read the option file {path}: {e}') from None
    if not isinstance(opt, dict):
      raise ConversionError(f'{path}: expected a JSON object of options.')
    return opt
  return parse_opt_txt(text, path)


def config_from_options(opt: Dict) -> ml_collections.ConfigDict:
  """Our config from the reference's options; errors name the bad option."""
  known = set(MODEL_OPTIONS) | set(CHECKED_OPTIONS) | set(IGNORED_OPTIONS)
  unknown = sorted(set(opt) - known)
  if unknown:
    raise ConversionError(
        f'Unknown reference option(s) {unknown}: spade_jax cannot tell how '
        'they change the network. Remove them from the option file if they '
        'do not affect the architecture.')
  config = default_config.get_config()
  for key in MODEL_OPTIONS:
    if key in opt:
      expected = _option_type(key)
      value = opt[key]
      if expected is float and isinstance(value, int):
        value = float(value)
      if not isinstance(value, expected) or (
          expected is int and isinstance(value, bool)):
        raise ConversionError(
            f'Option {key}={value!r}: expected a {expected.__name__}.')
      config[key] = value
  if 'netG' not in opt:
    config.netG = 'spade'
  if 'norm_G' not in opt:
    config.norm_G = ('spectralspadesyncbatch3x3' if config.netG == 'spade'
                     else 'instance')
  if 'n_layers_D' not in opt:
    config.n_layers_D = 4
  if 'lambda_vgg' not in opt:
    config.lambda_vgg = 10.0
  if opt.get('no_vgg_loss'):
    config.lambda_vgg = 0.0
  config.dataset = _DATASET_BY_MODE.get(opt.get('dataset_mode'), 'custom')
  config.batch_size = opt.get('batchSize', config.batch_size)
  _check_consistency(opt, config)
  return config


def _check_consistency(opt: Dict, config) -> None:
  """Errors for options our port cannot honour or that contradict others."""
  def bad(key, why):
    raise ConversionError(f'Option {key}={opt.get(key)!r}: {why}')

  if config.netG not in ('spade', 'pix2pixhd'):
    bad('netG', "expected 'spade' or 'pix2pixhd'.")
  try:
    if config.netG == 'spade':
      models.layers.parse_spade_norm(config.norm_G)
    else:
      models.layers.parse_plain_norm(config.norm_G)
  except ValueError as e:
    bad('norm_G', str(e))
  for key in ('norm_D', 'norm_E'):
    try:
      models.layers.parse_plain_norm(config[key])
    except ValueError as e:
      bad(key, str(e))
  if opt.get('output_nc', 3) != 3:
    bad('output_nc', 'only RGB output (3) is supported.')
  if opt.get('netD', 'multiscale') != 'multiscale':
    bad('netD', "only the 'multiscale' discriminator exists.")
  if opt.get('netD_subarch', 'n_layer') != 'n_layer':
    bad('netD_subarch', "only 'n_layer' exists.")
  if opt.get('netE', 'conv') != 'conv':
    bad('netE', "only the 'conv' encoder exists.")
  if 'semantic_nc' in opt and opt['semantic_nc'] != models.semantic_nc(config):
    bad('semantic_nc',
        f'label_nc={config.label_nc}, contain_dontcare_label='
        f'{config.contain_dontcare_label} and no_instance={config.no_instance}'
        f' give {models.semantic_nc(config)} channels.')
  if config.netG == 'spade':
    try:
      sh, sw = models.latent_size(config.num_upsampling_layers,
                                  config.crop_size, config.aspect_ratio)
    except ValueError as e:
      bad('num_upsampling_layers', str(e))
    if sw < 1 or sh < 1:
      bad('crop_size', f'too small for num_upsampling_layers='
          f'{config.num_upsampling_layers!r}.')
  if config.use_vae and config.netG != 'spade':
    bad('use_vae', 'the VAE needs the SPADE generator.')


# ---------------------------------------------------------------------------
# State dicts.
# ---------------------------------------------------------------------------
def _conv_kernel(w: np.ndarray, transpose: bool) -> np.ndarray:
  if transpose:  # ConvTranspose2d (in, out, kh, kw) -> flipped HWIO.
    return w.transpose(2, 3, 0, 1)[::-1, ::-1]
  return w.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> HWIO


def _sn_v(v: np.ndarray, w_orig: np.ndarray, transpose: bool) -> np.ndarray:
  """Reorders PyTorch's v (in, kh, kw) to our kernel's rows (kh, kw, in)."""
  if transpose:
    cin, _, kh, kw = w_orig.shape
    return v.reshape(cin, kh, kw)[:, ::-1, ::-1].transpose(1, 2, 0).reshape(-1)
  _, cin, kh, kw = w_orig.shape
  return v.reshape(cin, kh, kw).transpose(1, 2, 0).reshape(-1)


def _module_path(prefix: str, kind: str) -> Tuple[str, ...]:
  """Maps a reference module path (dotted) to our Flax module path."""
  parts = prefix.split('.')
  if kind == 'G_pix2pixhd':
    # model.{i}[.0] or model.{i}.conv_block.{j}[.0]
    i = parts[1]
    if len(parts) > 2 and parts[2] == 'conv_block':
      name, rest = f'model_{i}_{parts[3]}', parts[4:]
    else:
      name, rest = f'model_{i}', parts[2:]
    return (name,) + _norm_conv_tail(rest)
  out = []
  it = iter(range(len(parts)))
  for j in it:
    p = parts[j]
    if p == 'param_free_norm':
      out += ['param_free_norm', 'bn']
    elif p == 'mlp_shared':
      out.append(p)
      next(it, None)  # mlp_shared.0 is the conv inside its Sequential.
    elif re.fullmatch(r'model\d+|layer\d+', p):
      out.append(p)
      tail = parts[j + 1:]
      if p.startswith('model') and tail[:1] == ['0']:
        tail = tail[1:]  # model{n}.0 is the layer inside its Sequential.
      return tuple(out) + _norm_conv_tail(tail)
    else:
      out.append(p)
  return tuple(out)


def _norm_conv_tail(rest):
  """`.0` -> the conv, `.1` -> the norm of a NormConv; nothing -> the conv."""
  if not rest:
    return ('conv',)
  return ({'0': 'conv', '1': 'norm'}[rest[0]],)


def state_dict_to_variables(state: Dict[str, np.ndarray], kind: str,
                            transposed=frozenset()) -> Dict:
  """Maps a reference state dict to {'params': ..., 'batch_stats': ...}.

  `kind` is 'G_spade', 'G_pix2pixhd', 'D' or 'E'. `transposed` names the
  module paths (tuples) that are ConvTranspose2d layers.
  """
  variables = {'params': {}, 'batch_stats': {}}

  def put(collection, path, leaf, value):
    node = variables[collection]
    for p in path:
      node = node.setdefault(p, {})
    if leaf in node:
      raise ConversionError(f'Two reference keys map onto {path}/{leaf}.')
    node[leaf] = np.asarray(value, np.float32)

  for key in sorted(state):
    if key.endswith('num_batches_tracked'):
      continue
    prefix, leaf = key.rsplit('.', 1)
    path = _module_path(prefix, kind)
    value = state[key]
    is_t = path in transposed
    if leaf in ('weight', 'weight_orig') and value.ndim == 4:
      put('params', path, 'kernel', _conv_kernel(value, is_t))
    elif leaf == 'weight' and value.ndim == 2:
      put('params', path, 'kernel', value.T)
    elif leaf == 'weight' and value.ndim == 1:  # affine BatchNorm
      put('params', path, 'scale', value)
    elif leaf == 'bias':
      put('params', path, 'bias', value)
    elif leaf == 'weight_u':
      put('batch_stats', path, 'sn_u', value)
    elif leaf == 'weight_v':
      put('batch_stats', path, 'sn_v',
          _sn_v(value, state[prefix + '.weight_orig'], is_t))
    elif leaf == 'running_mean':
      put('batch_stats', path, 'mean', value)
    elif leaf == 'running_var':
      put('batch_stats', path, 'var', value)
    else:
      raise ConversionError(f'Unexpected reference key {key!r}.')
  return variables


def _fix_bare_layers(variables, template):
  """Moves `.../conv` leaves up where the template has a bare Conv there."""
  for collection, tree in variables.items():
    tmpl = template.get(collection, {})
    _fix_node(tree, tmpl)
  return variables


def _fix_node(node, tmpl):
  for name in list(node):
    sub = node[name]
    if not isinstance(sub, dict):
      continue
    t = tmpl.get(name, {}) if isinstance(tmpl, dict) else {}
    if (set(sub) == {'conv'} and isinstance(t, dict) and 'conv' not in t
        and t):
      node[name] = sub = sub['conv']
    _fix_node(sub, t)


def check_against_template(variables, template, what: str) -> None:
  """Same keys and shapes as the Flax model's own variables, or an error."""
  flat = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
  want = dict(jax.tree_util.tree_flatten_with_path(template)[0])
  fmt = lambda p: '/'.join(str(getattr(k, 'key', k)) for k in p)
  missing = sorted(fmt(p) for p in want if p not in flat)
  extra = sorted(fmt(p) for p in flat if p not in want)
  if missing or extra:
    raise ConversionError(
        f'{what}: the checkpoint does not fit the network its options '
        f'describe. Missing: {missing[:10]}{"..." if len(missing) > 10 else ""}'
        f'; unexpected: {extra[:10]}{"..." if len(extra) > 10 else ""}. Check '
        'the option file (ngf, label_nc, norm_G, num_upsampling_layers, ...).')
  # Parameters first: their shapes say most about which option differs.
  order = sorted(want, key=lambda p: fmt(p).split('/')[0] != 'params')
  for p in order:
    if tuple(flat[p].shape) != tuple(want[p].shape):
      raise ConversionError(
          f'{what}: {fmt(p)} has shape {tuple(flat[p].shape)} in the '
          f'checkpoint, the network expects {tuple(want[p].shape)}. Check '
          'the option file (ngf, ndf, label_nc, contain_dontcare_label, '
          'no_instance, ...).')


def load_torch_state(path: str) -> Dict[str, np.ndarray]:
  """Reads a reference `.pth` state dict with torch.load(weights_only=True)."""
  try:
    return torch_weights.read_state_dict(path)
  except torch_weights.WeightsFileError as e:
    raise ConversionError(str(e)) from None


def init_templates(config, crop_hw=None):
  """Shape-only variables of G, D (and E) for a config."""
  h, w = crop_hw or models.output_size(config)
  rng = jax.random.PRNGKey(0)
  label = np.zeros((1, h, w), np.int32)
  edges = np.zeros((1, h, w), np.float32)
  out = {}
  out['generator'] = jax.eval_shape(
      lambda: models.make_generator(config).init(
          {'params': rng, 'z': rng}, label, edges))
  d_in = np.zeros((1, h, w, models.semantic_nc(config) + 3), np.float32)
  out['discriminator'] = jax.eval_shape(
      lambda: models.make_discriminator(config).init(rng, d_in))
  if config.use_vae:
    out['encoder'] = jax.eval_shape(
        lambda: models.make_encoder(config).init(
            rng, np.zeros((1, h, w, 3), np.float32)))
  return {k: dict(v) for k, v in out.items()}


def _generator_transposed(config):
  if config.netG != 'pix2pixhd':
    return frozenset()
  first = 3 + 2 * config.resnet_n_downsample + config.resnet_n_blocks
  return frozenset((f'model_{first + 2 * i}', 'conv')
                   for i in range(config.resnet_n_downsample))


def convert_state_dicts(config, states: Dict[str, Dict[str, np.ndarray]]):
  """{'G': state, 'D': state?, 'E': state?} -> our variables, checked."""
  templates = init_templates(config)
  result = {}
  names = {'G': 'generator', 'D': 'discriminator', 'E': 'encoder'}
  for short, state in states.items():
    name = names[short]
    if name not in templates:
      raise ConversionError(
          f'A net_{short} checkpoint was given but the options do not use '
          'it (use_vae is False).')
    kind = {'G': f'G_{config.netG}', 'D': 'D', 'E': 'E'}[short]
    transposed = _generator_transposed(config) if short == 'G' else ()
    variables = state_dict_to_variables(state, kind, transposed)
    variables = _fix_bare_layers(variables, templates[name])
    variables = {k: v for k, v in variables.items() if v or k in
                 templates[name]}
    template = {k: templates[name].get(k, {}) for k in ('params',
                                                        'batch_stats')}
    variables = {k: variables.get(k, {}) for k in ('params', 'batch_stats')}
    check_against_template(variables, template, f'net_{short}')
    result[name] = variables
  return result


def find_checkpoint(reference_dir: str, net: str,
                    which_epoch: str = 'latest') -> Optional[str]:
  for name in (f'{which_epoch}_net_{net}.pth', f'net_{net}.pth'):
    path = os.path.join(reference_dir, name)
    if os.path.exists(path):
      return path
  return None


def convert(reference_dir: str, opt_path: str, output: str,
            which_epoch: str = 'latest',
            data_dir: Optional[str] = None,
            overwrite: bool = False) -> ml_collections.ConfigDict:
  """Converts a reference run folder; returns the config written.

  With `data_dir` (a built data set folder), OUT/classes.json gets its class
  names and colours; its label_nc must be the model's. OUT is written whole
  into a temporary folder, then renamed (see `model_io`): an existing OUT
  must be a model folder and `overwrite` set, and OUT may not be (or hold)
  the reference folder, the option file or the data set
  (`model_io.OutputError`).
  """
  protect = tuple(p for p in (reference_dir, opt_path, data_dir) if p)
  model_io.check_output(output, overwrite=overwrite, protect=protect)
  opt = read_options(opt_path)
  config = config_from_options(opt)
  classes = None
  if data_dir:
    if not os.path.isdir(data_dir):
      raise ConversionError(
          f'--data_dir {data_dir} is not a folder: pass a built data set '
          'folder (with dataset_info.json).')
    try:
      classes = model_io.read_class_source(data_dir, config.label_nc)
    except (OSError, ValueError) as e:
      raise ConversionError(f'--data_dir: {e}') from None
  g_path = find_checkpoint(reference_dir, 'G', which_epoch)
  if g_path is None:
    raise ConversionError(
        f'No generator checkpoint in {reference_dir}: expected '
        f'{which_epoch}_net_G.pth or net_G.pth.')
  states = {'G': load_torch_state(g_path)}
  for net in ('D', 'E'):
    path = find_checkpoint(reference_dir, net, which_epoch)
    if path is not None and (net == 'D' or config.use_vae):
      states[net] = load_torch_state(path)
  logging.info('Converting %s', ', '.join(f'net_{k}' for k in states))
  variables = convert_state_dicts(config, states)
  with model_io.model_writer(output, overwrite=overwrite,
                             protect=protect) as tmp:
    model_io.write_model(tmp, config, variables)
    if classes is not None:
      model_io.save_classes(tmp, classes['names'], classes['colors'])
  return config


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: importing
  this module must not claim flag names other programs define)."""
  flags.DEFINE_string('reference_dir', None,
                      'Folder with the reference *.pth.')
  flags.DEFINE_string('opt', None, "The reference run's opt.txt (or a JSON "
                      'file of its options).')
  flags.DEFINE_string('output', None, 'Model folder to write.')
  flags.DEFINE_string('which_epoch', 'latest', 'Checkpoint prefix to read.')
  flags.DEFINE_string('data_dir', None, 'Optional built data set folder '
                      '(with dataset_info.json) whose class names and '
                      'colours go to OUT/classes.json; its label_nc must be '
                      "the model's.")
  flags.DEFINE_bool('overwrite', False,
                    'Replace --output when it is a model folder written by '
                    'spade_jax (never the reference folder, nor a folder '
                    'holding it).')


def main(argv):
  del argv
  try:
    config = convert(FLAGS.reference_dir, FLAGS.opt, FLAGS.output,
                     FLAGS.which_epoch, FLAGS.data_dir, FLAGS.overwrite)
  except (ConversionError, FileNotFoundError, model_io.OutputError) as e:
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'Wrote {FLAGS.output} (netG={config.netG}, label_nc='
        f'{config.label_nc}, crop_size={config.crop_size}'
        f'{", classes.json from " + FLAGS.data_dir if FLAGS.data_dir else ""}'
        ').')


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['reference_dir', 'opt', 'output'])
  app.run(main)
