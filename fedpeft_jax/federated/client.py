"""Local training of one client: E epochs of minibatch SGD on its examples.

Every client is padded to the same number of examples so that one compiled
function (and its vmap over clients) serves all clients and rounds: padded
positions are masked out of the loss, and a client runs only the steps its own
examples fill.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedpeft_jax.privacy import mechanisms

PyTree = Any
# loss_fn(trainable, frozen, batch, rng) -> per-example losses [batch_size].
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], jax.Array]


class ClientOutput(NamedTuple):
  delta: PyTree  # Trained minus initial trainable parameters.
  loss_sum: jax.Array  # Sum of per-example training losses over all steps.
  examples_seen: jax.Array  # Number of real (unpadded) examples processed.


class SampleDP(NamedTuple):
  """Local DP-SGD: per-example clipping and Gaussian noise at every step."""
  clip_norm: float
  noise_multiplier: float


def _sort_keys(rng, max_examples: int, num_examples):
  """Random sort keys, real examples first. Each position's key is folded from its
  index, so the order of the real examples does not depend on the padding."""
  scores = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i)))(
      jnp.arange(max_examples))
  return jnp.where(jnp.arange(max_examples) < num_examples, scores, 2.0)


def epoch_batches(rng, num_examples, max_examples: int, batch_size: int):
  """A shuffled epoch cut into batches: positions [steps, batch_size] into the
  client's padded example list, and their validity mask."""
  steps = math.ceil(max_examples / batch_size)
  order = jnp.argsort(_sort_keys(rng, max_examples, num_examples))
  order = jnp.pad(order, (0, steps * batch_size - max_examples))
  valid = jnp.arange(steps * batch_size) < num_examples
  return order.reshape(steps, batch_size), valid.reshape(steps, batch_size)


def sampled_batches(rng, num_examples, max_examples: int, batch_size: int):
  """An epoch's worth of steps, each a uniform draw of min(batch_size, n) of the
  client's n examples without replacement: the sampling DP-SGD accounts for.
  Steps past ceil(n / batch_size) are all padding."""
  steps = math.ceil(max_examples / batch_size)
  width = min(batch_size, max_examples)

  def draw(step):
    order = jnp.argsort(_sort_keys(jax.random.fold_in(rng, step), max_examples,
                                   num_examples))[:width]
    return jnp.pad(order, (0, batch_size - width))

  positions = jax.vmap(draw)(jnp.arange(steps))
  real_steps = (num_examples + batch_size - 1) // batch_size
  valid = (jnp.arange(batch_size)[None] < jnp.minimum(num_examples, batch_size)) & (
      jnp.arange(steps)[:, None] < real_steps)
  return positions, valid


def make_client_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                       num_epochs: int, batch_size: int, max_examples: int,
                       sample_dp: Optional[SampleDP] = None):
  """Returns `client_update(trainable, frozen, dataset, example_ids, num_examples, rng)`.

  `dataset` is a pytree of arrays with a leading example axis shared by all
  clients; `example_ids` [max_examples] indexes it (entries past
  `num_examples` are padding).
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
    clipped, _ = jax.vmap(mechanisms.clip, in_axes=(0, None))(grads, sample_dp.clip_norm)
    mask = valid.astype(jnp.float32)
    summed = jax.tree.map(lambda g: jnp.tensordot(mask, g, axes=1), clipped)
    noised = mechanisms.add_noise(noise_rng, summed,
                                  sample_dp.noise_multiplier * sample_dp.clip_norm)
    # The fixed batch size, not the count of real examples, keeps the noise scale public.
    return jax.tree.map(lambda g: g / batch_size, noised), jnp.sum(losses * mask)

  grad_fn = private_grads if sample_dp else mean_grads
  make_batches = sampled_batches if sample_dp else epoch_batches

  def client_update(trainable, frozen, dataset, example_ids, num_examples, rng):
    epoch_rngs = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(num_epochs))
    order_rngs, step_rngs = jax.vmap(jax.random.split, out_axes=1)(epoch_rngs)
    positions, valid = jax.vmap(make_batches, in_axes=(0, None, None, None))(
        order_rngs, num_examples, max_examples, batch_size)
    # Only this client's real steps run: under vmap the loop lasts as long as the
    # chunk's largest client needs, not as long as the largest client overall.
    steps_per_epoch = (num_examples + batch_size - 1) // batch_size

    def step(t, carry):
      params, opt_state, loss_sum = carry
      epoch, index = t // steps_per_epoch, t % steps_per_epoch
      batch_valid = valid[epoch, index]
      batch = jax.tree.map(lambda x: x[example_ids[positions[epoch, index]]], dataset)
      # Keys folded from (epoch, step): independent of the client's padding.
      step_rng = jax.random.fold_in(step_rngs[epoch], index)
      grads, batch_loss = grad_fn(params, frozen, batch, batch_valid, step_rng)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss_sum + batch_loss

    init = (trainable, optimizer.init(trainable), jnp.zeros((), jnp.float32))
    trained, _, loss_sum = jax.lax.fori_loop(0, num_epochs * steps_per_epoch, step, init)
    delta = jax.tree.map(jnp.subtract, trained, trainable)
    return ClientOutput(delta, loss_sum, valid.sum())

  return client_update


def sgd(learning_rate: float, momentum: float, weight_decay: float,
        nesterov: bool = True) -> optax.GradientTransformation:
  """The paper's client optimizer: SGD with coupled weight decay, as in PyTorch."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
