r"""Entry point: `python -m spade_jax.main --config configs/default.py --workdir DIR`.

Config overrides: `--config.batch_size=16 --config.ngf=32`. Multi-host: pass
--coordinator_address/--num_processes/--process_id (or set the usual
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables).
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from spade_jax import checkpoints
from spade_jax import evaluate
from spade_jax import train
from spade_jax import xla_cpu

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Folder for checkpoints and TensorBoard.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                  'train: train (resuming if the workdir has checkpoints); '
                  'eval: FID of the latest checkpoint (needs '
                  '--config.inception_weights), and mIoU / pixel accuracy '
                  'with --config.segmenter_weights.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for multi-host training.')
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'This process (0-based).')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)


def initialize_distributed() -> None:
  """Calls jax.distributed.initialize when several processes are configured."""
  address = FLAGS.coordinator_address or os.environ.get(
      'JAX_COORDINATOR_ADDRESS')
  if not address:
    return
  num = FLAGS.num_processes or int(os.environ.get('JAX_NUM_PROCESSES', '1'))
  pid = FLAGS.process_id
  if pid is None:
    pid = int(os.environ.get('JAX_PROCESS_ID', '0'))
  if jax.config.jax_platforms in (None, '', 'cpu') or os.environ.get(
      'JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(address, num_processes=num, process_id=pid)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_cpu.apply_cpu_defaults()  # Before anything starts JAX.
  # TensorFlow only feeds data: keep it off any accelerator.
  tf.config.set_visible_devices([], 'GPU')
  initialize_distributed()
  logging.info('JAX process %d / %d, %d local devices of %d: %s',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  if FLAGS.mode == 'train':
    try:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except checkpoints.CheckpointError as e:  # Names the folders.
      sys.exit(f'ERROR: {e}')
  else:
    try:
      evaluate.evaluate(FLAGS.config, FLAGS.workdir)
    except (FileNotFoundError, checkpoints.CheckpointError) as e:
      sys.exit(f'ERROR: {e}')  # Missing weights, unreadable checkpoints.


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
