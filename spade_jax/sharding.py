"""The device mesh and the batch's placement on it.

Training runs on a 2-D mesh (`data`, `spatial`) of `mesh_devices(config)`:
`spatial` = `config.spatial_partitions` (k, default 1) and `data` = devices
/ k. The batch is sharded on `data`, and each image (with its label and
instance maps) is split along its height over `spatial`; everything else is
replicated. With k = 1 this is plain data parallelism. With k > 1, XLA's
SPMD partitioner (GSPMD) exchanges the convolutions' halo rows between
neighbouring devices, and reductions over the batch and the rows (BatchNorm
statistics, the losses' means) are global.

`global_batch` turns this process's share of a batch into global arrays so
placed; `constrain_spatial` is the hint the networks give GSPMD at their
feature maps (e.g. after a resize by gather, which it would otherwise
replicate), a no-op unless the step is traced under `mesh_context` of a
mesh whose `spatial` axis is larger than 1.
"""
import contextlib
from typing import Any, Dict, List

import jax
import numpy as np

DATA_AXIS = 'data'
SPATIAL_AXIS = 'spatial'
# Images, labels and instance maps: batch on `data`, height on `spatial`.
BATCH_SPEC = jax.sharding.PartitionSpec(DATA_AXIS, SPATIAL_AXIS)


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


def spatial_partitions(config) -> int:
  """config.spatial_partitions (default 1), checked against the devices.

  Each image is split over k devices of one process (consecutive in
  `jax.devices()`), so k must divide the devices used and, with several
  processes, each process's device count.
  """
  k = config.get('spatial_partitions', 1)
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f'spatial_partitions={k!r}: expected an integer >= 1 '
                     '(1: no spatial partitioning).')
  n = len(mesh_devices(config))
  if n % k:
    raise ValueError(
        f'spatial_partitions={k} does not divide the {n} devices used: use a '
        f'divisor of {n} (the mesh is data={n}/k x spatial=k), or set '
        'num_devices to a multiple of it.')
  local = jax.local_device_count()
  if jax.process_count() > 1 and local % k:
    raise ValueError(
        f'spatial_partitions={k} does not divide the {local} devices of each '
        f'of the {jax.process_count()} processes: an image is split over one '
        f'process\'s devices; use a divisor of {local}.')
  return k


def make_mesh(config) -> jax.sharding.Mesh:
  """The (`data`, `spatial`) mesh: devices / k x k, k = spatial_partitions."""
  devices = np.asarray(mesh_devices(config))
  k = spatial_partitions(config)
  return jax.sharding.Mesh(devices.reshape(len(devices) // k, k),
                           (DATA_AXIS, SPATIAL_AXIS))


def global_batch(batch: Dict[str, np.ndarray], mesh) -> Dict[str, jax.Array]:
  """This process's share of the batch -> global arrays, BATCH_SPEC-sharded."""
  sharding = jax.sharding.NamedSharding(mesh, BATCH_SPEC)
  keys = ('image', 'label', 'instance')
  return {k: jax.make_array_from_process_local_data(sharding, batch[k])
          for k in keys}


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh):
  """While tracing a step: the mesh `constrain_spatial` places maps on."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


def _spatial_spec(shape, data: int, spatial: int):
  """BATCH_SPEC where the dimension divides evenly, else None there."""
  return jax.sharding.PartitionSpec(
      DATA_AXIS if shape[0] % data == 0 else None,
      SPATIAL_AXIS if shape[1] % spatial == 0 else None)


def constrain_spatial(tree: Any) -> Any:
  """Hints GSPMD to keep (N, H, ...) maps split on batch and height.

  Applies to every array leaf of rank >= 3 (feature maps, label ids, edges;
  a `layers.LabelMap` is a pytree), on the dimensions that divide evenly.
  A no-op (returns `tree`) unless traced under `mesh_context` of a mesh with
  a `spatial` axis larger than 1, so networks call it unconditionally.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(SPATIAL_AXIS, 1) == 1:
    return tree
  data, spatial = mesh.shape[DATA_AXIS], mesh.shape[SPATIAL_AXIS]

  def constrain(x):
    if not hasattr(x, 'ndim') or x.ndim < 3:
      return x
    return jax.lax.with_sharding_constraint(
        x, _spatial_spec(x.shape, data, spatial))
  return jax.tree_util.tree_map(constrain, tree)
