"""One contract per registry of the federated round, passed by every registered entry
(optax's one-test-every-transform idea): a new algorithm, aggregator or server optimizer
is covered by being registered."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeft_jax.federated import aggregators
from fedpeft_jax.federated import algorithms
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import round as round_lib
from fedpeft_jax.federated import sampling
from fedpeft_jax.federated import schedules
from fedpeft_jax.federated import server_optimizers
from fedpeft_jax.federated import types
from tests.conftest import linear_loss_fn, linear_problem, tiny_config

SIZES = (5, 17, 0, 9, 30, 12, 3, 21)  # Uneven, one without examples.
LOCAL = client_lib.LocalSpec(num_epochs=2, batch_size=4, max_examples=max(SIZES))


def _algorithm(name):
  config = tiny_config()
  config.fl.prox_mu = 0.05 if name == 'fedprox' else 0.0
  spec = algorithms.ALGORITHMS.get(name)
  algorithm = spec.make(**spec.arguments(config))
  if config.fl.prox_mu:
    algorithm = algorithms.fedprox.with_proximal_term(algorithm, config.fl.prox_mu)
  return algorithm, client_lib.sgd(config.optim.lr, config.optim.momentum,
                                   config.optim.weight_decay, config.optim.nesterov)


def _per_client_loop(algorithm, optimizer, state, frozen, dataset, parts, reported_clients,
                     keys, aggregator):
  """The round written as a loop: each reporting client with examples trained alone on
  its own unpadded examples, the algorithm's hooks called on it one at a time."""
  shared = algorithm.round_input(state.algorithm_state)
  acc, contributions = algorithm.begin(state.algorithm_state), []
  for c in reported_clients:
    n = len(parts[c])
    if not n:
      continue
    update = jax.jit(client_lib.make_client_update(
        linear_loss_fn, optimizer, num_epochs=LOCAL.num_epochs, batch_size=LOCAL.batch_size,
        max_examples=n, gradient=algorithm.gradient))
    out = update(state.trainable, frozen, dataset, jnp.asarray(parts[c], jnp.int32), n,
                 jax.random.fold_in(keys.clients, c),
                 algorithm.client_input(state.algorithm_state, shared, c))
    steps = jnp.int32(LOCAL.num_epochs * -(-n // LOCAL.batch_size))
    contribution = aggregator.contribute(algorithm.client_delta(out.delta, steps),
                                         jnp.int32(n), state.aggregator_state)
    contributions.append(contribution)
    one = lambda x: jnp.asarray(x)[None]
    acc = algorithm.add_clients(acc, shared, algorithms.ClientsDone(
        one(c), jax.tree.map(one, out.delta), one(n), one(steps), one(contribution.weight),
        lambda x: x))
  total = jax.tree.map(lambda *xs: sum(xs), *contributions)
  aggregate = aggregator.finalize(total, len(contributions), state.aggregator_state,
                                  keys.aggregation)
  mean_delta, algorithm_state = algorithm.finish(acc, aggregate.mean_delta)
  trainable = jax.tree.map(jnp.add, state.trainable, mean_delta)  # Server sgd(1.0).
  return trainable, algorithm_state


@pytest.mark.parametrize('name', algorithms.ALGORITHMS.names())
def test_every_algorithm_equals_its_hooks_run_client_by_client(name):
  """Both schedules (3 lanes for 6 clients a round, dropout) against the loop, 2 rounds:
  the model and the algorithm's state."""
  algorithm, optimizer = _algorithm(name)
  dataset, parts, trainable, frozen = linear_problem(sizes=SIZES)
  table = types.ClientTable.from_partition(parts)
  aggregator = aggregators.weighted_mean()
  cohort = round_lib.Cohort(6, len(parts), dropout_prob=0.2)
  rng = jax.random.key(11)
  rounds = {}
  for schedule in schedules.SCHEDULES:
    fl_round = round_lib.make_round(
        linear_loss_fn, optimizer, LOCAL._replace(max_examples=table.max_examples), cohort,
        algorithm=algorithm, aggregator=aggregator,
        execution=round_lib.Execution(schedule, client_chunk=3))
    rounds[schedule] = jax.jit(fl_round.apply), fl_round.init(trainable, rng)
  expected = rounds['packed'][1]
  for round_index in range(2):
    keys = types.round_keys(rng, round_index)
    for schedule, (apply, state) in rounds.items():
      state, metrics = apply(state, frozen, dataset, table)
      rounds[schedule] = apply, state
    reported = np.asarray(metrics.clients)[np.asarray(metrics.reported)]
    np.testing.assert_array_equal(
        np.sort(np.asarray(metrics.clients)),
        np.sort(np.asarray(sampling.sample_clients(keys.sampling, len(parts), 6))))
    trainable_ref, algorithm_state = _per_client_loop(
        algorithm, optimizer, expected, frozen, dataset, parts, reported, keys, aggregator)
    expected = expected._replace(trainable=trainable_ref, algorithm_state=algorithm_state)
    for apply, state in rounds.values():
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
                   (state.trainable, state.algorithm_state),
                   (expected.trainable, expected.algorithm_state))
  assert not np.allclose(rounds['packed'][1].trainable['w'], trainable['w'])


def _aggregator(name):
  spec = aggregators.AGGREGATORS.get(name)
  config = tiny_config('bias,dp=client' if 'client' in spec.dp_modes else 'bias')

  class Privacy:
    noise_multiplier = 0.7

  return spec.make(**spec.arguments(config, Privacy))


@pytest.mark.parametrize('name', aggregators.AGGREGATORS.names())
def test_every_aggregator_jits_vmaps_and_handles_zero_and_no_reporters(name):
  aggregator = _aggregator(name)
  state = aggregator.init()
  deltas = {'w': jnp.arange(12.0).reshape(3, 4) / 10, 'b': jnp.ones((3, 2))}
  counts = jnp.asarray([3, 1, 5], jnp.int32)
  contributions = jax.jit(jax.vmap(aggregator.contribute, in_axes=(0, 0, None)))(
      deltas, counts, state)
  assert contributions.weight.shape == (3,) and contributions.weight.dtype == jnp.float32
  assert bool(jnp.all(contributions.weight > 0))
  total = jax.tree.map(lambda x: x.sum(0), contributions)
  finalize = jax.jit(aggregator.finalize)
  aggregate = finalize(total, jnp.int32(3), state, jax.random.key(0))
  assert bool(aggregate.released)
  assert jax.tree.structure(aggregate.mean_delta) == jax.tree.structure(
      jax.tree.map(lambda x: x[0], deltas))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(aggregate))
  # No reporters: the sums are zeros. Nothing NaN; released only if the aggregator must
  # release every round (DP), and then the same way whatever the count.
  zeros = jax.tree.map(jnp.zeros_like, total)
  empty = finalize(zeros, jnp.int32(0), state, jax.random.key(0))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(empty))
  spec = aggregators.AGGREGATORS.get(name)
  assert bool(empty.released) == ('client' in spec.dp_modes)
  if not bool(empty.released):
    jax.tree.map(np.testing.assert_array_equal, empty.state, state)


@pytest.mark.parametrize('name', server_optimizers.SERVER_OPTIMIZERS)
def test_every_server_optimizer_descends_along_the_mean_update_under_jit(name):
  """A positive mean update moves the model towards it, by the default learning rate's
  order of magnitude, and a zero one in the first round leaves it."""
  spec = server_optimizers.SERVER_OPTIMIZERS_REGISTRY.get(name)
  optimizer = server_optimizers.server_optimizer(name)
  params = {'w': jnp.zeros(3)}
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  updates, _ = update({'w': -jnp.ones(3)}, state, params)  # Gradient = -mean delta.
  assert bool(jnp.all(updates['w'] > 0))
  assert float(updates['w'][0]) <= 10 * spec.default_learning_rate
  still, _ = update({'w': jnp.zeros(3)}, state, params)
  np.testing.assert_array_equal(still['w'], np.zeros(3))
