"""Each callback of the experiment loop on its own, with hand-made rounds."""
import dataclasses
import json
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from tensorboard.backend.event_processing import event_accumulator

from fedpeft_jax import resume
from fedpeft_jax.experiment import callbacks
from fedpeft_jax.experiment import loop
from fedpeft_jax.federated import types
from fedpeft_jax.privacy import accounting
from tests.conftest import tiny_config


def _metrics(sampled=(3, 1, -1, -1), reported=2, nonfinite=0, loss=0.5, aggregator=None,
             sent=None):
  """A round's metrics; `sent`: clients that sent an update (default: reported + nonfinite)."""
  sent = reported + nonfinite if sent is None else sent
  return types.RoundMetrics(
      clients=np.asarray(sampled), reported=np.arange(len(sampled)) < sent,
      num_sampled=np.int32(sum(c >= 0 for c in sampled)), num_reported=np.int32(reported),
      num_nonfinite=np.int32(nonfinite), train_loss=np.float32(loss),
      aggregator=aggregator or {})


def _state(done=0, w=0.0):
  return types.ServerState(trainable={'head': {'kernel': jnp.full((2, 3), w)}}, opt_state=(),
                            aggregator_state=(), round=jnp.asarray(done), rng=None)


def test_traffic_counts_the_model_down_to_the_sampled_and_updates_up_from_reporters():
  traffic = callbacks.Traffic(num_trainable=10)
  record = traffic.on_round_end(1, _state(1), _metrics(reported=0, nonfinite=1), {})
  # A NaN update was still sent: traffic does not depend on what the update holds.
  assert record == {'bytes_down': 80, 'bytes_up': 40, 'bytes_cumulative': 120}
  resumed = callbacks.Traffic(num_trainable=10)
  resumed.load_state_dict(json.loads(json.dumps(traffic.state_dict())))
  record = resumed.on_round_end(2, _state(2), _metrics(reported=2), record)
  assert record['bytes_cumulative'] == 120 + 160


def test_round_summary_lists_the_sampled_clients_and_digests_the_parameters():
  summary = callbacks.RoundSummary(6)
  a = summary.on_round_end(1, _state(1, 0.0), _metrics(loss=0.25, nonfinite=1), {})
  b = summary.on_round_end(1, _state(1, 1.0), _metrics(), {})
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
  evaluation = callbacks.Evaluation(lambda t: calls.append(t) or {'test_accuracy': 0.75},
                                    every=2, rounds=5)
  records = [evaluation.on_round_end(r, _state(r), _metrics(), {}) for r in range(1, 6)]
  assert [bool(r) for r in records] == [False, True, False, True, True]
  assert records[1] == {'test_accuracy': 0.75} and len(calls) == 3


def test_privacy_composes_its_ledger_and_carries_it_across_a_restart():
  spec = accounting.PrivacySpec(mode='client', noise_multiplier=1.0, delta=1e-5, rounds=4,
                                num_clients=64, clients_per_round=8)
  privacy = callbacks.Privacy(spec, every=2, rounds=4)
  aggregator = {'clip_norm': np.float32(0.5), 'clipped_fraction': np.float32(0.25)}
  records = [privacy.on_round_end(r, _state(r), _metrics(aggregator=aggregator), {}) or {}
             for r in (1, 2)]
  # Resumed after round 2 with more noise for the remaining rounds.
  louder = callbacks.Privacy(dataclasses.replace(spec, noise_multiplier=2.0), every=2,
                             rounds=4)
  louder.load_state_dict(json.loads(json.dumps(privacy.state_dict())))
  records += [louder.on_round_end(r, _state(r), _metrics(aggregator=aggregator), {}) or {}
              for r in (3, 4)]
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
  record = callbacks.Privacy(spec, every=1, rounds=1).on_round_end(1, _state(1), _metrics(), {})
  assert json.loads(json.dumps(record, allow_nan=False))['epsilon'] == 'inf'


def test_diagnostics_are_separated_and_the_cohort_dropped():
  record = {'round': 3, 'test_accuracy': 0.5, 'train_loss': 0.2, 'clients': [1, 5],
            'clients_reported': 2, 'clients_nonfinite': 0, 'clipped_fraction': 0.5,
            'epsilon': 1.0, 'bytes_up': 8}
  record = callbacks.SeparateDiagnostics().on_round_end(3, _state(3), _metrics(), record)
  assert record == {'round': 3, 'test_accuracy': 0.5, 'epsilon': 1.0, 'bytes_up': 8,
                    'diagnostics': {'train_loss': 0.2, 'clients_reported': 2,
                                    'clients_nonfinite': 0, 'clipped_fraction': 0.5}}


def test_round_clock_carries_wall_time_across_a_restart(monkeypatch):
  now = iter([100.0, 103.0, 110.0, 500.0, 502.0])
  monkeypatch.setattr(callbacks.time, 'perf_counter', lambda: next(now))
  clock = callbacks.RoundClock()
  clock.on_run_start(_state())
  a = clock.on_round_end(1, _state(1), _metrics(), {})
  b = clock.on_round_end(2, _state(2), _metrics(), {})
  assert (a['round_s'], a['wall_s'], b['round_s'], b['wall_s']) == (3, 3, 7, 10)
  resumed = callbacks.RoundClock()
  resumed.load_state_dict(clock.state_dict())
  resumed.on_run_start(_state(2))
  c = resumed.on_round_end(3, _state(3), _metrics(), {})
  assert c == {'round_s': 2, 'wall_s': 12}


def test_round_zero_is_the_initial_model_with_nothing_sent_and_no_epsilon_spent(monkeypatch):
  """Each compute callback's part of round 0, on the initial state; evaluated whatever
  `every` says, timed apart from round 1."""
  state = _state(0, 0.5)
  assert callbacks.Traffic(10).on_round_zero(state, {}) == {'bytes_cumulative': 0}
  assert callbacks.RoundSummary(6).on_round_zero(state, {}) == {
      'trainable_params': 6, 'trainable_sha256': callbacks.tree_sha256(
          {'head': {'kernel': np.full((2, 3), 0.5, np.float32)}})}
  seen = []
  evaluation = callbacks.Evaluation(lambda t: seen.append(t) or {'test_accuracy': 0.25},
                                    every=5, rounds=10)
  assert evaluation.on_round_zero(state, {}) == {'test_accuracy': 0.25}
  assert seen == [state.trainable]
  spec = accounting.PrivacySpec(mode='client', noise_multiplier=1.0, delta=1e-5, rounds=4,
                                num_clients=64, clients_per_round=8)
  privacy = callbacks.Privacy(spec, every=1, rounds=4)
  assert privacy.on_round_zero(state, {}) == {'epsilon': 0.0}
  assert len(privacy.ledger) == 0  # Nothing recorded: round 1 composes one round.
  one = privacy.on_round_end(1, _state(1), _metrics(), {})['epsilon']
  assert one == pytest.approx(accounting.epsilon(dataclasses.replace(spec, rounds=1)),
                              rel=1e-9)
  now = iter([100.0, 101.5, 104.0])
  monkeypatch.setattr(callbacks.time, 'perf_counter', lambda: next(now))
  clock = callbacks.RoundClock()
  clock.on_run_start(state)
  assert clock.on_round_zero(state, {}) == {'wall_s': 1.5}
  assert clock.on_round_end(1, _state(1), _metrics(), {}) == {'round_s': 2.5, 'wall_s': 4.0}


def test_metrics_log_drops_rounds_after_the_resumed_checkpoint_and_a_torn_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'round': r}) + '\n' for r in (1, 2, 3)) + '{"rou')
  log = callbacks.MetricsLog(str(path))
  log.on_run_start(_state(2))
  log.on_round_end(3, _state(3), _metrics(), {'round': 3, 'x': 1})
  log.on_run_end(_state(3))
  assert callbacks.read_metrics(str(path)) == [{'round': 1}, {'round': 2}, {'round': 3, 'x': 1}]


def test_metrics_log_keeps_round_zero_on_resume_and_a_fresh_start_writes_it_anew(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'round': r}) + '\n' for r in (0, 1, 2)))
  resumed = callbacks.MetricsLog(str(path))
  resumed.on_run_start(_state(1))
  resumed.on_run_end(_state(1))
  assert callbacks.read_metrics(str(path)) == [{'round': 0}, {'round': 1}]
  fresh = callbacks.MetricsLog(str(path))  # Died before its first checkpoint: anew.
  fresh.on_run_start(_state(0))
  fresh.on_round_zero(_state(0), {'round': 0, 'test_accuracy': 0.25})
  fresh.on_run_end(_state(0))
  assert callbacks.read_metrics(str(path)) == [{'round': 0, 'test_accuracy': 0.25}]


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


def test_tensorboard_has_round_zero_at_step_zero_and_a_fresh_restart_hides_a_dead_attempt(
    tmp_path, monkeypatch):
  import tensorboardX.event_file_writer
  zero = {'round': 0, 'test_accuracy': 0.25, 'bytes_cumulative': 0}
  # The first attempt died after round 1, before a checkpoint; the second is in round 1.
  for start, rounds in ((1.7e9, (1,)), (1.7e9 + 60, ())):
    # Event files are named by the second they start in: a minute apart, as in life.
    monkeypatch.setattr(tensorboardX.event_file_writer.time, 'time', lambda: start)
    board = callbacks.TensorBoard(str(tmp_path))
    board.on_run_start(_state(0))
    board.on_round_zero(_state(0), zero)
    for r in rounds:
      board.on_round_end(r, _state(r), _metrics(), {'round': r, 'test_accuracy': 0.5,
                                                    'train_loss': 1.0})
    board.on_run_end(_state(len(rounds)))
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars('accuracy/test')] == [(0, 0.25)]
  assert [(e.step, e.value) for e in events.Scalars('traffic/sent_MiB')] == [(0, 0.0)]
  assert events.Scalars('loss/train') == []  # The dead attempt's round 1: hidden.


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
  assert lines[2] == ('round 3: no sampled client reported an update with examples (2 sampled); '
                      'the model is unchanged')
  console.on_round_zero(_state(), {'round': 0, 'test_accuracy': 0.25, 'bytes_cumulative': 0})
  console.on_round_zero(_state(), {'round': 0, 'test_accuracy': 0.5, 'epsilon': 0.0})
  assert capsys.readouterr().out.splitlines() == [
      'round    0/4  acc 0.2500  the initial model, before training',
      'round    0/4  acc 0.5000  eps 0  the initial model, before training']


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


def test_privacy_shares_its_ledger_and_refuses_a_checkpoint_without_one():
  spec = accounting.PrivacySpec(mode='client', noise_multiplier=1.0, delta=1e-5, rounds=3,
                                num_clients=64, clients_per_round=8)
  config = tiny_config('bias,dp=client')
  assert callbacks.restore_ledger(tiny_config('bias'), {}, '/w') is None  # No DP, no ledger.
  assert len(callbacks.restore_ledger(config, None, '/w')) == 0  # A new run: empty.
  saved = {'ledger': [accounting.round_record(spec)] * 2, 'calibrated_for_rounds': 3,
           'noise_multiplier': 1.0}
  ledger = callbacks.restore_ledger(config, {'privacy': saved, 'traffic': {}}, '/w')
  privacy = callbacks.Privacy(spec, every=1, rounds=3, ledger=ledger)
  record = privacy.on_round_end(3, _state(3), _metrics(), {})
  assert len(ledger) == 3 and privacy.state_dict() == ledger.state_dict()
  assert record['epsilon'] == pytest.approx(accounting.epsilon(spec), rel=1e-9)
  for restore in (lambda: callbacks.restore_ledger(config, {'traffic': {}}, '/w/checkpoints'),
                  lambda: loop.restore([privacy], {'traffic': {}}, '/w/checkpoints')):
    with pytest.raises(resume.ResumeError, match=r'^the checkpoint in /w/checkpoints has no '
                       r'privacy ledger \(made by an older version\)'):
      restore()


class StopAt(loop.Callback):
  def __init__(self, stop_round):
    self.stop_round = stop_round

  def on_round_end(self, round_index, state, metrics, record):
    return loop.Stop('enough') if round_index == self.stop_round else None


@pytest.mark.parametrize('stop_round, saved', [(None, [2, 4, 6]), (3, [2, 3]), (4, [2, 4])])
def test_checkpoint_saves_a_stopped_round_once_due_or_not(stop_round, saved):
  checkpointer, traffic = FakeCheckpointer(), callbacks.Traffic(1)
  checkpoint = callbacks.Checkpoint(checkpointer, config=None, every=2, rounds=6,
                                    stateful=[traffic])
  loop.run(lambda s: (s._replace(round=s.round + 1), _metrics()), _state(0), 6,
           [checkpoint, traffic, StopAt(stop_round)])
  assert [r for r, _ in checkpointer.saved] == saved
  assert checkpointer.saved[-1][1] == {'traffic': {'bytes_cumulative': 16 * saved[-1]}}


# metrics.jsonl's keys in the order runs have always written them (before callbacks
# returned their parts): each compute callback's keys in list order, the clock's last.
PLAIN_KEYS = ['round', 'bytes_up', 'bytes_down', 'bytes_cumulative', 'train_loss', 'clients',
              'clients_reported', 'clients_nonfinite', 'trainable_params', 'trainable_sha256',
              'test_accuracy', 'round_s', 'wall_s']
DP_KEYS = ['round', 'bytes_up', 'bytes_down', 'bytes_cumulative', 'trainable_params',
           'trainable_sha256', 'test_accuracy', 'epsilon', 'noise_multiplier', 'clip_norm',
           'diagnostics', 'round_s', 'wall_s']
# Round 0's (the initial model): no client took part, so no loss, cohort or diagnostics.
ZERO_KEYS = ['round', 'bytes_cumulative', 'trainable_params', 'trainable_sha256',
             'test_accuracy', 'wall_s']
ZERO_DP_KEYS = ZERO_KEYS[:-1] + ['epsilon', 'wall_s']


class FakeCheckpointerIn(FakeCheckpointer):
  directory = '/w/checkpoints'


def _standard_run(tmp_path, arg, rounds, saved=None, primary=True):
  """`callbacks.standard` around a stand-in round on `tiny_config(arg)`, every round
  evaluated and checkpointed; returns (callbacks, checkpointer)."""
  config = tiny_config(arg)
  config.fl.rounds, config.fl.eval_every, config.checkpoint.every = rounds, 1, 1
  spec = (None if config.dp.mode == 'none' else accounting.PrivacySpec(
      mode='client', noise_multiplier=1.0, delta=1e-5, rounds=rounds, num_clients=64,
      clients_per_round=8))
  experiment = SimpleNamespace(num_trainable=6, evaluate=lambda t: {'test_accuracy': 0.5},
                               privacy=spec)
  checkpointer = FakeCheckpointerIn()
  ledger = callbacks.restore_ledger(config, saved, checkpointer.directory)
  standard = callbacks.standard(experiment, config, str(tmp_path), checkpointer, primary,
                                ledger)
  state = _state(0)
  if saved is not None:
    state = _state(saved['round'])
    loop.restore(standard, saved, checkpointer.directory)
  aggregator = {'clip_norm': np.float32(0.5), 'clipped_fraction': np.float32(0.25)}
  loop.run(lambda s: (s._replace(round=s.round + 1), _metrics(aggregator=aggregator)), state,
           rounds, standard)
  return standard, checkpointer


@pytest.mark.parametrize('arg', ['bias', 'bias,dp=client', 'bias,dp=sample'])
def test_the_standard_callbacks_keep_the_contract_and_the_files_layout(tmp_path, arg):
  standard, checkpointer = _standard_run(tmp_path, arg, rounds=2)
  phases = [loop.PHASES.index(c.phase) for c in standard]
  assert phases == sorted(phases)
  names = [type(c).__name__ for c in standard]
  dp = 'dp=' in arg
  assert names == (['Traffic', 'RoundSummary']
                   + (['StopIfAllNonFinite'] if 'client' not in arg else [])
                   + ['Evaluation'] + (['Privacy'] if dp else []) + ['RoundClock']
                   + (['SeparateDiagnostics'] if dp else [])
                   + ['MetricsLog', 'TensorBoard', 'Console', 'Checkpoint', 'ExportTrainable'])
  stateful = [c.name for c in standard if isinstance(c, loop.Stateful)]
  assert len(set(stateful)) == len(stateful)
  lines = callbacks.read_metrics(str(tmp_path / 'metrics.jsonl'))
  assert [list(line) for line in lines] == ([ZERO_DP_KEYS if dp else ZERO_KEYS]
                                             + [DP_KEYS if dp else PLAIN_KEYS] * 2)
  assert lines[0]['bytes_cumulative'] == 0 and lines[0]['epsilon' if dp else 'round'] == 0
  if dp:
    assert list(lines[1]['diagnostics']) == list(callbacks.DIAGNOSTICS)
  assert (tmp_path / 'trainable.npz').exists()
  # Every stateful callback's values are in every checkpoint, and survive JSON.
  assert [(r, sorted(meta)) for r, meta in checkpointer.saved] == [(1, sorted(stateful)),
                                                                  (2, sorted(stateful))]
  json.dumps(checkpointer.saved)
  # Other processes write no files and still checkpoint.
  others, _ = _standard_run(tmp_path / 'other', arg, rounds=1, primary=False)
  assert [c.phase for c in others if c.phase in ('write', 'persist')] == ['persist']
  assert not (tmp_path / 'other').exists()


def test_a_checkpoint_older_than_a_stateful_callback_resumes_it_fresh_with_a_warning(
    tmp_path, caplog):
  _, checkpointer = _standard_run(tmp_path, 'bias,dp=client', rounds=2)
  round_2 = dict(checkpointer.saved[1][1])
  per_round = 2 * 2 * 4 * 6  # Both ways, 2 clients, 6 float32s.
  assert round_2['traffic'] == {'bytes_cumulative': 2 * per_round}
  del round_2['traffic']  # As if written before traffic was counted.
  _, resumed = _standard_run(tmp_path, 'bias,dp=client', rounds=3,
                             saved={**round_2, 'round': 2})
  (_, meta), = resumed.saved
  assert meta['traffic'] == {'bytes_cumulative': per_round}  # Round 3's only: fresh.
  assert len(meta['privacy']['ledger']) == 3  # The ledger continued.
  assert meta['clock']['wall_s'] >= round_2['clock']['wall_s']
  assert [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'] == [
      "the checkpoint in /w/checkpoints holds no values of callback 'traffic' (it predates "
      'that callback): it starts fresh']
  lines = callbacks.read_metrics(str(tmp_path / 'metrics.jsonl'))
  assert [line['round'] for line in lines] == [0, 1, 2, 3]  # Round 0 kept, not made again.


def test_two_stateful_callbacks_of_one_name_are_refused():
  with pytest.raises(ValueError, match=r"share a name \(\['traffic', 'traffic'\]\)"):
    callbacks.Checkpoint(FakeCheckpointer(), None, 1, 1,
                         [callbacks.Traffic(1), callbacks.Traffic(2)])


def test_a_text_run_shows_perplexity_on_the_console_and_in_tensorboard(tmp_path, capsys):
  """causal_lm's headline is test perplexity: `ppl` leads the line in place of next-token
  accuracy, and TensorBoard has it and the test loss."""
  console = callbacks.Console(rounds=4, headline='test_perplexity')
  console.on_run_start(_state())
  text = {'test_perplexity': 271.345, 'test_loss': 5.6, 'test_accuracy': 0.1289}
  console.on_round_zero(_state(), {'round': 0, 'bytes_cumulative': 0, **text})
  base = {'train_loss': 0.5, 'bytes_cumulative': 3 * 2**20, 'round_s': 2.0,
          'clients_reported': 2, 'clients_nonfinite': 0}
  console.on_round_end(1, _state(1), _metrics(), dict(base))
  console.on_round_end(2, _state(2), _metrics(), {**base, **text, 'test_perplexity': 9.873})
  assert capsys.readouterr().out.splitlines() == [
      'round    0/4  ppl 271.3  the initial model, before training',
      'round    1/4  ppl    -    loss 0.5000  sent 3.00 MiB  2.0 s/round  eta 6 s',
      'round    2/4  ppl 9.873  loss 0.5000  sent 3.00 MiB  2.0 s/round  eta 4 s']

  board = callbacks.TensorBoard(str(tmp_path))
  board.on_run_start(_state(0))
  board.on_round_zero(_state(0), {'round': 0, 'bytes_cumulative': 0, **text})
  board.on_round_end(1, _state(1), _metrics(), {'round': 1, 'train_loss': 5.0,
                                                'test_perplexity': 150.0, 'test_loss': 5.01})
  board.on_run_end(_state(1))
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  scalars = lambda tag: [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]
  assert scalars('perplexity/test') == [(0, 271.345), (1, 150.0)]
  assert scalars('loss/test') == [(0, 5.6), (1, 5.01)]
  assert scalars('accuracy/test') == [(0, 0.1289)]


@pytest.mark.parametrize('family, headline', [('vit', 'test_accuracy'),
                                              ('llama', 'test_perplexity')])
def test_the_standard_console_shows_the_tasks_headline_metric(tmp_path, family, headline):
  config = tiny_config('lora')
  config.model.family = family
  experiment = SimpleNamespace(num_trainable=6, evaluate=None, privacy=None)
  standard = callbacks.standard(experiment, config, str(tmp_path), FakeCheckpointerIn(), True)
  (console,) = [c for c in standard if isinstance(c, callbacks.Console)]
  assert console.headline == headline
