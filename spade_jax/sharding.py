"""The device mesh and the batch's placement on it.

Training shards the batch over a 1-D `data` mesh axis and replicates
everything else; `mesh_devices` picks the devices (all, or the first
`config.num_devices` in a single process), `global_batch` turns this
process's share of a batch into global arrays sharded on `data`.
"""
from typing import Dict, List

import jax
import numpy as np


def mesh_devices(config) -> List[jax.Device]:
  """All devices, or the first config.num_devices (single process only)."""
  devices = jax.devices()
  n = config.num_devices or 0
  if n == 0 or n == len(devices):
    return devices
  if not 0 < n < len(devices):
    raise ValueError(
        f'num_devices={n}, but {len(devices)} {devices[0].platform} '
        f'device(s) are visible: use 1..{len(devices)}, or 0 for all.')
  if jax.process_count() > 1:
    raise ValueError(
        f'num_devices={n} with {jax.process_count()} processes: several '
        'processes train on all their devices (num_devices=0).')
  return devices[:n]


def make_mesh(config) -> jax.sharding.Mesh:
  """The 1-D `data` mesh over `mesh_devices(config)`."""
  return jax.sharding.Mesh(np.asarray(mesh_devices(config)), ('data',))


def global_batch(batch: Dict[str, np.ndarray], mesh) -> Dict[str, jax.Array]:
  """This process's share of the batch -> global arrays sharded on `data`."""
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec('data'))
  keys = ('image', 'label', 'instance')
  return {k: jax.make_array_from_process_local_data(sharding, batch[k])
          for k in keys}
