"""Shared test helpers: where the reference fixtures and sample data live."""
import os
import pathlib

import pytest

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
