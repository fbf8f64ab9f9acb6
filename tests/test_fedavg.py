"""The vmapped round against a plain per-client loop, and the client's padding."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import fedavg
from tests.conftest import LINEAR_CLASSES, LINEAR_DIM, linear_loss_fn, linear_problem

def test_vmapped_round_equals_a_per_client_loop():
  dataset, parts, trainable, frozen = linear_problem()
  table = fedavg.ClientTable.from_partition(parts)
  optimizer = client_lib.sgd(0.1, 0.9, 1e-4)
  kw = dict(num_epochs=2, batch_size=4, max_examples=table.max_examples)
  algorithm = fedavg.fedavg(linear_loss_fn, optimizer, clients_per_round=4, num_clients=len(parts),
                            client_chunk=2, **kw)
  rng = jax.random.key(42)
  state = algorithm.init(trainable, rng)
  apply = jax.jit(algorithm.apply)
  client_update = jax.jit(client_lib.make_client_update(linear_loss_fn, optimizer, **kw))

  expected = trainable
  for _ in range(2):
    state, metrics = apply(state, frozen, dataset, table)
    keys = fedavg.round_keys(rng, state.round - 1)
    clients = np.asarray(fedavg.sample_clients(keys.sampling, len(parts), 4))
    np.testing.assert_array_equal(clients, metrics.clients)
    assert len(set(clients.tolist())) == 4
    deltas, weights = [], []
    for c in clients:  # The reference: one client at a time, unpadded.
      ids = jnp.asarray(parts[c], jnp.int32)
      plain = jax.jit(client_lib.make_client_update(
          linear_loss_fn, optimizer, num_epochs=2, batch_size=4, max_examples=len(ids)))
      out = plain(expected, frozen, dataset, ids, len(ids),
                  jax.random.fold_in(keys.clients, c))
      deltas.append(out.delta)
      weights.append(len(ids))
    weights = np.asarray(weights, np.float64) / sum(weights)
    expected = jax.tree.map(
        lambda p, *d: p + sum(w * np.asarray(x) for w, x in zip(weights, d)), expected, *deltas)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state.trainable, expected)
  assert client_update._cache_size() == 0  # Only the vmapped path ran the padded update.
  assert apply._cache_size() == 1  # One compilation served every round.


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
  positions, valid = client_lib.epoch_batches(jax.random.key(0), 10, 16, 4)
  assert positions.shape == (4, 4)
  seen = np.asarray(positions)[np.asarray(valid)]
  assert sorted(seen.tolist()) == list(range(10))


def test_sampling_is_deterministic_per_round_and_varies_across_rounds():
  rng = jax.random.key(0)
  draw = lambda r: np.asarray(fedavg.sample_clients(fedavg.round_keys(rng, r).sampling, 64, 8))
  np.testing.assert_array_equal(draw(3), draw(3))
  assert not np.array_equal(draw(3), draw(4))
  assert len(set(draw(5).tolist())) == 8


def test_chunk_for_memory_picks_the_largest_fitting_divisor():
  assert fedavg.chunk_for_memory(64, 10, 1000) == 64
  assert fedavg.chunk_for_memory(64, 10, 250) == 16  # 25 fit; 16 is the largest divisor.
  assert fedavg.chunk_for_memory(64, 10, 250, multiple=8) == 16
  assert fedavg.chunk_for_memory(24, 10, 200, multiple=8) == 8
  import pytest
  with pytest.raises(ValueError, match='GiB'):
    fedavg.chunk_for_memory(8, 10, 5)


def test_the_frozen_tree_is_never_copied_per_client():
  """No value in the compiled round has a client axis in front of a frozen leaf's shape."""
  dataset, parts, trainable, _ = linear_problem()
  frozen = {'proj': jnp.ones((LINEAR_DIM, 53))}  # A shape that appears nowhere else.
  trainable = {'w': jnp.zeros((53, LINEAR_CLASSES)), 'b': jnp.zeros(LINEAR_CLASSES)}

  def loss_fn(trainable, frozen, batch, rng):
    logits = (batch['x'] @ frozen['proj']) @ trainable['w'] + trainable['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])

  table = fedavg.ClientTable.from_partition(parts)
  algorithm = fedavg.fedavg(loss_fn, client_lib.sgd(0.1, 0.9, 1e-4), num_epochs=1,
                            batch_size=4, max_examples=table.max_examples,
                            clients_per_round=4, num_clients=len(parts))
  state = algorithm.init(trainable, jax.random.key(0))
  hlo = jax.jit(algorithm.apply).lower(state, frozen, dataset, table).compile().as_text()
  assert f'f32[{LINEAR_DIM},53]' in hlo  # The frozen leaf itself is there...
  assert f'f32[4,{LINEAR_DIM},53]' not in hlo and f'f32[{LINEAR_DIM},53,4]' not in hlo  # ...never per client.
  assert 'f32[4,53,3]' in hlo  # While the trainable tree is, once per client.

def _algorithm(loss_fn=linear_loss_fn, **kw):
  dataset, parts, trainable, frozen = linear_problem()
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


_loss_fn, _setup = linear_loss_fn, linear_problem  # TEMP: test_privacy imports these
