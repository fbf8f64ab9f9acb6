"""Server optimizers on the averaged client update (Reddi et al. 2021, "Adaptive
Federated Optimization"), as optax transformations.

The round hands the server optimizer the negative average delta as its gradient:
`sgd` at learning rate 1 is plain FedAvg and `momentum` FedAvgM (Hsu et al.
2019), both optax's `sgd`. `adam`, `yogi` and `adagrad` are the paper's FedAdam,
FedYogi and FedAdagrad exactly (its Algorithm 2), which optax's optimizers of
those names are not: no bias correction, the second moment starts at tau^2, and
tau (`eps`, 1e-3 by default) is added to its square root.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedpeft_jax import errors

SERVER_OPTIMIZERS = ('sgd', 'momentum', 'adam', 'yogi', 'adagrad')
# What `learning_rate=None` means: the adaptive optimizers step about learning_rate in
# every coordinate, whatever the size of the average update, so they need a small one.
DEFAULT_LEARNING_RATES = {'sgd': 1.0, 'momentum': 1.0, 'adam': 1e-2, 'yogi': 1e-2,
                          'adagrad': 1e-2}


class AdaptiveState(NamedTuple):
  first_moment: optax.Params
  second_moment: optax.Params


def _second_moment(kind: str, b2: float):
  """v_t from v_{t-1} and the update g: the one line in which the three differ."""
  if kind == 'adam':
    return lambda v, g: b2 * v + (1 - b2) * g**2
  if kind == 'yogi':
    return lambda v, g: v - (1 - b2) * g**2 * jnp.sign(v - g**2)
  return lambda v, g: v + g**2  # adagrad


def scale_by_adaptive_server(kind: str, b1: float, b2: float,
                             tau: float) -> optax.GradientTransformation:
  """m_t = b1 m + (1 - b1) g; v_t by `kind`; the update m_t / (sqrt(v_t) + tau)."""
  second_moment = _second_moment(kind, b2)

  def init(params):
    return AdaptiveState(optax.tree.zeros_like(params), optax.tree.full_like(params, tau**2))

  def update(updates, state, params=None):
    del params
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.first_moment, updates)
    v = jax.tree.map(second_moment, state.second_moment, updates)
    scaled = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
    return scaled, AdaptiveState(m, v)

  return optax.GradientTransformation(init, update)


def server_optimizer(name: str, learning_rate: float | None = None, *, momentum: float = 0.9,
                     b1: float = 0.9, b2: float = 0.99,
                     eps: float = 1e-3) -> optax.GradientTransformation:
  """The server optimizer called `name`; `learning_rate=None` is its default."""
  if name not in SERVER_OPTIMIZERS:
    raise errors.UserError(f'server optimizer {name!r}: use one of '
                           f'{", ".join(SERVER_OPTIMIZERS)}', argument='name')
  lr = DEFAULT_LEARNING_RATES[name] if learning_rate is None else learning_rate
  if name == 'sgd':
    return optax.sgd(lr)
  if name == 'momentum':
    return optax.sgd(lr, momentum=momentum)
  return optax.chain(scale_by_adaptive_server(name, b1, b2, eps), optax.scale(-lr))
