"""Each callback of the experiment loop on its own, with hand-made rounds."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from tensorboard.backend.event_processing import event_accumulator

from fedpeft_jax.experiment import callbacks
from fedpeft_jax.federated import fedavg
from fedpeft_jax.privacy import accounting


def _metrics(sampled=(3, 1, -1, -1), reported=2, nonfinite=0, loss=0.5, aggregator=None,
             sent=None):
  """A round's metrics; `sent`: clients that sent an update (default: reported + nonfinite)."""
  sent = reported + nonfinite if sent is None else sent
  return fedavg.RoundMetrics(
      clients=np.asarray(sampled), reported=np.arange(len(sampled)) < sent,
      num_sampled=np.int32(sum(c >= 0 for c in sampled)), num_reported=np.int32(reported),
      num_nonfinite=np.int32(nonfinite), train_loss=np.float32(loss),
      aggregator=aggregator or {})


def _state(done=0, w=0.0):
  return fedavg.ServerState(trainable={'head': {'kernel': jnp.full((2, 3), w)}}, opt_state=(),
                            aggregator_state=(), round=jnp.asarray(done), rng=None)


def test_traffic_counts_the_model_down_to_the_sampled_and_updates_up_from_reporters():
  traffic = callbacks.Traffic(num_trainable=10)
  record = {}
  traffic.on_round_end(1, _state(1), _metrics(reported=0, nonfinite=1), record)
  # A NaN update was still sent: traffic does not depend on what the update holds.
  assert record == {'bytes_down': 80, 'bytes_up': 40, 'bytes_cumulative': 120}
  resumed = callbacks.Traffic(num_trainable=10)
  resumed.load_state_dict(json.loads(json.dumps(traffic.state_dict())))
  resumed.on_round_end(2, _state(2), _metrics(reported=2), record)
  assert record['bytes_cumulative'] == 120 + 160


def test_round_summary_lists_the_sampled_clients_and_digests_the_parameters():
  summary, a, b = callbacks.RoundSummary(6), {}, {}
  summary.on_round_end(1, _state(1, 0.0), _metrics(loss=0.25, nonfinite=1), a)
  summary.on_round_end(1, _state(1, 1.0), _metrics(), b)
  assert a['clients'] == [3, 1] and a['clients_reported'] == 2 and a['clients_nonfinite'] == 1
  assert a['train_loss'] == 0.25 and a['trainable_params'] == 6
  assert a['trainable_sha256'] != b['trainable_sha256']
  assert a['trainable_sha256'] == callbacks.tree_sha256(
      {'head': {'kernel': np.zeros((2, 3), np.float32)}})
  # The path is part of the digest, not only the bytes.
  assert callbacks.tree_sha256({'a': np.zeros(2)}) != callbacks.tree_sha256({'b': np.zeros(2)})


def test_all_nonfinite_stops_an_empty_round_does_not():
  stop = callbacks.StopIfAllNonFinite('/ckpt')
  stop.on_round_end(1, _state(), _metrics(reported=0, nonfinite=0), {})
  stop.on_round_end(1, _state(), _metrics(reported=1, nonfinite=1), {})
  with pytest.raises(callbacks.TrainingError, match=r'round 4: every reporting client \(2\)'):
    stop.on_round_end(4, _state(), _metrics(reported=0, nonfinite=2), {})


def test_evaluation_runs_every_few_rounds_and_after_the_last():
  calls = []
  evaluation = callbacks.Evaluation(lambda t: calls.append(t) or 0.75, every=2, rounds=5)
  records = [{} for _ in range(5)]
  for r, record in enumerate(records, 1):
    evaluation.on_round_end(r, _state(r), _metrics(), record)
  assert [bool(r) for r in records] == [False, True, False, True, True]
  assert records[1] == {'test_accuracy': 0.75} and len(calls) == 3


def test_privacy_composes_its_ledger_and_carries_it_across_a_restart():
  spec = accounting.PrivacySpec(mode='client', noise_multiplier=1.0, delta=1e-5, rounds=4,
                                num_clients=64, clients_per_round=8)
  privacy = callbacks.Privacy(spec, every=2, rounds=4)
  aggregator = {'clip_norm': np.float32(0.5), 'clipped_fraction': np.float32(0.25)}
  records = [{} for _ in range(4)]
  for r, record in enumerate(records[:2], 1):
    privacy.on_round_end(r, _state(r), _metrics(aggregator=aggregator), record)
  # Resumed after round 2 with more noise for the remaining rounds.
  louder = callbacks.Privacy(dataclasses.replace(spec, noise_multiplier=2.0), every=2,
                             rounds=4)
  louder.load_state_dict(json.loads(json.dumps(privacy.state_dict())))
  for r, record in enumerate(records[2:], 3):
    louder.on_round_end(r, _state(r), _metrics(aggregator=aggregator), record)
  assert records[0] == {} and records[2] == {}
  # Independently: dp-accounting composing 2 rounds at z=1 and 2 at z=2.
  accountant = pld_privacy_accountant.PLDAccountant()
  for z in (1.0, 1.0, 2.0, 2.0):
    accountant.compose(dp_event.PoissonSampledDpEvent(8 / 64, dp_event.GaussianDpEvent(z)))
  assert records[3]['epsilon'] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
  assert records[1]['epsilon'] < records[3]['epsilon']
  assert records[3]['noise_multiplier'] == 2.0
  assert records[3]['clip_norm'] == 0.5 and records[3]['clipped_fraction'] == 0.25
  assert louder.state_dict()['calibrated_for_rounds'] == 4


def test_privacy_without_noise_writes_an_infinite_epsilon_as_standard_json():
  spec = accounting.PrivacySpec(mode='client', noise_multiplier=0.0, delta=1e-5, rounds=1,
                                num_clients=64, clients_per_round=8)
  record = {}
  callbacks.Privacy(spec, every=1, rounds=1).on_round_end(1, _state(1), _metrics(), record)
  assert json.loads(json.dumps(record, allow_nan=False))['epsilon'] == 'inf'


def test_diagnostics_are_separated_and_the_cohort_dropped():
  record = {'round': 3, 'test_accuracy': 0.5, 'train_loss': 0.2, 'clients': [1, 5],
            'clients_reported': 2, 'clients_nonfinite': 0, 'clipped_fraction': 0.5,
            'epsilon': 1.0, 'bytes_up': 8}
  callbacks.SeparateDiagnostics().on_round_end(3, _state(3), _metrics(), record)
  assert record == {'round': 3, 'test_accuracy': 0.5, 'epsilon': 1.0, 'bytes_up': 8,
                    'diagnostics': {'train_loss': 0.2, 'clients_reported': 2,
                                    'clients_nonfinite': 0, 'clipped_fraction': 0.5}}


def test_round_clock_carries_wall_time_across_a_restart(monkeypatch):
  now = iter([100.0, 103.0, 110.0, 500.0, 502.0])
  monkeypatch.setattr(callbacks.time, 'perf_counter', lambda: next(now))
  clock, a, b = callbacks.RoundClock(), {}, {}
  clock.on_run_start(_state())
  clock.on_round_end(1, _state(1), _metrics(), a)
  clock.on_round_end(2, _state(2), _metrics(), b)
  assert (a['round_s'], a['wall_s'], b['round_s'], b['wall_s']) == (3, 3, 7, 10)
  resumed = callbacks.RoundClock()
  resumed.load_state_dict(clock.state_dict())
  resumed.on_run_start(_state(2))
  c = {}
  resumed.on_round_end(3, _state(3), _metrics(), c)
  assert c == {'round_s': 2, 'wall_s': 12}


def test_metrics_log_drops_rounds_after_the_resumed_checkpoint_and_a_torn_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'round': r}) + '\n' for r in (1, 2, 3)) + '{"rou')
  log = callbacks.MetricsLog(str(path))
  log.on_run_start(_state(2))
  log.on_round_end(3, _state(3), _metrics(), {'round': 3, 'x': 1})
  log.on_run_end(_state(3))
  assert callbacks.read_metrics(str(path)) == [{'round': 1}, {'round': 2}, {'round': 3, 'x': 1}]


def test_tensorboard_writes_scalars_that_tensorboard_reads_and_purges_on_resume(tmp_path):
  board = callbacks.TensorBoard(str(tmp_path))
  board.on_run_start(_state(0))
  for r in (1, 2, 3):
    board.on_round_end(r, _state(r), _metrics(), {
        'round': r, 'train_loss': 1.0 / r, 'bytes_cumulative': r * 2**20,
        **({'test_accuracy': 0.5} if r == 2 else {}), 'clients': [1, 2]})
  board.on_run_end(_state(3))
  resumed = callbacks.TensorBoard(str(tmp_path))  # Killed after a checkpoint at round 1.
  resumed.on_run_start(_state(1))
  resumed.on_round_end(2, _state(2), _metrics(), {'train_loss': 9.0,
                                                  'diagnostics': {'clipped_fraction': 0.5}})
  resumed.on_run_end(_state(2))
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars('loss/train')] == [(1, 1.0), (2, 9.0)]
  assert [(e.step, e.value) for e in events.Scalars('traffic/sent_MiB')] == [(1, 1.0)]
  assert events.Scalars('accuracy/test') == []  # Purged with round 2.
  assert [(e.step, e.value) for e in events.Scalars('diagnostics/privacy/clipped_fraction')
          ] == [(2, 0.5)]


def test_console_line_says_accuracy_only_when_evaluated_and_traffic_in_mib(capsys):
  console = callbacks.Console(rounds=4)
  console.on_run_start(_state())
  base = {'train_loss': 0.5, 'bytes_cumulative': 3 * 2**20, 'round_s': 2.0,
          'clients_reported': 2, 'clients_nonfinite': 0}
  console.on_round_end(1, _state(1), _metrics(), dict(base))
  console.on_round_end(2, _state(2), _metrics(), dict(base, test_accuracy=0.625, round_s=4.0))
  console.on_round_end(3, _state(3), _metrics(reported=0), dict(base, clients_reported=0))
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == ('round    1/4  acc    -    loss 0.5000  sent 3.00 MiB  2.0 s/round  '
                      'eta 6 s')
  assert lines[1].startswith('round    2/4  acc 0.6250  loss') and lines[1].endswith('eta 6 s')
  assert lines[2] == 'round 3: no sampled client reported (2 sampled); the model is unchanged'


class FakeCheckpointer:
  def __init__(self):
    self.saved = []

  def save(self, state, meta, config):
    self.saved.append((int(state.round), meta))


def test_checkpoint_saves_every_few_rounds_and_the_last_with_callback_state():
  checkpointer, traffic = FakeCheckpointer(), callbacks.Traffic(1)
  checkpoint = callbacks.Checkpoint(checkpointer, config=None, every=2, rounds=3,
                                    stateful=[traffic])
  for r in (1, 2, 3):
    traffic.on_round_end(r, _state(r), _metrics(), {})
    checkpoint.on_round_end(r, _state(r), _metrics(), {})
  assert checkpointer.saved == [(2, {'traffic': {'bytes_cumulative': 32}}),
                                (3, {'traffic': {'bytes_cumulative': 48}})]


def test_export_writes_the_trainable_tree_in_the_flat_official_layout(tmp_path):
  callbacks.ExportTrainable(str(tmp_path / 't.npz')).on_run_end(_state(3, 2.0))
  with np.load(tmp_path / 't.npz') as f:
    assert f.files == ['head/kernel'] and (f['head/kernel'] == 2.0).all()
