"""Tests for spade_jax.vgg: forward parity with torch, loaders and errors."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from spade_jax import vgg as vgg_lib
import torch_reference


@pytest.fixture(scope='module')
def torch_features():
  return torch_reference.vgg19_features()


@pytest.fixture(scope='module')
def pth_file(tmp_path_factory, torch_features):
  """A state dict in torchvision's key format, plus keys we must ignore."""
  state = {f'features.{k}': v for k, v in torch_features.state_dict().items()}
  # Layers past relu5_1 and the classifier exist in the real file: ignored.
  state['features.30.weight'] = torch.zeros(512, 512, 3, 3)
  state['features.30.bias'] = torch.zeros(512)
  state['classifier.0.weight'] = torch.zeros(4, 8)
  state['classifier.0.bias'] = torch.zeros(4)
  path = tmp_path_factory.mktemp('vgg') / 'vgg19-test.pth'
  torch.save(state, path)
  return path


def _torch_slices(features, x_nchw):
  with torch.no_grad():
    outs = torch_reference.vgg19_slices(features, torch.from_numpy(x_nchw))
  return [h.numpy().transpose(0, 2, 3, 1).copy() for h in outs]


@pytest.fixture(scope='module')
def image():
  return np.random.default_rng(0).uniform(
      -1, 1, (2, 3, 20, 24)).astype(np.float32)


def _assert_close_relative(got, want, rtol):
  got = np.asarray(got, np.float32)
  scale = np.max(np.abs(want))
  assert scale > 0
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def test_keys_and_shapes_match_torchvision(torch_features):
  state = {f'features.{k}': tuple(v.shape)
           for k, v in torch_features.state_dict().items()}
  assert state == vgg_lib.expected_torch_shapes()


def test_forward_matches_torch(torch_features, pth_file, image):
  params = vgg_lib.load_vgg19_params(pth_file)
  want = _torch_slices(torch_features, image)
  got = jax.jit(vgg_lib.VGG19().apply)(params, image.transpose(0, 2, 3, 1))
  assert len(got) == 5
  # 20x24 input: pools floor to 10x12, 5x6, 2x3, 1x1.
  assert [g.shape[1:3] for g in got] == [(20, 24), (10, 12), (5, 6), (2, 3),
                                         (1, 1)]
  for g, w in zip(got, want):
    assert g.shape == w.shape
    assert g.dtype == jnp.float32
    _assert_close_relative(g, w, 1e-4)


def test_bfloat16_compute_float32_params(pth_file, image):
  params = vgg_lib.load_vgg19_params(pth_file)
  x = image.transpose(0, 2, 3, 1)
  net16 = vgg_lib.VGG19(dtype=jnp.bfloat16)
  got = jax.jit(net16.apply)(params, x)
  want = jax.jit(vgg_lib.VGG19().apply)(params, x)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    _assert_close_relative(g, np.asarray(w), 0.1)
  init = jax.eval_shape(net16.init, jax.random.PRNGKey(0), x)
  for leaf in jax.tree_util.tree_leaves(init):
    assert leaf.dtype == jnp.float32


def test_loaded_params_layout(torch_features, pth_file):
  params = vgg_lib.load_vgg19_params(pth_file)['params']
  assert sorted(params) == sorted(f'conv{i}' for i, *_ in vgg_lib.VGG19_CONVS)
  w = torch_features[5].weight.detach().numpy()  # (128, 64, 3, 3)
  assert params['conv5']['kernel'].shape == (3, 3, 64, 128)
  assert params['conv5']['kernel'].dtype == np.float32
  # kernel[kh, kw, in, out] == weight[out, in, kh, kw].
  assert params['conv5']['kernel'][2, 0, 7, 11] == w[11, 7, 2, 0]
  np.testing.assert_array_equal(params['conv5']['bias'],
                                torch_features[5].bias.detach().numpy())


def test_npz_round_trip(pth_file, tmp_path):
  params = vgg_lib.load_vgg19_params(pth_file)
  npz = tmp_path / 'vgg19.npz'
  vgg_lib.save_vgg19_npz(params, npz)
  with np.load(npz) as data:
    assert data['features.0.weight'].shape == (64, 3, 3, 3)
  again = vgg_lib.load_vgg19_params(npz)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)


def test_convert_command_line(pth_file, tmp_path):
  npz = tmp_path / 'converted.npz'
  assert vgg_lib.main(['vgg', str(pth_file), str(npz)]) == 0
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         vgg_lib.load_vgg19_params(pth_file),
                         vgg_lib.load_vgg19_params(npz))
  assert vgg_lib.main(['vgg']) == 2


def test_missing_file_says_how_to_get_it(tmp_path):
  for path in (tmp_path / 'absent.pth', tmp_path / 'absent.npz', ''):
    with pytest.raises(FileNotFoundError,
                       match=r'vgg19-dcbb9e9d\.pth.*lambda_vgg=0'):
      vgg_lib.load_vgg19_params(path)


def _small_npz(tmp_path, drop=(), reshape=None):
  """An .npz with the right keys and shapes (zeros), minus / plus faults."""
  arrays = {k: np.zeros(s, np.float32)
            for k, s in vgg_lib.expected_torch_shapes().items()
            if k not in drop}
  if reshape:
    arrays[reshape[0]] = np.zeros(reshape[1], np.float32)
  path = tmp_path / 'bad.npz'
  np.savez(path, **arrays)
  return path


def test_missing_keys_are_named(tmp_path):
  path = _small_npz(tmp_path, drop=('features.21.weight', 'features.28.bias'))
  with pytest.raises(ValueError,
                     match=r"missing 2 key.*'features.21.weight'.*"
                     r"'features.28.bias'"):
    vgg_lib.load_vgg19_params(path)


def test_wrong_shapes_are_named(tmp_path):
  path = _small_npz(tmp_path, reshape=('features.7.weight', (128, 64, 3, 3)))
  with pytest.raises(ValueError,
                     match=r'features\.7\.weight: expected \(128, 128, 3, 3\),'
                     r' got \(128, 64, 3, 3\)'):
    vgg_lib.load_vgg19_params(path)


def test_unprefixed_state_dict_names_missing_keys(tmp_path, torch_features):
  # A bare `features` Sequential state dict (keys '0.weight', ...).
  path = tmp_path / 'bare.pth'
  torch.save(torch_features.state_dict(), path)
  with pytest.raises(ValueError, match=r"features\.0\.weight.*'0\.bias'"):
    vgg_lib.load_vgg19_params(path)


def test_unreadable_files(tmp_path):
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(b'not a torch file')
  with pytest.raises(ValueError, match='Could not read'):
    vgg_lib.load_vgg19_params(junk)
  junk_npz = tmp_path / 'junk.npz'
  junk_npz.write_bytes(b'not an npz file')
  with pytest.raises(ValueError, match='Could not read'):
    vgg_lib.load_vgg19_params(junk_npz)
  not_dict = tmp_path / 'tensor.pth'
  torch.save(torch.zeros(3), not_dict)
  with pytest.raises(ValueError, match='not a state dict'):
    vgg_lib.load_vgg19_params(not_dict)


def test_pth_without_torch_is_a_clear_error(pth_file, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` fails.
  with pytest.raises(ImportError, match='needs torch.*\\.npz'):
    vgg_lib.load_vgg19_params(pth_file)
