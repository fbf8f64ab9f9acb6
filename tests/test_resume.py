"""Runs that survive: exact resume after SIGKILL, refused mismatches, dropout, NaN, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeft_jax import train, validation
from fedpeft_jax.federated import aggregators, client as client_lib, fedavg
from tests.conftest import REPO, tiny_config
from tests.test_fedavg import _loss_fn, _setup

TINY = 'experiments/synthetic_tiny.py:bias'
LONG_RUN = ['--config.fl.rounds=60', '--config.checkpoint.every=1', '--config.fl.eval_every=20',
            '--config.checkpoint.keep=3']


def _launch(workdir, *flags, wait=True):
  command = [sys.executable, 'launch.py', f'--config={TINY}', f'--workdir={workdir}', *flags]
  if wait:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)


def _checkpointed_rounds(workdir):
  path = workdir / 'checkpoints'
  return sorted(int(p) for p in os.listdir(path) if p.isdigit()) if path.exists() else []


def _last_sha(workdir):
  return json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])[
      'trainable_sha256']


def test_sigkill_then_resume_ends_exactly_like_an_uninterrupted_run(tmp_path):
  straight = _launch(tmp_path / 'straight', *LONG_RUN)
  assert straight.returncode == 0, straight.stderr[-2000:]

  victim = _launch(tmp_path / 'killed', *LONG_RUN, wait=False)
  deadline = time.time() + 120
  while not any(r >= 3 for r in _checkpointed_rounds(tmp_path / 'killed')):
    assert victim.poll() is None and time.time() < deadline, 'run ended before the kill'
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  killed_at = max(_checkpointed_rounds(tmp_path / 'killed'))
  assert killed_at < 60 and not (tmp_path / 'killed' / 'trainable.npz').exists()

  resumed = _launch(tmp_path / 'killed', *LONG_RUN)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'resuming from round' in resumed.stdout
  assert _last_sha(tmp_path / 'killed') == _last_sha(tmp_path / 'straight')
  lines = (tmp_path / 'killed' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['round'] for l in lines] == [20, 40, 60]  # No duplicates.
  exported = np.load(tmp_path / 'killed' / 'trainable.npz')
  assert 'head/kernel' in exported.files and 'Transformer/encoder_norm/bias' in exported.files
  assert _checkpointed_rounds(tmp_path / 'killed') == [58, 59, 60]  # checkpoint.keep=3


def test_a_workdir_of_another_config_is_refused_unless_forced(tmp_path):
  first = _launch(tmp_path, '--config.fl.rounds=2')
  assert first.returncode == 0, first.stderr[-2000:]
  other = _launch(tmp_path, '--config.fl.rounds=4', '--config.fl.num_clients=16',
                  '--config.peft.method=head')
  assert other.returncode == 2
  assert 'fl.num_clients: checkpoint 8 vs now 16' in other.stderr
  assert "peft.method: checkpoint 'bias' vs now 'head'" in other.stderr
  assert 'Traceback' not in other.stderr
  longer = _launch(tmp_path, '--config.fl.rounds=4')  # More rounds: a plain resume.
  assert longer.returncode == 0 and 'resuming from round 2' in longer.stdout


def _algorithm(loss_fn=_loss_fn, **kw):
  dataset, parts, trainable, frozen = _setup()
  table = fedavg.ClientTable.from_partition(parts)
  algorithm = fedavg.fedavg(loss_fn, client_lib.sgd(0.1, 0.9, 0.0), num_epochs=1,
                            batch_size=4, max_examples=table.max_examples,
                            clients_per_round=4, num_clients=len(parts), **kw)
  return algorithm, jax.jit(algorithm.apply), (frozen, dataset, table), trainable


def test_dropped_clients_are_left_out_and_an_empty_round_changes_nothing():
  algorithm, apply, args, trainable = _algorithm(dropout_prob=0.5)
  state = algorithm.init(trainable, jax.random.key(0))
  reported_counts = []
  for _ in range(12):
    before = state.trainable
    state, m = apply(state, *args)
    reported_counts.append(int(m.num_reported))
    assert int(m.num_sampled) == 4
    assert int(m.num_reported) == int(np.sum(m.reported))
    if int(m.num_reported) == 0:
      jax.tree.map(np.testing.assert_array_equal, state.trainable, before)
    else:
      assert not np.allclose(state.trainable['w'], before['w'])
  assert min(reported_counts) < 4 and max(reported_counts) > 0

  # The survivors' average equals a run in which only they were sampled: compare
  # against the same round with no dropout but the dropped clients' weights zeroed.
  _, _, (frozen, dataset, table), _ = _algorithm()
  s0 = algorithm.init(trainable, jax.random.key(1))
  _, m = apply(s0, *args)
  keys = fedavg.round_keys(jax.random.key(1), 0)
  update = jax.jit(client_lib.make_client_update(
      _loss_fn, client_lib.sgd(0.1, 0.9, 0.0), num_epochs=1, batch_size=4,
      max_examples=table.max_examples))
  survivors = np.asarray(m.clients)[np.asarray(m.reported)]
  if len(survivors):
    deltas = [update(trainable, frozen, dataset, table.example_ids[c], table.num_examples[c],
                     jax.random.fold_in(keys.clients, c)).delta for c in survivors]
    weights = np.asarray([int(table.num_examples[c]) for c in survivors], np.float64)
    expected = trainable['w'] + sum(w * d['w'] for w, d in zip(weights / weights.sum(), deltas))
    state1, _ = apply(algorithm.init(trainable, jax.random.key(1)), *args)
    np.testing.assert_allclose(state1.trainable['w'], expected, rtol=1e-5, atol=1e-6)


def test_nonfinite_client_updates_are_excluded_and_counted():
  def poisoned_loss(trainable, frozen, batch, rng):  # Client data with x > 3 explodes.
    loss = _loss_fn(trainable, frozen, batch, rng)
    return jnp.where(jnp.any(batch['x'] > 3.0, axis=-1), jnp.nan, loss)

  algorithm, apply, args, trainable = _algorithm(poisoned_loss)
  state = algorithm.init(trainable, jax.random.key(0))
  seen_bad = 0
  for _ in range(6):
    state, m = apply(state, *args)
    seen_bad += int(m.num_nonfinite)
    assert int(m.num_nonfinite) + int(m.num_reported) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.trainable))
  assert seen_bad > 0


def test_all_clients_nonfinite_stops_the_run_keeping_the_last_checkpoint(tmp_path):
  ok = _launch(tmp_path, '--config.fl.rounds=2')
  assert ok.returncode == 0
  # Resume with a learning rate that overflows: every update is Inf or NaN.
  bad = _launch(tmp_path, '--config.fl.rounds=4', '--config.optim.lr=1e38',
                '--config.checkpoint.force=True')
  assert bad.returncode == 1
  assert 'NaN or Inf' in bad.stderr and 'Traceback' not in bad.stderr
  assert _checkpointed_rounds(tmp_path) == [2]


@pytest.mark.parametrize('key,value,needle', [
    ('fl.clients_per_round', 9, 'must be <= fl.num_clients (8)'),
    ('data.alpha', 0.0, 'must be > 0'),
    ('data.alpha', -1.0, 'must be > 0'),
    ('fl.rounds', 0, 'must be > 0'),
    ('fl.local_epochs', -1, 'must be > 0'),
    ('fl.batch_size', 0, 'must be > 0'),
    ('optim.lr', 0.0, 'must be > 0'),
    ('peft.method', 'bitfit', 'must be one of full, head, bias'),
    ('data.source', 'hub', 'must be one of folder, tfds, synthetic'),
    ('model.name', 'vit_h14', 'must be one of vit_b16'),
    ('model.image_size', 18, 'must be divisible by the patch size 4'),
    ('model.checkpoint', '/nonexistent/ViT-B_16.npz', 'no such file'),
    ('data.partition', 'shards', 'must be one of iid, dirichlet'),
    ('fl.dropout_prob', 1.0, 'must be in [0, 1)'),
])
def test_every_bad_value_is_named_with_what_is_allowed(key, value, needle):
  config = tiny_config()
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(config)
  assert str(e.value).startswith(f'--config.{key}={value!r}: ')
  assert needle in str(e.value)


def test_unknown_tfds_name_and_missing_folder_are_caught_before_loading():
  config = tiny_config()
  config.data.source = 'tfds'
  config.data.name = 'cifar1000'
  with pytest.raises(validation.ConfigError, match='not a TFDS dataset name'):
    validation.validate(config)
  config.data.source, config.data.path = 'folder', '/nonexistent/data'
  with pytest.raises(validation.ConfigError, match='data.path'):
    validation.validate(config)


@pytest.mark.parametrize('flag,needle', [
    ('--config.fl.clients_per_round=100', 'fl.clients_per_round=100'),
    ('--config.data.source=folder', 'data.path'),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path, flag, needle):
  result = _launch(tmp_path, flag)
  assert result.returncode == 2
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and needle in errors[0]
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'metrics.jsonl').exists()  # Failed before any work.


def test_folder_with_too_few_classes_fails_with_exit_2(tmp_path):
  from PIL import Image
  for i in range(3):
    os.makedirs(tmp_path / 'data' / 'train' / 'a', exist_ok=True)
    os.makedirs(tmp_path / 'data' / 'test' / 'a', exist_ok=True)
    Image.new('RGB', (16, 16)).save(tmp_path / 'data' / 'train' / 'a' / f'{i}.jpg')
    Image.new('RGB', (16, 16)).save(tmp_path / 'data' / 'test' / 'a' / f'{i}.jpg')
  result = _launch(tmp_path / 'work', '--config.data.source=folder',
                   f'--config.data.path={tmp_path / "data"}')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'class' in result.stderr


def test_a_round_where_nobody_reports_keeps_the_model():
  algorithm, apply, args, trainable = _algorithm(dropout_prob=0.999)
  state, m = apply(algorithm.init(trainable, jax.random.key(0)), *args)
  assert int(m.num_sampled) == 4 and int(m.num_reported) == 0
  jax.tree.map(np.testing.assert_array_equal, state.trainable, trainable)
  assert int(state.round) == 1


@pytest.mark.parametrize('arg,needle', [('bitfit', "peft.method='bitfit'"),
                                        ('bias,dp=clinet', "dp.mode='clinet'")])
def test_a_typo_in_the_config_argument_is_one_line(tmp_path, arg, needle):
  result = subprocess.run(
      [sys.executable, 'launch.py', f'--config=experiments/synthetic_tiny.py:{arg}',
       f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert needle in result.stderr
