"""Reference configurations the shared fixtures do not cover, for conversion.

Each case builds the PyTorch model of the reference networks
(`torch_reference.py`), initialises it like the reference, moves its running
statistics and spectral-norm vectors with a few training forwards, and writes
what a reference run folder holds: `net_G.pth` (`net_D.pth`, `net_E.pth`) as
`torch.save(state_dict)` and the options as `opt.json`. Used by
convert_test.py and synthesizer_test.py.
"""
import copy
import dataclasses
import json
import pathlib
from typing import Dict, Optional

import jax
import numpy as np
import torch

from spade_jax import convert
import torch_reference as ref

BATCH = 2
# Training forwards that move the buffers before saving: one suffices to take
# every running statistic and spectral vector off its initial value.
MOVE_STEPS = 1
# XLA options for the tests' own jitted forwards: a lower LLVM optimisation
# level compiles these conv-heavy graphs 2-3x faster on CPU; the maths (and
# the floating-point results, checked against PyTorch) are the same.
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}
# Options every case shares (reference names); CASES override them.
_BASE = {'label_nc': 5, 'contain_dontcare_label': True, 'no_instance': False,
         'ngf': 4, 'ndf': 4, 'crop_size': 64, 'n_layers_D': 4, 'num_D': 2}
# name -> (option overrides, which nets the folder holds).
CASES = {
    'vae': ({'use_vae': True, 'crop_size': 256, 'ngf': 2, 'label_nc': 3},
            'GE'),
    'more': ({'num_upsampling_layers': 'more'}, 'GD'),
    'most': ({'num_upsampling_layers': 'most', 'crop_size': 128,
              'contain_dontcare_label': False}, 'G'),
    'aspect2': ({'aspect_ratio': 2.0}, 'G'),
    'spade_instance': ({'norm_G': 'spectralspadeinstance3x3'}, 'G'),
    'spade_batch': ({'norm_G': 'spadebatch5x5', 'norm_D': 'spectralbatch',
                     'n_layers_D': 3}, 'GD'),
    'no_instance': ({'no_instance': True, 'contain_dontcare_label': False},
                    'G'),
    'pix2pixhd': ({'netG': 'pix2pixhd', 'norm_G': 'spectralinstance',
                   'resnet_n_downsample': 2, 'resnet_n_blocks': 2}, 'G'),
    'pix2pixhd_batch': ({'netG': 'pix2pixhd', 'norm_G': 'spectralbatch',
                         'resnet_n_downsample': 1, 'resnet_n_blocks': 1,
                         'resnet_kernel_size': 5,
                         'resnet_initial_kernel_size': 5, 'crop_size': 32},
                        'G'),
}
# Options a real reference opt file also carries (checked or ignored).
_RUN_OPTIONS = {'name': 'test_run', 'gpu_ids': [], 'checkpoints_dir': './c',
                'model': 'pix2pix', 'init_type': 'xavier',
                'init_variance': 0.02, 'output_nc': 3, 'isTrain': True,
                'netD_subarch': 'n_layer', 'netD': 'multiscale',
                'dataset_mode': 'custom', 'batchSize': BATCH}


@dataclasses.dataclass
class Case:
  """A reference model, its run folder and inputs.

  Attributes:
    name: the key in CASES.
    opt: the reference options (as in opt.json).
    nets: {'G': module, 'D': ..., 'E': ...} in the state that was saved,
      eval mode. Use `fresh(net)` for a copy to run training forwards on.
    directory: the run folder (net_*.pth and opt.json).
    label: (N, H, W) int class ids, don't-care already as label_nc.
    instance: (N, H, W) int instance ids.
    image: (N, H, W, 3) float32 in [-1, 1] (style image / real image).
    z: (N, z_dim) float32 latent codes (VAE cases), else None.
  """
  name: str
  opt: Dict
  nets: Dict[str, torch.nn.Module]
  directory: pathlib.Path
  label: np.ndarray
  instance: np.ndarray
  image: np.ndarray
  z: Optional[np.ndarray]

  @property
  def opt_path(self) -> pathlib.Path:
    return self.directory / 'opt.json'

  @property
  def size(self):
    return self.label.shape[1:]

  def semantics(self, label=None) -> torch.Tensor:
    """The reference generator's input (NCHW) for `label` (default ours)."""
    return ref.semantics(self.label if label is None else label,
                         self.instance, self.opt['label_nc'],
                         self.opt['contain_dontcare_label'],
                         self.opt['no_instance'])

  def d_input(self, image_nchw: torch.Tensor) -> torch.Tensor:
    return torch.cat([self.semantics(), image_nchw], dim=1)


def fresh(net: torch.nn.Module) -> torch.nn.Module:
  return copy.deepcopy(net)


def options(name: str) -> Dict:
  overrides, _ = CASES[name]
  opt = dict(_BASE)
  opt.update(overrides)
  full = ref._full(opt)  # pylint: disable=protected-access
  opt['norm_G'] = full['norm_G']
  opt['semantic_nc'] = ref.semantic_nc(opt)
  return opt


def output_size(opt):
  h = round(opt['crop_size'] / opt.get('aspect_ratio', 1.0))
  return h, opt['crop_size']


def _blocky(rng, n, size, high, cells=8):
  """Piecewise-constant random maps, so maps have regions and boundaries.

  The top-left cells differ between the samples: the generators' first
  blocks see 1x1 or 1x2 semantic maps (`more`, `most`, aspect ratio 2), and
  with identical samples there the batch variance of their batch norms is
  zero and their outputs are rounding noise amplified by 1/sqrt(eps).
  """
  h, w = size
  small = rng.integers(0, high, (n, cells, cells))
  small[:, 0, 0] = rng.permutation(high)[:n]
  rows = np.arange(h) * cells // h
  cols = np.arange(w) * cells // w
  return small[:, rows][:, :, cols]


def build(name: str, directory: pathlib.Path, seed: int = 0) -> Case:
  """Builds case `name` and writes its reference run folder to `directory`."""
  opt = options(name)
  nets_wanted = CASES[name][1]
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  size = output_size(opt)
  nc = opt['label_nc'] + int(opt['contain_dontcare_label'])
  label = _blocky(rng, BATCH, size, nc)
  instance = _blocky(rng, BATCH, size, 4, cells=5)
  image = rng.uniform(-1, 1, (BATCH,) + size + (3,)).astype(np.float32)
  z = (rng.standard_normal((BATCH, opt.get('z_dim', 256))).astype(np.float32)
       if opt.get('use_vae') else None)
  nets = {}
  # Buffers are moved with inputs other than the test's, like a trained net.
  move_label = _blocky(rng, BATCH, size, nc, cells=6)
  seg = ref.semantics(move_label, instance, opt['label_nc'],
                      opt['contain_dontcare_label'], opt['no_instance'])
  move_image = torch.rand(BATCH, 3, *size) * 2 - 1
  g = ref.init_like_reference(ref.build_generator(opt))
  if opt.get('use_vae'):
    ref.move_buffers(g, seg, torch.randn(BATCH, opt.get('z_dim', 256)),
                     steps=MOVE_STEPS)
  else:
    ref.move_buffers(g, seg, steps=MOVE_STEPS)
  nets['G'] = g.eval()
  if 'D' in nets_wanted:
    d = ref.init_like_reference(ref.build_discriminator(opt))
    ref.move_buffers(d, torch.cat([seg, move_image], 1), steps=MOVE_STEPS)
    nets['D'] = d.eval()
  if 'E' in nets_wanted:
    e = ref.init_like_reference(ref.build_encoder(opt))
    ref.move_buffers(e, move_image, steps=MOVE_STEPS)
    nets['E'] = e.eval()
  directory.mkdir(parents=True, exist_ok=True)
  for key, net in nets.items():
    torch.save(net.state_dict(), directory / f'net_{key}.pth')
  full_opt = dict(_RUN_OPTIONS)
  full_opt.update(opt)
  (directory / 'opt.json').write_text(json.dumps(full_opt, indent=1))
  return Case(name, opt, nets, directory, label, instance, image, z)


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def max_rel_err(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|; `theirs` NCHW torch or NHWC numpy."""
  if isinstance(theirs, torch.Tensor):
    theirs = theirs.detach().numpy()
    if theirs.ndim == 4:
      theirs = theirs.transpose(0, 2, 3, 1)
  ours = np.asarray(ours)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def jit(fn, **kwargs):
  """jax.jit with FAST_COMPILE."""
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


_BUILT = {}


def converted(name: str, tmp_path_factory):
  """(case, model folder) for case `name`, built and converted once a session.

  The model folder is written by `convert.convert`, the Python entry point of
  `python -m spade_jax.convert`.
  """
  if name not in _BUILT:
    root = tmp_path_factory.mktemp(name)
    case = build(name, root / 'reference')
    out = root / 'converted'
    convert.convert(str(case.directory), str(case.opt_path), str(out))
    _BUILT[name] = case, out
  return _BUILT[name]
