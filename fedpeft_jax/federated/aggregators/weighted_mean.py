"""FedAvg's aggregation: the mean of the deltas weighted by example count ('weighted',
McMahan et al. 2017) or uniformly ('uniform')."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedpeft_jax.federated.aggregators import AGGREGATORS
from fedpeft_jax.federated.aggregators.base import Aggregate, Aggregator, AggregatorSpec, safe_mean


class MeanContribution(NamedTuple):
  delta: Any  # weight * delta
  weight: jax.Array


def weighted_mean(by_examples: bool = True) -> Aggregator:
  """sum_i w_i delta_i / sum_i w_i, w_i = n_i (or 1). A round whose weights sum to 0
  releases nothing: the model and the server optimizer's state stay as they were."""

  def contribute(delta, num_examples, state):
    weight = num_examples.astype(jnp.float32) if by_examples else jnp.ones((), jnp.float32)
    return MeanContribution(jax.tree.map(lambda d: weight * d, delta), weight)

  def finalize(total, count, state, rng):
    released = (count > 0) & (total.weight > 0)
    return Aggregate(safe_mean(total.delta, total.weight), state, {}, released)

  return Aggregator(lambda: (), contribute, finalize)


AGGREGATORS.register('weighted', AggregatorSpec(
    make=lambda: weighted_mean(True), summary='mean weighted by example count'))
AGGREGATORS.register('uniform', AggregatorSpec(
    make=lambda: weighted_mean(False), summary='unweighted mean over the reporting clients'))
