"""Federated averaging over the trainable pytree, one jitted function a round.

Each round the server samples a cohort, drops the clients that fail to
report, runs the others' local updates vmapped over the client axis (the
frozen backbone and the dataset broadcast, not batched) and aggregates their
deltas (weighted mean, or DP-FedAvg); a server optimizer applies the result
(`optax.sgd(1.0)` is plain FedAvg). At most `client_chunk` clients train at
once, so memory is bounded by that and a cohort of any size reuses one
compilation. Two schedules give the same result:

- 'padded': chunks of clients, vmapped, one chunk after another. Every client
  of a chunk computes as many steps as the chunk's largest needs, the
  surplus masked away.
- 'packed': `client_chunk` lanes step their clients one batch at a time. A
  lane whose client is done takes the next one (continuous batching), and
  once fewer clients are training than there are lanes, a step runs only the
  lanes in training, in pieces of a few vmap widths (all lanes, 16, 4, 1;
  compiled once each), so nearly every computed example is a real one.

Besides FedAvg's local SGD, clients may add FedProx's proximal term
(`prox_mu`), and the round may run SCAFFOLD (`scaffold`): a server control
variate and one per client, kept in the server state across rounds.
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
SCHEDULES = ('packed', 'padded')
ALGORITHMS = ('fedavg', 'scaffold')


class ServerState(NamedTuple):
  trainable: PyTree
  opt_state: PyTree
  aggregator_state: PyTree
  round: jax.Array  # Rounds completed so far.
  rng: jax.Array  # The run's key; every round's randomness is folded from it.
  # SCAFFOLD: every client's control variate c_i, [num_clients, ...] on each trainable
  # leaf, zero until the client has trained (the paper's initialisation); () otherwise.
  variates: PyTree = ()


class Scaffold(NamedTuple):
  """SCAFFOLD (Karimireddy et al. 2020) with option II control variates: a client's
  new variate is c_i - c + (x - y_i) / (K * local_learning_rate) after K local steps.

  The server's variate c is the mean of all clients' c_i: the paper's update of c,
  by (1 / N) times the sum of the changes, keeps it so from the zero start.
  """
  local_learning_rate: float


class ClientTable(NamedTuple):
  """Every client's example ids into the shared dataset, padded to one length.

  The padding is `client.PADDING_ID`, an id past the end of any dataset: a padded
  position reads zeros, never another client's example.
  """
  example_ids: jax.Array  # int32 [num_clients, max_examples]
  num_examples: jax.Array  # int32 [num_clients]

  @classmethod
  def from_partition(cls, client_indices: list[np.ndarray]) -> 'ClientTable':
    max_examples = max(1, max(len(ids) for ids in client_indices))
    table = np.full((len(client_indices), max_examples), client_lib.PADDING_ID, np.int32)
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
  # Batch rows holding the reporting clients' real examples, and all rows the round
  # computed, padding included: their ratio is the share of its work that was real.
  # (0 in metrics built by hand.)
  examples_trained: jax.Array = 0
  examples_computed: jax.Array = 0


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


def _by_lane(mask, x):
  """`mask` [clients...] shaped to select along the leading axes of `x` [clients..., ...]."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


class _Totals(NamedTuple):
  """Running sums over the clients a round has trained so far."""
  contributions: aggregators_lib.Contribution
  num_used: jax.Array  # Clients with a finite update, the ones summed.
  num_nonfinite: jax.Array
  loss_sum: jax.Array  # The used clients' training losses...
  examples_used: jax.Array  # ...and the number of examples they are over.
  examples_trained: jax.Array  # See RoundMetrics.
  examples_computed: jax.Array
  variates: PyTree = ()  # SCAFFOLD: every client's c_i, the used clients' updated.


class _Lanes(NamedTuple):
  """The packed schedule's clients in training, one per lane: [devices, lanes per
  device] while stepping, flattened to [lanes] between steps."""
  client: jax.Array  # int32: the client a lane trains, -1 if it has none.
  num_steps: jax.Array  # int32: that client's local steps; 0 if none.
  local: client_lib.ClientState  # Batched over lanes.

  @property
  def training(self):
    return self.local.steps_done < self.num_steps

  @property
  def finished(self):  # Done training, its update not yet added to the sums.
    return (self.client >= 0) & ~self.training


def fedavg(loss_fn: client_lib.LossFn, client_optimizer: optax.GradientTransformation, *,
           num_epochs: int, batch_size: int, max_examples: int, clients_per_round: int,
           num_clients: int, client_chunk: int | None = None, sampling: str = 'fixed',
           dropout_prob: float = 0.0,
           aggregator: aggregators_lib.Aggregator | None = None,
           server_optimizer: optax.GradientTransformation | None = None,
           sample_dp: client_lib.SampleDP | None = None,
           mesh: jax.sharding.Mesh | None = None,
           schedule: str = 'packed', prox_mu: float = 0.0,
           scaffold: Scaffold | None = None) -> FederatedAlgorithm:
  """Builds FedAvg on `loss_fn(trainable, frozen, batch, rng) -> per-example losses`.

  `prox_mu`: FedProx's proximal term in every local step (see
  `client.make_local_training`). `scaffold`: SCAFFOLD; every client's local
  gradient is corrected by c - c_i, and the variates of the clients whose update
  is used move as the paper's option II says (dropped clients and NaN updates
  leave theirs as they were).

  With a `mesh` whose one axis is 'clients', the clients training at once are
  spread over its devices; everything else (the frozen backbone, the dataset,
  the global trainable parameters) is replicated, and the sums over clients
  become all-reduces.
  """
  if sampling not in SAMPLINGS:
    raise errors.UserError(f'sampling={sampling!r}: allowed {SAMPLINGS}')
  if schedule not in SCHEDULES:
    raise errors.UserError(f'schedule={schedule!r}: use one of {SCHEDULES}',
                           argument='schedule')
  chunk = client_chunk or clients_per_round
  devices = 1 if mesh is None else mesh.size
  if chunk % devices:
    raise errors.UserError(f'fl.client_chunk={chunk} (0 means fl.clients_per_round) must be a '
                     f'multiple of the {devices} devices the clients are sharded over')
  by_client = (lambda x: x) if mesh is None else (
      lambda x: jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('clients'))))
  whole = (lambda x: x) if mesh is None else (
      lambda x: jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
  aggregator = aggregator or aggregators_lib.weighted_mean()
  server_optimizer = server_optimizer or optax.sgd(1.0)
  local = client_lib.make_local_training(
      loss_fn, client_optimizer, num_epochs=num_epochs, batch_size=batch_size,
      max_examples=max_examples, sample_dp=sample_dp, prox_mu=prox_mu)
  contribute = jax.vmap(aggregator.contribute, in_axes=(0, 0, None))
  lanes_per_device = chunk // devices
  # A packed step runs the lanes in training on each device in pieces of these widths,
  # each a vmap compiled once: all lanes, then powers of four (fewer copies of the step
  # to compile than powers of two, for at most three pieces of a width). Width 1 is
  # among them, so (on one device) no lane computes without a client.
  widths = sorted({lanes_per_device} | {4**p for p in range(lanes_per_device.bit_length())
                                        if 4**p < lanes_per_device}, reverse=True)

  def init(trainable, rng):
    variates = () if scaffold is None else jax.tree.map(
        lambda x: jnp.zeros((num_clients,) + x.shape, x.dtype), trainable)
    return ServerState(trainable, server_optimizer.init(trainable), aggregator.init(),
                       jnp.zeros((), jnp.int32), rng, variates)

  def apply(state: ServerState, frozen, dataset, table: ClientTable):
    keys = round_keys(state.rng, state.round)
    clients, sampled = sample_cohort(keys.sampling, sampling, num_clients, clients_per_round)
    dropped = jax.random.bernoulli(keys.dropout, dropout_prob, sampled.shape)
    reported = sampled & ~dropped
    num_reporting = reported.sum()
    # Reporting clients first (only they are trained), largest first: a chunk runs as
    # long as its largest client, so chunks of similar sizes waste the least, and packed
    # lanes run out of clients at about the same time.
    queue = clients[jnp.lexsort((-table.num_examples[clients], ~reported))]
    server_variate = jax.tree.map(lambda c_all: c_all.mean(0), state.variates)

    def num_examples_of(clients):
      """Each client's example count; 0 for -1, a lane or slot without a client."""
      return jnp.where(clients >= 0, table.num_examples[jnp.maximum(clients, 0)], 0)

    def client_inputs(client):
      """What `client` trains on besides the parameters: its examples, its key and (with
      SCAFFOLD) the correction c - c_i of its gradients. Client -1 (a lane without a
      client) has only padding: it reads nothing and takes no step."""
      has_client, index = client >= 0, jnp.maximum(client, 0)
      correction = None if scaffold is None else jax.tree.map(
          lambda c, c_all: c - c_all[index], server_variate, state.variates)
      example_ids = jnp.where(has_client, table.example_ids[index], client_lib.PADDING_ID)
      return (example_ids, num_examples_of(client), jax.random.fold_in(keys.clients, index),
              correction)

    def variate_changes(ids, delta):
      """SCAFFOLD option II: c_i+ - c_i = -c - delta_i / (K_i * local learning rate)."""
      steps = local.num_steps(num_examples_of(ids))
      scale = 1.0 / (jnp.maximum(steps, 1) * scaffold.local_learning_rate)
      # A client without examples took no step and keeps its variate.
      return jax.tree.map(
          lambda d, c: jnp.where(_by_lane(steps > 0, d), -c - _by_lane(scale, d) * d, 0),
          delta, server_variate)

    def add_clients(totals: _Totals, ids, out: client_lib.ClientOutput, in_cohort):
      """Adds the updates of clients `ids` (-1: none) where `in_cohort` to the sums, if
      finite and of positive weight. A client without examples has no update to report:
      it is not counted, and a round of only such clients aggregates nothing."""
      finite = jax.vmap(_all_finite)(out.delta) & jnp.isfinite(out.loss_sum)
      num_examples = num_examples_of(ids)
      contribution = contribute(out.delta, num_examples, state.aggregator_state)
      use = in_cohort & finite & (num_examples > 0) & (contribution.weight > 0)
      # where, not multiply: a NaN times zero is still NaN. The clients' contributions are
      # gathered whole before summing, in one order on every device: the sums, and so the
      # model, are bit-identical on any number of devices and hosts (an all-reduce's order
      # depends on the topology).
      used = lambda x: whole(jnp.where(_by_lane(use, x), x, 0))
      masked_sum = lambda x, total: total + jnp.sum(used(x).astype(total.dtype), 0)
      variates = totals.variates
      if scaffold is not None:
        # An add, not a set: padding lanes repeat an id, and add zero to it.
        variates = jax.tree.map(lambda c, c_all: c_all.at[jnp.maximum(ids, 0)].add(used(c)),
                                variate_changes(ids, out.delta), variates)
      return _Totals(
          jax.tree.map(masked_sum, contribution, totals.contributions),
          totals.num_used + use.sum(),
          totals.num_nonfinite + (in_cohort & ~finite).sum(),
          totals.loss_sum + jnp.where(use, out.loss_sum, 0).sum(),
          totals.examples_used + jnp.where(use, out.examples_seen, 0).sum(),
          totals.examples_trained + jnp.where(in_cohort, out.examples_seen, 0).sum(),
          totals.examples_computed, variates)

    def train_padded(totals):
      capacity = -(-queue.shape[0] // chunk) * chunk
      # Past the reporting clients, lanes hold no client (-1) and read no one's data.
      ids = jnp.where(jnp.arange(capacity) < num_reporting,
                      jnp.pad(queue, (0, capacity - queue.shape[0])), -1)

      def run_chunk(i, totals):
        chunk_ids = by_client(jax.lax.dynamic_slice(ids, (i * chunk,), (chunk,)))
        out = jax.vmap(lambda c: local.run(state.trainable, frozen, dataset,
                                           *client_inputs(c)))(chunk_ids)
        # Every lane computes as many steps as the chunk's largest client takes.
        computed = chunk * local.num_steps(num_examples_of(chunk_ids)).max() * batch_size
        totals = totals._replace(examples_computed=totals.examples_computed + computed)
        return add_clients(totals, chunk_ids, out, chunk_ids >= 0)

      return jax.lax.fori_loop(0, (num_reporting + chunk - 1) // chunk, run_chunk, totals)

    def train_packed(totals):
      def step_piece(width, lanes: _Lanes, start) -> _Lanes:
        """One local step of the clients in lanes [start, start + width) of each device."""
        piece = jax.tree.map(
            lambda x: by_client(jax.lax.dynamic_slice_in_dim(x, start, width, axis=1)), lanes)
        stepped = jax.vmap(jax.vmap(
            lambda client_state, c: local.step(client_state, state.trainable, frozen,
                                               dataset, *client_inputs(c))))(
            piece.local, piece.client)
        # On a device with fewer clients in training than the piece is wide, the lanes
        # past them (free, or finished and not yet collected) keep their state.
        kept = jax.tree.map(lambda new, old: jnp.where(_by_lane(piece.training, new), new, old),
                            stepped, piece.local)
        return lanes._replace(local=jax.tree.map(
            lambda x, new: jax.lax.dynamic_update_slice_in_dim(x, new, start, axis=1),
            lanes.local, kept))

      def turnover(carry):
        """Adds finished clients' updates to the sums, gives free lanes the next clients
        in the queue and moves the lanes in training to the front of every device."""
        lanes, next_in_queue, totals = carry
        lanes = jax.tree.map(lambda x: x.reshape((chunk,) + x.shape[2:]), lanes)
        # Finished clients first, by id: they are summed in the same order whichever
        # devices their lanes are on, so the model is the same bit for bit on any number.
        done = jax.tree.map(lambda x: x[jnp.lexsort((lanes.client, ~lanes.finished))], lanes)
        totals = add_clients(
            totals, done.client,
            jax.vmap(local.finalize, in_axes=(0, None))(done.local, state.trainable),
            done.finished)
        free = ~lanes.training
        position = next_in_queue + jnp.cumsum(free) - 1
        takes = free & (position < num_reporting)
        client = jnp.where(takes, queue[jnp.minimum(position, queue.shape[0] - 1)],
                           jnp.where(free, -1, lanes.client))
        lanes = _Lanes(
            client,
            local.num_steps(num_examples_of(client)),
            jax.tree.map(lambda fresh, x: jnp.where(_by_lane(takes, x), fresh, x),
                         local.init(state.trainable), lanes.local))
        # Rank r in training order goes to device r % devices, slot r // devices: every
        # device's clients in training come first, and the devices share them evenly.
        training_first = jnp.argsort(~lanes.training, stable=True)
        placed = training_first[jnp.arange(chunk).reshape(lanes_per_device, devices).T]
        lanes = jax.tree.map(lambda x: by_client(x[placed]), lanes)
        return lanes, next_in_queue + takes.sum(), totals

      def step(carry):
        lanes, next_in_queue, totals = carry
        remaining = -(-lanes.training.sum() // devices)  # Lanes to run on each device.
        start = jnp.zeros((), jnp.int32)
        for width in widths:
          pieces = remaining // width
          lanes = jax.lax.fori_loop(
              0, pieces, lambda i, lanes: step_piece(width, lanes, start + i * width), lanes)
          start, remaining = start + pieces * width, remaining - pieces * width
        totals = totals._replace(
            examples_computed=totals.examples_computed + start * devices * batch_size)
        carry = lanes, next_in_queue, totals
        return jax.lax.cond(lanes.finished.any(), turnover, lambda c: c, carry)

      no_clients = _Lanes(
          jnp.full((devices, lanes_per_device), -1, jnp.int32),
          jnp.zeros((devices, lanes_per_device), jnp.int32),
          jax.tree.map(lambda x: jnp.broadcast_to(x, (devices, lanes_per_device) + x.shape),
                       local.init(state.trainable)))
      carry = turnover((no_clients, jnp.zeros((), jnp.int32), totals))
      _, _, totals = jax.lax.while_loop(lambda c: (c[0].client >= 0).any(), step, carry)
      return totals

    zero_contribution = jax.tree.map(
        lambda x: jnp.zeros(x.shape[1:], jnp.float32),
        jax.eval_shape(contribute, jax.tree.map(lambda x: x[None], state.trainable),
                       jnp.ones(1, jnp.int32), state.aggregator_state))
    zero = jnp.zeros((), jnp.int32)
    train = train_packed if schedule == 'packed' else train_padded
    totals = train(_Totals(zero_contribution, zero, zero, jnp.zeros(()), zero, zero, zero,
                           state.variates))

    aggregate = aggregator.finalize(totals.contributions, totals.num_used,
                                    state.aggregator_state, keys.aggregation)
    mean_delta = jax.tree.map(lambda d, p: d.astype(p.dtype), aggregate.mean_delta,
                              state.trainable)
    # The server optimizer descends along the negative average update.
    updates, opt_state = server_optimizer.update(
        jax.tree.map(jnp.negative, mean_delta), state.opt_state, state.trainable)
    # The aggregator decides whether a round without reports changes anything: the
    # weighted mean has nothing to apply, DP still releases its noise.
    keep_unless_released = lambda new, old: jnp.where(aggregate.released, new, old)
    trainable = jax.tree.map(keep_unless_released,
                             optax.apply_updates(state.trainable, updates), state.trainable)
    opt_state = jax.tree.map(keep_unless_released, opt_state, state.opt_state)
    metrics = RoundMetrics(
        clients=jnp.where(sampled, clients, -1), reported=reported,
        num_sampled=sampled.sum(), num_reported=totals.num_used,
        num_nonfinite=totals.num_nonfinite,
        # NaN when no example was aggregated: an empty round has no training loss.
        train_loss=jnp.where(totals.examples_used > 0,
                             totals.loss_sum / jnp.maximum(totals.examples_used, 1), jnp.nan),
        aggregator=aggregate.metrics, examples_trained=totals.examples_trained,
        examples_computed=totals.examples_computed)
    return ServerState(trainable, opt_state, aggregate.state, state.round + 1,
                       state.rng, totals.variates), metrics

  return FederatedAlgorithm(init, apply)
