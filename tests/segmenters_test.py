"""The Flax segmenters against PyTorch ones built with random weights.

Each test builds the reference network in PyTorch (test-only definitions of
tests/segmenter_torch.py written from the public code, or the `mit-semseg`
package itself for UperNet), gives it random weights with realistic
BatchNorm statistics, saves its state dict with torch.save exactly as the
project publishes its weights (key layout included), loads that file with
`segmenters.load_variables` and compares the outputs.

Input sizes: the sizes the SPADE protocol feeds the segmenters, the paper's
generated images: 256x256 for COCO-Stuff (DeepLab) and ADE20K (UperNet),
512x256 (W x H) for Cityscapes (DRN). The segmenter projects' own evaluation
sizes (full COCO / ADE images at 513 or up to 1000 pixels, Cityscapes at
2048x1024) take minutes per pass on a 2-core CPU; the networks are fully
convolutional, so the sizes SPADE actually evaluates at are the ones tested.
"""
import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from spade_jax import segmenter_nets  # pylint: disable=g-import-not-at-top
from spade_jax import segmenters  # pylint: disable=g-import-not-at-top
import segmenter_torch  # pylint: disable=g-import-not-at-top


def _image(height, width, seed=0):
  rng = np.random.default_rng(seed)
  # Smooth structure plus noise, so the network sees image-like statistics.
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([np.sin(xx / 17.0 + c) * np.cos(yy / 23.0 - c)
                   for c in range(3)], -1)
  return np.clip(0.5 + 0.35 * base + 0.1 * rng.standard_normal(base.shape),
                 0, 1).astype(np.float32)


def _to_torch(x_nhwc):
  return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))


def _to_nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _assert_close(got, want, what, scale=None):
  """Equal to float32 rounding, relative to the logits' magnitude `scale`.

  Through 100+ layers float32 rounding adds up: PyTorch's own float32 run of
  these networks differs from its float64 run by up to ~2e-4 of the logits'
  magnitude (measured; the Flax port is as close to the float64 run, or
  closer). A port error (padding, dilation, stride, a missing ReLU) changes
  the output by O(1) of it. The bound: 5e-4, and the same argmax almost
  everywhere.
  """
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = np.abs(want).max() if scale is None else scale
  assert scale > 1e-3, f'{what}: degenerate reference output'
  err = np.abs(got - want).max() / scale
  assert err < 5e-4, f'{what}: max |diff| / max |logit| = {err:.2e}'
  agree = (got.argmax(-1) == want.argmax(-1)).mean()
  assert agree > 0.999, f'{what}: argmax agrees on {agree:.4%} of pixels'


def test_deeplabv2_msc_matches_pytorch(tmp_path):
  """DeepLab v2 MSC (182 classes) on a 256x256 BGR mean-subtracted image."""
  torch.manual_seed(0)
  model = segmenter_torch.deeplabv2_resnet101_msc(182)
  x = (_image(256, 256)[None] * 255)[..., ::-1] - np.array(
      [104.008, 116.669, 122.675], np.float32)
  x = x.astype(np.float32)
  segmenter_torch.calibrate_batch_norm(model.base, _to_torch(x[:, ::4, ::4]))
  path = tmp_path / segmenters.DEEPLAB_FILE
  torch.save(model.state_dict(), path)  # Keys `base.layer1.conv1.conv...`.
  base_outputs = []
  model.base.register_forward_hook(
      lambda mod, inp, out: base_outputs.append(_to_nhwc(out)))
  with torch.no_grad():
    want = _to_nhwc(model(_to_torch(x)))

  variables = segmenters.load_variables('deeplabv2_cocostuff', str(path))
  net = segmenters.make_network('deeplabv2_cocostuff')
  got, state = jax.jit(lambda v, x: net.apply(
      v, x, capture_intermediates=lambda m, _: m.name == 'base'))(
          variables, x)
  assert got.shape == (1, 33, 33, 182)
  scale = np.abs(want).max()
  _assert_close(got, want, 'DeepLab MSC', scale)
  # The base network at each scale (1, 0.5, 0.75): single-scale mode is the
  # first.
  got_base = state['intermediates']['base']['__call__']
  assert [g.shape[1:3] for g in got_base] == [(33, 33), (17, 17), (25, 25)]
  for g, w, p in zip(got_base, base_outputs, (1, 0.5, 0.75)):
    _assert_close(g, w, f'DeepLab base at scale {p}', scale)


def test_upernet101_matches_mit_semseg(tmp_path):
  """mit-semseg resnet101 + upernet (150 classes) on a 256x256 image."""
  semseg = pytest.importorskip(
      'mit_semseg.models.models',
      reason='the UperNet reference is the mit-semseg package: '
      '`pip install --no-deps mit-semseg`')
  torch.manual_seed(0)
  # ModelBuilder.build_encoder('resnet101') / build_decoder('upernet',
  # fc_dim=2048, num_class=150), without the ImageNet download.
  encoder = semseg.Resnet(semseg.resnet.resnet101(pretrained=False))
  decoder = semseg.UPerNet(num_class=150, fc_dim=2048, fpn_dim=512)
  x = ((_image(256, 256, seed=1)[None] - segmenters._IMAGENET_MEAN)  # pylint: disable=protected-access
       / segmenters._IMAGENET_STD).astype(np.float32)  # pylint: disable=protected-access

  class Both(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.encoder, self.decoder = encoder, decoder

    def forward(self, t):
      return self.decoder(self.encoder(t, return_feature_maps=True))

  both = Both()
  segmenter_torch.calibrate_batch_norm(both, _to_torch(x[:, ::4, ::4]))
  enc_path, dec_path = tmp_path / 'encoder_epoch_50.pth', tmp_path / (
      'decoder_epoch_50.pth')
  torch.save(encoder.state_dict(), enc_path)
  torch.save(decoder.state_dict(), dec_path)
  with torch.no_grad():
    want = _to_nhwc(both(_to_torch(x)))  # log_softmax at 1/4 size.

  variables = segmenters.load_variables('upernet101_ade20k',
                                        f'{enc_path},{dec_path}')
  logits = jax.jit(segmenters.make_network('upernet101_ade20k').apply)(
      variables, x)
  assert logits.shape == (1, 64, 64, 150)
  _assert_close(jax.nn.log_softmax(logits, axis=-1), want, 'UperNet',
                np.abs(logits).max())


def test_drn_d_105_matches_pytorch(tmp_path):
  """DRNSeg(drn_d_105, 19) on a 512x256 (W x H) normalised image."""
  torch.manual_seed(0)
  model = segmenter_torch.DRNSeg(19)
  x = ((_image(256, 512, seed=2)[None] - segmenters._DRN_MEAN)  # pylint: disable=protected-access
       / segmenters._DRN_STD).astype(np.float32)  # pylint: disable=protected-access
  segmenter_torch.calibrate_batch_norm(model, _to_torch(x[:, ::4, ::4]))
  path = tmp_path / 'drn_d_105_cityscapes.pth'
  torch.save(model.state_dict(), path)  # base.0.0.weight ... seg, up.
  with torch.no_grad():
    log_probs, logits = model(_to_torch(x))
  variables = segmenters.load_variables('drn105_cityscapes', str(path))
  got = jax.jit(segmenters.make_network('drn105_cityscapes').apply)(
      variables, x)
  assert got.shape == (1, 256, 512, 19)
  # Log-probabilities, relative to the magnitude of the logits they come of.
  _assert_close(got, _to_nhwc(log_probs), 'DRN-D-105',
                np.abs(logits.numpy()).max())


def test_resize_bilinear_matches_pytorch():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 13, 9, 3)).astype(np.float32)
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  for size, scale in (((31, 20), None), ((5, 4), None), ((9, 6), 0.75),
                      ((6, 4), 0.5)):
    if scale:
      want = F.interpolate(_to_torch(x), scale_factor=scale, mode='bilinear',
                           align_corners=False)
    else:
      want = F.interpolate(_to_torch(x), size=size, mode='bilinear',
                           align_corners=False)
    got = segmenter_nets.resize_bilinear(x, size, scale=scale)
    np.testing.assert_allclose(got, _to_nhwc(want), atol=1e-5)


def test_pools_match_pytorch():
  rng = np.random.default_rng(1)
  for h, w in ((65, 64), (33, 17), (8, 8)):
    x = rng.standard_normal((1, h, w, 4)).astype(np.float32)
    for ceil in (True, False):
      want = torch.nn.MaxPool2d(3, 2, 1, ceil_mode=ceil)(_to_torch(x))
      np.testing.assert_array_equal(
          segmenter_nets.max_pool_3x3_s2(x, ceil), _to_nhwc(want))
    for s in (1, 2, 3, 6):
      want = torch.nn.AdaptiveAvgPool2d(s)(_to_torch(x))
      np.testing.assert_allclose(segmenter_nets.adaptive_avg_pool(x, s),
                                 _to_nhwc(want), atol=1e-6)


def test_missing_and_wrong_weights_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=segmenters.DEEPLAB_FILE):
    segmenters.load_variables('deeplabv2_cocostuff',
                              str(tmp_path / 'absent.pth'))
  with pytest.raises(FileNotFoundError, match='ENCODER.pth,DECODER.pth'):
    segmenters.load_variables('upernet101_ade20k', str(tmp_path / 'one.pth'))
  path = tmp_path / 'wrong.pth'
  torch.save({'features.0.weight': torch.zeros(3)}, path)
  with pytest.raises(ValueError, match='lack'):
    segmenters.load_variables('drn105_cityscapes', str(path))


def test_label_conventions():
  coco = segmenters.labels_from_annotation('deeplabv2_cocostuff',
                                           np.array([0, 181, 182, 255]))
  np.testing.assert_array_equal(coco, [0, 181, -1, -1])
  ade = segmenters.labels_from_annotation('upernet101_ade20k',
                                          np.array([0, 1, 150, 151]))
  np.testing.assert_array_equal(ade, [-1, 0, 149, -1])
  city = segmenters.labels_from_annotation(
      'drn105_cityscapes', np.array([0, 6, 7, 8, 26, 33, 34, 255]))
  np.testing.assert_array_equal(city, [-1, -1, 0, 1, 13, 18, -1, -1])
  # spade_jax ids: COCO 182 / ADE 150 are don't-care; Cityscapes label ids.
  np.testing.assert_array_equal(
      segmenters.labels_from_spade('deeplabv2_cocostuff',
                                   np.array([5, 182])), [5, -1])
  np.testing.assert_array_equal(
      segmenters.labels_from_spade('upernet101_ade20k',
                                   np.array([0, 149, 150])), [0, 149, -1])
  np.testing.assert_array_equal(
      segmenters.labels_from_spade('drn105_cityscapes',
                                   np.array([7, 24, 1])), [0, 11, -1])


def test_resize_labels_nearest_is_pil_nearest():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  label = np.random.default_rng(0).integers(0, 200, (37, 53)).astype(np.uint8)
  for size in ((256, 256), (20, 31)):
    want = np.asarray(Image.fromarray(label).resize(size[::-1],
                                                    Image.NEAREST))
    np.testing.assert_array_equal(
        segmenters.resize_labels_nearest(label, size), want)


def test_protocol_input_sizes():
  """Each project's scales and rounding, from a 256x256 / 256x512 image."""
  variables = {}  # inputs() needs no weights.
  images = np.zeros((1, 256, 256, 3), np.uint8)
  upernet = segmenters.Segmenter('upernet101_ade20k', variables)
  assert [x.shape[1:3] for x in upernet.inputs(images)] == [
      (320, 320), (384, 384), (480, 480), (544, 544), (608, 608)]
  single = segmenters.Segmenter('upernet101_ade20k', variables,
                                multi_scale=False)
  assert [x.shape[1:3] for x in single.inputs(images)] == [(256, 256)]
  drn = segmenters.Segmenter('drn105_cityscapes', variables)
  wide = np.zeros((1, 256, 512, 3), np.uint8)
  assert [x.shape[1:3] for x in drn.inputs(wide)] == [
      (256, 512), (128, 256), (192, 384), (320, 640), (384, 768),
      (448, 896)]
  deeplab = segmenters.Segmenter('deeplabv2_cocostuff', variables)
  (x,) = deeplab.inputs(np.full((1, 2, 2, 3), [10, 20, 30], np.uint8))
  np.testing.assert_allclose(x[0, 0, 0], [30 - 104.008, 20 - 116.669,
                                          10 - 122.675], rtol=1e-6)


class _PoolConv(nn.Module):
  """A stand-in network: stride-`pool` average pool, 1x1 conv (+ log-softmax)."""
  classes: int
  pool: int
  log_softmax: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(x, (self.pool, self.pool), (self.pool, self.pool))
    x = nn.Conv(self.classes, (1, 1), precision='highest')(x)
    return jax.nn.log_softmax(x, axis=-1) if self.log_softmax else x


def _torch_pool_conv(x_nhwc, variables, pool, log_softmax):
  kernel = np.asarray(variables['params']['Conv_0']['kernel'])
  bias = np.array(variables['params']['Conv_0']['bias'])
  t = torch.nn.functional.avg_pool2d(_to_torch(x_nhwc), pool)
  t = torch.nn.functional.conv2d(
      t, torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()),
      torch.from_numpy(bias))
  return torch.log_softmax(t, 1) if log_softmax else t


@pytest.mark.parametrize('name', ['upernet101_ade20k', 'drn105_cityscapes'])
def test_multi_scale_protocol_matches_the_projects_test_code(name):
  """Scales, PIL resizes, normalisation and score fusion, written out here
  from mit-semseg eval.py / fyu/drn segment.py test_ms (a stand-in network
  in place of the 101-layer one, the same in both)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  upernet = name == 'upernet101_ade20k'
  classes, pool = (150, 4) if upernet else (19, 8)
  net = _PoolConv(classes, pool, log_softmax=not upernet)
  variables = net.init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3)))
  h, w = (48, 40) if upernet else (64, 128)
  image = (_image(h, w, seed=3) * 255).astype(np.uint8)
  seg = segmenters.Segmenter(name, variables, network=net)
  got = np.asarray(seg.class_scores(image[None]))

  want = 0
  if upernet:  # eval.py: mean of softmax(interpolate(logits, label size)).
    for short in (300, 375, 450, 525, 600):
      scale = min(short / min(h, w), 1000 / max(h, w))
      th, tw = [((int(n * scale) - 1) // 32 + 1) * 32 for n in (h, w)]
      im = np.asarray(Image.fromarray(image).resize((tw, th),
                                                    Image.BILINEAR))
      x = ((im / 255. - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
      out = F.interpolate(_torch_pool_conv(x[None].astype(np.float32),
                                           variables, pool, False),
                          size=(h, w), mode='bilinear', align_corners=False)
      want = want + F.softmax(out, 1) / 5
  else:  # test_ms: sum of log-probabilities resized to the image size.
    for s in (1, 0.5, 0.75, 1.25, 1.5, 1.75):
      im = image if s == 1 else np.asarray(Image.fromarray(image).resize(
          (int(w * s), int(h * s)), Image.BICUBIC))
      x = (im / 255. - segmenters._DRN_MEAN) / segmenters._DRN_STD  # pylint: disable=protected-access
      out = _torch_pool_conv(x[None].astype(np.float32), variables, pool,
                             True)
      want = want + F.interpolate(out, size=(h, w), mode='bilinear',
                                  align_corners=False)
  want = _to_nhwc(want)
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-5 * np.abs(want).max())
  np.testing.assert_array_equal(seg.predict(image[None])[0],
                                want[0].argmax(-1))
