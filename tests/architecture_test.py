"""The package's layering: imports only point down, light readers stay light.

Walks the import statements of every module of the project (function-level
ones included) and checks that they form no cycle; and that the model
readers (the web app, export) start without TensorFlow or the training code.
"""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

REPO_DIR = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ('spade_jax', 'data_pipelines', 'configs')


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO_DIR).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def project_imports():
  """{module: set of project modules it imports} for the whole project."""
  modules = {_module_name(p): p for package in PACKAGES
             for p in (REPO_DIR / package).rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        # `from pkg import mod` names the module mod, `from pkg.mod import x`
        # the module pkg.mod.
        targets = [f'{node.module}.{a.name}'
                   if f'{node.module}.{a.name}' in modules else node.module
                   for a in node.names]
      else:
        continue
      deps |= {t for t in targets if t in modules and t != name}
    graph[name] = deps
  return graph


def find_cycle(graph):
  """One import cycle as a list of modules, or None."""
  state = {}  # module -> 'open' while on the path, 'done' after.

  def visit(node, path):
    state[node] = 'open'
    for dep in sorted(graph[node]):
      if state.get(dep) == 'open':
        return path[path.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep, path + [dep])
        if found:
          return found
    state[node] = 'done'
    return None

  for start in sorted(graph):
    if start not in state:
      found = visit(start, [start])
      if found:
        return found
  return None


def test_find_cycle_finds_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c',
                                                              'a']
  assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_no_import_cycle():
  graph = project_imports()
  assert {'spade_jax.train', 'spade_jax.evaluate', 'data_pipelines.build',
          'data_pipelines.synthetic'} <= set(graph)
  assert 'spade_jax.train_state' in graph['spade_jax.export']
  cycle = find_cycle(graph)
  assert cycle is None, ' -> '.join(cycle)


@pytest.mark.parametrize('module', ['spade_jax.serve', 'spade_jax.export'])
def test_model_readers_import_no_tensorflow_nor_training(module):
  code = (f'import sys, {module}; print(sorted(m for m in sys.modules if m in '
          "('tensorflow', 'spade_jax.train', 'spade_jax.losses', "
          "'spade_jax.input_pipeline')))")
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO_DIR, env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == '[]', proc.stdout
