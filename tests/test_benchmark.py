"""Smoke tests of the benchmarks: tiny runs print valid JSON lines."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

KEYS = {'model', 'method', 'impl', 'clients', 'batch', 'local_steps', 'images_per_second',
        'mfu', 'peak_memory_bytes', 'compile_seconds', 'device', 'seconds_per_round',
        'peak_flops_per_second', 'memory_source'}


def test_client_throughput_prints_one_record_per_method_and_impl():
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # The package is installed.
  result = subprocess.run(
      [sys.executable, 'benchmarks/client_throughput.py', '--model=vit_test', '--clients=2',
       '--batch=4', '--steps=2', '--rounds=1', '--method=head', '--impl=vmap,loop'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(l) for l in result.stdout.splitlines() if l.startswith('{')]
  assert [(r['method'], r['impl']) for r in records] == [('head', 'vmap'), ('head', 'loop')]
  for r in records:
    assert KEYS <= set(r), KEYS - set(r)
    assert r['images_per_second'] > 0 and r['compile_seconds'] > 0
    assert r['peak_memory_bytes'] > 0 and r['local_steps'] == 2
    assert r['mfu'] is None or r['mfu'] > 0, r.get('note')
  # All lines share one peak, so their mfu compare.
  assert len({r['peak_flops_per_second'] for r in records}) == 1


SKEWED_KEYS = {'mode', 'split', 'client_sizes', 'schedule', 'model', 'clients_per_round',
               'lanes', 'batch', 'examples_real', 'examples_computed', 'real_share',
               'seconds_per_round', 'speedup', 'compile_seconds', 'compilations',
               'peak_memory_bytes', 'device'}


def test_skewed_round_prints_both_schedules_and_packed_computes_less_padding():
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run(
      [sys.executable, 'benchmarks/skewed_round.py', '--model=vit_test', '--method=head',
       '--split=pcam_dir05', '--clients_per_round=4', '--lanes=2', '--batch=64',
       '--rounds=1'], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  padded, packed = [json.loads(l) for l in result.stdout.splitlines() if l.startswith('{')]
  for r in (padded, packed):
    assert SKEWED_KEYS <= set(r), SKEWED_KEYS - set(r)
    assert r['compilations'] == 1 and r['seconds_per_round'] > 0
    assert r['real_share'] == pytest.approx(r['examples_real'] / r['examples_computed'], rel=1e-3)
    assert 0 < r['real_share'] <= 1
  assert (padded['schedule'], packed['schedule']) == ('padded', 'packed')
  assert padded['examples_real'] == packed['examples_real']  # The same clients trained.
  assert packed['real_share'] > padded['real_share']
  assert padded['speedup'] == 1.0 and packed['speedup'] > 0
