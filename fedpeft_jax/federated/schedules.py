"""The two schedules that train a round's reporting clients; both give the same sums.

- `train_padded`: chunks of clients, vmapped, one chunk after another. Every client
  of a chunk computes as many steps as the chunk's largest needs, the surplus
  masked away.
- `train_packed`: `chunk` lanes step their clients one batch at a time. A lane whose
  client is done takes the next one (continuous batching), and once fewer clients
  are training than there are lanes, a step runs only the lanes in training, in
  pieces of a few vmap widths (`chunking.packed_widths`, compiled once each), so
  nearly every computed example is a real one.

A lane without a client holds client -1: it reads no one's data and takes no step.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedpeft_jax.federated import client as client_lib

PyTree = Any
SCHEDULES = ('packed', 'padded')


def by_lane(mask, x):
  """`mask` [clients...] shaped to select along the leading axes of `x` [clients..., ...]."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


class Totals(NamedTuple):
  """Running sums over the clients a round has trained so far."""
  contributions: PyTree  # The aggregator's contributions, summed.
  num_used: jax.Array  # Clients with a finite update of positive weight, the ones summed.
  num_nonfinite: jax.Array
  loss_sum: jax.Array  # The used clients' training losses...
  examples_used: jax.Array  # ...and the number of examples they are over.
  examples_trained: jax.Array  # See types.RoundMetrics.
  examples_computed: jax.Array
  algorithm: PyTree = ()  # The algorithm's accumulator (`Algorithm.begin`).


class RoundContext(NamedTuple):
  """What a schedule needs of the round being run."""
  local: client_lib.LocalTraining
  # client (-1: none) -> (example ids, num examples, key, algorithm input) for local.step.
  inputs: Callable[[jax.Array], tuple]
  # (totals, ids, ClientOutput, in_cohort) -> totals with those clients' updates added.
  add: Callable[..., Totals]
  num_examples: Callable[[jax.Array], jax.Array]  # ids (-1: none) -> counts (0 for -1).
  trainable: PyTree  # The global trainable parameters the clients start from.
  frozen: PyTree
  dataset: PyTree
  queue: jax.Array  # int32 [capacity]: reporting clients first, largest first.
  num_reporting: jax.Array
  batch_size: int
  chunk: int  # Clients training at once, over all devices.
  devices: int
  widths: tuple[int, ...]  # `chunking.packed_widths` of chunk // devices.
  by_client: Callable[[Any], Any]  # Shards a [clients, ...] value over the devices.
  # client (-1: none) -> the trainable parameters it starts from (`Algorithm.start`);
  # None: every client starts from `trainable`.
  start: Callable[[jax.Array], PyTree] | None = None


def client_start(ctx: RoundContext, client):
  """The trainable parameters `client` starts from, and its update is measured from."""
  return ctx.trainable if ctx.start is None else ctx.start(client)


def train_padded(ctx: RoundContext, totals: Totals) -> Totals:
  chunk, queue = ctx.chunk, ctx.queue
  capacity = -(-queue.shape[0] // chunk) * chunk
  # Past the reporting clients, lanes hold no client (-1) and read no one's data.
  ids = jnp.where(jnp.arange(capacity) < ctx.num_reporting,
                  jnp.pad(queue, (0, capacity - queue.shape[0])), -1)

  def run_chunk(i, totals):
    chunk_ids = ctx.by_client(jax.lax.dynamic_slice(ids, (i * chunk,), (chunk,)))
    out = jax.vmap(lambda c: ctx.local.run(client_start(ctx, c), ctx.frozen, ctx.dataset,
                                           *ctx.inputs(c)))(chunk_ids)
    # Every lane computes as many steps as the chunk's largest client takes.
    computed = chunk * ctx.local.num_steps(ctx.num_examples(chunk_ids)).max() * ctx.batch_size
    totals = totals._replace(examples_computed=totals.examples_computed + computed)
    return ctx.add(totals, chunk_ids, out, chunk_ids >= 0)

  return jax.lax.fori_loop(0, (ctx.num_reporting + chunk - 1) // chunk, run_chunk, totals)


class Lanes(NamedTuple):
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


def _step_piece(ctx: RoundContext, width: int, lanes: Lanes, start) -> Lanes:
  """One local step of the clients in lanes [start, start + width) of each device."""
  piece = jax.tree.map(
      lambda x: ctx.by_client(jax.lax.dynamic_slice_in_dim(x, start, width, axis=1)), lanes)
  stepped = jax.vmap(jax.vmap(
      lambda client_state, c: ctx.local.step(client_state, client_start(ctx, c), ctx.frozen,
                                             ctx.dataset, *ctx.inputs(c))))(
      piece.local, piece.client)
  # On a device with fewer clients in training than the piece is wide, the lanes past
  # them (free, or finished and not yet collected) keep their state.
  kept = jax.tree.map(lambda new, old: jnp.where(by_lane(piece.training, new), new, old),
                      stepped, piece.local)
  return lanes._replace(local=jax.tree.map(
      lambda x, new: jax.lax.dynamic_update_slice_in_dim(x, new, start, axis=1),
      lanes.local, kept))


def _turnover(ctx: RoundContext, carry):
  """Adds finished clients' updates to the sums, gives free lanes the next clients in
  the queue and moves the lanes in training to the front of every device."""
  lanes, next_in_queue, totals = carry
  chunk, devices = ctx.chunk, ctx.devices
  lanes = jax.tree.map(lambda x: x.reshape((chunk,) + x.shape[2:]), lanes)
  # Finished clients first, by id: they are summed in the same order whichever devices
  # their lanes are on, so the model is the same bit for bit on any number.
  done = jax.tree.map(lambda x: x[jnp.lexsort((lanes.client, ~lanes.finished))], lanes)
  if ctx.start is None:
    outputs = jax.vmap(ctx.local.finalize, in_axes=(0, None))(done.local, ctx.trainable)
  else:
    outputs = jax.vmap(lambda s, c: ctx.local.finalize(s, ctx.start(c)))(done.local,
                                                                         done.client)
  totals = ctx.add(totals, done.client, outputs, done.finished)
  free = ~lanes.training
  position = next_in_queue + jnp.cumsum(free) - 1
  takes = free & (position < ctx.num_reporting)
  client = jnp.where(takes, ctx.queue[jnp.minimum(position, ctx.queue.shape[0] - 1)],
                     jnp.where(free, -1, lanes.client))
  fresh = (ctx.local.init(ctx.trainable) if ctx.start is None else
           jax.vmap(lambda c: ctx.local.init(ctx.start(c)))(client))
  lanes = Lanes(client, ctx.local.num_steps(ctx.num_examples(client)),
                jax.tree.map(lambda fresh, x: jnp.where(by_lane(takes, x), fresh, x),
                             fresh, lanes.local))
  # Rank r in training order goes to device r % devices, slot r // devices: every
  # device's clients in training come first, and the devices share them evenly.
  training_first = jnp.argsort(~lanes.training, stable=True)
  placed = training_first[jnp.arange(chunk).reshape(chunk // devices, devices).T]
  lanes = jax.tree.map(lambda x: ctx.by_client(x[placed]), lanes)
  return lanes, next_in_queue + takes.sum(), totals


def train_packed(ctx: RoundContext, totals: Totals) -> Totals:
  devices, lanes_per_device = ctx.devices, ctx.chunk // ctx.devices

  def step(carry):
    lanes, next_in_queue, totals = carry
    remaining = -(-lanes.training.sum() // devices)  # Lanes to run on each device.
    start = jnp.zeros((), jnp.int32)
    for width in ctx.widths:
      pieces = remaining // width
      lanes = jax.lax.fori_loop(
          0, pieces, lambda i, lanes, w=width, s=start: _step_piece(ctx, w, lanes, s + i * w),
          lanes)
      start, remaining = start + pieces * width, remaining - pieces * width
    totals = totals._replace(
        examples_computed=totals.examples_computed + start * devices * ctx.batch_size)
    carry = lanes, next_in_queue, totals
    return jax.lax.cond(lanes.finished.any(), lambda c: _turnover(ctx, c), lambda c: c, carry)

  no_clients = Lanes(
      jnp.full((devices, lanes_per_device), -1, jnp.int32),
      jnp.zeros((devices, lanes_per_device), jnp.int32),
      jax.tree.map(lambda x: jnp.broadcast_to(x, (devices, lanes_per_device) + x.shape),
                   ctx.local.init(ctx.trainable)))
  carry = _turnover(ctx, (no_clients, jnp.zeros((), jnp.int32), totals))
  _, _, totals = jax.lax.while_loop(lambda c: (c[0].client >= 0).any(), step, carry)
  return totals


SCHEDULE_FUNCTIONS = {'packed': train_packed, 'padded': train_padded}
