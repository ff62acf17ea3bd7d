"""XLA CPU process settings that make SPADE faster here.

XLA reads its flags (the XLA_FLAGS environment variable) once, when JAX
starts its first backend, so they are a setting of the process, not of a
jitted function: the entry points (`spade_jax.main`, `serve`,
`synthesize`, `scripts/benchmark.py`) call `apply_cpu_defaults()` before
anything starts JAX.

- `--xla_cpu_experimental_ynn_fusion_type=` (empty: no YNNPACK fusions).
  jaxlib 0.10's CPU compiler hands convolutions, matrix products and some
  elementwise work to YNNPACK by default; on SPADE's layers it is slower
  than XLA's own (Eigen) kernels wherever the channels are wide and the map
  small (a 3x3, 1024 -> 1024 convolution at 16x16: 31.6 ms vs 19.2 ms;
  128 -> 256 at 256x256: 155 vs 117 ms; only 128 -> 64 at 256x256 is
  faster with it, 26 vs 32 ms). The eval-mode generator at 256x256,
  ngf 64: 1.02-1.12 s -> 0.82-0.85 s per image (with the evaluation
  rewrites of docs/performance.md); training steps: docs/performance.md.
- `--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`: orders
  the program to keep fewer buffers live. The eval-mode generator at
  256x256: 0.81-0.85 -> 0.74 s per image, temporaries 431 -> 208 MiB;
  training steps the same time with 15-33% smaller temporaries.

Both were measured on the project's 2-core machines; which kernels win
depends on the CPU under the VM, so `cpu_description()` names it in every
benchmark record.

A flag the user already set in XLA_FLAGS is left as it is (set
`--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`,
for instance, to measure with YNNPACK's convolutions), and so is
everything when JAX has already started (then it logs why). Only for
jaxlib 0.10.x, whose flags these are: XLA stops the process on a flag it
does not know.
"""
import os
import platform
from typing import Dict, MutableMapping, Optional, Tuple

from absl import logging

# (flag, value) pairs, as measured in docs/performance.md.
CPU_DEFAULTS: Tuple[Tuple[str, str], ...] = (
    ('--xla_cpu_experimental_ynn_fusion_type', ''),
    ('--xla_cpu_scheduler_type', 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'),
)
_TESTED_JAXLIB = '0.10.'


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return bool(xla_bridge._backends)  # pylint: disable=protected-access


def apply_cpu_defaults(environ: Optional[MutableMapping[str, str]] = None,
                       jaxlib_version: Optional[str] = None) -> str:
  """Adds CPU_DEFAULTS to XLA_FLAGS where the user set no value; returns it.

  `environ` (default os.environ) and `jaxlib_version` (default the
  installed one) are for tests.
  """
  environ = os.environ if environ is None else environ
  current = environ.get('XLA_FLAGS', '')
  if jaxlib_version is None:
    import jaxlib  # pylint: disable=g-import-not-at-top
    jaxlib_version = jaxlib.__version__
  if not jaxlib_version.startswith(_TESTED_JAXLIB):
    logging.info('XLA CPU defaults not applied: measured with jaxlib %s*, '
                 'this is %s.', _TESTED_JAXLIB, jaxlib_version)
    return current
  given = {part.split('=', 1)[0] for part in current.split()}
  missing = [f'{flag}={value}' for flag, value in CPU_DEFAULTS
             if flag not in given]
  if not missing:
    return current
  if environ is os.environ and _backends_started():
    logging.warning('XLA CPU defaults not applied (JAX has already started): '
                    '%s', ' '.join(missing))
    return current
  environ['XLA_FLAGS'] = ' '.join([current] + missing).strip()
  return environ['XLA_FLAGS']


# Vector extensions whose presence changes which CPU kernels are fastest.
SIMD_FLAGS = ('avx', 'avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_tile')


def cpu_description(cpuinfo: Optional[str] = None) -> Dict[str, str]:
  """The host CPU as /proc/cpuinfo names it, for benchmark records.

  XLA's and PyTorch's CPU kernels gain differently from the vector units
  (docs/performance.md: our training step took 0.58x the reference's on
  one machine of the project's kind and 0.82x on another), so a timing
  names the CPU it was taken on. Returns cpu_model (the first processor's
  'model name', with its vendor, family and model numbers, which a
  hypervisor keeps where it shortens the name) and cpu_simd (the
  SIMD_FLAGS it has, space-separated). `cpuinfo` is for tests; where
  /proc/cpuinfo cannot be read, platform.processor() and ''.
  """
  if cpuinfo is None:
    try:
      with open('/proc/cpuinfo') as f:
        cpuinfo = f.read()
    except OSError:
      return {'cpu_model': platform.processor() or 'unknown', 'cpu_simd': ''}
  fields = {}
  for line in cpuinfo.splitlines():
    if not line.strip():
      if fields:
        break  # The first processor's block is enough.
      continue
    key, _, value = line.partition(':')
    fields.setdefault(key.strip(), value.strip())
  model = fields.get('model name') or platform.processor() or 'unknown'
  if 'vendor_id' in fields:
    model += (f" ({fields['vendor_id']} family {fields.get('cpu family', '?')}"
              f" model {fields.get('model', '?')})")
  present = set(fields.get('flags', fields.get('Features', '')).split())
  return {'cpu_model': model,
          'cpu_simd': ' '.join(f for f in SIMD_FLAGS if f in present)}
