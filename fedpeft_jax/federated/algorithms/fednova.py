"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", Eq. 6-7): clients that take different numbers of
local steps would pull the model towards the clients that step most; FedNova divides
each update by its client's effective number of steps a_i before averaging, and scales
the average back by tau_eff = sum_i p_i a_i:

  x+ = x + tau_eff * sum_i p_i delta_i / a_i,   p_i the aggregator's weights.

a_i = ||a_i||_1 is the total weight the client's optimizer gives its gradients over its
tau_i local steps: tau_i for plain SGD; with heavy-ball momentum rho,
(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho) (the paper's Eq. 7's example); with
Nesterov momentum (optax's `nesterov=True`), tau + rho times that. Weight decay counts as
part of the gradient. The server's step needs per-client step counts beyond a noised
sum, so client-level DP is refused.

This file is the whole of FedNova: the worked example of README "Extending".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedpeft_jax.federated.algorithms import ALGORITHMS
from fedpeft_jax.federated.algorithms.base import Algorithm, AlgorithmSpec, ClientsDone


def effective_steps(num_steps, momentum: float = 0.0, nesterov: bool = False):
  """a_i of clients that took `num_steps` (int [clients]) local steps: float32 [clients]."""
  tau = num_steps.astype(jnp.float32)
  if not momentum:
    return tau
  heavy_ball = (tau - momentum * (1 - momentum**tau) / (1 - momentum)) / (1 - momentum)
  return tau + momentum * heavy_ball if nesterov else heavy_ball


def fednova(momentum: float = 0.0, nesterov: bool = False) -> Algorithm:
  """FedNova for clients whose optimizer has `momentum` (Nesterov's if `nesterov`)."""

  def normalised_steps(num_steps):
    # A client without steps is never aggregated; 1 keeps its division finite.
    return jnp.where(num_steps > 0, effective_steps(num_steps, momentum, nesterov), 1.0)

  def client_delta(delta, num_steps):
    a = normalised_steps(num_steps)
    return jax.tree.map(lambda d: d / a.astype(d.dtype), delta)

  def add_clients(sums, shared, done: ClientsDone):
    """Sums of p_i a_i and of p_i over the aggregated clients."""
    weighted_steps, weights = sums
    return (weighted_steps + jnp.sum(done.used(done.weight * normalised_steps(done.num_steps))),
            weights + jnp.sum(done.used(done.weight)))

  def finish(sums, mean_delta):
    weighted_steps, weights = sums
    tau_eff = weighted_steps / jnp.maximum(weights, 1e-12)
    return jax.tree.map(lambda d: d * tau_eff.astype(d.dtype), mean_delta), ()

  zero = lambda: jnp.zeros((), jnp.float32)
  return Algorithm(client_delta=client_delta, begin=lambda state: (zero(), zero()),
                   add_clients=add_clients, finish=finish)


def _arguments(config):
  return {'momentum': config.optim.momentum, 'nesterov': config.optim.nesterov}


ALGORITHMS.register('fednova', AlgorithmSpec(
    make=fednova, arguments=_arguments, dp_modes=('none', 'sample'),
    summary='updates normalised by each client\'s effective local steps'))
