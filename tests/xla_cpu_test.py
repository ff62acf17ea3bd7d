"""The XLA CPU process settings the entry points apply (`xla_cpu`)."""
import os
import subprocess
import sys

from spade_jax import xla_cpu

FLAG = '--xla_cpu_experimental_ynn_fusion_type'
SCHEDULER = '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'
VERSION = '0.10.2'


def test_adds_the_defaults_to_an_empty_environment():
  env = {}
  got = xla_cpu.apply_cpu_defaults(env, VERSION)
  assert env['XLA_FLAGS'] == got == f'{FLAG}= {SCHEDULER}'


def test_keeps_the_users_flags_and_their_own_value():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  xla_cpu.apply_cpu_defaults(env, VERSION)
  assert env['XLA_FLAGS'].split() == [
      '--xla_force_host_platform_device_count=8', f'{FLAG}=', SCHEDULER]
  mine = f'{FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'
  env = {'XLA_FLAGS': mine}
  xla_cpu.apply_cpu_defaults(env, VERSION)
  assert env['XLA_FLAGS'] == f'{mine} {SCHEDULER}'
  every = f'{mine} --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT'
  env = {'XLA_FLAGS': every}
  assert xla_cpu.apply_cpu_defaults(env, VERSION) == every


def test_applying_twice_changes_nothing_more():
  env = {}
  once = xla_cpu.apply_cpu_defaults(env, VERSION)
  assert xla_cpu.apply_cpu_defaults(env, VERSION) == once == env['XLA_FLAGS']


def test_other_jaxlib_versions_are_left_alone():
  """XLA stops a process on a flag it does not know: only the measured
  jaxlib line gets them."""
  env = {'XLA_FLAGS': '--xla_dump_to=x'}
  assert xla_cpu.apply_cpu_defaults(env, '0.11.0') == '--xla_dump_to=x'
  assert env == {'XLA_FLAGS': '--xla_dump_to=x'}


def test_the_installed_xla_accepts_the_defaults():
  """A process started with the defaults runs a convolution (an unknown
  flag would abort it)."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  flags = xla_cpu.apply_cpu_defaults(env)
  assert FLAG in flags and SCHEDULER in flags
  code = ('import jax, jax.numpy as jnp; '
          'x = jnp.ones((1, 8, 8, 4)); k = jnp.ones((3, 3, 4, 4)); '
          'print(float(jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", '
          'dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()))')
  out = subprocess.run([sys.executable, '-c', code], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  # Ones, SAME: each output is 4 channels x the in-bounds taps; the taps
  # per row sum to 2 + 6 * 3 + 2 = 22, so 22 * 22 pixels-taps, 4 x 4 channels.
  assert float(out.stdout.split()[-1]) == 22 * 22 * 4 * 4


def test_training_entry_point_applies_them_before_jax_starts(tmp_path):
  """`python -m spade_jax.main` trains with the defaults in XLA_FLAGS (the
  user's own flags kept), set before its first JAX call."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  want = xla_cpu.apply_cpu_defaults(dict(env))
  code = ('import os, sys; from absl import app; '
          'from spade_jax import main, train; '
          'train.train_and_evaluate = lambda config, workdir: print('
          '"FLAGS", os.environ["XLA_FLAGS"], "DEVICES", '
          '__import__("jax").device_count()); '
          f'sys.argv = ["main", "--config", "configs/default.py", '
          f'"--workdir", {str(tmp_path)!r}]; app.run(main.main)')
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=repo,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f'FLAGS {want} DEVICES 2' in out.stdout, out.stdout[-2000:]
  assert FLAG in want and SCHEDULER in want


# The head of an x86 /proc/cpuinfo (two processors; the second must not
# override the first) and of an aarch64 one.
X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma avx2 bmi2

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: other
flags\t\t: avx512f
"""
ARM_CPUINFO = """
processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes
CPU implementer\t: 0x41
"""


def test_cpu_description_names_the_first_processor_and_its_vector_units():
  assert xla_cpu.cpu_description(X86_CPUINFO) == {
      'cpu_model': 'AMD EPYC (AuthenticAMD family 25 model 1)',
      'cpu_simd': 'avx avx2 fma'}
  arm = xla_cpu.cpu_description(ARM_CPUINFO)
  assert arm['cpu_simd'] == '' and arm['cpu_model']
  here = xla_cpu.cpu_description()
  assert set(here) == {'cpu_model', 'cpu_simd'} and here['cpu_model']
  assert set(here['cpu_simd'].split()) <= set(xla_cpu.SIMD_FLAGS)
