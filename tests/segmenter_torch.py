"""Test-only PyTorch definitions of DeepLab v2 MSC and DRN-D-105 segmentation.

Written from the public code's facts (kazuto1011/deeplab-pytorch
`libs/models/{resnet,deeplabv2,msc}.py`; fyu/drn `drn.py` and `segment.py`
`DRNSeg`): the same module names, hence the same state-dict keys as the
published weight files, and the same forward computation. UperNet's reference
is the `mit-semseg` package itself.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F


# ---- DeepLab v2 (deeplab-pytorch) ------------------------------------------


class ConvBnReLU(nn.Sequential):

  def __init__(self, cin, cout, k, stride, padding, dilation, relu=True):
    super().__init__()
    self.add_module('conv', nn.Conv2d(cin, cout, k, stride, padding,
                                      dilation, bias=False))
    self.add_module('bn', nn.BatchNorm2d(cout, eps=1e-5))
    if relu:
      self.add_module('relu', nn.ReLU())


class DLBottleneck(nn.Module):

  def __init__(self, cin, cout, stride, dilation, downsample):
    super().__init__()
    mid = cout // 4
    self.reduce = ConvBnReLU(cin, mid, 1, stride, 0, 1)
    self.conv3x3 = ConvBnReLU(mid, mid, 3, 1, dilation, dilation)
    self.increase = ConvBnReLU(mid, cout, 1, 1, 0, 1, relu=False)
    self.shortcut = (ConvBnReLU(cin, cout, 1, stride, 0, 1, relu=False)
                     if downsample else None)

  def forward(self, x):
    h = self.increase(self.conv3x3(self.reduce(x)))
    return F.relu(h + (self.shortcut(x) if self.shortcut is not None else x))


class DLResLayer(nn.Sequential):

  def __init__(self, n, cin, cout, stride, dilation):
    super().__init__()
    for i in range(n):
      self.add_module(f'block{i + 1}', DLBottleneck(
          cin if i == 0 else cout, cout, stride if i == 0 else 1, dilation,
          i == 0))


class Stem(nn.Sequential):

  def __init__(self):
    super().__init__()
    self.add_module('conv1', ConvBnReLU(3, 64, 7, 2, 3, 1))
    self.add_module('pool', nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class ASPP(nn.Module):

  def __init__(self, cin, cout, rates):
    super().__init__()
    for i, r in enumerate(rates):
      self.add_module(f'c{i}', nn.Conv2d(cin, cout, 3, 1, padding=r,
                                         dilation=r, bias=True))

  def forward(self, x):
    return sum(stage(x) for stage in self.children())


class DeepLabV2(nn.Sequential):

  def __init__(self, n_classes, n_blocks=(3, 4, 23, 3),
               rates=(6, 12, 18, 24)):
    super().__init__()
    self.add_module('layer1', Stem())
    self.add_module('layer2', DLResLayer(n_blocks[0], 64, 256, 1, 1))
    self.add_module('layer3', DLResLayer(n_blocks[1], 256, 512, 2, 1))
    self.add_module('layer4', DLResLayer(n_blocks[2], 512, 1024, 1, 2))
    self.add_module('layer5', DLResLayer(n_blocks[3], 1024, 2048, 1, 4))
    self.add_module('aspp', ASPP(2048, n_classes, rates))


class MSC(nn.Module):

  def __init__(self, base, scales=(0.5, 0.75)):
    super().__init__()
    self.base = base
    self.scales = scales

  def forward(self, x):
    logits = self.base(x)
    size = logits.shape[2:]
    outs = [logits]
    for p in self.scales:
      h = F.interpolate(x, scale_factor=p, mode='bilinear',
                        align_corners=False)
      outs.append(F.interpolate(self.base(h), size=size, mode='bilinear',
                                align_corners=False))
    return torch.max(torch.stack(outs), dim=0)[0]


def deeplabv2_resnet101_msc(n_classes=182):
  return MSC(DeepLabV2(n_classes))


# ---- DRN-D-105 (fyu/drn) ------------------------------------------------------


class DRNBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None,
               dilation=(1, 1)):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation[1],
                           dilation=dilation[1], bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    res = self.downsample(x) if self.downsample is not None else x
    return F.relu(out + res)


class DRND(nn.Module):
  """drn.DRN(Bottleneck, [1, 1, 3, 4, 23, 3, 1, 1], arch='D'), no fc."""

  def __init__(self, layers=(1, 1, 3, 4, 23, 3, 1, 1),
               channels=(16, 32, 64, 128, 256, 512, 512, 512)):
    super().__init__()
    self.inplanes = channels[0]
    self.layer0 = nn.Sequential(
        nn.Conv2d(3, channels[0], 7, 1, 3, bias=False),
        nn.BatchNorm2d(channels[0]), nn.ReLU())
    self.layer1 = self._conv_layers(channels[0], layers[0], 1)
    self.layer2 = self._conv_layers(channels[1], layers[1], 2)
    self.layer3 = self._layer(channels[2], layers[2], stride=2)
    self.layer4 = self._layer(channels[3], layers[3], stride=2)
    self.layer5 = self._layer(channels[4], layers[4], dilation=2)
    self.layer6 = self._layer(channels[5], layers[5], dilation=4)
    self.layer7 = self._conv_layers(channels[6], layers[6], dilation=2)
    self.layer8 = self._conv_layers(channels[7], layers[7], dilation=1)
    self.out_dim = channels[-1]

  def _layer(self, planes, blocks, stride=1, dilation=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * 4:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
          nn.BatchNorm2d(planes * 4))
    mods = [DRNBottleneck(self.inplanes, planes, stride, downsample,
                          (dilation, dilation))]
    self.inplanes = planes * 4
    for _ in range(1, blocks):
      mods.append(DRNBottleneck(self.inplanes, planes,
                                dilation=(dilation, dilation)))
    return nn.Sequential(*mods)

  def _conv_layers(self, channels, convs, stride=1, dilation=1):
    mods = []
    for i in range(convs):
      mods += [nn.Conv2d(self.inplanes, channels, 3,
                         stride if i == 0 else 1, padding=dilation,
                         dilation=dilation, bias=False),
               nn.BatchNorm2d(channels), nn.ReLU()]
      self.inplanes = channels
    return nn.Sequential(*mods)


def _fill_up_weights(up):
  w = up.weight.data
  f = math.ceil(w.size(2) / 2)
  c = (2 * f - 1 - f % 2) / (2. * f)
  for i in range(w.size(2)):
    for j in range(w.size(3)):
      w[0, 0, i, j] = (1 - math.fabs(i / f - c)) * (1 - math.fabs(j / f - c))
  for ch in range(1, w.size(0)):
    w[ch, 0, :, :] = w[0, 0, :, :]


class DRNSeg(nn.Module):

  def __init__(self, classes=19):
    super().__init__()
    trunk = DRND()
    self.base = nn.Sequential(*list(trunk.children()))
    self.seg = nn.Conv2d(trunk.out_dim, classes, 1, bias=True)
    self.up = nn.ConvTranspose2d(classes, classes, 16, stride=8, padding=4,
                                 output_padding=0, groups=classes, bias=False)
    _fill_up_weights(self.up)

  def forward(self, x):
    x = self.seg(self.base(x))
    return F.log_softmax(self.up(x), dim=1), x


def calibrate_batch_norm(model: nn.Module, x: torch.Tensor) -> None:
  """Random affine BN parameters, running statistics of `x` (realistic).

  With random weights and unit running statistics a 100-layer network's
  activations explode or vanish; one training-mode pass with momentum 1
  sets every BatchNorm's statistics to those of its input.
  """
  gen = torch.Generator().manual_seed(1)
  for m in model.modules():
    if isinstance(m, nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
      m.reset_running_stats()
      m.momentum = 1.0
      with torch.no_grad():
        m.weight.copy_(1 + 0.2 * torch.rand(m.weight.shape, generator=gen))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
  model.train()
  with torch.no_grad():
    model(x)
  model.eval()


def write_random_drn(path, seed=0) -> str:
  """A random-weight DRNSeg(19) saved as fyu/drn saves it (state dict)."""
  torch.manual_seed(seed)
  model = DRNSeg(19)
  calibrate_batch_norm(model, torch.rand(1, 3, 32, 64))
  torch.save(model.state_dict(), path)
  return str(path)
