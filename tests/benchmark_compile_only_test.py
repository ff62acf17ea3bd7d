"""scripts/benchmark.py --mode train --compile_only: compiled memory only."""
import json

import jax
import pytest

from benchmark_test import load_benchmark
from benchmark_test import tiny_model_config


def test_compile_only_reports_the_compiled_memory(tmp_path):
  benchmark = load_benchmark()
  record = benchmark.run_compile_only('train', tiny_model_config(),
                                      str(tmp_path))
  json.dumps(record)  # JSON-able.
  assert record['mode'] == 'train' and record['compile_only']
  assert record['backend'] == jax.default_backend()
  assert record['mesh'] == {'data': jax.device_count(), 'spatial': 1}
  assert record['remat'] == 'none' and record['spatial_partitions'] == 1
  for field in ('temp_bytes', 'argument_bytes', 'output_bytes',
                'compile_s', 'flops_per_step'):
    assert record[field] > 0, field
  # XLA's CPU backend reports 0 generated code bytes (its code lives apart).
  assert record['generated_code_bytes'] >= 0
  assert record['alias_bytes'] >= 0
  # No step ran: nothing timed.
  assert 'ms_per_step_median' not in record
  table = benchmark.format_memory_table(record)
  assert 'temp_bytes MiB/device' in table and 'compile only' in table
  with pytest.raises(ValueError, match='--compile_only needs --mode train'):
    benchmark.run_compile_only('generate', tiny_model_config(),
                               str(tmp_path))
