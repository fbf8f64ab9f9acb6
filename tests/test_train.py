"""experiment.train: config -> rounds -> what a run writes (metrics, TensorBoard, config,
run record), on synthetic data."""
import json

import pytest
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
