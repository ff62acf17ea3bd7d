"""config.remat: the generator's SPADE blocks rematerialised, same values.

One full training iteration (`train.compile_train_step`, G then D update)
with remat 'blocks' equals the one with 'none' to float32 rounding: the
losses, the updated parameters and the updated BatchNorm / spectral-norm
statistics. The rounding noise is measured in the same test, as the
sharding tests do: the 'none' step on the images or the generator's
initial parameters moved by one ulp, and on the batch in another order.
"""
import jax
import numpy as np
import optax
import pytest

from spade_jax import run_config
from spade_jax import sharding
from spade_jax import train
from spade_jax import train_state
import train_test


def _config(remat):
  # crop 128 as train_test's sharding tests: no BatchNorm over 1x1 or 2x2
  # planes, whose gradients are rounding noise.
  return train_test.tiny_config(
      remat=remat, **{**train_test.SHARDING_CONFIG, 'batch_size': 4})


def _one_step(config, runs):
  """One compiled train step per (batch, perturb_init) of `runs`, each from
  the initial state (perturb_init applied, when given): what the step
  changed in each state group (final minus initial) and the losses."""
  mesh = sharding.make_mesh(config)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Plain SGD, as the sharding tests: Adam would turn gradients that are
  # zero up to rounding into +-lr steps.
  host_init = jax.device_get(train_state.create_train_state(
      config, jax.random.PRNGKey(config.seed), 100,
      tx=(optax.sgd(0.01),) * 2))
  step_fn = train.compile_train_step(config, mesh)
  results = []
  for batch, perturb_init in runs:
    init = perturb_init(host_init) if perturb_init else host_init
    state, metrics = step_fn(jax.device_put(init, replicated),
                             sharding.global_batch(batch, mesh), None)
    state, metrics = jax.device_get((state, metrics))
    out = {}
    for field, trees in train_test._groups(state).items():  # pylint: disable=protected-access
      for net, tree in trees.items():
        before = jax.tree_util.tree_leaves(
            train_test._groups(init)[field][net])  # pylint: disable=protected-access
        after = jax.tree_util.tree_leaves(tree)
        if after:
          out[f'{field}/{net}'] = np.concatenate(
              [np.ravel(a) - np.ravel(b) for a, b in zip(after, before)])
    out.update({f'metrics/{k}': np.asarray(v) for k, v in metrics.items()
                if k != 'finite'})
    results.append(out)
  return host_init, results


def test_remat_blocks_equals_no_remat_in_a_training_step():
  batch = train_test._scene_batch(_config('none'), seed=0)  # pylint: disable=protected-access
  perturbed = dict(batch, image=train_test._one_ulp_perturbed(  # pylint: disable=protected-access
      batch['image'], seed=0))
  reordered = {k: v[::-1] for k, v in batch.items()}
  # The float32 noise: images or initial parameters one ulp off, the batch
  # in another order. Remat's recomputed forward rounds like another
  # fusion of the same ops, which the parameter perturbation stands for.
  params_ulp = lambda state: state.replace(  # pylint: disable=protected-access
      g=state.g.replace(params=train_test._one_ulp_perturbed(
          state.g.params, seed=1)))
  init_none, (plain, *noisy) = _one_step(
      _config('none'), [(batch, None), (perturbed, None), (reordered, None),
                        (batch, params_ulp)])
  init_remat, (remat,) = _one_step(_config('blocks'), [(batch, None)])
  # The same parameters and names: checkpoints are interchangeable.
  train_test._assert_trees_equal(init_none.g.params, init_remat.g.params)  # pylint: disable=protected-access
  assert set(plain) == set(remat)
  assert {'g_params/generator', 'g_stats/generator',
          'd_params/discriminator_0', 'metrics/G_GAN_Feat'} <= set(plain)
  eps = np.finfo(np.float32).eps
  for name in plain:
    if name.startswith('metrics/'):
      noise = max(abs(float(plain[name]) - float(n[name])) for n in noisy)
      err = abs(float(plain[name]) - float(remat[name]))
      floor = 4 * eps * abs(float(plain[name]))
    else:
      assert np.linalg.norm(plain[name]) > 0, name
      noise = max(train_test._relative_change(plain[name], n[name])  # pylint: disable=protected-access
                  for n in noisy)
      err = train_test._relative_change(plain[name], remat[name])  # pylint: disable=protected-access
      floor = 4 * eps
    tol = train_test.NOISE_FACTOR * max(noise, floor)
    assert err <= tol, (name, err, tol, noise)


def test_unknown_remat_is_rejected():
  with pytest.raises(ValueError, match=r"remat='layers'.*'none', 'blocks'"):
    run_config.validate_config(_config('layers'))
