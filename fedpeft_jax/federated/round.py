"""One federated round as one jitted function of the server state (`make_round`).

Each round the server samples a cohort, drops the clients that fail to report,
runs the others' local training vmapped over the client axis (the frozen backbone
and the dataset broadcast, not batched) with one of the two `schedules`, and
aggregates their updates (weighted mean, or DP-FedAvg); a server optimizer applies
the result (`optax.sgd(1.0)` is plain FedAvg). The federated algorithm's hooks
(`algorithms.Algorithm`) run at fixed points of the round. At most `chunk` clients
train at once, so memory is bounded by that and a cohort of any size reuses one
compilation.

With a `mesh` with a 'clients' axis, the clients training at once are spread over
that axis; everything else (the dataset, the global trainable parameters) is replicated
over it, and the sums over clients become all-reduces. A second 'model' axis is left to
the arguments' placement: the frozen backbone may come split over it (weights sharded,
clients replicated along it), and XLA adds the collectives that split needs.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedpeft_jax import errors
from fedpeft_jax.federated import aggregators as aggregators_lib
from fedpeft_jax.federated import chunking
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import sampling as sampling_lib
from fedpeft_jax.federated import schedules
from fedpeft_jax.federated import types
from fedpeft_jax.federated.algorithms import base as algorithms_base

PyTree = Any


class Cohort(NamedTuple):
  """Who takes part: `clients_per_round` of `num_clients` ('fixed' or, under client DP,
  'poisson' sampling), each then dropping out with probability `dropout_prob`."""
  clients_per_round: int
  num_clients: int
  sampling: str = 'fixed'
  dropout_prob: float = 0.0


class Execution(NamedTuple):
  """How the round runs, not what it computes: the schedule, how many clients train at
  once (None: the whole cohort) and the device mesh they are sharded over."""
  schedule: str = 'packed'
  client_chunk: int | None = None
  mesh: jax.sharding.Mesh | None = None


class FederatedRound(NamedTuple):
  init: Callable[[PyTree, jax.Array], types.ServerState]  # (trainable, run key) -> state.
  # (state, frozen, dataset, table) -> (state one round on, its metrics).
  apply: Callable[..., tuple[types.ServerState, types.RoundMetrics]]
  # (state, frozen) -> (trainable, frozen) of the global model as evaluated
  # (`Algorithm.served`); None when that is (state.trainable, frozen) itself.
  serve: Callable[..., tuple[PyTree, PyTree]] | None = None


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _sharding(mesh, spec):
  if mesh is None:
    return lambda x: x
  sharding = jax.sharding.NamedSharding(mesh, spec)
  return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def _check(cohort: Cohort, execution: Execution) -> tuple[int, int]:
  """(chunk, devices); `UserError` for an unknown sampling or schedule or a chunk that
  the devices do not divide."""
  if cohort.sampling not in sampling_lib.SAMPLINGS:
    raise errors.UserError(f'sampling={cohort.sampling!r}: allowed {sampling_lib.SAMPLINGS}')
  if execution.schedule not in schedules.SCHEDULES:
    raise errors.UserError(f'schedule={execution.schedule!r}: use one of '
                           f'{schedules.SCHEDULES}', argument='schedule')
  chunk = execution.client_chunk or cohort.clients_per_round
  devices = 1 if execution.mesh is None else execution.mesh.shape['clients']
  if chunk % devices:
    raise errors.UserError(f'fl.client_chunk={chunk} (0 means fl.clients_per_round) must be a '
                           f'multiple of the {devices} devices the clients are sharded over')
  return chunk, devices


def make_round(loss_fn: client_lib.LossFn, client_optimizer: optax.GradientTransformation,
               local: client_lib.LocalSpec, cohort: Cohort, *,
               algorithm: algorithms_base.Algorithm | None = None,
               aggregator: aggregators_lib.Aggregator | None = None,
               server_optimizer: optax.GradientTransformation | None = None,
               execution: Execution = Execution()) -> FederatedRound:
  """The round of `algorithm` (default FedAvg) on `loss_fn(trainable, frozen, batch, rng)
  -> per-example losses`, aggregated by `aggregator` (default the example-weighted mean)
  and applied by `server_optimizer` (default `optax.sgd(1.0)`).

  Raises `UserError` for an unknown sampling or schedule, or a chunk the devices do not
  divide.
  """
  chunk, devices = _check(cohort, execution)
  algorithm = algorithm or algorithms_base.Algorithm()
  aggregator = aggregator or aggregators_lib.weighted_mean()
  server_optimizer = server_optimizer or optax.sgd(1.0)
  training = client_lib.make_local_training(
      loss_fn, client_optimizer, num_epochs=local.num_epochs, batch_size=local.batch_size,
      max_examples=local.max_examples, sample_dp=local.sample_dp, gradient=algorithm.gradient)
  parts = _RoundParts(algorithm, aggregator, server_optimizer, training, local.batch_size,
                      cohort, chunk, devices, execution.mesh, execution.schedule)

  def init(trainable, rng):
    return types.ServerState(trainable, server_optimizer.init(trainable), aggregator.init(),
                             jnp.zeros((), jnp.int32), rng,
                             algorithm.init(trainable, cohort.num_clients))

  def apply(state, frozen, dataset, table):
    return _apply(parts, state, frozen, dataset, table)

  def serve(state, frozen):
    if algorithm.served is not None:
      return algorithm.served(state.algorithm_state, state.trainable, frozen)
    return state.trainable, algorithm.frozen(state.algorithm_state, frozen)

  plain = algorithm.served is None and algorithm.frozen is algorithms_base.identity_frozen
  return FederatedRound(init, apply, None if plain else serve)


class _RoundParts(NamedTuple):
  algorithm: algorithms_base.Algorithm
  aggregator: aggregators_lib.Aggregator
  server_optimizer: optax.GradientTransformation
  local: client_lib.LocalTraining
  batch_size: int
  cohort: Cohort
  chunk: int
  devices: int
  mesh: Any
  schedule: str


def _add_clients(p: _RoundParts, state, frozen, shared, num_examples_of,
                 totals: schedules.Totals, ids, out: client_lib.ClientOutput, in_cohort):
  """Adds the updates of clients `ids` (-1: none) where `in_cohort` to the sums, if
  finite and of positive weight. A client without examples has no update to report: it
  is not counted, and a round of only such clients aggregates nothing."""
  finite = jax.vmap(_all_finite)(out.delta) & jnp.isfinite(out.loss_sum)
  num_examples = num_examples_of(ids)
  num_steps = p.local.num_steps(num_examples)
  delta = jax.vmap(p.algorithm.client_delta)(out.delta, num_steps)
  contribution = jax.vmap(p.aggregator.contribute, in_axes=(0, 0, None))(
      delta, num_examples, state.aggregator_state)
  use = in_cohort & finite & (num_examples > 0) & (contribution.weight > 0)
  # where, not multiply: a NaN times zero is still NaN. The clients' contributions are
  # gathered whole before summing, in one order on every device: the sums, and so the
  # model, are bit-identical on any number of devices and hosts (an all-reduce's order
  # depends on the topology).
  whole = _sharding(p.mesh, jax.sharding.PartitionSpec())
  used = lambda x: whole(jnp.where(schedules.by_lane(use, x), x, 0))
  masked_sum = lambda x, total: total + jnp.sum(used(x).astype(total.dtype), 0)
  done = algorithms_base.ClientsDone(jnp.maximum(ids, 0), out.delta, num_examples, num_steps,
                                     contribution.weight, used, state.trainable, frozen)
  return schedules.Totals(
      jax.tree.map(masked_sum, contribution, totals.contributions),
      totals.num_used + use.sum(),
      totals.num_nonfinite + (in_cohort & ~finite).sum(),
      totals.loss_sum + jnp.where(use, out.loss_sum, 0).sum(),
      totals.examples_used + jnp.where(use, out.examples_seen, 0).sum(),
      totals.examples_trained + jnp.where(in_cohort, out.examples_seen, 0).sum(),
      totals.examples_computed, p.algorithm.add_clients(totals.algorithm, shared, done))


def _context(p: _RoundParts, state, frozen, dataset, table, keys):
  """The cohort of this round and what the schedules need to train it."""
  cohort = p.cohort
  clients, sampled = sampling_lib.sample_cohort(keys.sampling, cohort.sampling,
                                                cohort.num_clients, cohort.clients_per_round)
  dropped = jax.random.bernoulli(keys.dropout, cohort.dropout_prob, sampled.shape)
  reported = sampled & ~dropped
  # Reporting clients first (only they are trained), largest first: a chunk runs as long
  # as its largest client, so chunks of similar sizes waste the least, and packed lanes
  # run out of clients at about the same time.
  queue = clients[jnp.lexsort((-table.num_examples[clients], ~reported))]
  shared = p.algorithm.round_input(state.algorithm_state)

  def num_examples_of(ids):
    """Each client's example count; 0 for -1, a lane or slot without a client."""
    return jnp.where(ids >= 0, table.num_examples[jnp.maximum(ids, 0)], 0)

  def inputs(client):
    """What `client` trains on besides the parameters: its examples, its key and the
    algorithm's input. Client -1 has only padding: it reads nothing, takes no step."""
    index = jnp.maximum(client, 0)
    example_ids = jnp.where(client >= 0, table.example_ids[index], types.PADDING_ID)
    return (example_ids, num_examples_of(client), jax.random.fold_in(keys.clients, index),
            p.algorithm.client_input(state.algorithm_state, shared, index))

  start = None
  if p.algorithm.start is not None:
    start = lambda client: p.algorithm.start(state.trainable, inputs(client)[3])
  ctx = schedules.RoundContext(
      p.local, inputs,
      lambda *a: _add_clients(p, state, frozen, shared, num_examples_of, *a),
      num_examples_of, state.trainable, frozen, dataset, queue, reported.sum(), p.batch_size,
      p.chunk, p.devices, chunking.packed_widths(p.chunk // p.devices),
      _sharding(p.mesh, jax.sharding.PartitionSpec('clients')), start)
  return ctx, clients, sampled, reported


def _apply(p: _RoundParts, state: types.ServerState, frozen, dataset, table):
  keys = types.round_keys(state.rng, state.round)
  frozen = p.algorithm.frozen(state.algorithm_state, frozen)  # What the clients train with.
  ctx, clients, sampled, reported = _context(p, state, frozen, dataset, table, keys)
  zero_contribution = jax.tree.map(
      lambda x: jnp.zeros(x.shape[1:], jnp.float32),
      jax.eval_shape(jax.vmap(p.aggregator.contribute, in_axes=(0, 0, None)),
                     jax.tree.map(lambda x: x[None], state.trainable),
                     jnp.ones(1, jnp.int32), state.aggregator_state))
  zero = jnp.zeros((), jnp.int32)
  totals = schedules.SCHEDULE_FUNCTIONS[p.schedule](ctx, schedules.Totals(
      zero_contribution, zero, zero, jnp.zeros(()), zero, zero, zero,
      p.algorithm.begin(state.algorithm_state)))

  aggregate = p.aggregator.finalize(totals.contributions, totals.num_used,
                                    state.aggregator_state, keys.aggregation)
  if p.algorithm.finish_round is None:
    mean_delta, algorithm_state = p.algorithm.finish(totals.algorithm, aggregate.mean_delta)
    algorithm_metrics = {}
  else:
    mean_delta, algorithm_state, algorithm_metrics = p.algorithm.finish_round(
        totals.algorithm, aggregate.mean_delta,
        algorithms_base.RoundEnd(state.trainable, frozen, state.round, state.rng))
  mean_delta = jax.tree.map(lambda d, w: d.astype(w.dtype), mean_delta, state.trainable)
  # The server optimizer descends along the negative average update.
  updates, opt_state = p.server_optimizer.update(
      jax.tree.map(jnp.negative, mean_delta), state.opt_state, state.trainable)
  # The aggregator decides whether a round without reports changes anything: the
  # weighted mean has nothing to apply, DP still releases its noise.
  keep_unless_released = lambda new, old: jnp.where(aggregate.released, new, old)
  trainable = jax.tree.map(keep_unless_released,
                           optax.apply_updates(state.trainable, updates), state.trainable)
  opt_state = jax.tree.map(keep_unless_released, opt_state, state.opt_state)
  metrics = types.RoundMetrics(
      clients=jnp.where(sampled, clients, -1), reported=reported,
      num_sampled=sampled.sum(), num_reported=totals.num_used,
      num_nonfinite=totals.num_nonfinite,
      # NaN when no example was aggregated: an empty round has no training loss.
      train_loss=jnp.where(totals.examples_used > 0,
                           totals.loss_sum / jnp.maximum(totals.examples_used, 1), jnp.nan),
      aggregator=aggregate.metrics, examples_trained=totals.examples_trained,
      examples_computed=totals.examples_computed, algorithm=algorithm_metrics)
  return types.ServerState(trainable, opt_state, aggregate.state, state.round + 1,
                           state.rng, algorithm_state), metrics
