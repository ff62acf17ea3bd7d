"""config.spatial_partitions: images split along their height over devices.

A training iteration on a (data=2, spatial=2) mesh of 4 simulated CPU
devices equals the plain one (spatial_partitions=1: data=4) to float32
rounding, with the label lookup of the SPADE layers and of the
discriminator (the CPU default). Tolerances are train_test's sharding ones:
NOISE_FACTOR x the float32 noise measured in the same run (the plain step
on one-ulp perturbed images, on the batch in another order, and on 2 of
the 4 devices).
"""
import sys

import jax
import numpy as np
import optax
import pytest

from spade_jax import run_config
from spade_jax import sharding
from spade_jax import train
from spade_jax import train_state
import train_test

# The generator starts from 4x4 maps (crop / 32): two rows per device, the
# fewest validate_config allows (one gave wrong values, see run_config).
CONFIG = dict(crop_size=128, load_size=144, batch_size=4, spade_sparse=False)


def _worker(out_path, **changes):
  """One SGD train step per variant, from the same initial state:

  'plain' (spatial_partitions=1), 'perturbed<k>' (plain, images one ulp
  off), 'reordered' (plain, the batch reversed: other summation orders),
  'reordered_pair' (plain on 2 of the 4 devices: the per-device sums over
  two images, as train_test's 2-device run), 'spatial'
  (spatial_partitions=2). Saves what the step changed in each state group
  (final minus initial) and the losses, train_test's layout.

  The 2-device run is the noise that counts: the generator's update does
  not move at all when the images move by one ulp (its feature-matching
  loss is an L1 distance, whose gradient is a sign), and the reversed
  batch only reorders the cross-device sums; the spatial split changes
  the per-device sums, as another device count does. On an AMD EPYC
  (family 25 model 17) the spatial run differed from the plain one by
  7.4e-5 in the generator, the reversed batch by 7.2e-7 and the 2-device
  run by 2.6e-4 (moving every weight one ulp: 1.9e-3).
  """
  arrays = {'devices': jax.device_count()}
  batch = train_test._scene_batch(train_test.tiny_config(**CONFIG), seed=0)
  changes = {**CONFIG, **changes}  # pylint: disable=protected-access
  reverse = lambda b: {k: v[::-1] for k, v in b.items()}
  plain = {'plain': batch, 'reordered': reverse(batch)}
  for seed in range(2):
    plain[f'perturbed{seed}'] = dict(
        batch, image=train_test._one_ulp_perturbed(batch['image'], seed))  # pylint: disable=protected-access
  # (spatial_partitions, devices, variants)
  runs = [(1, 4, plain), (1, 2, {'reordered_pair': batch}),
          (2, 4, {'spatial': batch})]
  for k, devices, variants in runs:
    config = train_test.tiny_config(**changes, spatial_partitions=k,
                                     num_devices=devices)
    run_config.validate_config(config)
    mesh = sharding.make_mesh(config)
    assert dict(mesh.shape) == {'data': devices // k, 'spatial': k}
    replicated = jax.sharding.NamedSharding(mesh,
                                            jax.sharding.PartitionSpec())
    init = jax.device_get(train_state.create_train_state(
        config, jax.random.PRNGKey(config.seed), 100,
        tx=(optax.sgd(0.01),) * 2))
    step_fn = train.compile_train_step(config, mesh)
    for variant, host_batch in variants.items():
      state, metrics = jax.device_get(step_fn(
          jax.device_put(init, replicated),
          sharding.global_batch(host_batch, mesh), None))
      groups, before = train_test._groups(state), train_test._groups(init)  # pylint: disable=protected-access
      for field, trees in groups.items():
        for net, tree in trees.items():
          after = jax.tree_util.tree_leaves(tree)
          if after:
            arrays[f'{variant}/{field}/{net}'] = np.concatenate(
                [np.ravel(a) - np.ravel(b) for a, b in zip(
                    after, jax.tree_util.tree_leaves(before[field][net]))])
      arrays.update({f'{variant}/metrics0/{name}': np.asarray(v)
                     for name, v in metrics.items() if name != 'finite'})
  np.savez(out_path, **arrays)


def test_spatial_partitions_equal_the_plain_step(tmp_path, env):
  out = tmp_path / 'spatial.npz'
  code = f'import spatial_partitions_test as t; t._worker({str(out)!r})'
  train_test._run([sys.executable, '-c', code],  # pylint: disable=protected-access
                  train_test._with_devices(env, 4))  # pylint: disable=protected-access
  results = dict(np.load(out))
  assert int(results.pop('devices')) == 4
  tolerances = train_test._sharding_tolerances(results)  # pylint: disable=protected-access
  assert {'g_params/generator', 'g_stats/generator',
          'd_params/discriminator_0', 'd_stats/discriminator_0',
          'metrics0/D_Fake', 'metrics0/G_GAN_Feat'} <= set(tolerances)
  errors = train_test._sharding_errors(results, results, 'spatial')  # pylint: disable=protected-access
  for name, tol in tolerances.items():
    if not name.startswith('metrics'):
      assert np.linalg.norm(results['plain/' + name]) > 0, name
    assert errors[name] <= tol, (name, errors[name], tol)


env = train_test.env  # The subprocesses' environment fixture.


def test_bad_spatial_partitions_are_named(monkeypatch):
  monkeypatch.setattr(jax, 'devices', lambda: jax.local_devices()[:1] * 4)
  config = lambda **c: train_test.tiny_config(**{**CONFIG, **c})
  with pytest.raises(ValueError, match=r'spatial_partitions=3 does not '
                     r'divide the 4 devices.*divisor of 4'):
    run_config.validate_config(config(spatial_partitions=3))
  for bad in (0, -2):
    with pytest.raises(ValueError, match=f'spatial_partitions={bad}: '
                       'expected an integer >= 1'):
      sharding.spatial_partitions(config(spatial_partitions=bad))
  # crop 32: the generator starts from 1 row; crop 64: 2, one per device.
  with pytest.raises(ValueError, match=r'spatial_partitions=2 .* starts from '
                     r'1 rows \(image height 32 / 2\^5 upsamplings\)'):
    run_config.validate_config(config(spatial_partitions=2, crop_size=32))
  with pytest.raises(ValueError, match=r'starts from 2 rows .* at least 2 '
                     r'rows per device'):
    run_config.validate_config(config(spatial_partitions=2, crop_size=64,
                                      load_size=72))
  with pytest.raises(ValueError, match=r'spatial_partitions=3 splits'):
    run_config.validate_config(config(spatial_partitions=3, num_devices=3,
                                      batch_size=1))
  with pytest.raises(ValueError, match=r'batch_size=3 is not divisible by '
                     r'the 2 data-parallel groups \(4 devices / '
                     r'spatial_partitions=2\)'):
    run_config.validate_config(config(spatial_partitions=2, batch_size=3))
  run_config.validate_config(config(spatial_partitions=2))
  run_config.validate_config(config(spatial_partitions=4, batch_size=1,
                                    crop_size=256, load_size=288))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'local_device_count', lambda: 2)
  with pytest.raises(ValueError, match=r'spatial_partitions=4 does not '
                     r'divide the 2 devices of each of the 2 processes'):
    sharding.spatial_partitions(config(spatial_partitions=4))
