"""experiment.train: config -> rounds -> what a run writes (metrics, TensorBoard, config,
run record), on synthetic data."""
import json
import shutil

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from tensorboard.backend.event_processing import event_accumulator

from fedpeft_jax.experiment import train
from tests.conftest import tiny_config

METRIC_KEYS = {'round', 'train_loss', 'clients', 'bytes_up', 'bytes_down',
               'bytes_cumulative', 'trainable_params', 'trainable_sha256', 'wall_s', 'round_s',
               'clients_reported', 'clients_nonfinite'}


@pytest.mark.parametrize('method', ['head', 'bias', 'adapter', 'prompt', 'lora', 'full'])
def test_synthetic_run_learns_and_logs_every_round(tmp_path, method):
  config = tiny_config(method)
  config.fl.rounds = 4
  config.fl.eval_every = 2
  config.optim.lr = 0.1
  config.fl.local_epochs = 3
  config.data.num_test_examples = 256
  history = train.train(config, str(tmp_path))
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in lines] == [1, 2, 3, 4] and lines == history
  # Accuracy on evaluated rounds only; everything else every round.
  assert [set(r) - METRIC_KEYS for r in lines] == [set(), {'test_accuracy'}, set(),
                                                   {'test_accuracy'}]
  last = lines[-1]
  # 4 balanced classes: chance is 0.25 (std 0.027 over 256 test images).
  assert last['test_accuracy'] > 0.4
  assert len(set(last['clients'])) == config.fl.clients_per_round
  per_round = 4 * last['trainable_params'] * config.fl.clients_per_round
  assert all(r['bytes_up'] == r['bytes_down'] == per_round for r in lines)
  assert [r['bytes_cumulative'] for r in lines] == [2 * per_round * i for i in (1, 2, 3, 4)]
  assert len({r['trainable_sha256'] for r in lines}) == 4


def test_same_seed_same_result_other_seed_differs(tmp_path):
  config = tiny_config('bias')
  config.fl.rounds = 2
  a = train.train(config, str(tmp_path / 'a'))[-1]['trainable_sha256']
  b = train.train(config, str(tmp_path / 'b'))[-1]['trainable_sha256']
  config.seed = 1
  c = train.train(config, str(tmp_path / 'c'))[-1]['trainable_sha256']
  assert a == b != c


def test_a_run_writes_its_config_its_making_and_tensorboard_scalars(tmp_path):
  config = tiny_config('bias')
  config.fl.rounds, config.fl.eval_every = 3, 2
  history = train.train(config, str(tmp_path))

  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved == config.to_dict() and saved['fl']['rounds'] == 3
  run = json.loads((tmp_path / 'run.json').read_text())
  assert run['packages']['jax'] and run['packages']['dp-accounting'] == '0.6.0'
  assert run['device_count'] >= 1 and run['device_kind'] and run['backend'] == 'cpu'
  assert run['command'][1:] and run['start_time'] and run['resumed_from_round'] == 0

  events = event_accumulator.EventAccumulator(str(tmp_path / 'tb'))
  events.Reload()
  scalars = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]
  assert scalars('accuracy/test') == pytest.approx(
      [(r['round'], r['test_accuracy']) for r in history if 'test_accuracy' in r])
  assert [s for s, _ in scalars('accuracy/test')] == [2, 3]
  assert scalars('loss/train') == pytest.approx([(r['round'], r['train_loss']) for r in history])
  assert scalars('traffic/sent_MiB') == pytest.approx(
      [(r['round'], r['bytes_cumulative'] / 2**20) for r in history])
  assert [v for _, v in scalars('clients/reported')] == [r['clients_reported'] for r in history]
  assert len(scalars('time/seconds_per_round')) == 3
  assert 'privacy/epsilon' not in events.Tags()['scalars']


def _dp_config(rounds):
  config = tiny_config('bias,dp=client')
  config.fl.rounds, config.checkpoint.every, config.checkpoint.keep = rounds, 1, 10
  config.dp.target_epsilon, config.dp.clip_norm = 8.0, 0.1
  return config


def test_under_dp_the_epsilon_composes_what_ran_across_a_grown_resume(tmp_path):
  first = train.train(_dp_config(3), str(tmp_path))
  z1 = first[-1]['noise_multiplier']
  assert first[-1]['epsilon'] == pytest.approx(8.0, rel=2e-3)
  grown = train.train(_dp_config(6), str(tmp_path))  # Only rounds 4-6 are calibrated.
  z2 = grown[-1]['noise_multiplier']
  assert z2 > z1
  accountant = pld_privacy_accountant.PLDAccountant()
  for z in (z1,) * 3 + (z2,) * 3:  # Independently: the two multipliers composed.
    accountant.compose(dp_event.PoissonSampledDpEvent(4 / 8, dp_event.GaussianDpEvent(z)))
  assert grown[-1]['epsilon'] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
  assert grown[-1]['epsilon'] <= 8.0 * (1 + 2e-3)
  # Nothing written identifies the cohort; what epsilon does not cover is grouped.
  assert all('clients' not in r and 'train_loss' not in r for r in grown)
  assert set(grown[-1]['diagnostics']) == {'train_loss', 'clients_reported',
                                           'clients_nonfinite', 'clipped_fraction'}


def test_under_dp_a_plain_resume_keeps_the_noise_and_ends_bit_identical(tmp_path):
  straight = train.train(_dp_config(4), str(tmp_path / 'straight'))
  resumed_dir = tmp_path / 'resumed'
  train.train(_dp_config(4), str(resumed_dir))
  for lost in ('3', '4'):  # As if killed after round 2's checkpoint.
    shutil.rmtree(resumed_dir / 'checkpoints' / lost)
  resumed = train.train(_dp_config(4), str(resumed_dir))
  assert resumed[-1]['trainable_sha256'] == straight[-1]['trainable_sha256']
  assert resumed[-1]['epsilon'] == straight[-1]['epsilon']
