"""Tests for spade_jax.losses against values worked out by hand / in numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spade_jax import losses
from spade_jax import vgg as vgg_lib

# Two discriminator scales; each: [intermediate feature, prediction map].
# Scale 0 prediction: 1x2x2x1 = [-2, 0.5, 1, 3]; scale 1: 1x1x2x1 = [0, -0.5].
_P0 = np.array([-2.0, 0.5, 1.0, 3.0], np.float32).reshape(1, 2, 2, 1)
_P1 = np.array([0.0, -0.5], np.float32).reshape(1, 1, 2, 1)
_F0 = np.ones((1, 4, 4, 2), np.float32)
_F1 = np.ones((1, 2, 2, 2), np.float32)


def _preds(dtype=jnp.float32):
  return [[jnp.asarray(_F0, dtype), jnp.asarray(_P0, dtype)],
          [jnp.asarray(_F1, dtype), jnp.asarray(_P1, dtype)]]


# Hand-computed, per scale mean, then mean over the two scales.
# hinge D real: relu(1-x): s0 [3, .5, 0, 0] -> 0.875; s1 [1, 1.5] -> 1.25.
# hinge D fake: relu(1+x): s0 [0, 1.5, 2, 4] -> 1.875; s1 [1, .5] -> 0.75.
# hinge G: -mean: s0 -0.625; s1 0.25.
# ls real: (x-1)^2: s0 [9, .25, 0, 4] -> 3.3125; s1 [1, 2.25] -> 1.625.
# ls fake: x^2: s0 [4, .25, 1, 9] -> 3.5625; s1 [0, .25] -> 0.125.
_EXPECTED = {
    ('hinge', True, True): (0.875 + 1.25) / 2,
    ('hinge', False, True): (1.875 + 0.75) / 2,
    ('hinge', True, False): (-0.625 + 0.25) / 2,
    ('ls', True, True): (3.3125 + 1.625) / 2,
    ('ls', False, True): (3.5625 + 0.125) / 2,
    ('ls', True, False): (3.3125 + 1.625) / 2,
    ('w', True, True): (-0.625 + 0.25) / 2,
    ('w', False, True): (0.625 - 0.25) / 2,
}


@pytest.mark.parametrize('mode,real,for_d', sorted(_EXPECTED))
def test_gan_loss_hand_values(mode, real, for_d):
  got = losses.gan_loss(_preds(), real, for_d, mode)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _EXPECTED[(mode, real, for_d)], rtol=1e-6)


def _bce_numpy(x, t):
  p = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
  return np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))


@pytest.mark.parametrize('real', [True, False])
def test_gan_loss_original_is_bce_with_logits(real):
  t = 1.0 if real else 0.0
  want = (_bce_numpy(_P0, t) + _bce_numpy(_P1, t)) / 2
  np.testing.assert_allclose(losses.gan_loss(_preds(), real, True, 'original'),
                             want, rtol=1e-6)


def test_gan_loss_original_stable_for_large_logits():
  x = jnp.array([100.0, -100.0])
  # BCE(100, 0) = 100, BCE(-100, 0) ~ 0; no inf or nan.
  np.testing.assert_allclose(losses.gan_loss(x, False, True, 'original'),
                             50.0, rtol=1e-6)


def test_gan_loss_bare_array_and_list_of_arrays():
  # A bare array: one scale. A list of arrays: each is a prediction map.
  np.testing.assert_allclose(losses.gan_loss(jnp.asarray(_P0), True, True),
                             0.875, rtol=1e-6)
  np.testing.assert_allclose(
      losses.gan_loss([jnp.asarray(_P0), jnp.asarray(_P1)], False, True),
      (1.875 + 0.75) / 2, rtol=1e-6)


def test_gan_loss_mean_over_batch_elements():
  # Batch of 2 with different sizes of loss: the per-scale loss is the mean
  # over all elements, i.e. the mean of the per-sample means.
  x = jnp.array([[-1.0, -1.0], [3.0, 0.0]]).reshape(2, 1, 2, 1)
  # hinge D real: relu(1-x) = [2, 2, 0, 1] -> 1.25.
  np.testing.assert_allclose(losses.gan_loss([[x]], True, True), 1.25)


def test_gan_loss_bf16_computed_in_float32():
  got = losses.gan_loss(_preds(jnp.bfloat16), True, True, 'ls')
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _EXPECTED[('ls', True, True)], rtol=1e-6)


def test_gan_loss_errors():
  with pytest.raises(ValueError, match='aim for real'):
    losses.gan_loss(_preds(), False, False, 'hinge')
  with pytest.raises(ValueError, match='Unknown gan_mode'):
    losses.gan_loss(_preds(), True, True, 'wgan-gp')
  with pytest.raises(ValueError, match='empty'):
    losses.gan_loss([], True, True)


def test_gan_loss_generator_hinge_gradient():
  # d/dx of -mean(x) per scale, averaged over 2 scales: -1 / (2 * size).
  grads = jax.grad(lambda p: losses.gan_loss(p, True, False))(_preds())
  np.testing.assert_allclose(grads[0][1], np.full(_P0.shape, -1 / 8))
  np.testing.assert_allclose(grads[1][1], np.full(_P1.shape, -1 / 4))
  np.testing.assert_array_equal(grads[0][0], 0.0)


def _fm_inputs(dtype=jnp.float32):
  fake = [[jnp.asarray([[0.0, 2.0], [3.0, 4.0]], dtype).reshape(1, 2, 2, 1),
           jnp.asarray([0.0, 0.0], dtype).reshape(1, 1, 1, 2),
           jnp.asarray([9.0], dtype).reshape(1, 1, 1, 1)],
          [jnp.asarray([5.0, -5.0], dtype).reshape(1, 1, 2, 1),
           jnp.asarray([7.0], dtype).reshape(1, 1, 1, 1)]]
  real = [[jnp.asarray([[1.0, 1.0], [1.0, 1.0]], dtype).reshape(1, 2, 2, 1),
           jnp.asarray([1.0, -3.0], dtype).reshape(1, 1, 1, 2),
           jnp.asarray([-9.0], dtype).reshape(1, 1, 1, 1)],
          [jnp.asarray([4.0, -4.0], dtype).reshape(1, 1, 2, 1),
           jnp.asarray([0.0], dtype).reshape(1, 1, 1, 1)]]
  return fake, real


def test_feature_matching_hand_value():
  fake, real = _fm_inputs()
  # Scale 0: L1s 1.75 ([1,1,2,3]) and 2.0 ([1,3]); last (prediction)
  # excluded. Scale 1: L1 1.0. Sum 4.75, times lambda 10 / num_D 2 = 23.75.
  got = losses.feature_matching_loss(fake, real, 10.0)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, 23.75, rtol=1e-6)
  fake16, real16 = _fm_inputs(jnp.bfloat16)
  got16 = losses.feature_matching_loss(fake16, real16, 10.0)
  assert got16.dtype == jnp.float32
  np.testing.assert_allclose(got16, 23.75, rtol=1e-6)


def test_feature_matching_gradients():
  fake, real = _fm_inputs()
  g_fake, g_real = jax.grad(
      lambda f, r: losses.feature_matching_loss(f, r, 10.0),
      argnums=(0, 1))(fake, real)
  for scale in g_real:
    for g in scale:
      np.testing.assert_array_equal(g, 0.0)
  # sign(fake - real) / size * lambda / num_D; prediction map: no gradient.
  np.testing.assert_allclose(
      g_fake[0][0].ravel(), np.array([-1.0, 1, 1, 1]) / 4 * 5)
  np.testing.assert_allclose(g_fake[0][1].ravel(), np.array([-1.0, 1]) / 2 * 5)
  np.testing.assert_array_equal(g_fake[0][2], 0.0)
  np.testing.assert_allclose(g_fake[1][0].ravel(), np.array([1.0, -1]) / 2 * 5)
  np.testing.assert_array_equal(g_fake[1][1], 0.0)


def test_feature_matching_mismatched_scales():
  fake, real = _fm_inputs()
  with pytest.raises(ValueError, match='scales'):
    losses.feature_matching_loss(fake, real[:1], 10.0)


def test_kl_loss_hand_value():
  mu = jnp.array([[0.0, 1.0], [2.0, -1.0]])
  logvar = jnp.array([[0.0, 0.0], [np.log(2.0), np.log(0.5)]])
  # Terms 1 + lv - mu^2 - exp(lv): 0; -1; 1 + ln2 - 4 - 2; 1 - ln2 - 1 - 0.5.
  # Sum = -6.5 (the ln2 cancel); -0.5 * sum = 3.25.
  np.testing.assert_allclose(losses.kl_loss(mu, logvar), 3.25, rtol=1e-6)
  np.testing.assert_allclose(losses.kl_loss(mu, logvar, 0.05), 0.1625,
                             rtol=1e-6)
  got16 = losses.kl_loss(mu.astype(jnp.bfloat16), jnp.zeros((2, 2),
                                                            jnp.bfloat16))
  assert got16.dtype == jnp.float32
  # logvar 0: -0.5 * sum(-mu^2) = 0.5 * (0 + 1 + 4 + 1) = 3.
  np.testing.assert_allclose(got16, 3.0, rtol=1e-6)


def test_kl_loss_gradient():
  mu = jnp.array([1.0, -2.0])
  logvar = jnp.array([0.0, np.log(3.0)])
  g_mu, g_lv = jax.grad(losses.kl_loss, argnums=(0, 1))(mu, logvar)
  np.testing.assert_allclose(g_mu, [1.0, -2.0], rtol=1e-6)  # d/dmu = mu.
  # d/dlogvar = 0.5 * (exp(lv) - 1).
  np.testing.assert_allclose(g_lv, [0.0, 1.0], rtol=1e-6)


@pytest.fixture(scope='module')
def small_vgg():
  """Random VGG19 variables (real shapes), He-scaled so activations stay O(1)."""
  rng = np.random.default_rng(0)
  params = {}
  for index, cin, cout, _ in vgg_lib.VGG19_CONVS:
    std = np.sqrt(2.0 / (9 * cin))
    params[f'conv{index}'] = {
        'kernel': (rng.standard_normal((3, 3, cin, cout), np.float32)
                   * np.float32(std)),
        'bias': rng.normal(0, 0.01, (cout,)).astype(np.float32),
    }
  return {'params': params}


def test_vgg_loss_value(small_vgg):
  rng = np.random.default_rng(1)
  fake = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  real = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  net = vgg_lib.VGG19()
  feats = jax.jit(net.apply)(small_vgg, np.concatenate([fake, real]))
  f_feats = [f[:2] for f in feats]
  r_feats = [f[2:] for f in feats]
  weights = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0]
  want = sum(w * np.mean(np.abs(np.asarray(f) - np.asarray(r)))
             for w, f, r in zip(weights, f_feats, r_feats))
  loss_fn = jax.jit(losses.vgg_loss, static_argnames='dtype')
  got = loss_fn(small_vgg, fake, real)
  assert got.dtype == jnp.float32
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(loss_fn(small_vgg, real, real), 0.0)
  got16 = loss_fn(small_vgg, fake, real, dtype=jnp.bfloat16)
  assert got16.dtype == jnp.float32
  np.testing.assert_allclose(got16, want, rtol=5e-2)


def test_vgg_loss_gradients(small_vgg):
  rng = np.random.default_rng(2)
  fake = jnp.asarray(rng.uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
  real = jnp.asarray(rng.uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
  g_params, g_fake, g_real = jax.jit(
      jax.grad(losses.vgg_loss, argnums=(0, 1, 2)))(small_vgg, fake, real)
  np.testing.assert_array_equal(g_real, 0.0)
  assert float(jnp.abs(g_fake).sum()) > 0
  for leaf in jax.tree_util.tree_leaves(g_params):
    np.testing.assert_array_equal(leaf, 0.0)


def test_vgg_loss_shape_mismatch(small_vgg):
  with pytest.raises(ValueError, match='differ in shape'):
    losses.vgg_loss(small_vgg, jnp.zeros((1, 16, 16, 3)),
                    jnp.zeros((1, 32, 32, 3)))
