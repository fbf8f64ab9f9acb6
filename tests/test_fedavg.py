"""Both round schedules against a plain per-client loop, the packed lanes, the client."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedpeft_jax import errors
from fedpeft_jax.federated import aggregators
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import chunking, sampling, schedules, types
from fedpeft_jax.federated import server_optimizers
from fedpeft_jax.federated.algorithms import Algorithm, fedprox
from tests.conftest import LINEAR_CLASSES, LINEAR_DIM, fedavg_round, linear_loss_fn, linear_problem

def _poisoned_loss(trainable, frozen, batch, rng):
  """The linear loss, NaN on the examples marked as poison."""
  return jnp.where(batch['poison'] > 0, jnp.nan, linear_loss_fn(trainable, frozen, batch, rng))


@functools.lru_cache(maxsize=None)
def _unpadded_update(loss_fn, sample_dp, size, prox_mu):
  return jax.jit(client_lib.make_client_update(
      loss_fn, client_lib.sgd(0.1, 0.9, 1e-4), num_epochs=2, batch_size=4, max_examples=size,
      sample_dp=sample_dp, gradient=fedprox.with_proximal_term(Algorithm(), prox_mu).gradient))


def _per_client_loop(trainable, frozen, dataset, parts, clients, reported, keys, aggregator,
                     aggregator_state, loss_fn, sample_dp, prox_mu):
  """The reference round: each reporting client trained alone on its own (unpadded)
  examples, one after another, its update dropped if not finite; then aggregated."""
  contributions, nonfinite = [], 0
  for c in clients[reported]:
    size = len(parts[c])
    if not size:  # A client without examples has no update to report.
      continue
    ids = jnp.asarray(parts[c], jnp.int32)
    out = _unpadded_update(loss_fn, sample_dp, len(ids), prox_mu)(
        trainable, frozen, dataset, ids, size, jax.random.fold_in(keys.clients, c))
    if not all(np.isfinite(x).all() for x in jax.tree.leaves((out.delta, out.loss_sum))):
      nonfinite += 1
      continue
    contributions.append(aggregator.contribute(out.delta, jnp.int32(size), aggregator_state))
  zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
      aggregator.contribute, trainable, jnp.int32(0), aggregator_state))
  total = functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), contributions, zero)
  aggregate = aggregator.finalize(total, len(contributions), aggregator_state, keys.aggregation)
  if aggregate.released:  # The server's sgd(1.0) adds the mean delta.
    trainable = jax.tree.map(jnp.add, trainable, aggregate.mean_delta)
  return trainable, aggregate.state, len(contributions), nonfinite


EQUIVALENCE_CASES = {
    'uneven': dict(),
    'dropout_and_nan': dict(dropout_prob=0.3, loss_fn=_poisoned_loss),
    'client_dp': dict(aggregator=aggregators.dp_fedavg(
        clip_norm=0.05, noise_multiplier=0.5, expected_clients=6)),
    'sample_dp': dict(sample_dp=client_lib.SampleDP(clip_norm=0.5, noise_multiplier=0.5),
                      loss_fn=_poisoned_loss),
    'fedprox': dict(prox_mu=0.5),
}


@pytest.mark.parametrize('case', EQUIVALENCE_CASES)
def test_both_schedules_equal_a_per_client_loop(case):
  """Uneven clients (one without examples), 6 a round through 3 lanes: the padded round
  runs two chunks, the packed one hands free lanes new clients and, once the queue is
  empty, steps only the lanes still training."""
  options = dict(EQUIVALENCE_CASES[case])
  loss_fn = options.pop('loss_fn', linear_loss_fn)
  aggregator = options.setdefault('aggregator', aggregators.weighted_mean())
  dataset, parts, trainable, frozen = linear_problem(sizes=(5, 17, 9, 30, 12, 3, 0, 21))
  dataset['poison'] = jnp.zeros(len(dataset['y'])).at[parts[3][:2]].set(1.0)
  table = types.ClientTable.from_partition(parts)
  rng = jax.random.key(42)
  expected, aggregator_state = trainable, aggregator.init()
  rounds, dropped, nonfinite_seen = {}, 0, 0
  for schedule in schedules.SCHEDULES:
    algorithm = fedavg_round(
        loss_fn, client_lib.sgd(0.1, 0.9, 1e-4), num_epochs=2, batch_size=4,
        max_examples=table.max_examples, clients_per_round=6, num_clients=len(parts),
        client_chunk=3, schedule=schedule, **options)
    rounds[schedule] = (jax.jit(algorithm.apply), algorithm.init(trainable, rng))
  for round_index in range(2):
    keys = types.round_keys(rng, round_index)
    clients = np.asarray(sampling.sample_clients(keys.sampling, len(parts), 6))
    metrics = {}
    for schedule, (apply, state) in rounds.items():
      state, metrics[schedule] = apply(state, frozen, dataset, table)
      rounds[schedule] = apply, state
      np.testing.assert_array_equal(metrics[schedule].clients, clients)
    reported = np.asarray(metrics['padded'].reported)
    np.testing.assert_array_equal(metrics['packed'].reported, reported)
    expected, aggregator_state, num_used, nonfinite = _per_client_loop(
        expected, frozen, dataset, parts, clients, reported, keys, aggregator,
        aggregator_state, loss_fn, options.get('sample_dp'), options.get('prox_mu', 0.0))
    dropped += 6 - reported.sum()
    nonfinite_seen += nonfinite
    for schedule, (apply, state) in rounds.items():
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                   state.trainable, expected)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
                   state.aggregator_state, aggregator_state)
      assert int(metrics[schedule].num_reported) == num_used
      assert int(metrics[schedule].num_nonfinite) == nonfinite
  if case == 'dropout_and_nan':  # The seed gives both something to do.
    assert dropped > 0 and nonfinite_seen > 0
  for apply, _ in rounds.values():
    assert apply._cache_size() == 1  # One compilation served rounds of different cohorts.


def test_packed_lanes_narrow_to_the_clients_still_training():
  """A client of 4 steps and one of 1 step: the padded round computes 2 lanes x 4 steps,
  the packed one 2 lanes for one step, then 1 lane for three."""
  dataset, parts, trainable, frozen = linear_problem(sizes=(16, 4))
  table = types.ClientTable.from_partition(parts)
  computed = {}
  for schedule in schedules.SCHEDULES:
    algorithm = fedavg_round(linear_loss_fn, client_lib.sgd(0.1, 0.9, 0.0), num_epochs=1,
                              batch_size=4, max_examples=16, clients_per_round=2,
                              num_clients=2, schedule=schedule)
    _, metrics = jax.jit(algorithm.apply)(algorithm.init(trainable, jax.random.key(0)),
                                          frozen, dataset, table)
    assert int(metrics.examples_trained) == 20
    computed[schedule] = int(metrics.examples_computed)
  assert computed == {'padded': 2 * 4 * 4, 'packed': (2 + 1 + 1 + 1) * 4}


def test_padding_steps_are_no_ops():
  dataset, parts, trainable, frozen = linear_problem()
  ids = jnp.asarray(parts[1], jnp.int32)  # 17 examples.
  optimizer = client_lib.sgd(0.1, 0.9, 1e-3)
  make = lambda m: jax.jit(client_lib.make_client_update(
      linear_loss_fn, optimizer, num_epochs=3, batch_size=4, max_examples=m))
  padded_ids = jnp.concatenate([ids, jnp.zeros(23, jnp.int32)])
  rng = jax.random.key(3)
  plain = make(17)(trainable, frozen, dataset, ids, 17, rng)
  padded = make(40)(trainable, frozen, dataset, padded_ids, 17, rng)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), plain.delta,
               padded.delta)
  assert int(padded.examples_seen) == 3 * 17
  assert float(jnp.abs(plain.delta['w']).sum()) > 0


def test_each_epoch_visits_every_example_once():
  positions, valid = jax.vmap(
      lambda step: client_lib.epoch_batch(jax.random.key(0), 10, 16, 4, step))(jnp.arange(4))
  assert positions.shape == (4, 4)
  seen = np.asarray(positions)[np.asarray(valid)]
  assert sorted(seen.tolist()) == list(range(10))


def test_sampling_is_deterministic_per_round_and_varies_across_rounds():
  rng = jax.random.key(0)
  draw = lambda r: np.asarray(sampling.sample_clients(types.round_keys(rng, r).sampling, 64, 8))
  np.testing.assert_array_equal(draw(3), draw(3))
  assert not np.array_equal(draw(3), draw(4))
  assert len(set(draw(5).tolist())) == 8


def test_chunk_for_memory_picks_the_largest_fitting_divisor():
  assert chunking.chunk_for_memory(64, 10, 1000) == 64
  assert chunking.chunk_for_memory(64, 10, 250) == 16  # 25 fit; 16 is the largest divisor.
  assert chunking.chunk_for_memory(64, 10, 250, multiple=8) == 16
  assert chunking.chunk_for_memory(24, 10, 200, multiple=8) == 8
  with pytest.raises(ValueError, match='GiB'):
    chunking.chunk_for_memory(8, 10, 5)


@pytest.mark.parametrize('schedule', schedules.SCHEDULES)
def test_the_frozen_tree_is_never_copied_per_client(schedule):
  """No value in the compiled round has a client axis next to a frozen leaf's shape."""
  dataset, parts, trainable, _ = linear_problem()
  frozen = {'proj': jnp.ones((LINEAR_DIM, 53))}  # A shape that appears nowhere else.
  trainable = {'w': jnp.zeros((53, LINEAR_CLASSES)), 'b': jnp.zeros(LINEAR_CLASSES)}

  def loss_fn(trainable, frozen, batch, rng):
    logits = (batch['x'] @ frozen['proj']) @ trainable['w'] + trainable['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])

  table = types.ClientTable.from_partition(parts)
  algorithm = fedavg_round(loss_fn, client_lib.sgd(0.1, 0.9, 1e-4), num_epochs=1,
                            batch_size=4, max_examples=table.max_examples,
                            clients_per_round=4, num_clients=len(parts), schedule=schedule)
  state = algorithm.init(trainable, jax.random.key(0))
  hlo = jax.jit(algorithm.apply).lower(state, frozen, dataset, table).compile().as_text()
  assert f'f32[{LINEAR_DIM},53]' in hlo  # The frozen leaf itself is there...
  # ...never with a client axis (the packed schedule's lanes are [devices, lanes])...
  assert not re.search(rf'f32\[(\d+,)+{LINEAR_DIM},53\]|f32\[{LINEAR_DIM},53(,\d+)+\]', hlo)
  assert re.search(r'f32\[(1,)?4,53,3\]', hlo)  # ...while the trainable tree is, per client.

def _algorithm(loss_fn=linear_loss_fn, **kw):
  dataset, parts, trainable, frozen = linear_problem()
  table = types.ClientTable.from_partition(parts)
  algorithm = fedavg_round(loss_fn, client_lib.sgd(0.1, 0.9, 0.0), num_epochs=1,
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
  keys = types.round_keys(jax.random.key(1), 0)
  update = jax.jit(client_lib.make_client_update(
      linear_loss_fn, client_lib.sgd(0.1, 0.9, 0.0), num_epochs=1, batch_size=4,
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
    loss = linear_loss_fn(trainable, frozen, batch, rng)
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


def test_a_round_where_nobody_reports_keeps_the_model():
  algorithm, apply, args, trainable = _algorithm(dropout_prob=0.999)
  state, m = apply(algorithm.init(trainable, jax.random.key(0)), *args)
  assert int(m.num_sampled) == 4 and int(m.num_reported) == 0
  jax.tree.map(np.testing.assert_array_equal, state.trainable, trainable)
  assert int(state.round) == 1



def test_an_unknown_schedule_is_a_user_error():
  with pytest.raises(errors.UserError, match=r"schedule='fast': use one of \('packed'"):
    fedavg_round(linear_loss_fn, optax.sgd(0.1), num_epochs=1, batch_size=4, max_examples=8,
                  clients_per_round=2, num_clients=2, schedule='fast')


def _reference_deltas(trainable, frozen, dataset, parts, keys, clients, **options):
  """Each client trained alone on exactly its own examples (no padding, no table)."""
  deltas = {}
  for c in clients:
    ids = jnp.asarray(parts[c], jnp.int32)
    update = jax.jit(client_lib.make_client_update(
        linear_loss_fn, client_lib.sgd(0.1, 0.9, 1e-4), max_examples=len(ids), **options))
    deltas[c] = update(trainable, frozen, dataset, ids, len(ids),
                       jax.random.fold_in(keys.clients, c)).delta
  return deltas


@pytest.mark.parametrize('schedule', schedules.SCHEDULES)
def test_padding_never_reads_another_clients_example(schedule):
  """A NaN in each dataset row in turn: only that row's owner sends a non-finite update;
  every other client's update is what it computes alone on its own examples, so the
  round's model is the numpy mean of those. (Padding that read dataset row 0 made every
  client whose last batch is not full NaN when row 0 was.)"""
  sizes = (5, 7, 3, 0, 6)  # Batch 4: every non-empty client's last batch is padded.
  dataset, parts, trainable, frozen = linear_problem(sizes=sizes)
  table = types.ClientTable.from_partition(parts)
  options = dict(num_epochs=2, batch_size=4)
  # All 5 clients a round through 2 lanes: padded chunks end in a lane without a client,
  # and packed lanes run dry while others still train.
  algorithm = fedavg_round(linear_loss_fn, client_lib.sgd(0.1, 0.9, 1e-4),
                            max_examples=table.max_examples, clients_per_round=5,
                            num_clients=5, client_chunk=2, schedule=schedule, **options)
  apply = jax.jit(algorithm.apply)
  state = algorithm.init(trainable, jax.random.key(7))
  keys = types.round_keys(jax.random.key(7), 0)
  owner = np.repeat(np.arange(len(sizes)), sizes)
  deltas = _reference_deltas(trainable, frozen, dataset, parts, keys,
                             [c for c in range(5) if sizes[c]], **options)
  for row in range(len(owner)):
    poisoned = dict(dataset, x=dataset['x'].at[row].set(jnp.nan))
    new, m = apply(state, frozen, poisoned, table)
    assert int(m.num_nonfinite) == 1, f'row {row}: {int(m.num_nonfinite)} clients NaN'
    others = [c for c in deltas if c != owner[row]]
    assert int(m.num_reported) == len(others)
    weights = np.asarray([sizes[c] for c in others], np.float64)
    expected = jax.tree.map(
        lambda w, *ds: np.asarray(w, np.float64) + sum(
            p * np.asarray(d, np.float64) for p, d in zip(weights / weights.sum(), ds)),
        trainable, *[deltas[c] for c in others])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new.trainable, expected)
  assert apply._cache_size() == 1


def test_a_masked_row_is_zeros_and_never_reaches_the_gradient():
  """Padding ids gather zeros; with a NaN-on-read loss, a client's own rows still train."""
  dataset = {'x': jnp.arange(12.0).reshape(6, 2), 'y': jnp.arange(6)}
  ids = jnp.asarray([4, 5, client_lib.PADDING_ID, client_lib.PADDING_ID])
  batch = client_lib.gather_batch(dataset, ids)
  np.testing.assert_array_equal(batch['x'], [[8, 9], [10, 11], [0, 0], [0, 0]])
  np.testing.assert_array_equal(batch['y'], [4, 5, 0, 0])


SERVER_OPTIMIZER_NAMES = server_optimizers.SERVER_OPTIMIZERS


@pytest.mark.parametrize('schedule', schedules.SCHEDULES)
@pytest.mark.parametrize('by_examples', [True, False], ids=['weighted', 'uniform'])
def test_a_round_of_only_empty_clients_changes_nothing(schedule, by_examples):
  """1 client a round of 2 with examples and 2 without (min_client_size=0): a round whose
  client holds no example keeps the model, the server optimizer's and the aggregator's
  state bit for bit, under every server optimizer (FedAvgM's momentum and FedAdam's
  moments would otherwise keep stepping), counts nobody as reported and has no loss."""
  dataset, parts, trainable, frozen = linear_problem(sizes=(0, 7, 0, 5))
  table = types.ClientTable.from_partition(parts)
  for name in SERVER_OPTIMIZER_NAMES:
    algorithm = fedavg_round(
        linear_loss_fn, client_lib.sgd(0.1, 0.9, 1e-4), num_epochs=1, batch_size=4,
        max_examples=table.max_examples, clients_per_round=1, num_clients=4,
        aggregator=aggregators.weighted_mean(by_examples),
        server_optimizer=server_optimizers.server_optimizer(name, 0.5), schedule=schedule)
    apply = jax.jit(algorithm.apply)
    state = algorithm.init(trainable, jax.random.key(3))
    kinds = set()
    for _ in range(10):
      before = state
      state, m = apply(state, frozen, dataset, table)
      empty = len(parts[int(m.clients[0])]) == 0
      kinds.add(empty)
      if empty:
        for field in ('trainable', 'opt_state', 'aggregator_state'):
          jax.tree.map(np.testing.assert_array_equal, getattr(state, field),
                       getattr(before, field))
        assert int(m.num_reported) == 0 and np.isnan(float(m.train_loss))
      else:
        assert int(m.num_reported) == 1 and np.isfinite(float(m.train_loss))
        assert not np.array_equal(state.trainable['w'], before.trainable['w'])
    assert kinds == {True, False}, name  # The seed gives both kinds of round.


def test_a_client_without_examples_does_not_dilute_a_uniform_mean():
  """Uniform weighting: the mean over a cohort of one client with examples and one
  without is the first client's update alone, not half of it."""
  dataset, parts, trainable, frozen = linear_problem(sizes=(6, 0))
  table = types.ClientTable.from_partition(parts)
  algorithm = fedavg_round(
      linear_loss_fn, client_lib.sgd(0.1, 0.9, 1e-4), num_epochs=1, batch_size=4,
      max_examples=table.max_examples, clients_per_round=2, num_clients=2,
      aggregator=aggregators.weighted_mean(by_examples=False))
  state, m = jax.jit(algorithm.apply)(algorithm.init(trainable, jax.random.key(0)), frozen,
                                      dataset, table)
  keys = types.round_keys(jax.random.key(0), 0)
  delta = _reference_deltas(trainable, frozen, dataset, parts, keys, [0], num_epochs=1,
                            batch_size=4)[0]
  assert int(m.num_reported) == 1
  jax.tree.map(lambda a, w, d: np.testing.assert_allclose(a, np.asarray(w) + np.asarray(d),
                                                          rtol=1e-5, atol=1e-6),
               state.trainable, trainable, delta)


@pytest.mark.parametrize('schedule', schedules.SCHEDULES)
def test_under_client_dp_a_client_without_examples_is_not_counted(schedule):
  """DP-FedAvg still releases every round, but a client without examples adds nothing:
  not to the count of reporters, nor to the adaptive clip's count of unclipped updates."""
  dataset, parts, trainable, frozen = linear_problem(sizes=(6, 0))
  table = types.ClientTable.from_partition(parts)
  algorithm = fedavg_round(
      linear_loss_fn, client_lib.sgd(0.1, 0.9, 1e-4), num_epochs=1, batch_size=4,
      max_examples=table.max_examples, clients_per_round=2, num_clients=2, schedule=schedule,
      aggregator=aggregators.dp_fedavg(clip_norm=1e3, noise_multiplier=0.0,
                                       expected_clients=2, adaptive=True))
  state, m = jax.jit(algorithm.apply)(algorithm.init(trainable, jax.random.key(0)), frozen,
                                      dataset, table)
  assert int(m.num_reported) == 1
  assert float(m.aggregator['clipped_fraction']) == 0.0
  keys = types.round_keys(jax.random.key(0), 0)
  delta = _reference_deltas(trainable, frozen, dataset, parts, keys, [0], num_epochs=1,
                            batch_size=4)[0]
  # The noised sum over the public expected count of 2: one update, halved.
  jax.tree.map(lambda a, w, d: np.testing.assert_allclose(
      a, np.asarray(w) + np.asarray(d) / 2, rtol=1e-5, atol=1e-6),
               state.trainable, trainable, delta)
  # The clip norm moved by one unclipped update of one counted (Andrew et al. 2021).
  np.testing.assert_allclose(float(state.aggregator_state.clip_norm),
                             1e3 * np.exp(-0.2 * ((1 - 1 / 2) / 2 + 0.5 - 0.5)), rtol=1e-6)
