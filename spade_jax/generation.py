"""The generator in eval mode: the one function every caller runs.

Training previews, evaluation, the `Synthesizer` (and so `synthesize` and the
web server) and the exported module all feed the generator the same way:
class ids (N, H, W) and instance ids (N, H, W), the instance edges computed
from them on the device (`instance_edges`, as the reference's `get_edges`),
and for VAE models a latent code z. The train step computes its edges with
the same `instance_edges`.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from spade_jax import layers
from spade_jax import models


def instance_edges(config, instance: Optional[jax.Array]
                   ) -> Optional[jax.Array]:
  """float32 (N, H, W) instance boundaries, or None for no_instance models.

  Raises:
    ValueError: the model uses instance maps and `instance` is None.
  """
  if config.no_instance:
    return None
  if instance is None:
    raise ValueError('This model uses instance maps (no_instance=False): '
                     'pass (N, H, W) instance ids (the label map itself when '
                     'there are no instances).')
  return layers.instance_edges(instance)


def prior_z(config, n: int, rng: Optional[jax.Array] = None
            ) -> Optional[jax.Array]:
  """Latent codes of the prior for VAE models, None for others.

  With `rng` a draw z ~ N(0, 1); without, the prior's mean (zeros).
  """
  if not config.use_vae:
    return None
  if rng is None:
    return jnp.zeros((n, config.z_dim), jnp.float32)
  return jax.random.normal(rng, (n, config.z_dim))


def make_generate_fn(config) -> Callable:
  """generate(g_vars, label, instance=None, z=None) -> images (not jitted).

  `label`: int32 (N, H, W) class ids (don't-care already label_nc);
  `instance`: integer (N, H, W) instance ids, ignored by no_instance
  models; `z`: (N, z_dim) latent codes of VAE models, default the prior's
  mean. Returns float32 (N, H, W, 3) in [-1, 1] (the generator in eval
  mode: BatchNorm running statistics, no state updates).
  """
  gen = models.make_generator(config, training=False)

  def generate(g_vars, label, instance=None, z=None):
    if z is None:
      z = prior_z(config, label.shape[0])
    return gen.apply(g_vars, label, instance_edges(config, instance), z=z,
                     train=False)
  return generate
