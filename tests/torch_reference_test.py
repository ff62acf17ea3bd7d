"""Proves tests/torch_reference.py is the reference SPADE, then smoke-tests it.

The fixture tests load the reference's own checkpoints strictly and reproduce
its recorded outputs; the other tests build the configurations the fixtures do
not cover and check shapes, key names and the init / buffer helpers.
"""
import json
import math

import numpy as np
import pytest
import torch

import torch_reference as ref

_TOL = 1e-4


def _rel_err(got, want) -> float:
  got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture
def fixture(reference_dir):
  opt = json.loads((reference_dir / 'opt.json').read_text())
  io = dict(np.load(reference_dir / 'io.npz'))
  load = lambda name: torch.load(reference_dir / name, weights_only=True)
  return opt, io, load('net_G.pth'), load('net_D.pth')


def _loaded_generator(opt, state):
  net_g = ref.build_generator(opt)
  net_g.load_state_dict(state, strict=True)
  return net_g


def test_semantics_equal_recorded(fixture):
  opt, io, _, _ = fixture
  got = ref.semantics(io['label'], io['instance'], opt['label_nc'],
                      opt['contain_dontcare_label'], opt['no_instance'])
  assert got.shape[1] == ref.semantic_nc(opt) == opt['semantic_nc']
  np.testing.assert_array_equal(got.numpy(), io['semantics'])


def test_state_dict_keys_and_shapes_are_the_references(fixture):
  opt, _, state_g, state_d = fixture
  for net, state in ((ref.build_generator(opt), state_g),
                     (ref.build_discriminator(opt), state_d)):
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in state.items()}


def test_generator_eval_reproduces_reference(fixture):
  opt, io, state_g, _ = fixture
  net_g = _loaded_generator(opt, state_g).eval()
  with torch.no_grad():
    out = net_g(torch.from_numpy(io['semantics']))
  assert _rel_err(out, io['G_eval']) < _TOL


def test_generator_train_mode_reproduces_reference(fixture):
  opt, io, state_g, _ = fixture
  net_g = _loaded_generator(opt, state_g).train()
  with torch.no_grad():
    out = net_g(torch.from_numpy(io['semantics']))
  assert _rel_err(out, io['G_train']) < _TOL
  # Train mode moved the buffers: one power iteration, one BN update.
  moved = net_g.state_dict()
  for key in ('head_0.conv_0.weight_u',
              'up_3.norm_1.param_free_norm.running_mean'):
    assert not torch.equal(moved[key], state_g[key]), key


def test_discriminator_eval_reproduces_reference(fixture):
  opt, io, _, state_d = fixture
  net_d = ref.build_discriminator(opt)
  net_d.load_state_dict(state_d, strict=True)
  net_d.eval()
  x = torch.from_numpy(np.concatenate([io['semantics'], io['G_eval']], 1))
  with torch.no_grad():
    outs = net_d(x)
  names = sorted(k for k in io if k.startswith('D_eval_'))
  assert len(names) == sum(len(scale) for scale in outs)
  for name in names:
    scale, layer = map(int, name.split('_')[2:])
    assert _rel_err(outs[scale][layer], io[name]) < _TOL, name


def test_fixture_built_on_cpu_has_xavier_weight_orig(fixture):
  """The fixture was built with gpu_ids=[]: init reached weight_orig."""
  _, _, state_g, _ = fixture
  w = state_g['head_0.conv_0.weight_orig']  # (128, 128, 3, 3)
  xavier_std = 0.02 * math.sqrt(2.0 / (w[0].numel() + w[:, 0].numel()))
  assert abs(w.std().item() / xavier_std - 1) < 0.05


def _small(**overrides):
  opt = {'label_nc': 5, 'contain_dontcare_label': True, 'ngf': 4, 'ndf': 8,
         'crop_size': 64, 'n_layers_D': 3}
  opt.update(overrides)
  return opt


def _random_semantics(opt, n, h, w, seed=0):
  gen = np.random.default_rng(seed)
  nc = opt['label_nc'] + int(opt.get('contain_dontcare_label', False))
  label = gen.integers(0, nc, (n, h, w))
  instance = gen.integers(0, 3, (n, h, w))
  return ref.semantics(label, instance, opt['label_nc'],
                       opt.get('contain_dontcare_label', False),
                       opt.get('no_instance', False))


@pytest.mark.parametrize('overrides, hw', [
    ({}, (64, 64)),
    ({'num_upsampling_layers': 'more'}, (64, 64)),
    ({'num_upsampling_layers': 'most', 'crop_size': 128}, (128, 128)),
    ({'aspect_ratio': 2.0}, (32, 64)),
    ({'norm_G': 'spectralspadeinstance3x3'}, (64, 64)),
    ({'norm_G': 'spadebatch3x3'}, (64, 64)),
    ({'no_instance': True, 'contain_dontcare_label': False}, (64, 64)),
    ({'netG': 'pix2pixhd', 'norm_G': 'spectralinstance',
      'resnet_n_downsample': 2, 'resnet_n_blocks': 2}, (64, 64)),
    ({'netG': 'pix2pixhd', 'resnet_n_downsample': 1, 'resnet_n_blocks': 1,
      'resnet_kernel_size': 5, 'resnet_initial_kernel_size': 5}, (32, 32)),
])
def test_generator_configurations_run(overrides, hw):
  opt = _small(**overrides)
  torch.manual_seed(0)
  net_g = ref.init_like_reference(ref.build_generator(opt))
  seg = _random_semantics(opt, 2, *hw)
  ref.move_buffers(net_g, seg, steps=1)
  with torch.no_grad():
    out = net_g.eval()(seg)
  assert out.shape == (2, 3, *hw)
  assert torch.isfinite(out).all() and out.abs().max() <= 1


def test_spade_generator_layout():
  most = ref.build_generator(_small(num_upsampling_layers='most',
                                    crop_size=128))
  assert most.sh == most.sw == 1 and most.up_4.conv_1.out_channels == 2
  wide = ref.build_generator(_small(aspect_ratio=2.0))
  assert (wide.sh, wide.sw) == (1, 2)
  keys = ref.build_generator(_small(norm_G='spadebatch3x3')).state_dict()
  assert 'up_0.conv_s.weight' in keys and 'up_0.conv_0.weight_orig' not in keys
  assert 'head_0.norm_0.param_free_norm.num_batches_tracked' in keys
  inst = ref.build_generator(_small(norm_G='spectralspadeinstance5x5'))
  assert not any('param_free_norm' in k for k in inst.state_dict())
  assert inst.head_0.norm_0.mlp_gamma.weight.shape[2:] == (5, 5)


def test_pix2pixhd_key_layout():
  opt = _small(netG='pix2pixhd', norm_G='spectralinstance',
               resnet_n_downsample=2, resnet_n_blocks=1)
  shapes = {k: tuple(v.shape)
            for k, v in ref.build_generator(opt).state_dict().items()}
  # pad, conv(7), relu, 2 x (down, relu), block, 2 x (up, relu), pad, conv.
  assert shapes['model.1.0.weight_orig'] == (4, 7, 7, 7)
  assert 'model.1.0.bias' not in shapes
  assert shapes['model.7.conv_block.1.0.weight_orig'] == (16, 16, 3, 3)
  assert shapes['model.8.0.weight_orig'] == (16, 8, 3, 3)  # ConvTranspose.
  assert shapes['model.8.0.weight_u'] == (8,)
  assert shapes['model.13.weight'] == (3, 4, 7, 7)
  assert 'model.13.bias' in shapes


def test_vae_generator_and_encoder_run():
  opt = _small(use_vae=True, crop_size=256, ngf=4)
  torch.manual_seed(0)
  net_e = ref.init_like_reference(ref.build_encoder(opt))
  net_g = ref.init_like_reference(ref.build_generator(opt))
  assert net_g.fc.weight.shape == (16 * 4 * 8 * 8, 256)
  assert 'layer6.0.weight_orig' in net_e.state_dict()
  image = torch.rand(1, 3, 128, 128) * 2 - 1  # Resized to 256 inside.
  seg = _random_semantics(opt, 1, 256, 256)
  with torch.no_grad():
    mu, logvar = net_e(image)
    out = net_g(seg, mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
  assert mu.shape == logvar.shape == (1, 256)
  assert out.shape == (1, 3, 256, 256)


_SN = ('weight_orig', 'weight_u', 'weight_v')
_BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


@pytest.mark.parametrize('norm_d, model1_keys', [
    ('spectralinstance', ['0.0.' + k for k in _SN]),
    ('spectralbatch', ['0.0.' + k for k in _SN] + ['0.1.' + k for k in _BN]),
    ('spectralsync_batch',
     ['0.0.' + k for k in _SN] + ['0.1.' + k for k in _BN]),
    ('spectralnone', ['0.' + k for k in _SN + ('bias',)]),
    ('instance', ['0.0.weight']),
])
def test_discriminator_norms(norm_d, model1_keys):
  opt = _small(norm_D=norm_d, num_D=3)
  torch.manual_seed(0)
  net_d = ref.init_like_reference(ref.build_discriminator(opt))
  prefix = 'discriminator_2.model1.'
  keys = {k[len(prefix):] for k in net_d.state_dict() if k.startswith(prefix)}
  assert keys == set(model1_keys)
  x = torch.cat([_random_semantics(opt, 2, 64, 64),
                 torch.rand(2, 3, 64, 64)], 1)
  ref.move_buffers(net_d, x, steps=1)
  with torch.no_grad():
    outs = net_d.eval()(x)
  sizes = [[o.shape[-1] for o in scale] for scale in outs]
  assert sizes == [[33, 17, 18, 19], [17, 9, 10, 11], [9, 5, 6, 7]]
  assert [o.shape[1] for o in outs[0]] == [8, 16, 32, 1]


def test_init_like_reference():
  opt = _small()
  torch.manual_seed(0)
  net_g = ref.build_generator(opt)
  default_orig = net_g.head_0.conv_0.weight_orig.clone()
  ref.init_like_reference(net_g)
  conv = net_g.head_0.norm_0.mlp_gamma  # (64, 128, 3, 3)
  xavier_std = 0.02 * math.sqrt(2.0 / ((64 + 128) * 9))
  assert abs(conv.weight.std().item() / xavier_std - 1) < 0.05
  assert not conv.bias.any() and not net_g.head_0.conv_0.bias.any()
  assert torch.equal(net_g.head_0.conv_0.weight_orig, default_orig)
  ref.init_like_reference(net_g, spectral_orig=True)
  assert net_g.head_0.conv_0.weight_orig.std() < 0.1 * default_orig.std()


def test_move_buffers_moves_stats_and_vectors():
  opt = _small(norm_D='spectralsync_batch')
  net_g, net_d = ref.build_generator(opt), ref.build_discriminator(opt)
  before_g = {k: v.clone() for k, v in net_g.state_dict().items()}
  before_d = {k: v.clone() for k, v in net_d.state_dict().items()}
  net_g.eval()
  seg = _random_semantics(opt, 2, 64, 64)
  ref.move_buffers(net_g, seg, steps=1)
  ref.move_buffers(net_d, torch.cat([seg, torch.rand(2, 3, 64, 64)], 1),
                   steps=1)
  assert not net_g.training and net_d.training
  after_g, after_d = net_g.state_dict(), net_d.state_dict()
  for key in ('up_1.norm_s.param_free_norm.running_var',
              'up_1.conv_s.weight_v'):
    assert not torch.equal(after_g[key], before_g[key]), key
  # Like the reference's sync BN, the counter stays at 0.
  assert after_g['up_1.norm_s.param_free_norm.num_batches_tracked'] == 0
  for key in ('discriminator_1.model2.0.1.running_mean',
              'discriminator_1.model2.0.0.weight_u'):
    assert not torch.equal(after_d[key], before_d[key]), key
  assert torch.equal(after_g['fc.weight'], before_g['fc.weight'])
