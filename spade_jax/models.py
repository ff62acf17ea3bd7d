"""The SPADE networks: generators, multiscale discriminator, VAE encoder.

Flax Linen, NHWC. Submodule names follow the reference's state-dict keys
(`head_0.norm_0.mlp_shared`, `discriminator_0.model1`, `layer1`, ...) so a
reference checkpoint maps onto them one to one (see `convert.py`).

Generators take integer class ids (N, H, W) and, unless `no_instance`, instance
edges (N, H, W); the one-hot semantic map is built on the device.
"""
import functools
from typing import Any, List, Optional, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from spade_jax import layers
from spade_jax import sharding

Dtype = Any
NUM_UPSAMPLINGS = {'normal': 5, 'more': 6, 'most': 7}
# The boundary-sparse SPADE path's capacity (the share of a batch's pixels
# given the dense convolution) by resolution: (min shorter side, fraction),
# first match. Chosen from COCO-Stuff label maps with their instance edges
# (the sample's 21 images, resize_and_crop to 256 and 128): the share of
# non-uniform pixels (`layers.uniform_mask`) was mean 0.21 / max 0.39 at
# 256x256, mean 0.33-0.36 / max 0.57-0.62 at 128x128, mean 0.51 / max 0.79
# at 64x64 and 0.73 / 0.97 at 32x32. Two buckets each, about the mean and the
# max: a batch takes the smallest that holds it, and one above the largest
# runs dense (layers.boundary_sparse_conv).
SPARSE_CAPACITY = ((256, (0.25, 0.4)), (128, (0.4, 0.62)), (64, (0.6, 0.8)))


def semantic_nc(config) -> int:
  """Channels of the semantic input: classes (+ don't-care) (+ edges)."""
  return num_classes(config) + (0 if config.no_instance else 1)


def num_classes(config) -> int:
  """Classes the one-hot has: label_nc, plus one when there is a don't-care."""
  return config.label_nc + (1 if config.contain_dontcare_label else 0)


def latent_size(num_upsampling_layers: str, crop_size: int,
                aspect_ratio: float):
  """(sh, sw) of the generator's first feature map, as the reference."""
  if num_upsampling_layers not in NUM_UPSAMPLINGS:
    raise ValueError(f'num_upsampling_layers={num_upsampling_layers!r}: '
                     f'expected one of {sorted(NUM_UPSAMPLINGS)}.')
  sw = crop_size // 2**NUM_UPSAMPLINGS[num_upsampling_layers]
  sh = round(sw / aspect_ratio)
  return sh, sw


def output_size(config):
  """(H, W) of the generated image for a config (the data's crop size)."""
  if config.netG == 'pix2pixhd':
    return round(config.crop_size / config.aspect_ratio), config.crop_size
  sh, sw = latent_size(config.num_upsampling_layers, config.crop_size,
                       config.aspect_ratio)
  n = NUM_UPSAMPLINGS[config.num_upsampling_layers]
  return sh * 2**n, sw * 2**n


def _lrelu(x):
  return nn.leaky_relu(x, negative_slope=layers.LRELU_SLOPE)


class SPADEGenerator(nn.Module):
  """The reference SPADEGenerator (segmentation-map or VAE `z` input)."""
  num_classes: int
  use_instance: bool = True
  ngf: int = 64
  num_upsampling_layers: str = 'normal'
  crop_size: int = 256
  aspect_ratio: float = 1.0
  use_vae: bool = False
  z_dim: int = 256
  norm_G: str = 'spectralspadesyncbatch3x3'
  # SPADE's mlp_shared by the label lookup (layers.label_conv) or on the
  # one-hot map: the same function and parameters either way.
  label_lookup: bool = True
  # The boundary-sparse SPADE modulation (layers.boundary_sparse_conv) at
  # the resolutions whose shorter side is >= sparse_min_size; its capacity
  # there is the fraction (or the tuple of bucket fractions) of the first
  # `sparse_capacity` entry (min_side, fractions) with min_side <= the
  # shorter side.
  sparse: bool = False
  sparse_capacity: Tuple[Tuple[int, Any], ...] = None
  sparse_min_size: int = 256
  sparse_fallback: bool = True  # False: only to count FLOPs (layers.SPADE).
  conv_impl: str = 'auto'
  # Rematerialise each SPADE residual block in the backward pass (nn.remat):
  # only the blocks' inputs are kept; the same values and parameters.
  remat: bool = False
  dtype: Dtype = jnp.float32

  def sparse_fraction(self, size):
    """The sparse path's capacity (a fraction or a tuple of bucket
    fractions) at a resolution; None: dense there."""
    side = min(size)
    if not self.sparse or side < self.sparse_min_size:
      return None
    for min_side, fraction in self.sparse_capacity or SPARSE_CAPACITY:
      if side >= min_side:
        return fraction
    return None

  @nn.compact
  def __call__(self, label, edges=None, z=None, train: bool = False):
    nf = self.ngf
    sh, sw = latent_size(self.num_upsampling_layers, self.crop_size,
                         self.aspect_ratio)
    if self.use_instance and edges is None:
      raise ValueError('This generator was built with instance maps '
                       '(no_instance=False): pass instance edges.')
    # Each resolution's semantic map is resized once, on integer ids; the
    # SPADE layers get the ids (label lookup) or their one-hot.
    full = layers.LabelMap(label, edges if self.use_instance else None,
                           self.num_classes)
    seg_cache = {}

    def seg_at(size, one_hot=not self.label_lookup):
      key = (size, one_hot)
      if key not in seg_cache:
        # Split over the devices like the feature maps (spatial
        # partitioning; GSPMD would replicate the resize's gather).
        seg = sharding.constrain_spatial(full.resize(size))
        seg_cache[key] = seg.one_hot(self.dtype) if one_hot else seg
      return seg_cache[key]

    if self.use_vae:
      if z is None:
        z = jax.random.normal(self.make_rng('z'), (label.shape[0], self.z_dim))
      x = nn.Dense(16 * nf * sh * sw, kernel_init=layers.xavier_normal(),
                   dtype=self.dtype, name='fc')(z.astype(self.dtype))
      # The reference views the vector channel-major: (N, 16nf, sh, sw).
      x = x.reshape(-1, 16 * nf, sh, sw).transpose(0, 2, 3, 1)
    else:
      x = layers.Conv(16 * nf, 3, padding=1, dtype=self.dtype,
                      impl=self.conv_impl,
                      name='fc')(seg_at((sh, sw), one_hot=True))

    # static_argnums counts the module: (self, x, seg, train).
    block_cls = (nn.remat(layers.SPADEResnetBlock, static_argnums=(3,))
                 if self.remat else layers.SPADEResnetBlock)
    block = functools.partial(block_cls, norm_G=self.norm_G,
                              sparse_fallback=self.sparse_fallback,
                              conv_impl=self.conv_impl, dtype=self.dtype)

    def run(name, features, x):
      size = x.shape[1:3]
      fraction = self.sparse_fraction(size)
      # The sparse path needs the class ids (it uses the label lookup).
      seg = seg_at(size, one_hot=not (self.label_lookup or fraction))
      x = sharding.constrain_spatial(x)
      return block(features, sparse_fraction=fraction, name=name)(x, seg,
                                                                  train)

    x = run('head_0', 16 * nf, x)
    x = layers.upsample2x(x)
    x = run('G_middle_0', 16 * nf, x)
    if self.num_upsampling_layers in ('more', 'most'):
      x = layers.upsample2x(x)
    x = run('G_middle_1', 16 * nf, x)
    for i, features in enumerate((8 * nf, 4 * nf, 2 * nf, nf)):
      x = layers.upsample2x(x)
      x = run(f'up_{i}', features, x)
    if self.num_upsampling_layers == 'most':
      x = layers.upsample2x(x)
      x = run('up_4', nf // 2, x)
    x = layers.Conv(3, 3, padding=1, dtype=self.dtype, impl=self.conv_impl,
                    name='conv_img')(_lrelu(sharding.constrain_spatial(x)))
    return sharding.constrain_spatial(jnp.tanh(x.astype(jnp.float32)))


class Pix2PixHDGenerator(nn.Module):
  """The pix2pixHD global generator the paper compares against.

  Submodules are named `model_{i}` after the reference's Sequential index.
  """
  num_classes: int
  use_instance: bool = True
  ngf: int = 64
  norm_G: str = 'instance'
  n_downsample: int = 4
  n_blocks: int = 9
  kernel_size: int = 3
  initial_kernel_size: int = 7
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, label, edges=None, z=None, train: bool = False):
    del z  # Deterministic; kept for a common generator signature.
    x = layers.one_hot_semantics(label, edges if self.use_instance else None,
                                 self.num_classes, self.dtype)
    norm_conv = functools.partial(layers.NormConv, norm=self.norm_G,
                                  dtype=self.dtype, impl=self.conv_impl)
    reflect = lambda x, p: jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)),
                                   mode='reflect')
    k0 = self.initial_kernel_size
    x = nn.relu(norm_conv(self.ngf, k0, 1, 0, name='model_1')(
        reflect(x, k0 // 2), train))
    idx, mult = 3, 1
    for _ in range(self.n_downsample):
      x = nn.relu(norm_conv(self.ngf * mult * 2, 3, 2, 1, name=f'model_{idx}')(
          x, train))
      idx, mult = idx + 2, mult * 2
    pw = (self.kernel_size - 1) // 2
    for _ in range(self.n_blocks):
      dim = self.ngf * mult
      y = norm_conv(dim, self.kernel_size, 1, 0, name=f'model_{idx}_1')(
          reflect(x, pw), train)
      y = norm_conv(dim, self.kernel_size, 1, 0, name=f'model_{idx}_4')(
          reflect(nn.relu(y), pw), train)
      x, idx = x + y, idx + 1
    for _ in range(self.n_downsample):
      x = nn.relu(norm_conv(self.ngf * mult // 2, 3, 2, 1, transpose=True,
                            name=f'model_{idx}')(x, train))
      idx, mult = idx + 2, mult // 2
    x = layers.Conv(3, 7, padding=0, dtype=self.dtype, impl=self.conv_impl,
                    name=f'model_{idx + 1}')(reflect(x, 3))
    return jnp.tanh(x.astype(jnp.float32))


class NLayerDiscriminator(nn.Module):
  """PatchGAN; returns every intermediate output (the last is the score)."""
  ndf: int = 64
  n_layers_D: int = 4
  norm_D: str = 'spectralinstance'
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = False,
               seg=None) -> List[jnp.ndarray]:
    """x: the concatenated (semantics, image) input; or, with `seg` (a
    `layers.LabelMap` or `layers.PooledLabelMap` of x's size), the image
    alone, and the first convolution takes the semantic channels by lookup
    (same parameters). seg's batch may divide x's: the label part is
    computed once and repeated (x = [fake; real] with one label map)."""
    feats = []
    x, seg = sharding.constrain_spatial((x, seg))
    if seg is None:
      x = layers.Conv(self.ndf, 4, 2, 2, dtype=self.dtype,
                      impl=self.conv_impl, name='model0')(x)
    else:
      x = self.first_conv_on_labels(x, seg)
    feats.append(_lrelu(x))
    nf = self.ndf
    for n in range(1, self.n_layers_D):
      nf = min(nf * 2, 512)
      stride = 1 if n == self.n_layers_D - 1 else 2
      x = layers.NormConv(nf, 4, stride, 2, self.norm_D, dtype=self.dtype,
                          impl=self.conv_impl, name=f'model{n}')(feats[-1],
                                                                 train)
      feats.append(_lrelu(x))
    x = layers.Conv(1, 4, 1, 2, dtype=self.dtype, impl=self.conv_impl,
                    name=f'model{self.n_layers_D}')(feats[-1])
    feats.append(x)
    return feats

  def first_conv_on_labels(self, image, seg):
    """model0 on concat(one-hot of seg, image), the one-hot never built."""
    nsem = seg.channels
    kernel, bias = layers.Conv(self.ndf, 4, 2, 2, name='model0').weights(
        nsem + image.shape[-1])
    lookup = (layers.label_conv if isinstance(seg, layers.LabelMap)
              else layers.pooled_label_conv)
    y_sem = lookup(seg, kernel[:, :, :nsem], bias, 2, 2).astype(self.dtype)
    reps, rest = divmod(image.shape[0], y_sem.shape[0])
    if rest:
      raise ValueError(f'The label maps ({y_sem.shape[0]}) do not divide the '
                       f'image batch ({image.shape[0]}).')
    if reps > 1:
      y_sem = jnp.concatenate([y_sem] * reps, axis=0)
    y_img = layers.conv2d(image.astype(self.dtype),
                          kernel[:, :, nsem:].astype(self.dtype), 2, 2,
                          self.conv_impl)
    return y_sem + y_img


class MultiscaleDiscriminator(nn.Module):
  """`num_D` PatchGANs on successively 2x average-pooled inputs."""
  num_D: int = 2
  ndf: int = 64
  n_layers_D: int = 4
  norm_D: str = 'spectralinstance'
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = False,
               seg: Optional[layers.LabelMap] = None
               ) -> List[List[jnp.ndarray]]:
    """x: concat(one-hot semantics, image) on channels; or the image alone
    and `seg`, the label map (its batch may divide x's), which every scale's
    first convolution takes by lookup: the map itself at scale 0, its
    average-pooled one-hot as ids and weights (`layers.PooledLabelMap`)
    below. The same function and parameters either way."""
    outputs = []
    x = x.astype(self.dtype)
    pooled = None
    for i in range(self.num_D):
      if seg is None:
        scale_seg = None
      elif i == 0:
        scale_seg = seg
      else:
        pooled = (layers.PooledLabelMap.of(seg) if pooled is None
                  else pooled).pool()
        scale_seg = pooled
      outputs.append(NLayerDiscriminator(self.ndf, self.n_layers_D, self.norm_D,
                                         self.dtype, self.conv_impl,
                                         name=f'discriminator_{i}')(
                                             x, train, scale_seg))
      if i + 1 < self.num_D:
        x = layers.avg_pool_3x3_s2(x)
    return outputs


class ConvEncoder(nn.Module):
  """The VAE style encoder: image -> (mu, logvar), each (N, z_dim).

  Like the reference, the image is resized to 256x256 (bilinear) and a sixth
  layer is used when crop_size >= 256. Unlike the reference, whose fc layers
  only fit crop_size >= 256, the fc input size follows the features.
  """
  ngf: int = 64
  norm_E: str = 'spectralinstance'
  crop_size: int = 256
  z_dim: int = 256
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, image, train: bool = False):
    x = image.astype(jnp.float32)
    if x.shape[1:3] != (256, 256):
      x = jax.image.resize(x, (x.shape[0], 256, 256, x.shape[3]), 'bilinear',
                           antialias=False)
    nf = self.ngf
    widths = [nf, 2 * nf, 4 * nf, 8 * nf, 8 * nf]
    if self.crop_size >= 256:
      widths.append(8 * nf)
    x = x.astype(self.dtype)
    for i, width in enumerate(widths):
      if i:
        x = _lrelu(x)
      x = layers.NormConv(width, 3, 2, 1, self.norm_E, dtype=self.dtype,
                          impl=self.conv_impl, name=f'layer{i + 1}')(x, train)
    x = _lrelu(x)
    x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # channel-major
    dense = functools.partial(nn.Dense, self.z_dim, dtype=self.dtype,
                              kernel_init=layers.xavier_normal())
    mu = dense(name='fc_mu')(x).astype(jnp.float32)
    logvar = dense(name='fc_var')(x).astype(jnp.float32)
    return mu, logvar


def compute_dtype(config) -> Dtype:
  name = config.compute_dtype
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f'compute_dtype={name!r}: use float32 or bfloat16.')
  return jnp.dtype(name)


def conv_impl(config) -> str:
  """config.conv_impl (default 'auto'), checked.

  'patches' (a patch-matrix convolution, removed: it was measured slower
  than XLA's, docs/performance.md) computed the same function: a config
  saved with it reads as 'auto', with a warning.
  """
  impl = config.conv_impl
  if impl == 'patches':
    logging.warning("conv_impl='patches' was removed (measured slower than "
                    "XLA's convolution); using 'auto', the same function.")
    return 'auto'
  if impl not in layers.CONV_IMPLS:
    raise ValueError(f'conv_impl={impl!r}: expected one of '
                     f'{layers.CONV_IMPLS}.')
  return impl


REMAT_MODES = ('none', 'blocks')


def remat(config) -> str:
  """config.remat (default 'none'), checked: 'none' or 'blocks'."""
  value = config.get('remat', 'none')
  if value not in REMAT_MODES:
    raise ValueError(f'remat={value!r}: expected one of {REMAT_MODES} '
                     "('blocks': recompute each SPADE residual block in the "
                     'backward pass, to save memory).')
  return value


def label_lookup(config) -> bool:
  """config.spade_label_lookup; unset (None): on for the CPU backend only.

  The lookup made CPU training steps 1.4-1.9x faster; on an H100 the dense
  one-hot convolution was as fast or up to 20% faster (docs/performance.md).
  """
  value = config.spade_label_lookup
  return jax.default_backend() == 'cpu' if value is None else bool(value)


def spade_sparse(config, training: bool = True) -> bool:
  """config.spade_sparse; unset (None): on for the CPU backend.

  Measured on the 2-core CPU, alternating in one process
  (docs/performance.md): on real COCO-Stuff labels a 256x256 ngf 64
  training step is 8-25% faster (sparse at 256x256 only: the default
  spade_sparse_min_size; the machine's speed varied between days), the
  eval-mode generator 7-20% faster; at 128x128 ngf 32 the dense path was
  8-9% faster, so min_size 256 keeps that size dense. On maps with more
  boundary pixels than the capacity, where the dense fallback runs, a
  training step is 9-13% slower. No accelerator figure yet, so
  dense there, and dense with spatial_partitions > 1 (untested there).
  `training` is kept for a per-mode default.
  """
  del training
  value = config.spade_sparse
  if value is None:  # Not with images split over devices: untested there.
    return (jax.default_backend() == 'cpu' and
            config.spatial_partitions == 1)
  return bool(value)


def spade_sparse_capacity(config) -> Optional[Tuple[Tuple[int, float], ...]]:
  """config.spade_sparse_capacity as the generator's table (None: measured).

  A float in (0, 1) is the capacity at every resolution the path runs at.
  """
  value = config.spade_sparse_capacity
  if value is None:
    return None
  if not 0 < value < 1:
    raise ValueError(f'spade_sparse_capacity={value!r}: expected a share of '
                     'the pixels in (0, 1), e.g. 0.4, or unset for the '
                     'measured per-resolution table.')
  return ((0, float(value)),)


def make_generator(config: ml_collections.ConfigDict,
                   training: bool = True) -> nn.Module:
  """The generator `config.netG` names, from reference option names.

  `training`: for a train step (else the eval-mode generator); it chooses
  the default of speed switches only (`spade_sparse`), never the
  parameters.
  """
  common = dict(num_classes=num_classes(config),
                use_instance=not config.no_instance, ngf=config.ngf,
                dtype=compute_dtype(config), conv_impl=conv_impl(config))
  if config.netG == 'spade':
    layers.parse_spade_norm(config.norm_G)
    return SPADEGenerator(
        num_upsampling_layers=config.num_upsampling_layers,
        crop_size=config.crop_size, aspect_ratio=config.aspect_ratio,
        use_vae=config.use_vae, z_dim=config.z_dim, norm_G=config.norm_G,
        label_lookup=label_lookup(config),
        sparse=spade_sparse(config, training),
        sparse_capacity=spade_sparse_capacity(config),
        sparse_min_size=config.spade_sparse_min_size,
        sparse_fallback=config.spade_sparse_fallback,
        remat=remat(config) == 'blocks',
        **common)
  if config.netG == 'pix2pixhd':
    layers.parse_plain_norm(config.norm_G)
    return Pix2PixHDGenerator(
        norm_G=config.norm_G, n_downsample=config.resnet_n_downsample,
        n_blocks=config.resnet_n_blocks, kernel_size=config.resnet_kernel_size,
        initial_kernel_size=config.resnet_initial_kernel_size, **common)
  raise ValueError(f"netG={config.netG!r}: expected 'spade' or 'pix2pixhd'.")


def discriminator_inputs(config, label, edges, fake, image,
                         lookup: bool = True):
  """(x, seg) for the discriminator on [fake; real] with the batch's labels.

  With the label lookup (`label_lookup`, and `lookup`) x is the images and
  seg the label map, which the first convolutions take by lookup; else x is
  the concatenated (one-hot semantics, image) input and seg None.
  """
  dtype = compute_dtype(config)
  images = jnp.concatenate([fake.astype(dtype), image.astype(dtype)], axis=0)
  edges = None if config.no_instance else edges
  if lookup and label_lookup(config):
    return images, layers.LabelMap(label, edges, num_classes(config))
  semantics = layers.one_hot_semantics(label, edges, num_classes(config),
                                       dtype)
  return jnp.concatenate([jnp.concatenate([semantics] * 2, axis=0), images],
                         axis=-1), None


def make_discriminator(config) -> MultiscaleDiscriminator:
  layers.parse_plain_norm(config.norm_D)
  return MultiscaleDiscriminator(config.num_D, config.ndf, config.n_layers_D,
                                 config.norm_D, compute_dtype(config),
                                 conv_impl(config))


def make_encoder(config) -> ConvEncoder:
  layers.parse_plain_norm(config.norm_E)
  return ConvEncoder(config.ngf, config.norm_E, config.crop_size, config.z_dim,
                     compute_dtype(config), conv_impl(config))
