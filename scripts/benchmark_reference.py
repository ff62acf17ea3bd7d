r"""Times the reference's PyTorch training iteration on this machine.

  python scripts/benchmark_reference.py --crop_size 256 --ngf 64 \
      --batch_size 1 --steps 4 --warmup 1 --json runs.jsonl

`scripts/benchmark.py --mode train` times ours; this times the reference's
iteration with the same options, so that the two can be compared minutes
apart on one machine (the machines here drift by up to 2x in speed from
one day to the next: docs/performance.md). Run each in a process of its own,
never beside another job, and alternate them.

What runs: the networks of tests/torch_reference.py (our PyTorch definition
of the reference's, checked against its recorded checkpoints and outputs
by tests/torch_reference_test.py) in the reference trainer's iteration
(SPEC.md): a generator step (hinge GAN loss, feature matching, the VGG19
loss on the images as they are, in [-1, 1]), then a discriminator step on
a fake regenerated (no gradient) by the updated generator; Adam with TTUR
(beta1 0, beta2 0.9, lr_G = lr / 2, lr_D = 2 lr). VGG19 has random weights:
only the time matters. The labels are blocky random class ids with
instance edges: the reference's dense computation costs the same on any
label map. COCO-Stuff's classes by default (182 + don't-care + edges).

Needs the torch extra (`pip install -e '.[torch]'`). Threads: PyTorch's
default (one per core) unless --threads.
"""
import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import numpy as np

# The CPU's description only (no JAX: this process runs PyTorch alone).
from spade_jax import xla_cpu

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO_ROOT, 'tests'))

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_integer('crop_size', 256, 'Image height and width.')
  flags.DEFINE_integer('ngf', 64, 'Generator width.')
  flags.DEFINE_integer('ndf', 64, 'Discriminator width.')
  flags.DEFINE_integer('n_layers_D', 4, 'Layers per discriminator.')
  flags.DEFINE_integer('num_D', 2, 'Discriminator scales.')
  flags.DEFINE_integer('batch_size', 1, 'Images per iteration.')
  flags.DEFINE_integer('label_nc', 182, 'Classes (without don\'t-care).')
  flags.DEFINE_bool('contain_dontcare_label', True, 'A don\'t-care class.')
  flags.DEFINE_bool('no_instance', False, 'Leave out the instance edges.')
  flags.DEFINE_float('lambda_vgg', 10.0, 'VGG loss weight (0: no VGG).')
  flags.DEFINE_float('lambda_feat', 10.0, 'Feature-matching loss weight.')
  flags.DEFINE_float('lr', 2e-4, 'Base learning rate (TTUR splits it).')
  flags.DEFINE_integer('steps', 5, 'Timed iterations.')
  flags.DEFINE_integer('warmup', 1, 'Untimed iterations first.')
  flags.DEFINE_integer('threads', 0, 'torch.set_num_threads (0: default).')
  flags.DEFINE_integer('seed', 0, 'Seed of the weights and inputs.')
  flags.DEFINE_string('json', None, 'Append the record to this file as one '
                      'JSON line.')


# VGG loss weights of relu1_1 ... relu5_1 (SPEC.md).
VGG_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


def options(values) -> dict:
  """The reference's option dict (tests/torch_reference.py names)."""
  return dict(label_nc=values['label_nc'],
              contain_dontcare_label=values['contain_dontcare_label'],
              no_instance=values['no_instance'],
              crop_size=values['crop_size'], ngf=values['ngf'],
              ndf=values['ndf'], num_D=values['num_D'],
              n_layers_D=values['n_layers_D'])


def blocky_inputs(values, rng: np.random.RandomState):
  """(label, instance, real image) for one batch: 8 x 8 blocks of classes."""
  import torch  # pylint: disable=g-import-not-at-top
  n, crop = values['batch_size'], values['crop_size']
  nc = values['label_nc'] + int(values['contain_dontcare_label'])
  blocks = max(crop // 8, 1)
  label = np.kron(rng.randint(0, nc, (n, 8, 8)),
                  np.ones((blocks, blocks), np.int64))[:, :crop, :crop]
  real = torch.from_numpy(
      rng.uniform(-1, 1, (n, 3, crop, crop)).astype(np.float32))
  return label, label.copy(), real


def make_iteration(values):
  """The reference trainer's iteration as a function of no arguments."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  import torch_reference as tr  # pylint: disable=g-import-not-at-top

  torch.manual_seed(values['seed'])
  opt = options(values)
  generator = tr.init_like_reference(tr.build_generator(opt)).train()
  discriminator = tr.init_like_reference(tr.build_discriminator(opt)).train()
  vgg = tr.vgg19_features() if values['lambda_vgg'] > 0 else None
  if vgg is not None:
    for p in vgg.parameters():
      p.requires_grad_(False)
  lr = values['lr']
  opt_g = torch.optim.Adam(generator.parameters(), lr=lr / 2,
                           betas=(0.0, 0.9))
  opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr * 2,
                           betas=(0.0, 0.9))
  label, instance, real = blocky_inputs(
      values, np.random.RandomState(values['seed']))
  seg = tr.semantics(label, instance, values['label_nc'],
                     values['contain_dontcare_label'], values['no_instance'])
  n = values['batch_size']

  def discriminate(fake):
    """D on [fake; real] in one batch, as the reference does."""
    out = discriminator(torch.cat([torch.cat([seg, fake], 1),
                                   torch.cat([seg, real], 1)], 0))
    return ([[t[:n] for t in scale] for scale in out],
            [[t[n:] for t in scale] for scale in out])

  def iteration():
    opt_g.zero_grad()
    fake = generator(seg)
    pred_fake, pred_real = discriminate(fake)
    num_d = len(pred_fake)
    loss = sum(-scale[-1].mean() for scale in pred_fake) / num_d
    loss = loss + sum(
        F.l1_loss(a, b.detach())
        for sf, sr in zip(pred_fake, pred_real)
        for a, b in zip(sf[:-1], sr[:-1])) * values['lambda_feat'] / num_d
    if vgg is not None:
      loss = loss + sum(
          w * F.l1_loss(a, b.detach()) for w, a, b in zip(
              VGG_WEIGHTS, tr.vgg19_slices(vgg, fake),
              tr.vgg19_slices(vgg, real))
      ) * values['lambda_vgg']
    loss.backward()
    opt_g.step()
    opt_d.zero_grad()
    with torch.no_grad():
      fake = generator(seg)
    pred_fake, pred_real = discriminate(fake.detach())
    d_loss = (sum(F.relu(1 + scale[-1]).mean() for scale in pred_fake)
              + sum(F.relu(1 - scale[-1]).mean() for scale in pred_real)
              ) / num_d
    d_loss.backward()
    opt_d.step()
    return float(loss), float(d_loss)

  return iteration


def run(values) -> dict:
  """Warm-up and timed iterations; the record."""
  import torch  # pylint: disable=g-import-not-at-top
  if values['steps'] <= 0 or values['warmup'] < 0:
    raise ValueError(f'Need steps > 0 and warmup >= 0, got '
                     f'{values["steps"]}, {values["warmup"]}.')
  if values['threads']:
    torch.set_num_threads(values['threads'])
  load_before = os.getloadavg()[0]
  iteration = make_iteration(values)
  for _ in range(values['warmup']):
    iteration()
  times = []
  for _ in range(values['steps']):
    start = time.perf_counter()
    losses = iteration()
    times.append(time.perf_counter() - start)
  if not all(np.isfinite(losses)):
    raise RuntimeError(f'Non-finite losses {losses}: the timing is void.')
  return {
      'benchmark': 'reference_torch_train_iteration',
      **values,
      'torch_version': torch.__version__,
      'torch_threads': torch.get_num_threads(),
      'ms_per_step_median': 1e3 * statistics.median(times),
      'ms_per_step_min': 1e3 * min(times),
      'ms_per_step_max': 1e3 * max(times),
      'images_per_s': values['batch_size'] * len(times) / sum(times),
      'load_average_1min_before': load_before,
      'load_average_1min': os.getloadavg()[0],
      **xla_cpu.cpu_description(),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  values = {f.name: f.value
            for f in FLAGS.get_key_flags_for_module(sys.modules[__name__])
            if f.name != 'json'}  # The options define_flags defined.
  try:
    record = run(values)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  width = max(map(len, record))
  print('\n'.join(f'{k:<{width}}  {v}' for k, v in record.items()))
  if FLAGS.json:
    with open(FLAGS.json, 'a') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')


if __name__ == '__main__':
  define_flags()
  app.run(main)
