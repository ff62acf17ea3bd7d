"""Damaged checkpoints and resuming on another number of devices.

Training falls back to the newest readable checkpoint (and moves the damaged
ones aside), readers (export, serve, evaluate) fall back with a warning or
stop naming the folder and the --step to use; a checkpoint saved on 4
devices restores on 2 and then on 1 (subprocesses with simulated CPU
devices).
"""
import glob
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from spade_jax import checkpoints
from spade_jax import model_io
from spade_jax import sharding
from spade_jax import train_state

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)


def tiny_config(**changes):
  config = default.get_config()
  config.update(dict(crop_size=32, load_size=36, ngf=8, ndf=8, batch_size=4,
                     keep_checkpoints=5), **changes)
  return config


_SHAPES = {}


def _state(config, step):
  """A TrainState of `config`'s shapes whose values depend on `step` alone.

  Shapes from jax.eval_shape (no network is run): fast, and random values
  tell every step's checkpoint apart.
  """
  key = config.to_json()
  if key not in _SHAPES:
    _SHAPES[key] = jax.eval_shape(lambda: train_state.create_train_state(
        config, jax.random.PRNGKey(0)))
  leaves, tree = jax.tree_util.tree_flatten(_SHAPES[key])
  rs = np.random.RandomState(step)
  leaves = [rs.uniform(-1, 1, x.shape).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating) else
            rs.randint(0, 1000, x.shape).astype(x.dtype) for x in leaves]
  state = jax.tree_util.tree_unflatten(tree, [jnp.asarray(x) for x in leaves])
  step = jnp.asarray(step, jnp.int32)
  return state.replace(g=state.g.replace(step=step),
                       d=state.d.replace(step=step))


def _assert_state_equal(got, want):
  got = jax.tree_util.tree_flatten_with_path(jax.device_get(got))[0]
  want = jax.tree_util.tree_flatten_with_path(jax.device_get(want))[0]
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, a), (_, b) in zip(got, want):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _workdir(tmp_path, config, steps):
  """A training workdir with checkpoints at `steps` and its config.json."""
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  mngr = train_state.checkpoint_manager(workdir, config)
  for step in steps:
    train_state.save_checkpoint(mngr, _state(config, step), config)
  mngr.close()
  return workdir


def _damage(workdir, step, how):
  state_dir = os.path.join(workdir, 'checkpoints', str(step), 'state')
  if how == 'empty_metadata':
    open(os.path.join(state_dir, '_METADATA'), 'w').close()
  elif how == 'lost_manifest':
    os.remove(os.path.join(state_dir, 'manifest.ocdbt'))
  else:
    raise ValueError(how)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A pristine workdir with checkpoints at steps 2 and 4 (copied per test)."""
  config = tiny_config()
  return config, _workdir(tmp_path_factory.mktemp('saved'), config, (2, 4))


def _copy(saved, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  config, source = saved
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  return config, workdir


@pytest.mark.parametrize('how', ['empty_metadata', 'lost_manifest'])
def test_readers_fall_back_to_the_newest_readable_step(saved, tmp_path,
                                                       caplog, how):
  config, workdir = _copy(saved, tmp_path)
  _damage(workdir, 4, how)
  bad_folder = os.path.join(workdir, 'checkpoints', '4')
  with caplog.at_level('WARNING'):
    state, step = train_state.read_checkpoint(workdir, config)
  assert step == 2
  _assert_state_equal(state, jax.device_get(_state(config, 2)))
  warnings = ' '.join(r.getMessage() for r in caplog.records)
  assert bad_folder in warnings and 'cannot be read' in warnings, warnings
  # The serve/evaluate path, which goes through the same reader.
  _, variables, step = train_state.load_inference_variables(workdir)
  assert step == 2 and 'generator' in variables
  # Asked for the damaged step: an error naming it and the step to use.
  with pytest.raises(checkpoints.CheckpointError) as info:
    train_state.read_checkpoint(workdir, config, step=4)
  message = str(info.value)
  assert bad_folder in message and '--step=2' in message, message
  assert os.path.isdir(bad_folder)  # Readers leave it alone.


def test_nothing_readable_names_every_folder(saved, tmp_path):
  config, workdir = _copy(saved, tmp_path)
  _damage(workdir, 4, 'empty_metadata')
  _damage(workdir, 2, 'lost_manifest')
  with pytest.raises(checkpoints.CheckpointError) as info:
    train_state.read_checkpoint(workdir, config)
  message = str(info.value)
  for step in (2, 4):
    assert os.path.join(workdir, 'checkpoints', str(step)) in message
  # Found by the step's file list, before orbax reads anything.
  assert 'state/_METADATA has 0 bytes where' in message, message
  assert 'state/manifest.ocdbt is missing' in message, message
  assert 'config.json' in message


def test_steps_without_a_file_list_are_checked_by_reading_them(
    saved, tmp_path, caplog):
  """Step folders of an older spade_jax (no file list): orbax's own error."""
  config, workdir = _copy(saved, tmp_path)
  os.remove(os.path.join(workdir, 'checkpoints', '4', checkpoints.FILES_LIST))
  _damage(workdir, 4, 'empty_metadata')
  with caplog.at_level('WARNING'):
    _, step = train_state.read_checkpoint(workdir, config)
  assert step == 2
  warnings = ' '.join(r.getMessage() for r in caplog.records)
  assert 'JSONDecodeError' in warnings, warnings


def test_training_resumes_from_the_newest_good_step_and_sets_the_bad_aside(
    saved, tmp_path, caplog):
  config, workdir = _copy(saved, tmp_path)
  _damage(workdir, 4, 'empty_metadata')
  mngr = train_state.checkpoint_manager(workdir, config)
  fresh = _state(config, 0)
  with caplog.at_level('WARNING'):
    state = train_state.restore_checkpoint(mngr, fresh, config,
                                     set_aside_damaged=True)
  assert int(state.step) == 2
  _assert_state_equal(state, _state(config, 2))
  moved = os.path.join(workdir, checkpoints.DAMAGED_DIR, '4')
  assert os.path.isfile(os.path.join(moved, 'state', '_METADATA'))
  assert mngr.all_steps() == [2]
  warnings = ' '.join(r.getMessage() for r in caplog.records)
  assert os.path.join(workdir, 'checkpoints', '4') in warnings
  assert moved in warnings
  # Training can write step 4 again; then it is the one restored.
  train_state.save_checkpoint(mngr, _state(config, 4), config)
  assert int(train_state.restore_checkpoint(mngr, fresh, config).step) == 4
  mngr.close()


def test_checkpoints_of_the_older_state_layout_are_named(tmp_path):
  """A checkpoint written when G and D shared one TrainState: training and
  the readers stop with an error naming its folder and what to do."""
  config = tiny_config()
  workdir = str(tmp_path / 'old')
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  old = {'step': jnp.asarray(3, jnp.int32), 'g_params': {'w': jnp.ones(2)},
         'g_opt_state': {'count': jnp.zeros((), jnp.int32)},
         'rng': jax.random.PRNGKey(0)}
  mngr = train_state.checkpoint_manager(workdir, config)
  train_state.save_checkpoint(mngr, _OldState(**old), config)
  folder = os.path.join(workdir, 'checkpoints', '3')
  for restore in (
      lambda: train_state.restore_checkpoint(mngr, _state(config, 0), config),
      lambda: train_state.read_checkpoint(workdir, config)):
    with pytest.raises(checkpoints.CheckpointError) as info:
      restore()
    message = str(info.value)
    assert folder in message and 'older spade_jax' in message, message
    assert 'Start afresh' in message, message
  mngr.close()
  assert os.path.isdir(folder)  # Left as it was.


@flax.struct.dataclass
class _OldState:
  step: jax.Array
  g_params: dict
  g_opt_state: dict
  rng: jax.Array


def test_damaged_model_folder_and_config_are_named(saved, tmp_path):
  config, workdir = _copy(saved, tmp_path)
  folder = str(tmp_path / 'model')
  model_io.save_model(folder, config, {'generator': {'params': {
      'w': np.ones(3, np.float32)}}})
  open(os.path.join(folder, model_io.VARIABLES_DIR, '_METADATA'), 'w').close()
  with pytest.raises(ValueError, match='cannot read the variables of the '
                     'model folder ' + folder):
    model_io.load_model(folder)
  with open(os.path.join(folder, model_io.CONFIG_FILE), 'w') as f:
    f.write('{"ngf": ')
  with pytest.raises(ValueError, match='cannot read .*config.json'):
    model_io.load_model(folder)
  open(os.path.join(workdir, 'config.json'), 'w').close()
  with pytest.raises(ValueError, match='cannot read .*config.json'):
    model_io.load_config(workdir)


# ---------------------------------------------------------------------------
# Subprocesses: the export command line, and 4 -> 2 -> 1 devices.
# ---------------------------------------------------------------------------
def _env(devices=1):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=os.pathsep.join([REPO_DIR, TESTS_DIR] + [
                 p for p in [os.environ.get('PYTHONPATH')] if p]))
  return env


def _device_worker(workdir, restore_step, save_step):
  """Restores `restore_step` (if any) on all devices; saves `save_step`.

  Waits (up to 5 minutes) for `restore_step` to be written by another
  worker, so that the workers of a chain start together. Prints a JSON
  line: the device count and the warnings raised while restoring.
  """
  import time  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  mesh = sharding.make_mesh(config)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  report = {'devices': jax.device_count(), 'warnings': []}
  if restore_step is not None:
    # orbax renames a step's folder into place once it is complete.
    folder = os.path.join(workdir, 'checkpoints', str(restore_step))
    deadline = time.monotonic() + 300
    while not os.path.isdir(folder):
      assert time.monotonic() < deadline, f'{folder} never appeared'
      time.sleep(0.2)
  mngr = train_state.checkpoint_manager(workdir, config)
  if restore_step is not None:
    assert mngr.latest_step() == restore_step, mngr.all_steps()
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      state = train_state.restore_checkpoint(mngr, _state(config, 0), config, mesh)
    report['warnings'] = [str(w.message) for w in caught]
    for leaf in jax.tree_util.tree_leaves(state):
      assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim), (
          leaf.sharding)
      assert len(leaf.addressable_shards) == jax.device_count()
      for shard in leaf.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data),
                                      np.asarray(leaf))
    _assert_state_equal(state, _state(config, restore_step))
  state = jax.device_put(_state(config, save_step), replicated)
  train_state.save_checkpoint(mngr, state, config)
  mngr.close()
  print(json.dumps(report))


def test_resume_on_4_then_2_then_1_devices(tmp_path):
  """Saved on 4 devices, restored on 2, saved again, restored on 1.

  The three workers start together (their imports overlap); each waits for
  the checkpoint it restores.
  """
  workdir = str(tmp_path / 'run')
  os.makedirs(os.path.join(workdir, 'checkpoints'))
  code = ('import checkpoint_recovery_test as t; '
          't._device_worker({!r}, {}, {})')
  chain = ((4, None, 2), (2, 2, 4), (1, 4, 6))
  procs = [subprocess.Popen(
      [sys.executable, '-c', code.format(workdir, restore, save)],
      env=_env(devices), cwd=REPO_DIR, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for devices, restore, save in chain]
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for (devices, _, _), proc, (out, err) in zip(chain, procs, outputs):
    assert proc.returncode == 0, err[-5000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report['devices'] == devices
    assert not [w for w in report['warnings'] if 'unsafe' in w], report
    assert 'unsafe' not in err, err[-3000:]
  assert sorted(int(os.path.basename(p)) for p in glob.glob(
      os.path.join(workdir, 'checkpoints', '*'))) == [2, 4, 6]


def test_export_command_names_the_damaged_step(saved, tmp_path):
  _, workdir = _copy(saved, tmp_path)
  _damage(workdir, 4, 'lost_manifest')
  out = str(tmp_path / 'out')
  proc = subprocess.run(
      [sys.executable, '-m', 'spade_jax.export', '--workdir', workdir,
       '--step=4', '--output', out, '--nojax_export'],
      env=_env(), cwd=REPO_DIR, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert os.path.join(workdir, 'checkpoints', '4') in proc.stderr
  assert 'pass --step=2' in proc.stderr
  assert not os.path.exists(out)
