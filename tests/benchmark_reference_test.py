"""scripts/benchmark_reference.py: the reference's iteration runs and is timed."""
import json
import math
import os
import subprocess
import sys

import pytest

from spade_jax import xla_cpu

pytest.importorskip('torch')

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_DIR, 'scripts'))
import benchmark_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = dict(crop_size=32, ngf=8, ndf=8, n_layers_D=2, num_D=2, batch_size=2,
            label_nc=5, contain_dontcare_label=True, no_instance=False,
            lambda_vgg=10.0, lambda_feat=10.0, lr=2e-4, steps=2, warmup=1,
            threads=1, seed=0)


def test_iteration_updates_both_networks_and_losses_move():
  """Each call is one G step then one D step: both optimisers move their
  networks, so the losses of the same batch change between calls."""
  iteration = benchmark_reference.make_iteration(TINY)
  first, second = iteration(), iteration()
  assert all(math.isfinite(x) for x in first + second)
  assert first[0] != second[0] and first[1] != second[1]


def test_record_has_the_timings_and_the_options():
  record = benchmark_reference.run(TINY)
  assert record['benchmark'] == 'reference_torch_train_iteration'
  assert record['crop_size'] == 32 and record['batch_size'] == 2
  assert record['torch_threads'] == 1
  assert 0 < record['ms_per_step_min'] <= record['ms_per_step_median'] <= (
      record['ms_per_step_max'])
  assert record['images_per_s'] > 0
  assert record['load_average_1min_before'] >= 0
  assert record['cpu_model'] == xla_cpu.cpu_description()['cpu_model']


def test_bad_step_counts_are_refused():
  with pytest.raises(ValueError, match='steps > 0'):
    benchmark_reference.run({**TINY, 'steps': 0})


def test_cli_appends_a_json_record(tmp_path):
  out = tmp_path / 'ref.jsonl'
  flags = [f'--{k}={v}' for k, v in TINY.items()
           if k not in ('contain_dontcare_label', 'no_instance')]
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO_DIR, 'scripts',
                                    'benchmark_reference.py'),
       *flags, '--steps=1', '--warmup=0', '--lambda_vgg=0',
       f'--json={out}'],
      capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ms_per_step_median' in proc.stdout
  record = json.loads(out.read_text().splitlines()[-1])
  assert record['lambda_vgg'] == 0 and record['steps'] == 1
