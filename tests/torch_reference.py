"""A compact PyTorch model of the NVlabs SPADE networks, for tests only.

Our own code, written from ../shared/SPEC.md and checked against the
reference's recorded checkpoints and outputs (see torch_reference_test.py).
State-dict keys, shapes and forward semantics are the reference's, so
reference checkpoints load with `strict=True` and configurations that the
fixtures do not cover can be compared against the JAX port.

Options are a plain dict with the reference's option names; missing ones take
the reference's defaults (`DEFAULTS`). All tensors are NCHW.
"""
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DEFAULTS = {
    'contain_dontcare_label': False,
    'no_instance': False,
    'ngf': 64,
    'ndf': 64,
    'norm_G': None,  # 'spectralspadesyncbatch3x3', or 'instance' for pix2pixhd.
    'norm_D': 'spectralinstance',
    'norm_E': 'spectralinstance',
    'num_upsampling_layers': 'normal',
    'crop_size': 256,
    'aspect_ratio': 1.0,
    'use_vae': False,
    'z_dim': 256,
    'n_layers_D': 4,
    'num_D': 2,
    'netG': 'spade',
    'resnet_n_downsample': 4,
    'resnet_n_blocks': 9,
    'resnet_kernel_size': 3,
    'resnet_initial_kernel_size': 7,
    'output_nc': 3,
}
_NUM_UPSAMPLINGS = {'normal': 5, 'more': 6, 'most': 7}
_SPADE_HIDDEN = 128  # Fixed in the reference.
_ENCODER_OUT = 256  # fc_mu / fc_var width, fixed in the reference.


def _full(opt: Mapping) -> Dict:
  """Options with the reference's defaults filled in."""
  full = dict(DEFAULTS)
  full.update(opt)
  if full['norm_G'] is None:
    full['norm_G'] = ('instance' if full['netG'] == 'pix2pixhd' else
                      'spectralspadesyncbatch3x3')
  return full


def semantic_nc(opt: Mapping) -> int:
  """Channels of the semantic input: one-hot labels plus instance edges."""
  opt = _full(opt)
  return (opt['label_nc'] + int(opt['contain_dontcare_label']) +
          int(not opt['no_instance']))


def semantics(label, instance, label_nc: int, contain_dontcare_label: bool,
              no_instance: bool) -> torch.Tensor:
  """The generator's semantic input, as the reference builds it.

  Args:
    label: (N, H, W) or (N, 1, H, W) integer class ids in [0, nc), where
      nc = label_nc + contain_dontcare_label (the data loader has already
      mapped 255 to label_nc).
    instance: instance ids of the same shape; ignored when `no_instance`.
    label_nc: number of classes without the don't-care class.
    contain_dontcare_label: whether class label_nc (don't care) is one-hot too.
    no_instance: leave out the instance-edge channel.

  Returns:
    (N, nc [+ 1], H, W) float32: one-hot labels, then instance edges (1.0
    where a pixel's id differs from any of its 4 neighbours).
  """
  label = torch.as_tensor(np.asarray(label)).long()
  if label.dim() == 4:
    label = label[:, 0]
  nc = label_nc + int(contain_dontcare_label)
  onehot = F.one_hot(label, nc).permute(0, 3, 1, 2).float()
  if no_instance:
    return onehot
  inst = torch.as_tensor(np.asarray(instance)).long()
  if inst.dim() == 4:
    inst = inst[:, 0]
  edge = torch.zeros_like(inst, dtype=torch.bool)
  dx = inst[:, :, 1:] != inst[:, :, :-1]
  dy = inst[:, 1:, :] != inst[:, :-1, :]
  edge[:, :, 1:] |= dx
  edge[:, :, :-1] |= dx
  edge[:, 1:, :] |= dy
  edge[:, :-1, :] |= dy
  return torch.cat([onehot, edge[:, None].float()], dim=1)


class SyncBatchNorm2d(nn.BatchNorm2d):
  """The reference's SynchronizedBatchNorm2d on one device.

  Same maths and buffers as BatchNorm2d, but, like the reference, it calls
  F.batch_norm directly and so never counts `num_batches_tracked`.
  """

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                        self.bias, self.training, self.momentum, self.eps)


def nonspade_norm(norm_type: str) -> Callable[[nn.Module], nn.Module]:
  """Wraps a conv as the reference's get_nonspade_norm_layer does.

  `spectral{sub}`: spectral norm on the layer, then the sub-norm `sub` in
  ('', 'none', 'instance', 'batch', 'sync_batch'). A sub-norm removes the
  layer's bias and wraps both as Sequential(layer, norm). (The reference
  crashes on names without `spectral`; here they mean the sub-norm alone.)
  """
  spectral = norm_type.startswith('spectral')
  subnorm = norm_type[len('spectral'):] if spectral else norm_type

  def wrap(layer: nn.Module) -> nn.Module:
    if spectral:
      layer = nn.utils.spectral_norm(layer)
    if subnorm in ('', 'none'):
      return layer
    if getattr(layer, 'bias', None) is not None:
      delattr(layer, 'bias')
      layer.register_parameter('bias', None)
    channels = layer.out_channels
    if subnorm == 'batch':
      norm = nn.BatchNorm2d(channels, affine=True)
    elif subnorm == 'sync_batch':
      norm = SyncBatchNorm2d(channels, affine=True)
    elif subnorm == 'instance':
      norm = nn.InstanceNorm2d(channels, affine=False)
    else:
      raise ValueError(f'unknown normalization {norm_type!r}')
    return nn.Sequential(layer, norm)

  return wrap


class SPADE(nn.Module):
  """Param-free norm of x, then scale and shift predicted from seg."""

  def __init__(self, config: str, norm_nc: int, label_nc: int):
    super().__init__()
    match = re.fullmatch(r'spade(\D+)(\d)x\d', config)
    if not match:
      raise ValueError(f'bad SPADE config {config!r}')
    kind, ks = match.group(1), int(match.group(2))
    if kind == 'instance':
      self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
    elif kind == 'syncbatch':
      self.param_free_norm = SyncBatchNorm2d(norm_nc, affine=False)
    elif kind == 'batch':
      self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
    else:
      raise ValueError(f'unknown param-free norm {kind!r}')
    pad = ks // 2
    self.mlp_shared = nn.Sequential(
        nn.Conv2d(label_nc, _SPADE_HIDDEN, ks, padding=pad), nn.ReLU())
    self.mlp_gamma = nn.Conv2d(_SPADE_HIDDEN, norm_nc, ks, padding=pad)
    self.mlp_beta = nn.Conv2d(_SPADE_HIDDEN, norm_nc, ks, padding=pad)

  def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    normalized = self.param_free_norm(x)
    seg = F.interpolate(seg, size=x.shape[2:], mode='nearest')
    actv = self.mlp_shared(seg)
    return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
  """Residual block with SPADE norms; learned 1x1 shortcut iff fin != fout."""

  def __init__(self, fin: int, fout: int, norm_G: str, label_nc: int):
    super().__init__()
    self.learned_shortcut = fin != fout
    fmid = min(fin, fout)
    sn = nn.utils.spectral_norm if 'spectral' in norm_G else (lambda m: m)
    config = norm_G.replace('spectral', '')
    self.conv_0 = sn(nn.Conv2d(fin, fmid, 3, padding=1))
    self.conv_1 = sn(nn.Conv2d(fmid, fout, 3, padding=1))
    if self.learned_shortcut:
      self.conv_s = sn(nn.Conv2d(fin, fout, 1, bias=False))
    self.norm_0 = SPADE(config, fin, label_nc)
    self.norm_1 = SPADE(config, fmid, label_nc)
    if self.learned_shortcut:
      self.norm_s = SPADE(config, fin, label_nc)

  def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    if self.learned_shortcut:
      x_s = self.conv_s(self.norm_s(x, seg))
    else:
      x_s = x
    dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
    dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
    return x_s + dx


class SPADEGenerator(nn.Module):
  """forward(seg, z=None) -> image in [-1, 1] at seg's resolution."""

  def __init__(self, opt: Mapping):
    super().__init__()
    opt = _full(opt)
    self.opt = opt
    nf = opt['ngf']
    n_up = _NUM_UPSAMPLINGS[opt['num_upsampling_layers']]
    self.sw = opt['crop_size'] // 2**n_up
    self.sh = round(self.sw / opt['aspect_ratio'])
    label_nc = semantic_nc(opt)
    if opt['use_vae']:
      self.fc = nn.Linear(opt['z_dim'], 16 * nf * self.sh * self.sw)
    else:
      self.fc = nn.Conv2d(label_nc, 16 * nf, 3, padding=1)

    def block(fin, fout):
      return SPADEResnetBlock(fin, fout, opt['norm_G'], label_nc)

    self.head_0 = block(16 * nf, 16 * nf)
    self.G_middle_0 = block(16 * nf, 16 * nf)
    self.G_middle_1 = block(16 * nf, 16 * nf)
    self.up_0 = block(16 * nf, 8 * nf)
    self.up_1 = block(8 * nf, 4 * nf)
    self.up_2 = block(4 * nf, 2 * nf)
    self.up_3 = block(2 * nf, nf)
    final_nc = nf
    if opt['num_upsampling_layers'] == 'most':
      self.up_4 = block(nf, nf // 2)
      final_nc = nf // 2
    self.conv_img = nn.Conv2d(final_nc, 3, 3, padding=1)
    self.up = nn.Upsample(scale_factor=2)

  def forward(self, seg: torch.Tensor,
              z: Optional[torch.Tensor] = None) -> torch.Tensor:
    mode = self.opt['num_upsampling_layers']
    if self.opt['use_vae']:
      if z is None:  # As the reference: sample when no z is given.
        z = torch.randn(seg.shape[0], self.opt['z_dim'])
      x = self.fc(z).view(-1, 16 * self.opt['ngf'], self.sh, self.sw)
    else:
      x = self.fc(F.interpolate(seg, size=(self.sh, self.sw)))
    x = self.head_0(x, seg)
    x = self.G_middle_0(self.up(x), seg)
    if mode in ('more', 'most'):
      x = self.up(x)
    x = self.G_middle_1(x, seg)
    for block in (self.up_0, self.up_1, self.up_2, self.up_3):
      x = block(self.up(x), seg)
    if mode == 'most':
      x = self.up_4(self.up(x), seg)
    return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


class ResnetBlock(nn.Module):
  """pix2pixHD residual block: x + (pad, conv, relu, pad, conv)(x)."""

  def __init__(self, dim: int, norm_layer, kernel_size: int):
    super().__init__()
    pad = (kernel_size - 1) // 2
    self.conv_block = nn.Sequential(
        nn.ReflectionPad2d(pad), norm_layer(nn.Conv2d(dim, dim, kernel_size)),
        nn.ReLU(), nn.ReflectionPad2d(pad),
        norm_layer(nn.Conv2d(dim, dim, kernel_size)))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x + self.conv_block(x)


class Pix2PixHDGenerator(nn.Module):
  """forward(seg, z=None) -> image; everything lives in `model.{i}`."""

  def __init__(self, opt: Mapping):
    super().__init__()
    opt = _full(opt)
    norm_layer = nonspade_norm(opt['norm_G'])
    ngf, n_down = opt['ngf'], opt['resnet_n_downsample']
    k0 = opt['resnet_initial_kernel_size']
    layers = [nn.ReflectionPad2d(k0 // 2),
              norm_layer(nn.Conv2d(semantic_nc(opt), ngf, k0)), nn.ReLU()]
    mult = 1
    for _ in range(n_down):
      layers += [norm_layer(nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2,
                                      padding=1)), nn.ReLU()]
      mult *= 2
    for _ in range(opt['resnet_n_blocks']):
      layers.append(ResnetBlock(ngf * mult, norm_layer,
                                opt['resnet_kernel_size']))
    for _ in range(n_down):
      layers += [norm_layer(nn.ConvTranspose2d(
          ngf * mult, ngf * mult // 2, 3, stride=2, padding=1,
          output_padding=1)), nn.ReLU()]
      mult //= 2
    layers += [nn.ReflectionPad2d(3),
               nn.Conv2d(ngf * mult, opt['output_nc'], 7), nn.Tanh()]
    self.model = nn.Sequential(*layers)

  def forward(self, seg: torch.Tensor,
              z: Optional[torch.Tensor] = None) -> torch.Tensor:
    del z  # Unused, as in the reference.
    return self.model(seg)


class NLayerDiscriminator(nn.Module):
  """PatchGAN; forward returns every layer group's output, the last is D's."""

  def __init__(self, opt: Mapping):
    super().__init__()
    opt = _full(opt)
    in_nc = semantic_nc(opt) + opt['output_nc']
    norm_layer = nonspade_norm(opt['norm_D'])
    nf = opt['ndf']
    groups = [[nn.Conv2d(in_nc, nf, 4, stride=2, padding=2),
               nn.LeakyReLU(0.2)]]
    for n in range(1, opt['n_layers_D']):
      nf_prev, nf = nf, min(nf * 2, 512)
      stride = 1 if n == opt['n_layers_D'] - 1 else 2
      groups.append([norm_layer(nn.Conv2d(nf_prev, nf, 4, stride=stride,
                                          padding=2)), nn.LeakyReLU(0.2)])
    groups.append([nn.Conv2d(nf, 1, 4, stride=1, padding=2)])
    for n, group in enumerate(groups):
      self.add_module(f'model{n}', nn.Sequential(*group))

  def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
    outputs = []
    for group in self.children():
      x = group(x)
      outputs.append(x)
    return outputs


class MultiscaleDiscriminator(nn.Module):
  """num_D PatchGANs on ever smaller copies of the input (avg-pooled)."""

  def __init__(self, opt: Mapping):
    super().__init__()
    opt = _full(opt)
    for i in range(opt['num_D']):
      self.add_module(f'discriminator_{i}', NLayerDiscriminator(opt))

  def forward(self, x: torch.Tensor) -> List[List[torch.Tensor]]:
    """x = concat(semantics, image); returns [scale][layer] outputs."""
    results = []
    for disc in self.children():
      results.append(disc(x))
      x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
    return results


class ConvEncoder(nn.Module):
  """VAE image encoder: forward(image) -> (mu, logvar), each (N, 256)."""

  def __init__(self, opt: Mapping):
    super().__init__()
    opt = _full(opt)
    nf = opt['ngf']
    norm_layer = nonspade_norm(opt['norm_E'])
    widths = [3, nf, 2 * nf, 4 * nf, 8 * nf, 8 * nf]
    if opt['crop_size'] >= 256:
      widths.append(8 * nf)
    self.num_layers = len(widths) - 1
    for k in range(self.num_layers):
      self.add_module(f'layer{k + 1}', norm_layer(
          nn.Conv2d(widths[k], widths[k + 1], 3, stride=2, padding=1)))
    # Sized for a 4x4 final map, i.e. crop_size >= 256, as in the reference.
    self.fc_mu = nn.Linear(8 * nf * 4 * 4, _ENCODER_OUT)
    self.fc_var = nn.Linear(8 * nf * 4 * 4, _ENCODER_OUT)

  def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if x.shape[2:] != (256, 256):
      x = F.interpolate(x, size=(256, 256), mode='bilinear',
                        align_corners=False)
    for k in range(self.num_layers):
      if k:
        x = F.leaky_relu(x, 0.2)
      x = getattr(self, f'layer{k + 1}')(x)
    x = F.leaky_relu(x, 0.2).flatten(1)
    return self.fc_mu(x), self.fc_var(x)


# torchvision `vgg19().features` up to relu5_1 (index 29), the VGG loss's
# network (SPEC.md), and the slice ends (exclusive) of its five outputs:
# relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
VGG19_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512,
             512, 512, 'M', 512)
VGG19_SLICE_ENDS = (2, 7, 12, 21, 30)


def vgg19_features() -> nn.Sequential:
  """torchvision's vgg19 `features[:30]` built by hand, random weights.

  He-scaled weights and small random biases so activations stay O(1);
  eval mode. Keys are torchvision's (`features.{index}.weight`).
  """
  torch.manual_seed(0)
  layers = []
  cin = 3
  for v in VGG19_CFG:
    if v == 'M':
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1),
                 nn.ReLU(inplace=True)]
      cin = v
  features = nn.Sequential(*layers)
  assert len(features) == VGG19_SLICE_ENDS[-1]
  with torch.no_grad():
    for m in features:
      if isinstance(m, nn.Conv2d):
        fan_in = m.in_channels * 9
        m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
        m.bias.normal_(0.0, 0.05)
  return features.eval()


def vgg19_slices(features: nn.Sequential,
                 x: torch.Tensor) -> List[torch.Tensor]:
  """The VGG loss's five outputs (relu1_1 ... relu5_1) of NCHW `x`."""
  outs, start = [], 0
  for end in VGG19_SLICE_ENDS:
    x = features[start:end](x)
    outs.append(x)
    start = end
  return outs


def build_generator(opt: Mapping) -> nn.Module:
  """SPADEGenerator, or Pix2PixHDGenerator when opt['netG'] == 'pix2pixhd'."""
  if _full(opt)['netG'] == 'pix2pixhd':
    return Pix2PixHDGenerator(opt)
  return SPADEGenerator(opt)


def build_discriminator(opt: Mapping) -> nn.Module:
  return MultiscaleDiscriminator(opt)


def build_encoder(opt: Mapping) -> nn.Module:
  return ConvEncoder(opt)


def init_like_reference(module: nn.Module, gain: float = 0.02,
                        spectral_orig: bool = False) -> nn.Module:
  """Re-initialises like the reference's init_weights('xavier', gain).

  Conv / ConvTranspose / Linear weights: xavier normal with `gain`; their
  biases 0 (spectral layers' biases too). Affine BatchNorm: weight N(1, gain),
  bias 0. Spectral layers' `weight_orig` keeps PyTorch's default init unless
  `spectral_orig`: the reference writes its init through the layer's cached
  `weight`, which aliases `weight_orig` only when the network was NOT moved
  to a GPU before init (gpu_ids empty, as for the shared fixtures); after
  `.cuda()` the alias is stale and the init misses `weight_orig`. The RNG
  draw order differs from the reference's.
  """
  with torch.no_grad():
    for m in module.modules():
      name = type(m).__name__
      if 'BatchNorm2d' in name:
        if m.weight is not None:
          nn.init.normal_(m.weight, 1.0, gain)
          nn.init.zeros_(m.bias)
      elif ('Conv' in name or 'Linear' in name) and hasattr(m, 'weight'):
        if hasattr(m, 'weight_orig'):
          if spectral_orig:
            nn.init.xavier_normal_(m.weight_orig, gain=gain)
        else:
          nn.init.xavier_normal_(m.weight, gain=gain)
        if getattr(m, 'bias', None) is not None:
          nn.init.zeros_(m.bias)
  return module


def move_buffers(module: nn.Module, *inputs: torch.Tensor,
                 steps: int = 3) -> nn.Module:
  """Runs `steps` training-mode forwards without gradients on `inputs`.

  Moves BatchNorm running statistics and spectral-norm u/v vectors off their
  initial values, so comparisons do not run on untouched buffers. Pass random
  inputs of the right shapes. The module's train/eval mode is restored.
  """
  was_training = module.training
  module.train()
  with torch.no_grad():
    for _ in range(steps):
      module(*inputs)
  module.train(was_training)
  return module
