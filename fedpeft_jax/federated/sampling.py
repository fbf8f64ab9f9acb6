"""Who takes part in a round: the cohort, drawn on device from the round's key."""
from __future__ import annotations

import jax
import jax.numpy as jnp

SAMPLINGS = ('fixed', 'poisson')


def sample_clients(rng, num_clients: int, clients_per_round: int):
  """Uniform sampling without replacement: int32 [clients_per_round]."""
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
