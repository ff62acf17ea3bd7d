"""spade_jax.export: checkpoint -> model folder + jax.export module, round trip.

A tiny training state (running statistics and spectral vectors moved by a
training-mode forward, distinct EMA weights) is checkpointed like training
does; the exported folder must give, through `Synthesizer.load` and through
the deserialized module run by a program that never imports spade_jax,
exactly what the training-side eval generator gives.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from spade_jax import export
from spade_jax import label_maps
from spade_jax import model_io
from spade_jax import models
from spade_jax import train
from spade_jax import train_state
from spade_jax.synthesizer import Synthesizer

TOL = 2e-5

# Runs the exported module with JAX alone and checks spade_jax stayed out.
_RUNNER = r'''
import json, sys
import numpy as np
from jax import export
folder, inputs, out = sys.argv[1:4]
with open(folder + '/generator.jax_export', 'rb') as f:
  gen = export.deserialize(bytearray(f.read()))
with open(folder + '/generator_signature.json') as f:
  sig = json.load(f)
data = np.load(inputs)
args = [data[i['name']].astype(i['dtype']) for i in sig['inputs']]
np.save(out, np.asarray(gen.call(*args)))
assert 'spade_jax' not in sys.modules, 'spade_jax was imported'
assert not any(m.startswith('spade_jax') for m in sys.modules)
print('ran without spade_jax')
'''


def tiny_config(**overrides):
  config = default_config.get_config()
  config.crop_size = 32
  config.load_size = 36
  config.ngf = 8
  config.ndf = 8
  config.batch_size = 2
  config.ema_decay = 0.99
  config.update(overrides)
  return config


def fake_train_state(config, seed=0):
  """A TrainState of the right structure with random values, built fast.

  Initialising the networks compiles slowly on CPU; random leaves of the
  right shapes (positive variances, unit spectral vectors) serve as well:
  running statistics and spectral vectors then differ from an init's.
  """
  abstract = jax.eval_shape(lambda: train_state.create_train_state(
      config, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', getattr(path[-1], 'name', '')))
    shape, dtype = leaf.shape, leaf.dtype
    if not np.issubdtype(dtype, np.floating):
      return np.full(shape, 3, dtype)  # step, rng key, counts
    if name == 'var':
      return rng.uniform(0.5, 1.5, shape).astype(dtype)
    if name.startswith('sn_'):
      v = rng.normal(size=shape)
      return (v / np.linalg.norm(v)).astype(dtype)
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return (rng.normal(size=shape) / np.sqrt(fan_in)).astype(dtype)

  state = jax.tree_util.tree_map_with_path(fill, abstract)
  g = state.g.replace(batch_stats=_top_singular_vectors(state.g.params,
                                                        state.g.batch_stats))
  if g.ema_params is not None:  # Matching g_stats' spectral vectors too.
    g = g.replace(ema_params=g.params['generator'])
  d = state.d.replace(batch_stats=_top_singular_vectors(state.d.params,
                                                        state.d.batch_stats))
  state = state.replace(g=g, d=d)
  return jax.tree_util.tree_map(jnp.asarray, state)


def _top_singular_vectors(params, stats):
  """`stats` with each spectral conv's sn_u / sn_v set to its kernel's top
  singular vectors (sigma is then the kernel's spectral norm). Random ones
  give a tiny sigma: the kernels blow up, every output pixel saturates at
  +-1, and any rounding difference flips a pixel from 0 to 255."""
  if not isinstance(stats, dict):
    return stats
  if 'sn_u' in stats:
    w = np.asarray(params['kernel'], np.float64)
    w = w.reshape(-1, w.shape[-1])  # (rows, out), as layers.spectral_sigma.
    left, _, right = np.linalg.svd(w, full_matrices=False)
    return dict(stats, sn_u=right[0].astype(np.float32),
                sn_v=left[:, 0].astype(np.float32))
  return {k: _top_singular_vectors(params.get(k, {}) if isinstance(
      params, dict) else {}, v) for k, v in stats.items()}


def make_workdir(workdir, config, seed=0):
  """A checkpointed random TrainState (distinct EMA weights) at step 3."""
  state = fake_train_state(config, seed)
  if state.g.ema_params is not None:
    ema = jax.tree_util.tree_map(lambda p: 0.9 * p,
                                 state.g.params['generator'])
    state = state.replace(g=state.g.replace(ema_params=ema))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  mngr = train_state.checkpoint_manager(workdir, config)
  train_state.save_checkpoint(mngr, state, config)
  mngr.close()
  return state


def sample_inputs(config, n=2, seed=1):
  h, w = models.output_size(config)
  rng = np.random.default_rng(seed)
  label = np.repeat(np.repeat(rng.integers(0, config.label_nc, (n, h // 4,
                                                                w // 4)),
                              4, 1), 4, 2).astype(np.int32)
  instance = (label * 3 + (np.arange(w) >= w // 2)).astype(np.int32)
  return label, instance


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp('export')
  config = tiny_config()
  state = make_workdir(str(root / 'run'), config)
  out = str(root / 'model')
  export.export(str(root / 'run'), out, batch_size=2, platforms=['cpu'])
  return config, state, out, root


@pytest.fixture(scope='module')
def expected(exported):
  """The training-side eval generator's output on `sample_inputs`."""
  config, state, _, _ = exported
  label, instance = sample_inputs(config)
  return np.asarray(train.make_generate_fn(config)(
      train_state.generator_variables(state), label, instance))


def test_exports_generator_variables_and_config(exported):
  config, state, out, _ = exported
  loaded_config, variables = model_io.load_model(out)
  assert sorted(variables) == ['generator']
  assert loaded_config.ngf == config.ngf
  want = train_state.generator_variables(state, use_ema=True)
  got = variables['generator']
  for a, b in zip(jax.tree_util.tree_leaves(want),
                  jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), b)
  # The EMA weights, not the raw ones.
  raw = state.g.params['generator']['fc']['kernel']
  assert not np.allclose(np.asarray(raw), got['params']['fc']['kernel'])


def test_round_trip_synthesizer_and_jax_export(exported, expected):
  config, _, out, root = exported
  label, instance = sample_inputs(config)
  assert np.std(expected) > 0.05  # Not a constant image.

  synth = Synthesizer.load(out)
  np.testing.assert_allclose(synth(label, instance), expected, atol=TOL)

  inputs = str(root / 'inputs.npz')
  np.savez(inputs, label=label, instance=instance)
  result = str(root / 'result.npy')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _RUNNER, out, inputs, result],
                        capture_output=True, text=True, env=env,
                        cwd=str(root), timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ran without spade_jax' in proc.stdout
  np.testing.assert_allclose(np.load(result), expected, atol=TOL)


def test_signature_file(exported):
  config, _, out, _ = exported
  with open(os.path.join(out, export.SIGNATURE_FILE)) as f:
    sig = json.load(f)
  h, w = models.output_size(config)
  assert [i['name'] for i in sig['inputs']] == ['label', 'instance']
  assert sig['inputs'][0]['shape'] == [2, h, w]
  assert sig['output']['shape'] == [2, h, w, 3]
  assert sig['platforms'] == ['cpu']
  assert sig['matmul_precision'] == 'highest'
  assert sig['step'] == 3


def test_other_label_size_resized_like_pipeline(exported, expected):
  config, state, _, _ = exported
  # For 2x larger maps: labels are resized (PIL nearest) inside.
  fn = jax.jit(export.make_inference_fn(
      config, train_state.generator_variables(state)))
  label, instance = sample_inputs(config)
  big = lambda x: np.repeat(np.repeat(x, 2, 1), 2, 2)
  np.testing.assert_allclose(np.asarray(fn(big(label), big(instance))),
                             expected, atol=TOL)
  np.testing.assert_array_equal(label_maps.pil_nearest_indices(64, 32),
                                np.arange(32) * 2 + 1)


def test_model_folder_source_and_no_ema(exported, tmp_path):
  config, state, out, root = exported
  # A converted-style model folder exports the same way (here: our output).
  again = str(tmp_path / 'again')
  export.export(out, again, platforms=['cpu'], with_jax_export=False)
  _, a = model_io.load_model(out)
  _, b = model_io.load_model(again)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  raw = str(tmp_path / 'raw')
  export.export(str(root / 'run'), raw, use_ema=False, with_jax_export=False)
  _, c = model_io.load_model(raw)
  np.testing.assert_array_equal(
      c['generator']['params']['fc']['kernel'],
      np.asarray(state.g.params['generator']['fc']['kernel']))


def test_bad_step_and_bad_folder(exported, tmp_path):
  _, _, _, root = exported
  with pytest.raises(ValueError, match='steps \\[3\\]'):
    export.export(str(root / 'run'), str(tmp_path / 'x'), step=7)
  with pytest.raises(FileNotFoundError, match='neither a training workdir'):
    export.export(str(tmp_path), str(tmp_path / 'y'))


def test_cli(exported, tmp_path):
  _, _, _, root = exported
  out = str(tmp_path / 'cli')
  proc = subprocess.run(
      [sys.executable, '-m', 'spade_jax.export', '--workdir',
       str(root / 'run'), '--output', out, '--platforms=cpu'],
      capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.isfile(os.path.join(out, export.EXPORT_FILE))
  assert os.path.isfile(os.path.join(out, model_io.CONFIG_FILE))


def test_converted_reference_checkpoint_exports(reference_dir, tmp_path):
  """The shared reference checkpoint: convert, export, match PyTorch.

  (Synthesizer.load on the same kind of folder is checked against PyTorch in
  synthesizer_test.py; here the exported module is.)
  """
  from spade_jax import convert  # pylint: disable=g-import-not-at-top
  converted = str(tmp_path / 'converted')
  convert.convert(str(reference_dir), str(reference_dir / 'opt.json'),
                  converted)
  io = np.load(reference_dir / 'io.npz')
  want = io['G_eval'].transpose(0, 2, 3, 1)
  n = len(io['label'])
  out = str(tmp_path / 'exported')
  export.export(converted, out, batch_size=n, platforms=['cpu'])
  _, variables = model_io.load_model(out)
  assert sorted(variables) == ['generator']  # No discriminator.
  scale = np.abs(want).max()
  with open(os.path.join(out, export.EXPORT_FILE), 'rb') as f:
    module = jax.export.deserialize(bytearray(f.read()))
  got = np.asarray(module.call(io['label'].astype(np.int32),
                               io['instance'].astype(np.int32)))
  assert np.abs(got - want).max() / scale < 1e-4
