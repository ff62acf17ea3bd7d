"""Shared test helpers: where the reference fixtures and sample data live.

Also one persistent JAX compilation cache for the whole test run, in this
process and in every subprocess the tests start (they inherit the
environment): many tests and CLI runs compile the same small programs. Set
JAX_COMPILATION_CACHE_DIR yourself to keep it; otherwise it is a temporary
folder removed when the run ends. The cache is keyed by the XLA flags, so
this process runs with the entry points' XLA CPU defaults as well.
"""
import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

from spade_jax import xla_cpu

if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  _CACHE_DIR = tempfile.mkdtemp(prefix='spade_jax_tests_jax_cache_')
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE_DIR

# The XLA CPU flags `spade_jax.main` and the other entry points run with, in
# this process too (before anything starts JAX) and so in its subprocesses:
# the same programs then compile to the same cache entries everywhere.
xla_cpu.apply_cpu_defaults()

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# `../shared` beside the checkout holds reference fixtures and real sample data.
SHARED_DIR = pathlib.Path(
    os.environ.get('SPADE_JAX_SHARED', REPO_ROOT.parent / 'shared'))


def _require(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    pytest.skip(f'{path} is absent: these tests need the shared reference '
                'fixtures beside the checkout (../shared), or set '
                'SPADE_JAX_SHARED to their location.')
  return path


@pytest.fixture(scope='session')
def reference_dir() -> pathlib.Path:
  """The small reference SPADE checkpoint and its recorded outputs."""
  return _require(SHARED_DIR / 'fixtures' / 'spade_reference' / 'small')


@pytest.fixture(scope='session')
def coco_sample_dir() -> pathlib.Path:
  """A small real COCO-Stuff sample in the reference layout."""
  return _require(SHARED_DIR / 'datasets' / 'coco_stuff_sample')


@pytest.fixture(scope='session')
def dataset_folder():
  """A function writing a tiny built data set's dataset_info.json.

  dataset_folder(path, label_nc, contain_dontcare_label=False) -> (path,
  names, colors): the folder holds only dataset_info.json (no records), which
  is all class names and colours need. Names and colours cover the don't-care
  class too when there is one, as `data_pipelines.build` writes them.
  """
  def make(path, label_nc, contain_dontcare_label=False):
    from data_pipelines import records  # pylint: disable=g-import-not-at-top
    n = label_nc + int(contain_dontcare_label)
    names = [f'stuff {i}' for i in range(n)]
    colors = [[(37 * i) % 256, 255 - i, (91 * i) % 256] for i in range(n)]
    os.makedirs(path, exist_ok=True)
    records.DatasetInfo(dataset='custom', label_nc=label_nc,
                        contain_dontcare_label=contain_dontcare_label,
                        has_instance=True, class_names=names,
                        colors=colors).save(str(path))
    return pathlib.Path(path), names, colors

  return make
