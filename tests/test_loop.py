"""The loop calls the round function and every callback's hooks, in phase order, merging what
they return into the round's record, nothing else."""
import jax.numpy as jnp
import pytest

from fedpeft_jax.experiment import loop
from fedpeft_jax.federated import types


class Recorder(loop.Callback):
  def __init__(self, name, calls):
    self.name, self.calls = name, calls

  def on_run_start(self, state):
    self.calls.append((self.name, 'start', int(state.round)))

  def on_round_end(self, round_index, state, metrics, record):
    self.calls.append((self.name, 'round', round_index, dict(record)))
    return {self.name: metrics}

  def on_run_end(self, state):
    self.calls.append((self.name, 'end', int(state.round)))


def _state(done):
  return types.ServerState(trainable=jnp.zeros(()), opt_state=(), aggregator_state=(),
                            round=jnp.asarray(done), rng=None)


def test_rounds_continue_after_the_state_and_records_pass_from_callback_to_callback():
  calls, seen = [], []

  def round_fn(state):
    seen.append(int(state.round))
    return state._replace(round=state.round + 1), f'm{int(state.round) + 1}'

  final = loop.run(round_fn, _state(2), 4, [Recorder('a', calls), Recorder('b', calls)])
  assert int(final.round) == 4 and seen == [2, 3]
  assert calls == [
      ('a', 'start', 2), ('b', 'start', 2),
      ('a', 'round', 3, {'round': 3}), ('b', 'round', 3, {'round': 3, 'a': 'm3'}),
      ('a', 'round', 4, {'round': 4}), ('b', 'round', 4, {'round': 4, 'a': 'm4'}),
      ('a', 'end', 4), ('b', 'end', 4)]


def test_a_finished_state_runs_no_round():
  calls = []
  loop.run(lambda s: (_ for _ in ()).throw(AssertionError('no round')), _state(5), 5,
           [Recorder('a', calls)])
  assert calls == [('a', 'start', 5), ('a', 'end', 5)]


class Zeroed(loop.Callback):
  """Logs round 0 and round 1; adds `adds` to round 0 (a filter: the record it makes)."""

  def __init__(self, name, phase, calls, adds=None):
    self.name, self.phase, self.calls, self.adds = name, phase, calls, adds

  def on_round_zero(self, state, record):
    self.calls.append((self.name, 'zero', int(state.round), dict(record)))
    return self.adds(record) if callable(self.adds) else self.adds

  def on_round_end(self, round_index, state, metrics, record):
    self.calls.append((self.name, 'round', round_index))


def test_a_fresh_run_makes_round_zero_by_phase_before_round_one_a_resumed_one_does_not():
  calls = []
  hide = lambda record: {**record, 'x': 'hidden'}
  given = [Zeroed('writer', 'write', calls), Zeroed('filter', 'filter', calls, hide),
           Zeroed('compute', 'compute', calls, {'x': 1}), Phased('plain', 'compute', calls)]
  loop.run(_counting_round, _state(0), 1, given)
  assert [c for c in calls if c[0] != 'plain'] == [
      ('compute', 'zero', 0, {'round': 0}), ('filter', 'zero', 0, {'round': 0, 'x': 1}),
      ('writer', 'zero', 0, {'round': 0, 'x': 'hidden'}),
      ('compute', 'round', 1), ('filter', 'round', 1), ('writer', 'round', 1)]
  # A callback without on_round_zero sees only the rounds.
  assert [c[:2] for c in calls if c[0] == 'plain'] == [('plain', 'start'), ('plain', 1),
                                                       ('plain', 'end')]
  assert loop.round_zero(loop.in_phase_order(given), _state(0)) == {'round': 0, 'x': 'hidden'}
  calls.clear()
  loop.run(_counting_round, _state(1), 2, given)
  assert [c[1] for c in calls if c[0] != 'plain'] == ['round'] * 3


def test_round_zero_cannot_stop_the_run_or_add_a_key_twice():
  with pytest.raises(TypeError, match=r'Zeroed\.on_round_zero returned Stop: return a dict or '
                     r'None'):
    loop.run(_counting_round, _state(0), 1, [Zeroed('z', 'compute', [], loop.Stop('no'))])
  with pytest.raises(ValueError, match=r"Zeroed adds \['round'\], already in the record"):
    loop.run(_counting_round, _state(0), 1, [Zeroed('z', 'compute', [], {'round': 1})])


class Phased(loop.Callback):
  """Logs its hooks; returns `adds` (a dict, a Stop, a record maker) from on_round_end."""

  def __init__(self, name, phase, calls, adds=None):
    self.name, self.phase, self.calls, self.adds = name, phase, calls, adds

  def on_run_start(self, state):
    self.calls.append((self.name, 'start'))

  def on_round_end(self, round_index, state, metrics, record):
    self.calls.append((self.name, round_index, dict(record)))
    return self.adds(record) if callable(self.adds) else self.adds

  def on_run_end(self, state):
    self.calls.append((self.name, 'end', int(state.round)))


def _counting_round(state):
  return state._replace(round=state.round + 1), None


def test_callbacks_run_in_phase_order_whatever_the_list_order_stable_within_a_phase():
  calls = []
  given = [Phased('persist', 'persist', calls), Phased('write1', 'write', calls),
           Phased('filter', 'filter', calls), Phased('write2', 'write', calls),
           Phased('compute1', 'compute', calls, {'x': 1}),
           Phased('compute2', 'compute', calls, {'y': 2})]
  loop.run(_counting_round, _state(0), 1, given)
  order = ['compute1', 'compute2', 'filter', 'write1', 'write2', 'persist']
  assert [c[0] for c in calls if c[1] == 'start'] == order
  assert [c[0] for c in calls if c[1] == 1] == order
  assert [c[0] for c in calls if c[1] == 'end'] == order
  # What compute callbacks return lands in the record, in their order, after 'round'.
  seen = {c[0]: c[2] for c in calls if c[1] == 1}
  assert seen['compute2'] == {'round': 1, 'x': 1}
  assert list(seen['write1'].items()) == [('round', 1), ('x', 1), ('y', 2)]
  with pytest.raises(ValueError, match=r"Phased\.phase='late': must be one of compute, "):
    loop.run(_counting_round, _state(0), 1, [Phased('late', 'late', calls)])


def test_a_filter_replaces_the_record_and_writers_see_the_replacement():
  calls = []
  move = lambda record: {'round': record['round'], 'aside': {'secret': record['secret']}}
  loop.run(_counting_round, _state(0), 2, [
      Phased('writer', 'write', calls), Phased('filter', 'filter', calls, move),
      Phased('compute', 'compute', calls, {'secret': 7})])
  assert [c[2] for c in calls if c[0] == 'writer' and isinstance(c[1], int)] == [
      {'round': 1, 'aside': {'secret': 7}}, {'round': 2, 'aside': {'secret': 7}}]


@pytest.mark.parametrize('phase, adds, error, needle', [
    ('compute', {'round': 5}, ValueError, r"Phased adds \['round'\], already in the record"),
    ('write', {'z': 1}, TypeError, r"Phased \(write phase\) returned \['z'\]: only compute"),
    ('persist', {'z': 1}, TypeError, r'Phased \(persist phase\) returned'),
    ('filter', {'z': 1}, ValueError, r"Phased \(a filter\) returned a record without 'round'"),
    ('compute', [('z', 1)], TypeError, r'Phased\.on_round_end returned list: return a dict'),
])
def test_what_a_callback_may_not_return_fails_naming_it(phase, adds, error, needle):
  with pytest.raises(error, match=needle):
    loop.run(_counting_round, _state(0), 1, [Phased('p', phase, [], adds)])


def test_a_callback_cannot_change_the_record_in_place():
  class Mutating(loop.Callback):
    def on_round_end(self, round_index, state, metrics, record):
      record['x'] = 1

  with pytest.raises(TypeError):
    loop.run(_counting_round, _state(0), 1, [Mutating()])


def test_a_stop_ends_the_run_after_the_rounds_persist_phase(capsys):
  """Decided: a returned Stop lets its round finish (written, persisted), then every
  on_run_end runs and no further round starts; its values land in the record too."""
  calls = []
  stop_at_2 = lambda record: (loop.Stop('loss is flat', {'stopped': True})
                              if record['round'] == 2 else None)
  final = loop.run(_counting_round, _state(0), 5, [
      Phased('persist', 'persist', calls), Phased('writer', 'write', calls),
      Phased('stopper', 'compute', calls, stop_at_2)])
  assert int(final.round) == 2
  assert [c[:2] for c in calls] == [
      ('stopper', 'start'), ('writer', 'start'), ('persist', 'start'),
      ('stopper', 1), ('writer', 1), ('persist', 1),
      ('stopper', 2), ('writer', 2), ('persist', 2),
      ('stopper', 'end'), ('writer', 'end'), ('persist', 'end')]
  assert calls[7][2] == {'round': 2, 'stopped': True}
  assert calls[-1] == ('persist', 'end', 2)
  assert 'round 2: loss is flat; the run stops here' in capsys.readouterr().out


def test_an_exception_ends_the_run_at_once_without_writing_the_round():
  calls = []

  def fail(record):
    raise RuntimeError('bad round')

  with pytest.raises(RuntimeError, match='bad round'):
    loop.run(_counting_round, _state(0), 3, [Phased('writer', 'write', calls),
                                              Phased('failing', 'compute', calls, fail)])
  assert [c[:2] for c in calls] == [('failing', 'start'), ('writer', 'start'), ('failing', 1)]


class Counter(loop.Stateful):
  name = 'counter'

  def __init__(self):
    self.count = 0

  def on_round_end(self, round_index, state, metrics, record):
    self.count += 1
    return {'count': self.count}

  def state_dict(self):
    return {'count': self.count}

  def load_state_dict(self, saved):
    self.count = saved['count']


def test_restore_loads_saved_values_and_a_callback_the_checkpoint_predates_starts_fresh(caplog):
  saved, missing = Counter(), Counter()
  missing.name = 'newer'
  loop.restore([saved, missing, Phased('plain', 'write', [])],
               {'counter': {'count': 4}, 'config': {}}, '/w/checkpoints')
  assert saved.count == 4 and missing.count == 0
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert warnings == ["the checkpoint in /w/checkpoints holds no values of callback 'newer' "
                      '(it predates that callback): it starts fresh']
