"""FedAdam, FedYogi and FedAdagrad exactly as Reddi et al. 2021 (Algorithm 2) write them,
which optax's optimizers of those names are not: no bias correction, the second moment
starts at tau^2, and tau (`eps`, 1e-3 by default) is added to its square root."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedpeft_jax.federated.server_optimizers import SERVER_OPTIMIZERS_REGISTRY, ServerOptimizerSpec


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


def _make(kind: str):
  return lambda lr, b1, b2, eps, **options: optax.chain(
      scale_by_adaptive_server(kind, b1, b2, eps), optax.scale(-lr))


for _kind, _summary in (('adam', 'FedAdam'), ('yogi', 'FedYogi'), ('adagrad', 'FedAdagrad')):
  SERVER_OPTIMIZERS_REGISTRY.register(_kind, ServerOptimizerSpec(
      _make(_kind), 1e-2, f'{_summary} (Reddi et al. 2021, Algorithm 2)'))
