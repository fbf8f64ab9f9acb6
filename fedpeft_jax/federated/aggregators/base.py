"""How the server turns client updates into one update: the aggregator's contract.

An aggregator maps each client's delta to a contribution (vmapped, inside the round),
and the sums of those to the mean update (`finalize`). Keeping the per-client part
separate lets the round scan over client chunks holding only running sums, never every
client's update. Each aggregator owns its contribution pytree; the round reads only its
`weight` field (a client of weight 0 is not aggregated).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class Aggregate(NamedTuple):
  mean_delta: PyTree
  state: PyTree
  metrics: dict
  # False: nothing to apply, the server keeps its model and optimizer state as they were.
  released: jax.Array


class Aggregator(NamedTuple):
  init: Callable[[], PyTree]
  # (delta, num_examples, state) -> contribution, for one client: a pytree with a scalar
  # float32 `weight` field.
  contribute: Callable[[PyTree, jax.Array, PyTree], Any]
  # (sum of contributions, number of contributors, state, rng) -> Aggregate.
  finalize: Callable[[Any, jax.Array, PyTree, jax.Array], Aggregate]


class AggregatorSpec(NamedTuple):
  """A registered aggregator: `make(**arguments(config, privacy))` (privacy: the run's
  `accounting.PrivacySpec` or None); the `dp.mode`s it serves (client-level DP needs an
  aggregator that bounds and noises the sum)."""
  make: Callable[..., Aggregator]
  summary: str
  arguments: Callable[[Any, Any], dict] = lambda config, privacy: {}
  dp_modes: tuple[str, ...] = ('none', 'sample')


def safe_mean(tree, total):
  return jax.tree.map(lambda x: x / jnp.maximum(total, 1e-12), tree)
