"""Restoring training checkpoints that may be damaged.

A training workdir keeps orbax checkpoints in WORKDIR/checkpoints/STEP. A
step folder can be damaged (a file lost or emptied by a full disk, a copy cut
short, ...), and orbax then fails deep inside TensorStore or its JSON reader
with a message that names no checkpoint. `restore_newest` tries the newest
step first and falls back to the newest one that restores, with a warning
naming each damaged folder; when a given step is damaged it stops with an
error that names the folder and the step to use instead; when none restores,
the error lists every folder and why. Training
(`train_state.restore_checkpoint`) then moves the damaged folders aside with
`set_aside`, so that it can write those steps again; the readers (export,
serve, evaluate) leave them alone.
"""
import json
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple
import uuid

from absl import logging
import orbax.checkpoint as ocp

# Where training moves damaged step folders: WORKDIR/DAMAGED_DIR/STEP.
DAMAGED_DIR = 'damaged_checkpoints'
# In each step folder: its files and their sizes (`record_files`).
FILES_LIST = 'spade_jax_files.json'


class CheckpointError(ValueError):
  """No usable checkpoint; the message names the folders and what to do."""


def step_folder(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def _reason(error: BaseException, limit: int = 300) -> str:
  lines = str(error).strip().splitlines()
  line = lines[0] if lines else ''
  if len(line) > limit:
    line = line[:limit] + '...'
  return f'{type(error).__name__}: {line}' if line else type(error).__name__


def record_files(folder: str) -> None:
  """Lists the files of a finished step folder, with their sizes.

  Written after orbax finalised the step, so that `check_files` can tell a
  lost or truncated file before orbax reads the step (a failed orbax read
  leaves TensorStore reads behind that print tracebacks long after).
  """
  files = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if rel != FILES_LIST:
        files[rel] = os.path.getsize(path)
  tmp = os.path.join(folder, FILES_LIST + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(files, f, indent=0, sort_keys=True)
  os.replace(tmp, os.path.join(folder, FILES_LIST))


def check_files(folder: str) -> None:
  """Raises if a file `record_files` listed is missing or has another size.

  Step folders without the list (written by an older spade_jax) pass.
  """
  path = os.path.join(folder, FILES_LIST)
  if not os.path.exists(path):
    return
  with open(path) as f:
    files = json.load(f)
  for rel, size in sorted(files.items()):
    full = os.path.join(folder, rel)
    if not os.path.exists(full):
      raise FileNotFoundError(f'{rel} is missing')
    if os.path.getsize(full) != size:
      raise ValueError(f'{rel} has {os.path.getsize(full)} bytes where '
                       f'{size} were written')


def _try(mngr: ocp.CheckpointManager, restore_fn: Callable[[int], Any],
         step: int) -> Tuple[Any, Optional[str]]:
  """(restored, None), or (None, why) when the step cannot be restored."""
  try:
    check_files(step_folder(mngr, step))
    return restore_fn(step), None
  except Exception as e:  # pylint: disable=broad-except
    # orbax and TensorStore raise ValueError, KeyError, FileNotFoundError,
    # JSONDecodeError, ... for missing, empty or truncated files.
    return None, _reason(e)


def restore_newest(mngr: ocp.CheckpointManager,
                   restore_fn: Callable[[int], Any],
                   step: Optional[int] = None, step_flag: str = '--step'
                   ) -> Tuple[Any, int, List[int]]:
  """Restores `step`, or by default the newest step that can be restored.

  Args:
    mngr: the checkpoint manager.
    restore_fn: step -> the restored checkpoint (raises when it cannot).
    step: the step to restore (default: the newest readable one).
    step_flag: how the user names a step, for the error messages.

  Returns:
    (restored, its step, the newer steps that could not be restored).

  Raises:
    FileNotFoundError: no checkpoint at all.
    ValueError: `step` is not one of the checkpoints.
    CheckpointError: `step`, or every checkpoint, cannot be restored.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  where = str(mngr.directory)
  if not steps:
    raise FileNotFoundError(f'{where} holds no checkpoint.')
  if step is not None:
    if step not in steps:
      raise ValueError(f'No checkpoint at step {step} in {where}; it has '
                       f'steps {sorted(steps)}.')
    restored, why = _try(mngr, restore_fn, step)
    if why is None:
      return restored, step, []
    hint = f'No other checkpoint in {where} can be read either.'
    for other in steps:
      if other != step and _try(mngr, restore_fn, other)[1] is None:
        hint = (f'The newest readable checkpoint is step {other}: pass '
                f'{step_flag}={other}.')
        break
    raise CheckpointError(f'The checkpoint {step_folder(mngr, step)} (step '
                          f'{step}) cannot be read: {why}. {hint}')
  bad, reasons = [], []
  for candidate in steps:
    restored, why = _try(mngr, restore_fn, candidate)
    if why is None:
      if bad:
        logging.warning(
            'Using the checkpoint at step %d, the newest readable one in %s '
            '(damaged: %s).', candidate, where,
            ', '.join(step_folder(mngr, s) for s in bad))
      return restored, candidate, bad
    logging.warning('The checkpoint %s (step %d) cannot be read: %s. Trying '
                    'the one before it.', step_folder(mngr, candidate),
                    candidate, why)
    bad.append(candidate)
    reasons.append(f'step {candidate} ({step_folder(mngr, candidate)}): '
                   f'{why}')
  raise CheckpointError(
      f'No checkpoint in {where} can be read: ' + '; '.join(reasons) + '. If '
      'the model config changed since they were written, use the one they '
      "were written with (the workdir's config.json); otherwise the files are "
      'damaged: restore them from a copy, or move the checkpoints folder '
      'away to start afresh.')


def set_aside(mngr: ocp.CheckpointManager, steps: Sequence[int]) -> List[str]:
  """Moves damaged step folders to WORKDIR/damaged_checkpoints/; new paths.

  Nothing is deleted: the files stay there for inspection. The manager is
  reloaded, so it no longer lists those steps (and can write them again).
  """
  moved = []
  target_dir = os.path.join(os.path.dirname(str(mngr.directory)), DAMAGED_DIR)
  for step in steps:
    source = step_folder(mngr, step)
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, str(step))
    if os.path.exists(target):
      target += f'-{uuid.uuid4().hex[:8]}'
    os.rename(source, target)
    logging.warning('Moved the damaged checkpoint %s to %s.', source, target)
    moved.append(target)
  if moved:
    mngr.reload()
  return moved
