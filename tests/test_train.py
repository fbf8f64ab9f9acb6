"""experiment.train: config -> rounds -> what a run writes (metrics, TensorBoard, config,
run record), on synthetic data."""
import json
import shutil

import numpy as np
import PIL.Image
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from tensorboard.backend.event_processing import event_accumulator

from fedpeft_jax.data import partition, sources
from fedpeft_jax.experiment import build
from fedpeft_jax.experiment import callbacks
from fedpeft_jax.experiment import train
from tests.conftest import tiny_config

METRIC_KEYS = {'round', 'train_loss', 'clients', 'bytes_up', 'bytes_down',
               'bytes_cumulative', 'trainable_params', 'trainable_sha256', 'wall_s', 'round_s',
               'clients_reported', 'clients_nonfinite'}
# Round 0: the initial model, before training; no client took part.
ROUND_ZERO_KEYS = {'round', 'bytes_cumulative', 'trainable_params', 'trainable_sha256',
                   'test_accuracy', 'wall_s'}


# bias and adapter train in many other tests; these are the other paths through the model.
@pytest.mark.parametrize('method', ['head', 'prompt', 'lora', 'full'])
def test_synthetic_run_learns_and_logs_every_round(tmp_path, method):
  config = tiny_config(method)
  config.fl.rounds = 4
  config.fl.eval_every = 2
  config.optim.lr = 0.1
  config.fl.local_epochs = 3
  config.data.num_test_examples = 256
  history = train.train(config, str(tmp_path))
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in lines] == [0, 1, 2, 3, 4] and lines == history
  assert set(lines[0]) == ROUND_ZERO_KEYS and lines[0]['bytes_cumulative'] == 0
  lines = lines[1:]
  # Accuracy on evaluated rounds only; everything else every round (and LoRA's rule's
  # aggregation error: FedIT's, the default).
  lora = {'lora_aggregation_error'} if method == 'lora' else set()
  assert [set(r) - METRIC_KEYS for r in lines] == [lora, lora | {'test_accuracy'}, lora,
                                                   lora | {'test_accuracy'}]
  last = lines[-1]
  assert last['test_accuracy'] > history[0]['test_accuracy'] + 0.1  # Learnt from round 0.
  # 4 balanced classes: chance is 0.25 (std 0.027 over 256 test images).
  assert last['test_accuracy'] > 0.4
  assert len(set(last['clients'])) == config.fl.clients_per_round
  per_round = 4 * last['trainable_params'] * config.fl.clients_per_round
  assert all(r['bytes_up'] == r['bytes_down'] == per_round for r in lines)
  assert [r['bytes_cumulative'] for r in lines] == [2 * per_round * i for i in (1, 2, 3, 4)]
  assert len({r['trainable_sha256'] for r in history}) == 5


def test_round_zero_is_the_initial_model_evaluated_before_training_once_across_resumes(
    tmp_path):
  """A fresh run's first line evaluates the tree it starts from, as the experiment's own
  evaluate does on a separately built experiment; a resume keeps that line, once."""
  config = tiny_config('adapter')
  config.fl.rounds, config.checkpoint.every, config.checkpoint.keep = 2, 1, 2
  experiment = build.build(config)
  expected = experiment.evaluate(experiment.state.trainable)
  history = train.train(config, str(tmp_path))
  zero = history[0]
  assert zero['round'] == 0 and zero['test_accuracy'] == expected['test_accuracy']
  assert zero['trainable_sha256'] == callbacks.tree_sha256(experiment.state.trainable)
  assert zero['trainable_sha256'] != history[1]['trainable_sha256']
  assert zero['trainable_params'] == experiment.num_trainable and zero['wall_s'] > 0
  shutil.rmtree(tmp_path / 'checkpoints' / '2')  # As if killed after round 1's checkpoint.
  resumed = train.train(config, str(tmp_path))
  assert [r['round'] for r in resumed] == [0, 1, 2] and resumed[0] == zero
  assert resumed[-1]['trainable_sha256'] == history[-1]['trainable_sha256']


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
  assert [s for s, _ in scalars('accuracy/test')] == [0, 2, 3]  # Round 0 at step 0.
  trained = history[1:]
  assert scalars('loss/train') == pytest.approx([(r['round'], r['train_loss']) for r in trained])
  assert scalars('traffic/sent_MiB') == pytest.approx(
      [(r['round'], r['bytes_cumulative'] / 2**20) for r in history])
  assert [v for _, v in scalars('clients/reported')] == [r['clients_reported'] for r in trained]
  assert len(scalars('time/seconds_per_round')) == 3
  assert 'privacy/epsilon' not in events.Tags()['scalars']


def _dp_config(rounds):
  config = tiny_config('bias,dp=client')
  config.fl.rounds, config.checkpoint.every, config.checkpoint.keep = rounds, 1, 10
  config.dp.target_epsilon, config.dp.clip_norm = 8.0, 0.1
  return config


def test_under_dp_a_resume_keeps_the_noise_and_a_grown_one_composes_what_ran(tmp_path):
  straight = train.train(_dp_config(3), str(tmp_path / 'straight'))
  # Round 0 evaluates the public initial model: it spends no epsilon and has no diagnostics.
  assert set(straight[0]) == ROUND_ZERO_KEYS | {'epsilon'} and straight[0]['epsilon'] == 0
  z1 = straight[-1]['noise_multiplier']
  assert straight[-1]['epsilon'] == pytest.approx(8.0, rel=2e-3)
  shutil.copytree(tmp_path / 'straight', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '3')  # As if killed after round 2.
  resumed = train.train(_dp_config(3), str(tmp_path / 'resumed'))
  assert [r['round'] for r in resumed] == [0, 1, 2, 3] and resumed[0] == straight[0]
  assert resumed[-1]['trainable_sha256'] == straight[-1]['trainable_sha256']
  assert resumed[-1]['epsilon'] == straight[-1]['epsilon']

  grown = train.train(_dp_config(6), str(tmp_path / 'resumed'))  # Rounds 4-6 calibrated.
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


def test_scaffold_with_fedadam_resumes_bit_identical_after_losing_rounds(tmp_path, capsys):
  """The control variates and the server's Adam moments travel in the checkpoint: a run
  that lost its last two checkpoints (as if killed) ends where an uninterrupted one does."""
  config = tiny_config('bias')
  config.fl.rounds, config.checkpoint.every, config.checkpoint.keep = 4, 1, 4
  config.fl.algorithm, config.fl.server_optimizer, config.fl.prox_mu = 'scaffold', 'adam', 0.1
  straight = train.train(config, str(tmp_path / 'straight'))
  # The variate table's size is said at the start: 8 clients x the trainable float32s.
  table_mib = 8 * straight[-1]['trainable_params'] * 4 / 2**20
  assert (f"SCAFFOLD keeps a control variate per client: 8 x "
          f"{straight[-1]['trainable_params']:,} parameters, {table_mib:,.1f} MiB"
          in capsys.readouterr().out)
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'straight', resumed_dir)
  for lost in ('3', '4'):
    shutil.rmtree(resumed_dir / 'checkpoints' / lost)
  resumed = train.train(config, str(resumed_dir))
  assert [r['trainable_sha256'] for r in resumed] == [r['trainable_sha256'] for r in straight]
  # SCAFFOLD sends the variates both ways beside the model and the update.
  per_round = 2 * 4 * straight[-1]['trainable_params'] * config.fl.clients_per_round
  assert all(r['bytes_up'] == r['bytes_down'] == per_round for r in straight[1:])


def test_a_run_writes_its_partition(tmp_path):
  config = tiny_config('bias')  # 256 synthetic examples of 4 classes, 8 clients.
  config.fl.rounds, config.data.partition = 1, 'shards'
  train.train(config, str(tmp_path))
  written = json.loads((tmp_path / 'partition.json').read_text())
  labels = sources.load('synthetic', split='train', num_classes=4, num_examples=256,
                        image_size=16, seed=0).labels
  parts = partition.shards(labels, num_clients=8, seed=0, shards_per_client=2)
  assert written == {
      'method': 'shards', 'args': {'seed': 0, 'data.shards_per_client': 2},
      'class_names': ['0', '1', '2', '3'],
      'clients': [{'size': len(p), 'label_histogram': [int((labels[p] == c).sum())
                                                       for c in range(4)]} for p in parts]}
  # 16 shards of 16 examples; each class (64 examples) is 4 whole shards.
  for client in written['clients']:
    assert client['size'] == 32
    assert sorted(client['label_histogram']) in ([0, 0, 0, 32], [0, 0, 16, 16])


# client -> class -> images, for the natural partition; classes are '0'..'3' as in
# synthetic_tiny's 4-class head.
CLIENTS = {'alice': {'0': 3, '2': 5}, 'bob': {'1': 4}, 'carol': {'0': 1, '1': 2, '3': 3}}


def test_a_natural_partition_trains_on_the_clients_of_the_folders(tmp_path):
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for client, classes in CLIENTS.items():
      for name, count in classes.items():
        (tmp_path / 'data' / split / client / name).mkdir(parents=True)
        for i in range(count):
          PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
              tmp_path / 'data' / split / client / name / f'{i}.png')
  config = tiny_config('bias')
  config.data.source, config.data.path = 'folder', str(tmp_path / 'data')
  config.data.num_train_examples = config.data.num_test_examples = None  # All of them.
  config.data.partition = 'natural'
  config.fl.num_clients, config.fl.clients_per_round, config.fl.rounds = 3, 2, 1
  history = train.train(config, str(tmp_path / 'work'))
  assert len(history) == 2 and all('test_accuracy' in r for r in history)
  written = json.loads((tmp_path / 'work' / 'partition.json').read_text())
  assert written == {
      'method': 'natural', 'args': {}, 'class_names': ['0', '1', '2', '3'],
      'clients': [{'size': 8, 'label_histogram': [3, 0, 5, 0], 'id': 'alice'},
                  {'size': 4, 'label_histogram': [0, 4, 0, 0], 'id': 'bob'},
                  {'size': 6, 'label_histogram': [1, 2, 0, 3], 'id': 'carol'}]}
