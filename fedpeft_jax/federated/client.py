"""Local training of one client: E epochs of minibatch SGD on its examples.

Every client is padded to the same number of examples so that one compiled
function (and its vmap over clients) serves all clients and rounds: padded
positions are masked out of the loss, and a client runs only the steps its own
examples fill.

Local training also comes in pieces (`make_local_training`: init, one step,
finalize) so that a round can interleave clients, advancing each by one step
at a time; every step's batch and randomness depend only on the client's key
and the step's index, so the result does not depend on how clients are
scheduled.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedpeft_jax.federated import types
from fedpeft_jax.privacy import mechanisms

PyTree = Any
# loss_fn(trainable, frozen, batch, rng) -> per-example losses [batch_size]. A batch's
# masked-out rows (padding) are all zeros: the loss must be finite on them.
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], jax.Array]
# (grads, params, global params, client input) -> grads: the algorithm's hook on every
# local step's gradient (FedProx's proximal term, SCAFFOLD's correction).
GradientHook = Callable[[PyTree, PyTree, PyTree, PyTree], PyTree]
PADDING_ID = types.PADDING_ID


class ClientOutput(NamedTuple):
  delta: PyTree  # Trained minus initial trainable parameters.
  loss_sum: jax.Array  # Sum of per-example training losses over all steps.
  examples_seen: jax.Array  # Number of real (unpadded) examples processed.


class SampleDP(NamedTuple):
  """Local DP-SGD: per-example clipping and Gaussian noise at every step."""
  clip_norm: float
  noise_multiplier: float


class ClientState(NamedTuple):
  """A client part-way through its local training."""
  params: PyTree
  opt_state: PyTree
  loss_sum: jax.Array  # Sum of per-example training losses so far.
  examples_seen: jax.Array  # Real (unpadded) examples processed so far.
  steps_done: jax.Array


class LocalTraining(NamedTuple):
  """One client's local training as init, `num_steps(num_examples)` steps, finalize.

  A step takes the global parameters the client started from (FedProx pulls
  towards them) and the algorithm's input for the client (SCAFFOLD's c - c_i), which
  its gradient hook reads; both are the same at every step of a client, so they are
  inputs, not state.
  """
  num_steps: Callable[[jax.Array], jax.Array]
  init: Callable[[PyTree], ClientState]  # The global trainable parameters -> fresh state.
  # (state, global trainable, frozen, dataset, example_ids, num_examples, rng,
  #  client input) -> state one step on.
  step: Callable[..., ClientState]
  finalize: Callable[[ClientState, PyTree], ClientOutput]  # (state, global params) -> output.

  def run(self, trainable, frozen, dataset, example_ids, num_examples, rng,
          client_input=None) -> ClientOutput:
    """The whole of one client's local training."""
    # Only this client's real steps run: under vmap the loop lasts as long as the
    # chunk's largest client needs, not as long as the largest client overall.
    state = jax.lax.fori_loop(
        0, self.num_steps(num_examples),
        lambda _, s: self.step(s, trainable, frozen, dataset, example_ids, num_examples, rng,
                               client_input),
        self.init(trainable))
    return self.finalize(state, trainable)


def _sort_keys(rng, max_examples: int, num_examples):
  """Random sort keys, real examples first. Each position's key is folded from its
  index, so the order of the real examples does not depend on the padding."""
  scores = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i)))(
      jnp.arange(max_examples))
  return jnp.where(jnp.arange(max_examples) < num_examples, scores, 2.0)


def epoch_batch(rng, num_examples, max_examples: int, batch_size: int, index):
  """Batch `index` of the epoch shuffled by `rng`: positions [batch_size] into the
  client's padded example list, and their validity mask."""
  order = jnp.pad(jnp.argsort(_sort_keys(rng, max_examples, num_examples)), (0, batch_size))
  start = index * batch_size
  return (jax.lax.dynamic_slice(order, (start,), (batch_size,)),
          start + jnp.arange(batch_size) < num_examples)


def sampled_batch(rng, num_examples, max_examples: int, batch_size: int, index):
  """Step `index` of an epoch: a uniform draw of min(batch_size, n) of the client's n
  examples without replacement, the sampling DP-SGD accounts for."""
  width = min(batch_size, max_examples)
  order = jnp.argsort(_sort_keys(jax.random.fold_in(rng, index), max_examples,
                                 num_examples))[:width]
  return (jnp.pad(order, (0, batch_size - width)),
          jnp.arange(batch_size) < jnp.minimum(num_examples, batch_size))


def gather_batch(dataset: PyTree, ids: jax.Array) -> PyTree:
  """Rows `ids` [batch] of every leaf of `dataset`; an id out of range (`PADDING_ID`)
  gives a row of zeros. Masked-out rows are zeros, not data: no other client's example
  is read, and a non-finite example cannot reach a gradient through a masked row (a
  masked loss still multiplies a NaN row's gradient by zero, which stays NaN)."""
  return jax.tree.map(lambda x: x.at[ids].get(mode='fill', fill_value=0), dataset)


def _finite_per_example(losses, grads) -> jax.Array:
  """[batch] True where an example's loss and every entry of its gradient are finite."""
  finite = jnp.isfinite(losses)
  for g in jax.tree.leaves(grads):
    finite &= jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1)
  return finite


class LocalSpec(NamedTuple):
  """What every client's local training is: E epochs of minibatches of `batch_size`
  over at most `max_examples` examples, optionally DP-SGD."""
  num_epochs: int
  batch_size: int
  max_examples: int
  sample_dp: Optional[SampleDP] = None


def make_local_training(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                        num_epochs: int, batch_size: int, max_examples: int,
                        sample_dp: Optional[SampleDP] = None,
                        gradient: Optional[GradientHook] = None) -> LocalTraining:
  """`make_client_update` in pieces, for rounds that schedule clients' steps.

  `gradient`: the algorithm's hook on every step's gradient (after DP-SGD's noise),
  e.g. FedProx's proximal term (`algorithms.fedprox`).
  """

  def mean_grads(params, frozen, batch, valid, rng):
    def masked_mean_loss(p):
      losses = jnp.where(valid, loss_fn(p, frozen, batch, rng), 0.0)
      return losses.sum() / jnp.maximum(valid.sum(), 1), losses.sum()
    return jax.grad(masked_mean_loss, has_aux=True)(params)

  def private_grads(params, frozen, batch, valid, rng):
    noise_rng, example_rng = jax.random.split(rng)

    def example_loss(p, example, r):
      return loss_fn(p, frozen, jax.tree.map(lambda x: x[None], example), r)[0]

    losses, grads = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))(
        params, batch, jax.random.split(example_rng, batch_size))
    # Padding and examples with a NaN or Inf loss or gradient contribute zero, set before
    # clipping: where, not multiply, since a NaN times zero is still NaN.
    use = valid & _finite_per_example(losses, grads)
    grads = jax.tree.map(
        lambda g: jnp.where(use.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0), grads)
    clipped, _ = jax.vmap(mechanisms.clip, in_axes=(0, None))(grads, sample_dp.clip_norm)
    summed = jax.tree.map(lambda g: jnp.sum(g, 0), clipped)
    noised = mechanisms.add_noise(noise_rng, summed,
                                  sample_dp.noise_multiplier * sample_dp.clip_norm)
    # The fixed batch size, not the count of real examples, keeps the noise scale public.
    return jax.tree.map(lambda g: g / batch_size, noised), jnp.where(use, losses, 0).sum()

  grad_fn = private_grads if sample_dp else mean_grads
  make_batch = sampled_batch if sample_dp else epoch_batch

  def steps_per_epoch(num_examples):
    return (num_examples + batch_size - 1) // batch_size

  def num_steps(num_examples):
    return num_epochs * steps_per_epoch(num_examples)

  def init(trainable):
    zero = jnp.zeros((), jnp.int32)
    return ClientState(trainable, optimizer.init(trainable), jnp.zeros((), jnp.float32),
                       zero, zero)

  def step(state, trainable, frozen, dataset, example_ids, num_examples, rng, client_input):
    # At least 1: a round may step a client without examples and discard the result.
    per_epoch = jnp.maximum(steps_per_epoch(num_examples), 1)
    epoch, index = state.steps_done // per_epoch, state.steps_done % per_epoch
    # Keys folded from (epoch, step): independent of the client's padding and of
    # whatever else the round runs alongside it. The batch is derived afresh at every
    # step (a sort of max_examples keys, cheap next to the model), so the client's state
    # carries no batch plan.
    order_rng, step_rng = jax.random.split(jax.random.fold_in(rng, epoch))
    positions, valid = make_batch(order_rng, num_examples, max_examples, batch_size, index)
    batch = gather_batch(dataset, jnp.where(valid, example_ids[positions], PADDING_ID))
    grads, batch_loss = grad_fn(state.params, frozen, batch, valid,
                                jax.random.fold_in(step_rng, index))
    if gradient is not None:
      grads = gradient(grads, state.params, trainable, client_input)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return ClientState(optax.apply_updates(state.params, updates), opt_state,
                       state.loss_sum + batch_loss, state.examples_seen + valid.sum(),
                       state.steps_done + 1)

  def finalize(state, trainable):
    delta = jax.tree.map(jnp.subtract, state.params, trainable)
    return ClientOutput(delta, state.loss_sum, state.examples_seen)

  return LocalTraining(num_steps, init, step, finalize)


def make_client_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                       num_epochs: int, batch_size: int, max_examples: int,
                       sample_dp: Optional[SampleDP] = None,
                       gradient: Optional[GradientHook] = None):
  """Returns `client_update(trainable, frozen, dataset, example_ids, num_examples, rng,
  client_input=None)`.

  `dataset` is a pytree of arrays with a leading example axis shared by all
  clients; `example_ids` [max_examples] indexes it (entries past
  `num_examples` are padding).
  """
  return make_local_training(loss_fn, optimizer, num_epochs=num_epochs,
                             batch_size=batch_size, max_examples=max_examples,
                             sample_dp=sample_dp, gradient=gradient).run


def sgd(learning_rate: float, momentum: float, weight_decay: float,
        nesterov: bool = True) -> optax.GradientTransformation:
  """The paper's client optimizer: SGD with coupled weight decay, as in PyTorch."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
