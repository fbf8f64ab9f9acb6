"""Smoke test of benchmarks/client_throughput.py: a tiny sweep prints valid JSON lines."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO

KEYS = {'model', 'method', 'impl', 'clients', 'batch', 'local_steps', 'images_per_second',
        'mfu', 'peak_memory_bytes', 'compile_seconds', 'device', 'seconds_per_round',
        'peak_flops_per_second', 'memory_source'}


def test_client_throughput_sweep_prints_one_record_per_method_and_impl():
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # The package is installed.
  result = subprocess.run(
      [sys.executable, 'benchmarks/client_throughput.py', '--model=vit_test', '--clients=2',
       '--batch=4', '--steps=2', '--rounds=1', '--method=bias,head'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(l) for l in result.stdout.splitlines() if l.startswith('{')]
  assert [(r['method'], r['impl']) for r in records] == [
      ('bias', 'vmap'), ('bias', 'loop'), ('head', 'vmap'), ('head', 'loop')]
  for r in records:
    assert KEYS <= set(r), KEYS - set(r)
    assert r['images_per_second'] > 0 and r['compile_seconds'] > 0
    assert r['peak_memory_bytes'] > 0 and r['local_steps'] == 2
    assert r['mfu'] is None or r['mfu'] > 0, r.get('note')
  # All lines share one peak, so their mfu compare.
  assert len({r['peak_flops_per_second'] for r in records}) == 1
