"""The converter on reference configurations the shared fixtures do not cover.

Each case (reference_cases.py) builds the PyTorch model of the reference
networks, moves its running statistics and spectral vectors, saves the state
dicts like a reference run and converts them. Here the converted networks run
in training mode against the PyTorch model's training forward: outputs, and
the running statistics and spectral-norm vectors the forward leaves behind.
The discriminator and encoder are also checked in eval mode; eval-mode
generators are checked through the Synthesizer in synthesizer_test.py.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from spade_jax import convert
from spade_jax import layers
from spade_jax import model_io
from spade_jax import models
import reference_cases as rc

TOL = 1e-4
G_CASES = sorted(rc.CASES)
D_CASES = sorted(k for k, (_, nets) in rc.CASES.items() if 'D' in nets)


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  return lambda name: rc.converted(name, tmp_path_factory)


def _flat(tree):
  fmt = lambda p: '/'.join(str(getattr(k, 'key', k)) for k in p)
  return {fmt(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _stats_after_torch_forward(config, net, key):
  """The torch module's buffers, converted to our batch_stats."""
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  return convert.convert_state_dicts(config, {key: state})[
      {'G': 'generator', 'D': 'discriminator', 'E': 'encoder'}[key]][
          'batch_stats']


def _assert_stats_match(ours, theirs, before):
  """Same leaves; each within TOL (relative); and each moved by the forward."""
  ours, theirs, before = _flat(ours), _flat(theirs), _flat(before)
  assert ours, 'no running statistics or spectral vectors to compare'
  assert set(ours) == set(theirs) == set(before)
  for key, want in theirs.items():
    err = np.max(np.abs(ours[key] - want)) / np.max(np.abs(want))
    assert err < TOL, (key, err)
    assert not np.allclose(before[key], want, rtol=1e-6, atol=1e-7), key


def _assert_buffers_nontrivial(batch_stats):
  """The saved buffers are not their initial values (move_buffers ran)."""
  for key, value in _flat(batch_stats).items():
    if key.endswith('/mean'):
      assert np.abs(value).max() > 0, key
    elif key.endswith('/var'):
      assert not np.allclose(value, 1.0), key


# ---------------------------------------------------------------------------
# Conversion of every case.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('name', G_CASES)
def test_config_follows_options(name, converted):
  case, out = converted(name)
  config = model_io.load_config(str(out))
  for key, value in case.opt.items():
    if key != 'semantic_nc':
      assert config[key] == value, key
  assert models.semantic_nc(config) == case.opt['semantic_nc']
  assert models.output_size(config) == case.size


@pytest.mark.parametrize('name', G_CASES)
def test_generator_training_forward_and_buffers_match(name, converted):
  """Train-mode output, then running stats and u/v, as the reference."""
  case, out = converted(name)
  config, variables = model_io.load_model(str(out))
  g_vars = variables['generator']
  _assert_buffers_nontrivial(g_vars['batch_stats'])
  gen = models.make_generator(config)
  forward = rc.jit(lambda v, label, edges, z: gen.apply(
      v, label, edges, z=z, train=True, mutable=['batch_stats']))
  edges = layers.instance_edges(case.instance)
  ours, updated = forward(g_vars, case.label, edges, case.z)

  net = rc.fresh(case.nets['G']).train()
  with torch.no_grad():
    theirs = net(case.semantics(),
                 None if case.z is None else torch.from_numpy(case.z))
  assert rc.max_rel_err(ours, theirs) < TOL
  _assert_stats_match(updated['batch_stats'],
                      _stats_after_torch_forward(config, net, 'G'),
                      g_vars['batch_stats'])


@pytest.mark.parametrize('name', D_CASES)
def test_discriminator_matches_every_feature_map(name, converted):
  """Eval mode: every layer of every scale; train mode: outputs and buffers."""
  case, out = converted(name)
  config, variables = model_io.load_model(str(out))
  d_vars = variables['discriminator']
  _assert_buffers_nontrivial(d_vars['batch_stats'])
  disc = models.make_discriminator(config)
  x = case.d_input(rc.nchw(case.image))
  x_nhwc = x.numpy().transpose(0, 2, 3, 1)
  ours = rc.jit(lambda v, x: disc.apply(v, x))(d_vars, x_nhwc)
  with torch.no_grad():
    theirs = case.nets['D'](x)
  assert len(ours) == len(theirs) == config.num_D
  for i, (ours_i, theirs_i) in enumerate(zip(ours, theirs)):
    assert len(ours_i) == len(theirs_i) == config.n_layers_D + 1
    for j, (a, b) in enumerate(zip(ours_i, theirs_i)):
      assert rc.max_rel_err(a, b) < TOL, (i, j)

  ours, updated = rc.jit(lambda v, x: disc.apply(
      v, x, train=True, mutable=['batch_stats']))(d_vars, x_nhwc)
  net = rc.fresh(case.nets['D']).train()
  with torch.no_grad():
    theirs = net(x)
  for i, (ours_i, theirs_i) in enumerate(zip(ours, theirs)):
    for j, (a, b) in enumerate(zip(ours_i, theirs_i)):
      assert rc.max_rel_err(a, b) < TOL, ('train', i, j)
  _assert_stats_match(updated['batch_stats'],
                      _stats_after_torch_forward(config, net, 'D'),
                      d_vars['batch_stats'])


def test_vae_encoder_matches(converted):
  """mu and logvar in eval mode (also from a resized image); train buffers."""
  case, out = converted('vae')
  config, variables = model_io.load_model(str(out))
  e_vars = variables['encoder']
  enc = models.make_encoder(config)
  encode = rc.jit(lambda v, x: enc.apply(v, x))
  half = case.image[:, ::2, ::2]  # 128x128: bilinearly upsampled to 256.
  for image in (case.image, half):
    mu, logvar = encode(e_vars, image)
    with torch.no_grad():
      mu_t, logvar_t = case.nets['E'](rc.nchw(image))
    assert mu.shape == logvar.shape == (rc.BATCH, 256)
    assert rc.max_rel_err(mu, mu_t.numpy()) < TOL
    assert rc.max_rel_err(logvar, logvar_t.numpy()) < TOL

  (mu, _), updated = rc.jit(lambda v, x: enc.apply(
      v, x, train=True, mutable=['batch_stats']))(e_vars, case.image)
  net = rc.fresh(case.nets['E']).train()
  with torch.no_grad():
    mu_t, _ = net(rc.nchw(case.image))
  assert rc.max_rel_err(mu, mu_t.numpy()) < TOL
  _assert_stats_match(updated['batch_stats'],
                      _stats_after_torch_forward(config, net, 'E'),
                      e_vars['batch_stats'])


def test_command_line_writes_the_same_model(converted, dataset_folder,
                                            tmp_path):
  """The CLI's model is convert()'s; --data_dir adds classes.json."""
  case, out = converted('pix2pixhd_batch')
  data, names, colors = dataset_folder(
      tmp_path / 'data', case.opt['label_nc'],
      case.opt['contain_dontcare_label'])
  cli_out = tmp_path / 'cli_model'
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-m', 'spade_jax.convert', '--reference_dir',
       str(case.directory), '--opt', str(case.opt_path), '--output',
       str(cli_out), '--data_dir', str(data)], cwd=repo, capture_output=True,
      text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert str(cli_out) in result.stdout
  assert f'classes.json from {data}' in result.stdout
  assert model_io.load_classes(str(cli_out)) == {'names': names,
                                                 'colors': colors}
  assert model_io.load_classes(str(out)) is None  # Not without --data_dir.
  config, variables = model_io.load_model(str(out))
  cli_config, cli_variables = model_io.load_model(str(cli_out))
  assert cli_config.to_dict() == config.to_dict()
  ours, theirs = _flat(cli_variables), _flat(variables)
  assert set(ours) == set(theirs)
  for key in theirs:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


# ---------------------------------------------------------------------------
# Errors name the option, key or file at fault.
# ---------------------------------------------------------------------------
def _run_folder(converted, tmp_path, name='aspect2', **opt_changes):
  """A copy of a case's run folder with changed options (None deletes)."""
  case, _ = converted(name)
  folder = tmp_path / 'reference'
  shutil.copytree(case.directory, folder)
  opt = json.loads(case.opt_path.read_text())
  for key, value in opt_changes.items():
    if value is None:
      opt.pop(key)
    else:
      opt[key] = value
  (folder / 'opt.json').write_text(json.dumps(opt))
  return folder


def _convert_fails(folder, tmp_path, *expected):
  out = tmp_path / 'out'
  with pytest.raises(convert.ConversionError) as info:
    convert.convert(str(folder), str(folder / 'opt.json'), str(out))
  message = str(info.value)
  for text in expected:
    assert text in message, message
  assert not out.exists()
  return message


def test_unknown_option_is_named(converted, tmp_path):
  folder = _run_folder(converted, tmp_path, use_attention_blocks=True)
  _convert_fails(folder, tmp_path, 'use_attention_blocks')


def test_inconsistent_semantic_nc_is_named(converted, tmp_path):
  case, _ = converted('aspect2')
  folder = _run_folder(converted, tmp_path,
                       semantic_nc=case.opt['semantic_nc'] + 1)
  _convert_fails(folder, tmp_path, 'semantic_nc', 'label_nc=5',
                 'no_instance=False')


def test_option_of_wrong_type_is_named(converted, tmp_path):
  folder = _run_folder(converted, tmp_path, crop_size='64')
  _convert_fails(folder, tmp_path, 'crop_size')


def test_checkpoint_with_other_ngf_is_rejected(converted, tmp_path):
  # The checkpoint has ngf=4; options claiming ngf=8 want twice the channels.
  folder = _run_folder(converted, tmp_path, ngf=8)
  _convert_fails(folder, tmp_path, 'net_G', 'params/', '(64,)', '(128,)',
                 'ngf')


def test_checkpoint_with_other_label_nc_is_rejected(converted, tmp_path):
  folder = _run_folder(converted, tmp_path, label_nc=6, semantic_nc=8)
  _convert_fails(folder, tmp_path, 'net_G', 'shape')


def test_checkpoint_with_other_norm_is_rejected(converted, tmp_path):
  # Sync-batch SPADE norms have running statistics an instance norm lacks.
  folder = _run_folder(converted, tmp_path,
                       norm_G='spectralspadeinstance3x3')
  _convert_fails(folder, tmp_path, 'net_G', 'param_free_norm/bn',
                 'unexpected', 'norm_G')


def test_discriminator_with_other_ndf_is_rejected(converted, tmp_path):
  folder = _run_folder(converted, tmp_path, name='more', ndf=8)
  _convert_fails(folder, tmp_path, 'net_D', 'shape')


def test_missing_generator_checkpoint_is_named(converted, tmp_path):
  folder = _run_folder(converted, tmp_path)
  (folder / 'net_G.pth').unlink()
  _convert_fails(folder, tmp_path, 'net_G.pth', str(folder))


def test_unreadable_option_file_is_named(converted, tmp_path):
  folder = _run_folder(converted, tmp_path)
  (folder / 'opt.json').write_text('{"label_nc": 5,')
  _convert_fails(folder, tmp_path, 'opt.json')


def test_data_dir_names_the_classes_and_must_match_label_nc(
    converted, dataset_folder, tmp_path):
  case, _ = converted('aspect2')
  label_nc = case.opt['label_nc']
  data, names, colors = dataset_folder(tmp_path / 'data', label_nc, True)
  out = tmp_path / 'named'
  convert.convert(str(case.directory), str(case.opt_path), str(out),
                  data_dir=str(data))
  assert model_io.load_classes(str(out)) == {'names': names,
                                             'colors': colors}
  assert (out / model_io.CLASSES_FILE).is_file()

  # Another number of classes: an error naming both, nothing written.
  other, _, _ = dataset_folder(tmp_path / 'other', label_nc + 2)
  bad_out = tmp_path / 'bad'
  with pytest.raises(convert.ConversionError) as info:
    convert.convert(str(case.directory), str(case.opt_path), str(bad_out),
                    data_dir=str(other))
  message = str(info.value)
  assert f'has {label_nc + 2} classes' in message, message
  assert f'label_nc={label_nc}' in message and str(other) in message
  assert not bad_out.exists()
  # A folder that is no built data set, and a missing one.
  for folder, text in [(tmp_path, 'is not a built data set folder'),
                       (tmp_path / 'none', 'is not a folder')]:
    with pytest.raises(convert.ConversionError, match=text):
      convert.convert(str(case.directory), str(case.opt_path), str(bad_out),
                      data_dir=str(folder))
    assert not bad_out.exists()
