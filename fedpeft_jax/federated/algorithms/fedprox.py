"""FedProx (Li et al. 2020): (mu / 2) ||w - w_global||^2 added to every local step's loss
over the trainable tree, i.e. mu (w - w_global) added to its gradient (after DP-SGD's
noise: the term holds no data).

The proximal term composes with any algorithm (`with_proximal_term`, applied by the
build whenever `fl.prox_mu` > 0); `fl.algorithm=fedprox` is FedAvg with it and insists
on a positive mu.
"""
from __future__ import annotations

import jax

from fedpeft_jax import errors
from fedpeft_jax.federated.algorithms import ALGORITHMS
from fedpeft_jax.federated.algorithms.base import Algorithm, AlgorithmSpec


def with_proximal_term(algorithm: Algorithm, prox_mu: float) -> Algorithm:
  """`algorithm` whose local gradients first get mu (w - w_global). Raises `UserError`
  (argument 'prox_mu') for mu < 0; mu = 0 returns `algorithm` unchanged."""
  if prox_mu < 0:
    raise errors.UserError(f'prox_mu={prox_mu}: must be >= 0 (0 is FedAvg)',
                           argument='prox_mu')
  if not prox_mu:
    return algorithm
  inner = algorithm.gradient

  def gradient(grads, params, global_params, client_input):
    grads = jax.tree.map(lambda g, w, w0: g + prox_mu * (w - w0), grads, params,
                         global_params)
    return inner(grads, params, global_params, client_input)

  return algorithm._replace(gradient=gradient)


def _check(config):
  if config.fl.prox_mu <= 0:
    return 'fl.prox_mu', 'fl.algorithm=fedprox needs fl.prox_mu > 0, e.g. 0.01'
  return None


ALGORITHMS.register('fedprox', AlgorithmSpec(
    make=Algorithm, summary='FedAvg with the proximal term fl.prox_mu', check=_check))
