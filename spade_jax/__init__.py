"""spade_jax: SPADE (GauGAN) semantic image synthesis in JAX and Flax."""

__version__ = '0.1.0'


def __getattr__(name):
  # Lazy, so that `import spade_jax` stays cheap for the CLI modules.
  if name == 'Synthesizer':
    from spade_jax.synthesizer import Synthesizer  # pylint: disable=g-import-not-at-top
    return Synthesizer
  raise AttributeError(name)
