"""Training checkpoints on disk: asynchronous saves, file lists, recovery.

A training workdir keeps orbax checkpoints in WORKDIR/checkpoints/STEP.
`Manager` is orbax's CheckpointManager saving asynchronously: `save` returns
once the state is copied off the devices, orbax writes the files in
background threads into STEP.orbax-checkpoint-tmp and renames that folder to
STEP when they are complete (a process killed before the rename leaves only
the tmp folder, which orbax does not list as a step; `set_aside_unfinished`
moves it away). Once a step's save has finished, `Manager` writes the step's
file list (`record_files`).

A step folder can be damaged (a file lost or emptied by a full disk, a copy cut
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
import jax
import orbax.checkpoint as ocp

# Where training moves damaged step folders: WORKDIR/DAMAGED_DIR/STEP.
DAMAGED_DIR = 'damaged_checkpoints'
# In each step folder: its files and their sizes (`record_files`).
FILES_LIST = 'spade_jax_files.json'
# In the name of a step folder orbax has not finished writing.
UNFINISHED_MARK = ocp.utils.TMP_DIR_SUFFIX


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


class Manager(ocp.CheckpointManager):
  """orbax's CheckpointManager, which also lists the files of its steps.

  Saves are asynchronous (orbax's default): `save` returns once the state is
  copied to host memory and writes the files in the background; orbax's next
  `save` first waits for the previous one, and steps beyond `max_to_keep` are
  deleted only after the new step is complete. Each time this manager has
  waited for its saves (at the start of the next `save`, in
  `wait_until_finished` and `close`), process 0 writes the file list of each
  step it saved since (`record_files`); a step whose save failed is not
  listed (orbax drops it).
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._unlisted = []  # Steps saved (maybe still being written), no list.

  def save(self, step: int, *args, **kwargs) -> bool:
    saved = super().save(step, *args, **kwargs)
    if saved:
      self._unlisted.append(step)
    return saved

  def wait_until_finished(self) -> None:
    try:
      super().wait_until_finished()
    finally:
      # Even when the save failed: the steps that did finish get a list.
      unlisted, self._unlisted = self._unlisted, []
      finished = set(self.all_steps())
      for step in unlisted:
        folder = step_folder(self, step)
        if (step in finished and os.path.isdir(folder) and
            jax.process_index() == 0):
          record_files(folder)
          logging.info('Checkpoint at step %d complete: %s', step, folder)


def set_aside_unfinished(directory: str) -> List[str]:
  """Moves the step folders orbax did not finish writing to
  WORKDIR/damaged_checkpoints/ (a process killed mid-save leaves them); the
  new paths. Call it before saving (process 0, nothing being saved)."""
  if not os.path.isdir(directory):
    return []
  target_dir = os.path.join(os.path.dirname(directory), DAMAGED_DIR)
  moved = []
  for name in sorted(os.listdir(directory)):
    source = os.path.join(directory, name)
    if UNFINISHED_MARK not in name or not os.path.isdir(source):
      continue
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, name)
    if os.path.exists(target):
      target += f'-{uuid.uuid4().hex[:8]}'
    os.rename(source, target)
    logging.warning(
        'Moved %s, a checkpoint whose save did not finish (the process '
        'stopped while writing it), to %s; it cannot be restored and can be '
        'deleted.', source, target)
    moved.append(target)
  return moved


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
