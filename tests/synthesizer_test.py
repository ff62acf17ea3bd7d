"""The Synthesizer: converted reference models in eval mode, and its checks.

Every reference configuration of reference_cases.py is converted, loaded with
`Synthesizer.load` and run on the case's label and instance maps against the
PyTorch generator in eval mode (running statistics, stored spectral vectors).
The shared fixture's recorded `G_eval` is checked the same way. Bad inputs
must fail with a ValueError that names the value at fault, and a converted
folder must load as a training start point.
"""
import jax
import numpy as np
import pytest
import torch

from spade_jax import convert
from spade_jax import model_io
from spade_jax import models
from spade_jax import synthesizer as synthesizer_lib
import reference_cases as rc

TOL = 1e-4
CASES = sorted(rc.CASES)
VAE_CASES = sorted(k for k, (o, _) in rc.CASES.items() if o.get('use_vae'))
NETS = {'G': 'generator', 'D': 'discriminator', 'E': 'encoder'}


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  return lambda name: rc.converted(name, tmp_path_factory)


@pytest.fixture(scope='module')
def synth(converted):
  """name -> (case, Synthesizer), loaded once per module (jit caches kept)."""
  cache = {}

  def get(name):
    if name not in cache:
      case, out = converted(name)
      cache[name] = case, synthesizer_lib.Synthesizer.load(
          str(out), compiler_options=rc.FAST_COMPILE)
    return cache[name]

  return get


_FIXTURE_MODELS = {}


@pytest.fixture
def fixture_model(reference_dir, tmp_path_factory):
  """(io arrays, model folder) of the shared fixture, converted once."""
  key = str(reference_dir)
  if key not in _FIXTURE_MODELS:
    out = tmp_path_factory.mktemp('fixture') / 'converted'
    convert.convert(str(reference_dir), str(reference_dir / 'opt.json'),
                    str(out))
    io = dict(np.load(reference_dir / 'io.npz'))
    # Default compiler options here: the path users take.
    _FIXTURE_MODELS[key] = (io, out,
                            synthesizer_lib.Synthesizer.load(str(out)))
  return _FIXTURE_MODELS[key]


def _differ(a, b) -> bool:
  """Clearly different images (untrained generators' outputs are small)."""
  return rc.max_rel_err(a, b) > 1e-2


def _torch_generate(case, z=None):
  """The PyTorch generator in eval mode on the case's inputs."""
  with torch.no_grad():
    return case.nets['G'].eval()(
        case.semantics(),
        None if z is None else torch.from_numpy(np.array(z, np.float32)))


# ---------------------------------------------------------------------------
# Outputs against the reference.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('name', CASES)
def test_eval_output_matches_reference(name, synth):
  case, model = synth(name)
  assert model.image_size == tuple(case.size)
  ours = model(case.label, case.instance, z=case.z)
  assert ours.dtype == np.float32
  assert ours.shape == (rc.BATCH,) + tuple(case.size) + (3,)
  assert np.all(np.abs(ours) <= 1)
  assert rc.max_rel_err(ours, _torch_generate(case, case.z)) < TOL


def test_shared_fixture_eval_output_matches_reference(fixture_model):
  io, _, model = fixture_model
  ours = model(io['label'], io['instance'])
  assert rc.max_rel_err(ours, torch.from_numpy(io['G_eval'])) < TOL


def test_dontcare_255_is_the_dontcare_class(fixture_model):
  io, _, model = fixture_model
  label_nc = model.config.label_nc
  assert model.config.contain_dontcare_label
  assert np.any(io['label'] == label_nc)
  as_255 = np.where(io['label'] == label_nc, 255, io['label']).astype(np.uint8)
  np.testing.assert_array_equal(model(as_255, io['instance']),
                                model(io['label'], io['instance']))


@pytest.mark.parametrize('name', VAE_CASES)
def test_style_images_go_through_the_encoder(name, synth):
  """z = mu + exp(logvar / 2) * N(0, 1) from the encoder, the noise from rng."""
  case, model = synth(name)
  rng = jax.random.PRNGKey(3)
  with torch.no_grad():
    mu, logvar = case.nets['E'].eval()(rc.nchw(case.image))
  mu, logvar = mu.numpy(), logvar.numpy()
  # An untrained encoder's mu is small next to the noise: checked on its own.
  assert rc.max_rel_err(model.encode(case.image, sample=False), mu) < TOL
  noise = np.asarray(jax.random.normal(rng, mu.shape))
  z = mu + noise * np.exp(0.5 * logvar)
  ours_z = model.encode(case.image, rng)
  assert ours_z.shape == (rc.BATCH, case.z.shape[1])
  assert rc.max_rel_err(ours_z - noise, z - noise) < TOL
  ours = model(case.label, case.instance, style_images=case.image, rng=rng)
  np.testing.assert_array_equal(
      ours, model(case.label, case.instance, z=ours_z))
  assert rc.max_rel_err(ours, _torch_generate(case, z)) < TOL


@pytest.mark.parametrize('name', VAE_CASES)
def test_random_z_follows_rng(name, synth):
  case, model = synth(name)
  key, other = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  a = model(case.label, case.instance, rng=key)
  np.testing.assert_array_equal(a, model(case.label, case.instance, rng=key))
  assert _differ(a, model(case.label, case.instance, rng=other))
  # The sampled z is a standard normal drawn from rng, given to the generator.
  z = np.asarray(jax.random.normal(key, (rc.BATCH, case.z.shape[1])))
  assert rc.max_rel_err(a, _torch_generate(case, z)) < TOL
  # Style images are sampled with rng too (the noise is checked above).
  assert _differ(
      model(case.label, case.instance, style_images=case.image, rng=key),
      model(case.label, case.instance, style_images=case.image, rng=other))


# ---------------------------------------------------------------------------
# Bad inputs name the value at fault.
# ---------------------------------------------------------------------------
def _fails(model, *expected, **kwargs):
  with pytest.raises(ValueError) as info:
    model(**kwargs)
  message = str(info.value)
  for text in expected:
    assert text in message, message
  return message


def test_labels_of_wrong_rank_are_rejected(synth):
  case, model = synth('aspect2')
  _fails(model, '(32, 64)', 'leading axis', labels=case.label[0],
         instances=case.instance[0])
  _fails(model, '(2, 1, 32, 64)', '(N, 32, 64)', labels=case.label[:, None],
         instances=case.instance[:, None])


def test_labels_of_wrong_size_are_rejected(synth):
  case, model = synth('aspect2')
  # The transposed map: the model wants 32x64 (aspect ratio 2).
  _fails(model, '(2, 64, 32)', '(N, 32, 64)',
         labels=case.label.transpose(0, 2, 1),
         instances=case.instance.transpose(0, 2, 1))


def test_float_labels_are_rejected(synth):
  case, model = synth('aspect2')
  _fails(model, 'float32', 'integer', labels=case.label.astype(np.float32),
         instances=case.instance)


@pytest.mark.parametrize('bad', [-1, 6, 7, 254, 256, 2**32 + 1])
def test_class_ids_out_of_range_are_named(synth, bad):
  case, model = synth('aspect2')  # label_nc=5, with don't-care.
  labels = case.label.astype(np.int64)
  labels[1, 3, 4] = bad
  _fails(model, f'[{bad}] at 1 pixel', "0..4, or 5 or 255 (don't care)",
         labels=labels, instances=case.instance)


@pytest.mark.parametrize('bad', [5, 255, -1])
def test_dontcare_ids_need_the_dontcare_class(synth, bad):
  case, model = synth('no_instance')  # label_nc=5, no don't-care.
  assert not model.config.contain_dontcare_label
  labels = case.label.copy()
  labels[0, 0, 0] = bad
  message = _fails(model, f'[{bad}]', '0..4', labels=labels)
  assert '255' not in message.replace(f'[{bad}]', '')


def test_dontcare_ids_are_accepted_with_the_dontcare_class(synth):
  case, model = synth('aspect2')
  label_nc = model.config.label_nc
  labels = np.full_like(case.label, label_nc)
  np.testing.assert_array_equal(
      model(np.full_like(case.label, 255), case.instance),
      model(labels, case.instance))


def test_missing_instances_are_named(synth):
  case, model = synth('most')
  _fails(model, 'instances', 'no_instance=False', labels=case.label)


def test_instances_of_other_shape_are_named(synth):
  case, model = synth('most')
  _fails(model, 'instances', str(case.instance[:1].shape),
         str(case.label.shape), labels=case.label,
         instances=case.instance[:1])
  _fails(model, 'instances', 'float64', labels=case.label,
         instances=case.instance.astype(np.float64))


def test_style_inputs_need_a_vae(synth):
  case, model = synth('no_instance')
  _fails(model, 'use_vae=False', 'style_images', labels=case.label,
         style_images=case.image)
  _fails(model, 'use_vae=False', labels=case.label,
         z=np.zeros((rc.BATCH, 256), np.float32))


def test_vae_inputs_of_wrong_shape_are_named(synth):
  case, model = synth('vae')
  _fails(model, 'style_images', '(2, 128, 128, 3)', '(N, 256, 256, 3)',
         labels=case.label, instances=case.instance,
         style_images=case.image[:, ::2, ::2])
  _fails(model, 'style_images', '1 images', '2 label maps',
         labels=case.label, instances=case.instance,
         style_images=case.image[:1])
  _fails(model, 'style_images', 'uint8', labels=case.label,
         instances=case.instance, style_images=case.image.astype(np.uint8))
  _fails(model, 'z', '(2, 8)', '(2, 256)', labels=case.label,
         instances=case.instance, z=np.zeros((2, 8), np.float32))
  _fails(model, 'z', 'style_images', labels=case.label,
         instances=case.instance, z=case.z, style_images=case.image)


def test_style_images_need_an_encoder(converted):
  case, out = converted('vae')
  config, variables = model_io.load_model(str(out))
  model = synthesizer_lib.Synthesizer(config,
                                      {'generator': variables['generator']})
  _fails(model, 'no encoder', labels=case.label, instances=case.instance,
         style_images=case.image)
  with pytest.raises(ValueError, match='no generator'):
    synthesizer_lib.Synthesizer(config, {'encoder': variables['encoder']})


# ---------------------------------------------------------------------------
# The converted folder as a training start point.
# ---------------------------------------------------------------------------
def _shapes(tree):
  return jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)),
                                tree)


def _fresh_variables(config, nets):
  """Shapes of freshly initialised networks, as training would create them."""
  h, w = models.output_size(config)
  rng = jax.random.PRNGKey(0)
  label = np.zeros((1, h, w), np.int32)
  edges = np.zeros((1, h, w), np.float32)
  image = np.zeros((1, h, w, 3), np.float32)
  init = {
      'G': lambda: models.make_generator(config).init(
          {'params': rng, 'z': rng}, label, edges),
      'D': lambda: models.make_discriminator(config).init(
          rng, np.zeros((1, h, w, models.semantic_nc(config) + 3),
                        np.float32)),
      'E': lambda: models.make_encoder(config).init(rng, image),
  }
  return {NETS[k]: dict(jax.eval_shape(init[k])) for k in nets}


@pytest.mark.parametrize('name', ['vae', 'spade_batch', 'pix2pixhd'])
def test_converted_folder_loads_for_training(name, converted):
  case, out = converted(name)
  config, variables = model_io.load_model(str(out))
  nets = rc.CASES[name][1]
  assert set(variables) == {NETS[k] for k in nets}
  assert _shapes(variables) == _shapes(_fresh_variables(config, nets))
  assert config.label_nc == case.opt['label_nc']


def test_shared_fixture_folder_loads_for_training(fixture_model):
  _, out, _ = fixture_model
  config, variables = model_io.load_model(str(out))
  assert set(variables) == {'generator', 'discriminator'}
  assert _shapes(variables) == _shapes(_fresh_variables(config, 'GD'))
