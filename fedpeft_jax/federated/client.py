"""Local training of one client: E epochs of minibatch SGD on its examples.

Every client is padded to the same number of examples so that one compiled
function (and its vmap over clients) serves all clients and rounds: padded
positions are masked out of the loss, and steps with no real example leave
parameters and optimizer state untouched.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
# loss_fn(trainable, frozen, batch, rng) -> per-example losses [batch_size].
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], jax.Array]


class ClientOutput(NamedTuple):
  delta: PyTree  # Trained minus initial trainable parameters.
  loss_sum: jax.Array  # Sum of per-example training losses over all steps.
  examples_seen: jax.Array  # Number of real (unpadded) examples processed.


def epoch_batches(rng, num_examples, max_examples: int, batch_size: int):
  """A shuffled order of one epoch, real examples first, cut into batches.

  Returns positions [steps, batch_size] into the client's (padded) example list
  and a validity mask of the same shape. Each position's sort key is drawn from
  its own folded key, so the order of the real examples (and so the training)
  does not depend on how much padding the client got.
  """
  steps = math.ceil(max_examples / batch_size)
  scores = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i)))(
      jnp.arange(max_examples))
  scores = jnp.where(jnp.arange(max_examples) < num_examples, scores, 2.0)
  order = jnp.argsort(scores)
  order = jnp.pad(order, (0, steps * batch_size - max_examples))
  valid = jnp.arange(steps * batch_size) < num_examples
  return order.reshape(steps, batch_size), valid.reshape(steps, batch_size)


def make_client_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                       num_epochs: int, batch_size: int, max_examples: int):
  """Returns `client_update(trainable, frozen, dataset, example_ids, num_examples, rng)`.

  `dataset` is a pytree of arrays with a leading example axis shared by all
  clients; `example_ids` [max_examples] indexes it (entries past
  `num_examples` are padding).
  """

  def masked_mean_loss(trainable, frozen, batch, valid, rng):
    losses = loss_fn(trainable, frozen, batch, rng)
    total = jnp.sum(jnp.where(valid, losses, 0.0))
    return total / jnp.maximum(valid.sum(), 1), total

  grad_fn = jax.grad(masked_mean_loss, has_aux=True)

  def client_update(trainable, frozen, dataset, example_ids, num_examples, rng):
    epoch_rngs = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(num_epochs))
    order_rngs, step_rngs = jax.vmap(jax.random.split, out_axes=1)(epoch_rngs)
    positions, valid = jax.vmap(epoch_batches, in_axes=(0, None, None, None))(
        order_rngs, num_examples, max_examples, batch_size)
    steps_per_epoch = positions.shape[1]
    # Keys folded from (epoch, step): independent of the padded step count.
    step_rngs = jax.vmap(lambda r: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        r, jnp.arange(steps_per_epoch)))(step_rngs)
    positions = positions.reshape(-1, batch_size)
    valid = valid.reshape(-1, batch_size)
    step_rngs = step_rngs.reshape(-1)

    def step(carry, inputs):
      params, opt_state, loss_sum = carry
      batch_positions, batch_valid, rng = inputs
      ids = example_ids[batch_positions]
      batch = jax.tree.map(lambda x: x[ids], dataset)
      grads, batch_loss = grad_fn(params, frozen, batch, batch_valid, rng)
      updates, new_opt_state = optimizer.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      # A step made only of padding must not move momentum or weight decay.
      keep = lambda new, old: jnp.where(batch_valid.any(), new, old)
      params = jax.tree.map(keep, new_params, params)
      opt_state = jax.tree.map(keep, new_opt_state, opt_state)
      return (params, opt_state, loss_sum + batch_loss), None

    init = (trainable, optimizer.init(trainable), jnp.zeros((), jnp.float32))
    (trained, _, loss_sum), _ = jax.lax.scan(step, init, (positions, valid, step_rngs))
    delta = jax.tree.map(jnp.subtract, trained, trainable)
    return ClientOutput(delta, loss_sum, valid.sum())

  return client_update


def sgd(learning_rate: float, momentum: float, weight_decay: float,
        nesterov: bool = True) -> optax.GradientTransformation:
  """The paper's client optimizer: SGD with coupled weight decay, as in PyTorch."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
