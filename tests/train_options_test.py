"""Adam's betas as the reference's options: mode defaults, user values win."""
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from export_test import tiny_config
from spade_jax import train_state


def _adam_two_steps(g1, g2, lr, b1, b2, eps=1e-8):
  """PyTorch's Adam (no weight decay), two steps from zero state."""
  m = v = 0.0
  out = []
  for t, g in enumerate((g1, g2), 1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    out.append(-lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
  return out


def _check_optimizers_use(config, lr_g, lr_d, b1, b2):
  tx_g, tx_d, _, _ = train_state.make_optimizers(config, steps_per_epoch=10)
  g1 = {'w': jnp.array([0.3, -1.0, 2.0])}
  g2 = {'w': jnp.array([-0.5, -0.2, 4.0])}
  for tx, lr in ((tx_g, lr_g), (tx_d, lr_d)):
    state = tx.init(g1)
    u1, state = tx.update(g1, state)
    u2, _ = tx.update(g2, state)
    want = _adam_two_steps(np.asarray(g1['w'], np.float64),
                           np.asarray(g2['w'], np.float64), lr, b1, b2)
    np.testing.assert_allclose(u1['w'], want[0], rtol=1e-5)
    np.testing.assert_allclose(u2['w'], want[1], rtol=1e-5)


def test_defaults_are_unset():
  config = default_config.get_config()
  assert config.beta1 is None and config.beta2 is None


@pytest.mark.parametrize('no_ttur,user,want', [
    (False, None, (0.0, 0.9)),      # TTUR, defaults.
    (True, None, (0.5, 0.999)),     # no_TTUR, defaults.
    (False, (0.5, 0.99), (0.5, 0.99)),   # TTUR, the user's values.
    (True, (0.0, 0.9), (0.0, 0.9)),      # no_TTUR, the user's values.
])
def test_betas_follow_the_reference(no_ttur, user, want):
  config = tiny_config(lr=2e-4, no_TTUR=no_ttur)
  if user is not None:
    config.beta1, config.beta2 = user
  assert train_state.adam_betas(config) == want
  lr_g, lr_d = (2e-4, 2e-4) if no_ttur else (1e-4, 4e-4)
  assert train_state.learning_rates(config) == (lr_g, lr_d) + want
  _check_optimizers_use(config, lr_g, lr_d, *want)


def test_one_beta_set_keeps_the_other_default():
  config = tiny_config(no_TTUR=True)
  config.beta2 = 0.95
  assert train_state.adam_betas(config) == (0.5, 0.95)
  config = tiny_config()
  config.beta1 = 0.2
  assert train_state.adam_betas(config) == (0.2, 0.9)
