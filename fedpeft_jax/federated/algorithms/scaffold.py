"""SCAFFOLD (Karimireddy et al. 2020) with option II control variates.

Every local gradient is corrected by c - c_i; after K local steps a used client's
variate becomes c_i - c + (x - y_i) / (K * local_learning_rate). Only the clients'
variates c_i are kept ([num_clients, ...] on each trainable leaf, zero until a client
has trained: the paper's initialisation); the server's c is their mean, which the
paper's update of c, by (1 / N) times the sum of the changes, keeps it from the zero
start. Dropped clients, clients without examples and NaN updates keep their variate.
Both directions carry two trees (model and c down; update and change of c_i up).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedpeft_jax.federated.algorithms import ALGORITHMS
from fedpeft_jax.federated.algorithms.base import Algorithm, AlgorithmSpec, ClientsDone
from fedpeft_jax.federated.schedules import by_lane


def scaffold(local_learning_rate: float) -> Algorithm:
  """SCAFFOLD whose clients step `local_learning_rate` per unit of gradient (plain SGD's
  learning rate; lr / (1 - momentum) for momentum SGD once its momentum builds up)."""

  def init(trainable, num_clients):
    return jax.tree.map(lambda x: jnp.zeros((num_clients,) + x.shape, x.dtype), trainable)

  def client_input(state, server_variate, client):
    return jax.tree.map(lambda c, c_all: c - c_all[client], server_variate, state)

  def gradient(grads, params, global_params, correction):
    return jax.tree.map(jnp.add, grads, correction)

  def add_clients(variates, server_variate, done: ClientsDone):
    """c_i+ - c_i = -c - delta_i / (K_i * lr), added at the used clients' rows (an add,
    not a set: padding lanes repeat an id and add zero to it)."""
    steps = done.num_steps
    scale = 1.0 / (jnp.maximum(steps, 1) * local_learning_rate)
    # A client without examples took no step and keeps its variate.
    changes = jax.tree.map(
        lambda d, c: jnp.where(by_lane(steps > 0, d), -c - by_lane(scale, d) * d, 0),
        done.delta, server_variate)
    return jax.tree.map(lambda c, c_all: c_all.at[done.ids].add(done.used(c)), changes,
                        variates)

  return Algorithm(init=init, round_input=lambda state: jax.tree.map(
      lambda c_all: c_all.mean(0), state), client_input=client_input, gradient=gradient,
                   add_clients=add_clients)


def _arguments(config):
  # Option II reads the average gradient off the update as (x - y) / (K * lr), for plain
  # SGD; momentum SGD steps lr / (1 - momentum) per gradient once its momentum builds up.
  return {'local_learning_rate': config.optim.lr / (1 - config.optim.momentum)}


ALGORITHMS.register('scaffold', AlgorithmSpec(
    make=scaffold, arguments=_arguments, trees_per_transfer=2, dp_modes=('none', 'sample'),
    summary='control variates correct every local gradient (option II)'))
