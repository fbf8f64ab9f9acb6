"""Federated averaging over the trainable pytree, one jitted function a round.

The server samples clients, runs their local updates vmapped over the client
axis (the frozen backbone and the dataset broadcast, not batched), averages
their deltas weighted by example count and applies the average with a server
optimizer (`optax.sgd(1.0)` is plain FedAvg). Clients run in chunks: vmap
within a chunk, scan over chunks, so memory is bounded by the chunk size.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedpeft_jax.federated import client as client_lib

PyTree = Any


class ServerState(NamedTuple):
  trainable: PyTree
  opt_state: PyTree
  round: jax.Array  # Rounds completed so far.
  rng: jax.Array  # The run's key; every round's randomness is folded from it.


class ClientTable(NamedTuple):
  """Every client's example ids into the shared dataset, padded to one length."""
  example_ids: jax.Array  # int32 [num_clients, max_examples]
  num_examples: jax.Array  # int32 [num_clients]

  @classmethod
  def from_partition(cls, client_indices: list[np.ndarray]) -> 'ClientTable':
    max_examples = max(len(ids) for ids in client_indices)
    table = np.zeros((len(client_indices), max_examples), np.int32)
    for row, ids in zip(table, client_indices):
      row[:len(ids)] = ids
    return cls(jnp.asarray(table),
               jnp.asarray([len(ids) for ids in client_indices], jnp.int32))

  @property
  def num_clients(self) -> int:
    return self.example_ids.shape[0]

  @property
  def max_examples(self) -> int:
    return self.example_ids.shape[1]


class RoundMetrics(NamedTuple):
  clients: jax.Array  # int32 [clients_per_round], the sampled client ids.
  train_loss: jax.Array  # Mean per-example local training loss.


class FederatedAlgorithm(NamedTuple):
  init: Callable[[PyTree, jax.Array], ServerState]
  apply: Callable[[ServerState, PyTree, PyTree, ClientTable], tuple[ServerState, RoundMetrics]]


def sample_clients(rng, num_clients: int, clients_per_round: int):
  """Uniform sampling without replacement."""
  return jax.random.choice(rng, num_clients, (clients_per_round,), replace=False)


def round_keys(rng, round_index):
  """(sampling key, per-client parent key) of a round, folded from the run's key."""
  sampling, clients = jax.random.split(jax.random.fold_in(rng, round_index))
  return sampling, clients


def fedavg(loss_fn: client_lib.LossFn, client_optimizer: optax.GradientTransformation, *,
           num_epochs: int, batch_size: int, max_examples: int, clients_per_round: int,
           num_clients: int, client_chunk: int | None = None,
           server_optimizer: optax.GradientTransformation | None = None) -> FederatedAlgorithm:
  """Builds FedAvg on `loss_fn(trainable, frozen, batch, rng) -> per-example losses`."""
  chunk = client_chunk or clients_per_round
  if clients_per_round % chunk:
    raise ValueError(f'fl.client_chunk={chunk} must divide fl.clients_per_round='
                     f'{clients_per_round}')
  server_optimizer = server_optimizer or optax.sgd(1.0)
  client_update = client_lib.make_client_update(
      loss_fn, client_optimizer, num_epochs=num_epochs, batch_size=batch_size,
      max_examples=max_examples)
  vmapped_update = jax.vmap(client_update, in_axes=(None, None, None, 0, 0, 0))

  def init(trainable, rng):
    return ServerState(trainable, server_optimizer.init(trainable),
                       jnp.zeros((), jnp.int32), rng)

  def apply(state: ServerState, frozen, dataset, table: ClientTable):
    sampling_rng, clients_rng = round_keys(state.rng, state.round)
    clients = sample_clients(sampling_rng, num_clients, clients_per_round)
    rngs = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(clients_rng, clients)
    ids, counts = table.example_ids[clients], table.num_examples[clients]
    by_chunk = lambda x: x.reshape((-1, chunk) + x.shape[1:])

    def run_chunk(totals, chunk_inputs):
      out = vmapped_update(state.trainable, frozen, dataset, *chunk_inputs)
      weights = chunk_inputs[1].astype(jnp.float32)
      weighted = jax.tree.map(
          lambda d: jnp.tensordot(weights, d.astype(jnp.float32), axes=1), out.delta)
      delta_sum, weight_sum, loss_sum, seen = totals
      return (jax.tree.map(jnp.add, delta_sum, weighted), weight_sum + weights.sum(),
              loss_sum + out.loss_sum.sum(), seen + out.examples_seen.sum()), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state.trainable)
    init_totals = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros((), jnp.int32))
    (delta_sum, weight_sum, loss_sum, seen), _ = jax.lax.scan(
        run_chunk, init_totals, (by_chunk(ids), by_chunk(counts), by_chunk(rngs)))
    mean_delta = jax.tree.map(lambda d, p: (d / weight_sum).astype(p.dtype),
                              delta_sum, state.trainable)
    # The server optimizer descends along the negative average update.
    updates, opt_state = server_optimizer.update(
        jax.tree.map(jnp.negative, mean_delta), state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = RoundMetrics(clients, loss_sum / jnp.maximum(seen, 1))
    return ServerState(trainable, opt_state, state.round + 1, state.rng), metrics

  return FederatedAlgorithm(init, apply)
