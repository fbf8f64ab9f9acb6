"""Two processes on one machine stand in for a TPU pod slice: jax.distributed over localhost,
4 CPU devices each, clients sharded over all 8."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TINY

RUN = ['--config.fl.clients_per_round=8', '--config.fl.rounds=3', '--config.checkpoint.every=1']


def _free_port():
  try:
    with socket.socket() as s:
      s.bind(('localhost', 0))
      return s.getsockname()[1]
  except OSError as e:
    pytest.skip(f'no localhost port for the coordinator ({e})')


def _start(workdir, devices, *flags):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.Popen(
      [sys.executable, 'launch.py', f'--config={TINY}', f'--workdir={workdir}', *RUN, *flags],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start_pair(workdir, port):
  return [_start(workdir, 4, '--distributed', f'--coordinator_address=localhost:{port}',
                 '--num_processes=2', f'--process_id={i}') for i in (0, 1)]


def _finish(process):
  out, err = process.communicate(timeout=180)
  assert process.returncode == 0, err[-3000:]
  return out


def _records(workdir):
  return [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_two_processes_train_like_one_with_all_devices_and_resume_after_a_kill(tmp_path):
  port = _free_port()
  single = _start(tmp_path / 'single', 8)
  pair = _start_pair(tmp_path / 'pair', port)
  outputs = [_finish(p) for p in pair]
  _finish(single)
  expected = _records(tmp_path / 'single')[-1]['trainable_sha256']
  records = _records(tmp_path / 'pair')
  assert [r['round'] for r in records] == [0, 1, 2, 3]  # Written once, by process 0.
  assert records[-1]['trainable_sha256'] == expected
  assert 'round    0/3' in outputs[0] and 'round    3/3' in outputs[0]
  assert 'round' not in outputs[1]
  assert (tmp_path / 'pair' / 'trainable.npz').exists()
  assert len(os.listdir(tmp_path / 'pair' / 'tb')) == 1

  killed = tmp_path / 'killed'
  pair = _start_pair(killed, _free_port())
  deadline = time.time() + 120
  while not (killed / 'checkpoints' / '1').exists():
    assert all(p.poll() is None for p in pair) and time.time() < deadline
    time.sleep(0.05)
  for p in pair:
    p.send_signal(signal.SIGKILL)
    p.wait()
  resumed = [_finish(p) for p in _start_pair(killed, _free_port())]
  assert 'resuming from round' in resumed[0]
  assert _records(killed)[-1]['trainable_sha256'] == expected
  assert [r['round'] for r in _records(killed)] == [0, 1, 2, 3]
