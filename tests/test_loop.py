"""The loop calls the round function and every callback's hooks, in order, nothing else."""
import jax.numpy as jnp

from fedpeft_jax.experiment import loop
from fedpeft_jax.federated import fedavg


class Recorder(loop.Callback):
  def __init__(self, name, calls):
    self.name, self.calls = name, calls

  def on_run_start(self, state):
    self.calls.append((self.name, 'start', int(state.round)))

  def on_round_end(self, round_index, state, metrics, record):
    self.calls.append((self.name, 'round', round_index, dict(record)))
    record[self.name] = metrics

  def on_run_end(self, state):
    self.calls.append((self.name, 'end', int(state.round)))


def _state(done):
  return fedavg.ServerState(trainable=jnp.zeros(()), opt_state=(), aggregator_state=(),
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
