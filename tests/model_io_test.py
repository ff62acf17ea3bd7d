"""Writing model folders never loses the user's files; refused pickles.

`model_io.save_model`, `export` and `convert` write a model folder whole or
not at all, replace only a model folder written by spade_jax and only with
--overwrite, and never the source or a folder holding it.
"""
import json
import os
import pickle
import subprocess
import sys

from configs import default
import numpy as np
import pytest

from spade_jax import convert
from spade_jax import export
from spade_jax import model_io

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  config = default.get_config()
  config.update(crop_size=32, load_size=36, ngf=8, ndf=8)
  return config


def _variables(value):
  return {'generator': {'params': {'w': np.full(3, value, np.float32)}}}


def _tree(path):
  """{relative path: file bytes} of everything under `path`."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), path) + '/'] = None
    for name in files:
      full = os.path.join(root, name)
      with open(full, 'rb') as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def _hidden_leftovers(parent):
  return [e for e in os.listdir(parent) if e.startswith('.')]


def _w(folder):
  return model_io.load_model(str(folder))[1]['generator']['params']['w']


def test_unrelated_folders_and_files_are_left_alone(tmp_path):
  config = _config()
  user = tmp_path / 'photos'
  (user / 'sub').mkdir(parents=True)
  (user / 'a.jpg').write_bytes(b'jpeg')
  (user / 'sub' / 'b.txt').write_text('notes')
  before = _tree(user)
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('mine')
  for target, text in [(user, 'is not a spade_jax model folder'),
                       (a_file, 'is a file')]:
    for overwrite in (False, True):
      with pytest.raises(model_io.OutputError, match=text) as info:
        model_io.save_model(str(target), config, _variables(1),
                            overwrite=overwrite)
      assert 'left alone' in str(info.value) and str(target) in str(
          info.value)
  assert _tree(user) == before
  assert a_file.read_text() == 'mine'
  assert not _hidden_leftovers(tmp_path)


def test_model_folder_needs_overwrite_and_is_replaced_whole(tmp_path,
                                                            monkeypatch):
  config = _config()
  out = tmp_path / 'model'
  out.mkdir()  # An empty folder is taken as it is.
  model_io.save_model(str(out), config, _variables(1))
  np.testing.assert_array_equal(_w(out), 1)
  with pytest.raises(model_io.OutputError, match='pass --overwrite'):
    model_io.save_model(str(out), config, _variables(2))
  np.testing.assert_array_equal(_w(out), 1)
  model_io.save_model(str(out), config, _variables(2), overwrite=True)
  np.testing.assert_array_equal(_w(out), 2)
  assert not _hidden_leftovers(tmp_path)

  # A write that fails half-way leaves the old folder as it was.
  def broken(folder, *args):
    open(os.path.join(folder, model_io.CONFIG_FILE), 'w').close()
    raise OSError('disk full')
  before = _tree(out)
  monkeypatch.setattr(model_io, 'write_model', broken)
  with pytest.raises(OSError, match='disk full'):
    model_io.save_model(str(out), config, _variables(3), overwrite=True)
  monkeypatch.undo()
  assert _tree(out) == before and not _hidden_leftovers(tmp_path)

  # A model folder the user added files to is not replaced.
  (out / 'README.md').write_text('my notes')
  with pytest.raises(model_io.OutputError, match=r'did not write \(README'):
    model_io.save_model(str(out), config, _variables(4), overwrite=True)
  assert (out / 'README.md').read_text() == 'my notes'
  np.testing.assert_array_equal(_w(out), 2)


def test_export_never_writes_over_its_source(tmp_path):
  config = _config()
  parent = tmp_path / 'p'
  source = parent / 'model'
  model_io.save_model(str(source), config, _variables(5))
  before = _tree(parent)
  for output, what in [(source, 'is the source'),
                       (parent, 'holds the source'),
                       (tmp_path, 'holds the source')]:
    with pytest.raises(model_io.OutputError, match=what):
      export.export(str(source), str(output), overwrite=True,
                    with_jax_export=False)
  assert _tree(parent) == before
  # Another model folder: replaced with overwrite, with the source's values.
  other = tmp_path / 'other'
  model_io.save_model(str(other), config, _variables(6))
  with pytest.raises(model_io.OutputError, match='pass --overwrite'):
    export.export(str(source), str(other), with_jax_export=False)
  export.export(str(source), str(other), overwrite=True,
                with_jax_export=False)
  np.testing.assert_array_equal(_w(other), 5)
  assert (other / model_io.CLASSES_FILE).is_file()
  assert not _hidden_leftovers(tmp_path)


def test_convert_refuses_before_reading_anything(tmp_path):
  reference = tmp_path / 'ref'
  reference.mkdir()
  (reference / 'latest_net_G.pth').write_bytes(b'not read')
  opt = reference / 'opt.json'
  opt.write_text('{}')
  for output, what in [(reference, 'is the source'),
                       (tmp_path, 'holds the source')]:
    with pytest.raises(model_io.OutputError, match=what):
      convert.convert(str(reference), str(opt), str(output), overwrite=True)
  assert sorted(os.listdir(reference)) == ['latest_net_G.pth', 'opt.json']


def test_convert_command_leaves_an_existing_folder_alone(tmp_path):
  user = tmp_path / 'results'
  user.mkdir()
  (user / 'keep.png').write_bytes(b'png')
  proc = subprocess.run(
      [sys.executable, '-m', 'spade_jax.convert', '--reference_dir',
       str(tmp_path / 'ref'), '--opt', str(tmp_path / 'opt.json'),
       '--output', str(user)], cwd=REPO_DIR, capture_output=True, text=True,
      timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2'))
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  assert f'ERROR: --output {user} exists' in proc.stderr, proc.stderr[-2000:]
  assert os.listdir(user) == ['keep.png']


class _Payload:
  """Unpickling this runs code (writes a marker file)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_refused_pickles_get_our_own_error(tmp_path):
  torch = pytest.importorskip('torch')
  marker = tmp_path / 'ran'
  evil = tmp_path / 'latest_net_G.pth'
  torch.save({'w': torch.ones(2), 'x': _Payload(str(marker))}, str(evil))
  with pytest.raises(convert.ConversionError) as info:
    convert.load_torch_state(str(evil))
  message = str(info.value)
  assert str(evil) in message and 'refused' in message, message
  assert 'io.open' in message or 'builtins.open' in message, message
  assert 'weights_only' not in message and 'False' not in message
  assert info.value.__cause__ is None and info.value.__suppress_context__
  assert not marker.exists()
  # A plain pickle (no zip archive) with code in it: the same.
  legacy = tmp_path / 'legacy.pth'
  with open(legacy, 'wb') as f:
    pickle.dump({'x': _Payload(str(marker))}, f)
  with pytest.raises(convert.ConversionError, match='refused') as info:
    convert.load_torch_state(str(legacy))
  assert 'weights_only' not in str(info.value)
  assert not marker.exists()
  # Damaged files: named, no torch internals advice.
  good = tmp_path / 'good.pth'
  torch.save({'w': torch.ones(2)}, str(good))
  data = good.read_bytes()
  cut = tmp_path / 'cut.pth'
  cut.write_bytes(data[:len(data) // 2])
  for path in (cut, tmp_path / 'opt.json'):
    if not path.exists():
      path.write_text('{"label_nc": 3}')
    with pytest.raises(convert.ConversionError,
                       match='not a PyTorch checkpoint') as info:
      convert.load_torch_state(str(path))
    assert str(path) in str(info.value)
    assert 'weights_only' not in str(info.value)
  assert convert.load_torch_state(str(good))['w'].tolist() == [1.0, 1.0]
  # Through convert(): the same error, nothing written.
  (tmp_path / 'opt2.json').write_text('{}')
  out = tmp_path / 'out'
  with pytest.raises(convert.ConversionError, match='refused'):
    convert.convert(str(tmp_path), str(tmp_path / 'opt2.json'), str(out))
  assert not out.exists() and not _hidden_leftovers(tmp_path)


def test_one_config_loader_merges_old_saved_configs_over_the_defaults(
    tmp_path):
  """A config.json from before newer keys existed (a model folder's or a
  training workdir's) loads with their defaults, so code reads config.KEY."""
  saved = default.get_config().to_dict()
  for newer in ('diffaugment', 'fid_every_steps', 'adam_eps', 'beta1',
                'num_devices', 'segmenter_single_scale'):
    del saved[newer]
  saved['lr'] = 1  # An int saved for a float key.
  for folder in (tmp_path / 'model', tmp_path / 'workdir'):
    os.makedirs(folder / model_io.VARIABLES_DIR if 'model' in str(folder)
                else folder)
    with open(folder / model_io.CONFIG_FILE, 'w') as f:
      json.dump(saved, f)
    config = model_io.load_config(str(folder))
    assert config.diffaugment == '' and config.fid_every_steps == 0
    assert config.adam_eps == 1e-8 and config.beta1 is None
    assert config.num_devices == 0 and not config.segmenter_single_scale
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.ngf == saved['ngf']
  with pytest.raises(FileNotFoundError, match='neither a training workdir'):
    model_io.load_config(str(tmp_path / 'nothing'))
