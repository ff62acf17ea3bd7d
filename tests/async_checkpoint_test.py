"""Asynchronous checkpoints: saves overlap training, file lists, killed saves.

orbax writes a step into STEP.orbax-checkpoint-tmp in background threads and
renames it to STEP once complete. The tests hold that rename (a patched
`_on_commit_callback`, released by an event) so that "the save is still
running" does not depend on how fast the machine is: a save call that waited
for its files would block until the hold times out and then find the step
complete, which the tests reject.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from checkpoint_recovery_test import _assert_state_equal
from checkpoint_recovery_test import _state
from checkpoint_recovery_test import tiny_config
from orbax.checkpoint._src.checkpointers import async_checkpointer
from spade_jax import checkpoints
from spade_jax import sharding
from spade_jax import train_state

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
# How long a held rename waits for the test's release at most.
HOLD_S = 300


def _hold_renames(steps, released: threading.Event):
  """orbax's commit callback, holding the rename of `steps` until released.

  Returns (the patched callback, the events set when each step is held).
  """
  original = async_checkpointer._on_commit_callback  # pylint: disable=protected-access
  held = {step: threading.Event() for step in steps}

  def callback(tmpdir, *args, **kwargs):
    step = int(tmpdir.get_final().name)
    if step in held:
      held[step].set()
      print(f'HELD {step}', flush=True)  # For a parent process.
      assert released.wait(timeout=HOLD_S), f'step {step} never released'
    return original(tmpdir, *args, **kwargs)
  return callback, held


def _listed_files(folder):
  """The files of a step folder and their sizes, as `record_files` lists."""
  files = {}
  for root, _, names in os.walk(folder):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), folder)
      if rel != checkpoints.FILES_LIST:
        files[rel] = os.path.getsize(os.path.join(root, name))
  return files


def assert_listed(ckpt_dir, step):
  """Step `step` of `ckpt_dir` has a file list naming all its files."""
  folder = os.path.join(ckpt_dir, str(step))
  with open(os.path.join(folder, checkpoints.FILES_LIST)) as f:
    listed = json.load(f)
  assert listed == _listed_files(folder), step
  assert any(name.startswith('state/') for name in listed), listed
  checkpoints.check_files(folder)


_bump_donating = jax.jit(
    lambda state: jax.tree_util.tree_map(lambda x: x + 1, state),
    donate_argnums=0)


def test_saves_overlap_training_and_each_finished_step_is_listed(
    tmp_path, monkeypatch):
  config = tiny_config(keep_checkpoints=2)
  workdir = str(tmp_path / 'run')
  ckpt_dir = os.path.join(workdir, train_state.CHECKPOINTS_DIR)
  released = threading.Event()
  callback, held = _hold_renames({4}, released)
  monkeypatch.setattr(async_checkpointer, '_on_commit_callback', callback)
  mngr = train_state.checkpoint_manager(workdir, config)
  try:
    train_state.save_checkpoint(mngr, _state(config, 2), config)
    # Own buffers (as a train step's output has): donated below.
    state = jax.tree_util.tree_map(lambda x: x.copy(), _state(config, 4))
    train_state.save_checkpoint(mngr, state, config)
    # The call returned while step 4 is still being written (its rename is
    # held); orbax waited for step 2 first, which now has its file list.
    assert held[4].wait(timeout=HOLD_S)
    assert not released.is_set()
    assert mngr.is_saving_in_progress()
    assert os.path.isdir(
        os.path.join(ckpt_dir, '4' + checkpoints.UNFINISHED_MARK))
    assert not os.path.exists(os.path.join(ckpt_dir, '4'))
    assert_listed(ckpt_dir, 2)
    # Training goes on meanwhile and donates the state's buffers.
    for _ in range(3):
      state = _bump_donating(state)
    jax.block_until_ready(state)
    released.set()
    # The next save waits for step 4, lists it, and deletes step 2
    # (keep_checkpoints=2) only once step 6 is complete.
    train_state.save_checkpoint(mngr, _state(config, 6), config)
    assert_listed(ckpt_dir, 4)
  finally:
    released.set()
    mngr.close()
  assert sorted(os.listdir(ckpt_dir)) == ['4', '6']
  for step in (4, 6):
    assert_listed(ckpt_dir, step)
  # Step 4 holds the state as it was when saved, not the donated updates.
  restored, step = train_state.read_checkpoint(workdir, config, step=4)
  assert step == 4
  _assert_state_equal(restored, _state(config, 4))


def test_restore_waits_for_a_save_of_the_same_manager(tmp_path, monkeypatch):
  config = tiny_config()
  workdir = str(tmp_path / 'run')
  released = threading.Event()
  callback, held = _hold_renames({3}, released)
  monkeypatch.setattr(async_checkpointer, '_on_commit_callback', callback)
  mngr = train_state.checkpoint_manager(workdir, config)
  try:
    train_state.save_checkpoint(mngr, _state(config, 3), config)
    assert held[3].wait(timeout=HOLD_S)
    threading.Timer(0.5, released.set).start()
    state = train_state.restore_checkpoint(mngr, _state(config, 0), config)
  finally:
    released.set()
    mngr.close()
  _assert_state_equal(state, _state(config, 3))
  assert_listed(os.path.join(workdir, train_state.CHECKPOINTS_DIR), 3)


def _env():
  """Subprocesses: CPU, one device, this checkout and tests importable."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONPATH=os.pathsep.join([REPO_DIR, TESTS_DIR] + [
                 p for p in [os.environ.get('PYTHONPATH')] if p]))
  env.pop('XLA_FLAGS', None)
  return env


def _killed_worker(workdir):
  """Saves step 2, then starts saving step 4 and hangs before its rename
  (the test kills this process there)."""
  config = tiny_config()
  callback, _ = _hold_renames({4}, threading.Event())
  async_checkpointer._on_commit_callback = callback  # pylint: disable=protected-access
  mngr = train_state.checkpoint_manager(workdir, config)
  train_state.save_checkpoint(mngr, _state(config, 2), config)
  train_state.save_checkpoint(mngr, _state(config, 4), config)
  time.sleep(HOLD_S)  # The held rename prints HELD 4.


def run_main_holding(step, argv):
  """Runs `python -m spade_jax.main ARGV` whose save of `step` never
  finishes (its rename is held; it prints HELD STEP then)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from spade_jax import main  # pylint: disable=g-import-not-at-top
  callback, _ = _hold_renames({step}, threading.Event())
  async_checkpointer._on_commit_callback = callback  # pylint: disable=protected-access
  sys.argv = ['spade_jax.main'] + list(argv)  # config_flags reads sys.argv.
  app.run(main.main)


def test_a_process_killed_mid_save_resumes_from_the_newest_complete_step(
    tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  ckpt_dir = os.path.join(workdir, train_state.CHECKPOINTS_DIR)
  env = _env()
  log = tmp_path / 'worker.log'
  with open(log, 'w') as err:
    proc = subprocess.Popen(
        [sys.executable, '-c', 'import async_checkpoint_test as t; '
         f't._killed_worker({workdir!r})'], env=env, cwd=REPO_DIR,
        stdout=subprocess.PIPE, stderr=err, text=True)
  try:
    line = proc.stdout.readline()  # Blocks until step 4 is being saved.
    assert line.strip() == 'HELD 4', log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  partial = '4' + checkpoints.UNFINISHED_MARK
  assert sorted(os.listdir(ckpt_dir)) == ['2', partial]
  assert_listed(ckpt_dir, 2)
  # Readers see step 2 and leave the partial folder alone.
  config = tiny_config()
  state, step = train_state.read_checkpoint(workdir, config)
  assert step == 2
  _assert_state_equal(state, _state(config, 2))
  assert os.path.isdir(os.path.join(ckpt_dir, partial))
  # Training sets it aside (nothing deleted), resumes from step 2 and can
  # write step 4 again.
  with caplog.at_level('WARNING'):
    mngr = train_state.checkpoint_manager(workdir, config)
  moved = os.path.join(workdir, checkpoints.DAMAGED_DIR, partial)
  assert os.path.isdir(moved)
  warnings = ' '.join(r.getMessage() for r in caplog.records)
  assert os.path.join(ckpt_dir, partial) in warnings and moved in warnings
  try:
    assert mngr.all_steps() == [2]
    state = train_state.restore_checkpoint(mngr, _state(config, 0), config,
                                           set_aside_damaged=True)
    assert int(state.step) == 2
    train_state.save_checkpoint(mngr, _state(config, 4), config)
  finally:
    mngr.close()
  assert sorted(os.listdir(ckpt_dir)) == ['2', '4']
  assert_listed(ckpt_dir, 4)
  np.testing.assert_array_equal(
      jax.device_get(train_state.read_checkpoint(workdir, config)[0].rng),
      jax.device_get(_state(config, 4).rng))


def _two_process_worker(address, process_id, workdir):
  """One of 2 processes (1 CPU device each, gloo): saves steps 2 and 4 of a
  state replicated over both, restores the newest."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(address, num_processes=2, process_id=process_id)
  config = tiny_config()
  mesh = sharding.make_mesh(config)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  mngr = train_state.checkpoint_manager(workdir, config)
  def global_state(step):  # The same values on both processes.
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_callback(
            x.shape, replicated, lambda index, x=np.asarray(x): x[index]),
        _state(config, step))
  for step in (2, 4):
    train_state.save_checkpoint(mngr, global_state(step), config)
  state = train_state.restore_checkpoint(mngr, _state(config, 0), config,
                                         mesh)
  mngr.close()
  assert int(state.step) == 4
  np.testing.assert_array_equal(
      np.asarray(state.rng.addressable_data(0)),
      np.asarray(_state(config, 4).rng))
  print('OK', flush=True)


def test_two_processes_save_asynchronously(tmp_path):
  """Process 0 sets an unfinished folder aside while process 1 waits;
  process 0 lists each step once both processes finished writing it."""
  workdir = str(tmp_path / 'run')
  ckpt_dir = os.path.join(workdir, train_state.CHECKPOINTS_DIR)
  partial = '6' + checkpoints.UNFINISHED_MARK
  os.makedirs(os.path.join(ckpt_dir, partial))
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{sock.getsockname()[1]}'
  procs = [subprocess.Popen(
      [sys.executable, '-c', 'import async_checkpoint_test as t; '
       f't._two_process_worker({address!r}, {i}, {workdir!r})'],
      env=_env(), cwd=REPO_DIR, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0 and 'OK' in out, err[-5000:]
  assert sorted(os.listdir(ckpt_dir)) == ['2', '4']
  assert os.path.isdir(os.path.join(workdir, checkpoints.DAMAGED_DIR,
                                    partial))
  for step in (2, 4):
    assert_listed(ckpt_dir, step)


def test_an_error_during_training_waits_for_the_save_under_way(
    tmp_path, monkeypatch):
  """train.py's exit path: the save in flight finishes (and is listed)
  while the error propagates."""
  from spade_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  workdir = str(tmp_path / 'run')
  released = threading.Event()
  callback, held = _hold_renames({5}, released)
  monkeypatch.setattr(async_checkpointer, '_on_commit_callback', callback)
  mngr = train_state.checkpoint_manager(workdir, config)
  with pytest.raises(RuntimeError, match='step 6 failed'):
    with train._closing(mngr):  # pylint: disable=protected-access
      train_state.save_checkpoint(mngr, _state(config, 5), config)
      assert held[5].wait(timeout=HOLD_S)
      threading.Timer(0.5, released.set).start()
      raise RuntimeError('step 6 failed')
  assert_listed(os.path.join(workdir, train_state.CHECKPOINTS_DIR), 5)
