"""2 processes x 2 CPU devices (gloo on 127.0.0.1) read the input together.

Each process reads only its own share (data_order): the shares are disjoint
and cover every epoch of the split once, and a process restarted at a step
reads what it would have read without the restart. Run as a script, this
file is one of the processes.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
NUM_TRAIN, BATCH, START = 40, 4, 3


def _config():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.update(dict(dataset='synthetic', batch_size=BATCH, load_size=32,
                     crop_size=32, shuffle_buffer_size=4))
  return config


def _read(config, data_dir, **kw):
  from spade_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  ds = input_pipeline.create_split(config, data_dir, 'train', train=True,
                                   with_metadata=True, num_epochs=2, **kw)
  return [{'names': [n.decode() for n in b['file_name']],
           'index': b['index'].tolist(),
           'image_sum': float(np.asarray(b['image'], np.float64).sum())}
          for b in input_pipeline.numpy_batches(ds)]


def _worker(address: str, process_id: int, data_dir: str, out: str):
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(address, num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.local_device_count() == 2
  config = _config()
  result = {'straight': _read(config, data_dir),
            'resumed': _read(config, data_dir, start_step=START)}
  with open(out, 'w') as f:
    json.dump(result, f)
  jax.distributed.shutdown()


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_read_disjoint_shares_covering_each_epoch(tmp_path):
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / 'data')
  synthetic.build_synthetic(data_dir, NUM_TRAIN, 0, 32, num_shards=4)
  address = f'127.0.0.1:{_free_port()}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_force_host_platform_device_count=2',
             PYTHONPATH=os.pathsep.join([REPO_DIR] + [
                 p for p in [os.environ.get('PYTHONPATH')] if p]))
  outs = [str(tmp_path / f'out{i}.json') for i in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, __file__, address, str(i), data_dir, outs[i]],
      env=env, cwd=REPO_DIR, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    errs = [p.communicate(timeout=600)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-4000:]
  results = []
  for out in outs:
    with open(out) as f:
      results.append(json.load(f))
  per_epoch = NUM_TRAIN // 2 // (BATCH // 2)  # Batches per process, epoch.
  for epoch in range(2):
    names = [sum((b['names'] for b in r['straight'][
        epoch * per_epoch:(epoch + 1) * per_epoch]), []) for r in results]
    assert not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == [
        f'train_{i:06d}' for i in range(NUM_TRAIN)]
    indices = sorted(sum((b['index'] for r in results for b in r['straight'][
        epoch * per_epoch:(epoch + 1) * per_epoch]), []))
    assert indices == list(range(epoch * NUM_TRAIN, (epoch + 1) * NUM_TRAIN))
  for r in results:
    assert r['resumed'] == r['straight'][START:]


if __name__ == '__main__':
  sys.path.insert(0, REPO_DIR)
  _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
