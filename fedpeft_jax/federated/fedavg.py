"""Federated averaging over the trainable pytree, one jitted function a round.

Each round the server samples a cohort, drops the clients that fail to
report, runs the others' local updates vmapped over the client axis (the
frozen backbone and the dataset broadcast, not batched) and aggregates their
deltas (weighted mean, or DP-FedAvg); a server optimizer applies the result
(`optax.sgd(1.0)` is plain FedAvg). Clients run in chunks, vmap within a chunk
and a loop over as many chunks as there are reporting clients, so memory is
bounded by the chunk size and a cohort of any size reuses one compilation.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedpeft_jax import errors
from fedpeft_jax.federated import aggregators as aggregators_lib
from fedpeft_jax.federated import client as client_lib

PyTree = Any
SAMPLINGS = ('fixed', 'poisson')


class ServerState(NamedTuple):
  trainable: PyTree
  opt_state: PyTree
  aggregator_state: PyTree
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
  clients: jax.Array  # int32 [cohort capacity]: sampled ids first, then -1.
  reported: jax.Array  # bool [cohort capacity]: the sampled clients that reported.
  num_sampled: jax.Array
  num_reported: jax.Array  # Reported with a finite update: what was aggregated.
  num_nonfinite: jax.Array  # Reported NaN or Inf and were left out.
  train_loss: jax.Array  # Mean per-example local training loss.
  aggregator: dict


class FederatedAlgorithm(NamedTuple):
  init: Callable[[PyTree, jax.Array], ServerState]
  apply: Callable[[ServerState, PyTree, PyTree, ClientTable], tuple[ServerState, RoundMetrics]]


class RoundKeys(NamedTuple):
  sampling: jax.Array
  dropout: jax.Array
  clients: jax.Array  # Parent of every client's key: fold in the client id.
  aggregation: jax.Array


def round_keys(rng, round_index) -> RoundKeys:
  return RoundKeys(*jax.random.split(jax.random.fold_in(rng, round_index), 4))


def sample_clients(rng, num_clients: int, clients_per_round: int):
  """Uniform sampling without replacement."""
  return jax.random.choice(rng, num_clients, (clients_per_round,), replace=False)


def sample_cohort(rng, sampling: str, num_clients: int, clients_per_round: int):
  """Returns (client ids, sampled mask) of a fixed capacity.

  'fixed': exactly `clients_per_round` without replacement. 'poisson': every
  client independently with rate clients_per_round / num_clients; the capacity
  is all clients, the sampled ones first.
  """
  if sampling == 'fixed':
    return (sample_clients(rng, num_clients, clients_per_round),
            jnp.ones(clients_per_round, bool))
  sampled = jax.random.bernoulli(rng, clients_per_round / num_clients, (num_clients,))
  order = jnp.argsort(~sampled, stable=True)
  return order.astype(jnp.int32), sampled[order]


def chunk_for_memory(clients_per_round: int, per_client_bytes: int, available_bytes: int,
                     multiple: int = 1) -> int:
  """The largest chunk of clients (a divisor of `clients_per_round` and a multiple of
  `multiple`, the device count) whose working memory fits in `available_bytes`."""
  fitting = [c for c in range(multiple, clients_per_round + 1, multiple)
             if clients_per_round % c == 0 and c * per_client_bytes <= available_bytes]
  if not fitting:
    raise errors.UserError(
        f'one chunk of {multiple} client(s) needs {multiple * per_client_bytes / 2**30:.1f} '
        f'GiB but {available_bytes / 2**30:.1f} GiB are free: lower fl.batch_size or use '
        'a PEFT method')
  return max(fitting)


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def fedavg(loss_fn: client_lib.LossFn, client_optimizer: optax.GradientTransformation, *,
           num_epochs: int, batch_size: int, max_examples: int, clients_per_round: int,
           num_clients: int, client_chunk: int | None = None, sampling: str = 'fixed',
           dropout_prob: float = 0.0,
           aggregator: aggregators_lib.Aggregator | None = None,
           server_optimizer: optax.GradientTransformation | None = None,
           sample_dp: client_lib.SampleDP | None = None,
           mesh: jax.sharding.Mesh | None = None) -> FederatedAlgorithm:
  """Builds FedAvg on `loss_fn(trainable, frozen, batch, rng) -> per-example losses`.

  With a `mesh` whose one axis is 'clients', each chunk's clients are spread
  over its devices; everything else (the frozen backbone, the dataset, the
  global trainable parameters) is replicated, and the sums over clients become
  all-reduces.
  """
  if sampling not in SAMPLINGS:
    raise errors.UserError(f'sampling={sampling!r}: allowed {SAMPLINGS}')
  chunk = client_chunk or clients_per_round
  if mesh is not None and chunk % mesh.size:
    raise errors.UserError(f'fl.client_chunk={chunk} (0 means fl.clients_per_round) must be a '
                     f'multiple of the {mesh.size} devices the clients are sharded over')
  by_client = (lambda x: x) if mesh is None else (
      lambda x: jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('clients'))))
  aggregator = aggregator or aggregators_lib.weighted_mean()
  server_optimizer = server_optimizer or optax.sgd(1.0)
  client_update = client_lib.make_client_update(
      loss_fn, client_optimizer, num_epochs=num_epochs, batch_size=batch_size,
      max_examples=max_examples, sample_dp=sample_dp)
  vmapped_update = jax.vmap(client_update, in_axes=(None, None, None, 0, 0, 0))
  contribute = jax.vmap(aggregator.contribute, in_axes=(0, 0, None))

  def init(trainable, rng):
    return ServerState(trainable, server_optimizer.init(trainable), aggregator.init(),
                       jnp.zeros((), jnp.int32), rng)

  def apply(state: ServerState, frozen, dataset, table: ClientTable):
    keys = round_keys(state.rng, state.round)
    clients, sampled = sample_cohort(keys.sampling, sampling, num_clients, clients_per_round)
    dropped = jax.random.bernoulli(keys.dropout, dropout_prob, sampled.shape)
    reported = sampled & ~dropped
    # Reporting clients first (only they are trained), largest first: a chunk runs as
    # long as its largest client, so chunks of similar sizes waste the least.
    order = jnp.lexsort((-table.num_examples[clients], ~reported))
    num_reporting = reported.sum()
    capacity = -(-clients.shape[0] // chunk) * chunk
    ids = jnp.pad(clients[order], (0, capacity - clients.shape[0]))

    def run_chunk(i, totals):
      sums, count, nonfinite, loss_sum, seen = totals
      chunk_ids = by_client(jax.lax.dynamic_slice(ids, (i * chunk,), (chunk,)))
      in_cohort = i * chunk + jnp.arange(chunk) < num_reporting
      counts = table.num_examples[chunk_ids]
      rngs = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(keys.clients, chunk_ids)
      out = vmapped_update(state.trainable, frozen, dataset, table.example_ids[chunk_ids],
                           counts, rngs)
      finite = jax.vmap(_all_finite)(out.delta) & jnp.isfinite(out.loss_sum)
      use = in_cohort & finite
      contribution = contribute(out.delta, counts, state.aggregator_state)
      # where, not multiply: a NaN times zero is still NaN.
      masked_sum = lambda x, total: total + jnp.sum(
          jnp.where(use.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0).astype(total.dtype), 0)
      sums = jax.tree.map(masked_sum, contribution, sums)
      return (sums, count + use.sum(), nonfinite + (in_cohort & ~finite).sum(),
              loss_sum + jnp.where(use, out.loss_sum, 0).sum(),
              seen + jnp.where(use, out.examples_seen, 0).sum())

    zero_contribution = jax.tree.map(
        lambda x: jnp.zeros(x.shape[1:], jnp.float32),
        jax.eval_shape(contribute, jax.tree.map(lambda x: x[None], state.trainable),
                       jnp.ones(1, jnp.int32), state.aggregator_state))
    zero = jnp.zeros((), jnp.int32)
    totals = (zero_contribution, zero, zero, jnp.zeros(()), zero)
    sums, count, nonfinite, loss_sum, seen = jax.lax.fori_loop(
        0, (num_reporting + chunk - 1) // chunk, run_chunk, totals)

    aggregate = aggregator.finalize(sums, count, state.aggregator_state, keys.aggregation)
    mean_delta = jax.tree.map(lambda d, p: d.astype(p.dtype), aggregate.mean_delta,
                              state.trainable)
    # The server optimizer descends along the negative average update.
    updates, opt_state = server_optimizer.update(
        jax.tree.map(jnp.negative, mean_delta), state.opt_state, state.trainable)
    # A round where no client reported leaves the model and optimizer as they were.
    keep_if_empty = lambda new, old: jnp.where(count > 0, new, old)
    trainable = jax.tree.map(keep_if_empty, optax.apply_updates(state.trainable, updates),
                             state.trainable)
    opt_state = jax.tree.map(keep_if_empty, opt_state, state.opt_state)
    metrics = RoundMetrics(
        clients=jnp.where(sampled, clients, -1), reported=reported,
        num_sampled=sampled.sum(), num_reported=count, num_nonfinite=nonfinite,
        train_loss=loss_sum / jnp.maximum(seen, 1), aggregator=aggregate.metrics)
    return ServerState(trainable, opt_state, aggregate.state, state.round + 1,
                       state.rng), metrics

  return FederatedAlgorithm(init, apply)
