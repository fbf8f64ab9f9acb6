"""The vmapped round against a plain per-client loop, and the client's padding."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import fedavg

DIM, CLASSES = 6, 3


def _loss_fn(trainable, frozen, batch, rng):
  # A linear model on frozen random features, with augmentation noise from rng.
  x = batch['x'] @ frozen['proj'] + 0.01 * jax.random.normal(rng, batch['x'].shape[:1] + (DIM,))
  logits = x @ trainable['w'] + trainable['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])


def _setup(sizes=(5, 17, 9, 30, 12, 3)):
  rng = np.random.default_rng(0)
  n = sum(sizes)
  dataset = {'x': jnp.asarray(rng.normal(size=(n, DIM)), jnp.float32),
             'y': jnp.asarray(rng.integers(0, CLASSES, n), jnp.int32)}
  bounds = np.cumsum((0,) + sizes)
  parts = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
  trainable = {'w': jnp.asarray(rng.normal(size=(DIM, CLASSES)), jnp.float32) * 0.1,
               'b': jnp.zeros(CLASSES)}
  frozen = {'proj': jnp.asarray(rng.normal(size=(DIM, DIM)), jnp.float32)}
  return dataset, parts, trainable, frozen


def test_vmapped_round_equals_a_per_client_loop():
  dataset, parts, trainable, frozen = _setup()
  table = fedavg.ClientTable.from_partition(parts)
  optimizer = client_lib.sgd(0.1, 0.9, 1e-4)
  kw = dict(num_epochs=2, batch_size=4, max_examples=table.max_examples)
  algorithm = fedavg.fedavg(_loss_fn, optimizer, clients_per_round=4, num_clients=len(parts),
                            client_chunk=2, **kw)
  rng = jax.random.key(42)
  state = algorithm.init(trainable, rng)
  apply = jax.jit(algorithm.apply)
  client_update = jax.jit(client_lib.make_client_update(_loss_fn, optimizer, **kw))

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
          _loss_fn, optimizer, num_epochs=2, batch_size=4, max_examples=len(ids)))
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
  dataset, parts, trainable, frozen = _setup()
  ids = jnp.asarray(parts[1], jnp.int32)  # 17 examples.
  optimizer = client_lib.sgd(0.1, 0.9, 1e-3)
  make = lambda m: jax.jit(client_lib.make_client_update(
      _loss_fn, optimizer, num_epochs=3, batch_size=4, max_examples=m))
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
  dataset, parts, trainable, _ = _setup()
  frozen = {'proj': jnp.ones((DIM, 53))}  # A shape that appears nowhere else.
  trainable = {'w': jnp.zeros((53, CLASSES)), 'b': jnp.zeros(CLASSES)}

  def loss_fn(trainable, frozen, batch, rng):
    logits = (batch['x'] @ frozen['proj']) @ trainable['w'] + trainable['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])

  table = fedavg.ClientTable.from_partition(parts)
  algorithm = fedavg.fedavg(loss_fn, client_lib.sgd(0.1, 0.9, 1e-4), num_epochs=1,
                            batch_size=4, max_examples=table.max_examples,
                            clients_per_round=4, num_clients=len(parts))
  state = algorithm.init(trainable, jax.random.key(0))
  hlo = jax.jit(algorithm.apply).lower(state, frozen, dataset, table).compile().as_text()
  assert f'f32[{DIM},53]' in hlo  # The frozen leaf itself is there...
  assert f'f32[4,{DIM},53]' not in hlo and f'f32[{DIM},53,4]' not in hlo  # ...never per client.
  assert 'f32[4,53,3]' in hlo  # While the trainable tree is, once per client.
