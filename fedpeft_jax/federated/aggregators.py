"""How the server turns client updates into one update: small, composable pieces.

An aggregator maps each client's delta to a contribution and a weight
(vmapped, inside the round), and the sums of those to the mean update
(`finalize`). Keeping the per-client part separate lets the round scan over
client chunks holding only running sums, never every client's update.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedpeft_jax.privacy import mechanisms

PyTree = Any


class Contribution(NamedTuple):
  delta: PyTree
  weight: jax.Array
  unclipped: jax.Array  # 1.0 where the update was within the clip norm.


class Aggregate(NamedTuple):
  mean_delta: PyTree
  state: PyTree
  metrics: dict
  # False: nothing to apply, the server keeps its model and optimizer state as they were.
  released: jax.Array


class Aggregator(NamedTuple):
  init: Callable[[], PyTree]
  # (delta, num_examples, state) -> Contribution, for one client.
  contribute: Callable[[PyTree, jax.Array, PyTree], Contribution]
  # (sum of Contributions, number of contributors, state, rng) -> Aggregate.
  finalize: Callable[[Contribution, jax.Array, PyTree, jax.Array], Aggregate]


def _safe_mean(tree, total):
  return jax.tree.map(lambda x: x / jnp.maximum(total, 1e-12), tree)


def weighted_mean(by_examples: bool = True) -> Aggregator:
  """FedAvg: the mean of the deltas weighted by example count (or uniformly)."""

  def contribute(delta, num_examples, state):
    weight = num_examples.astype(jnp.float32) if by_examples else jnp.ones((), jnp.float32)
    return Contribution(jax.tree.map(lambda d: weight * d, delta), weight,
                        jnp.ones((), jnp.float32))

  def finalize(total, count, state, rng):
    # Nothing to apply unless some weight was aggregated: a round of only zero-weight
    # updates leaves the model and the server optimizer's state as they were.
    released = (count > 0) & (total.weight > 0)
    return Aggregate(_safe_mean(total.delta, total.weight), state, {}, released)

  return Aggregator(lambda: (), contribute, finalize)


class ClipState(NamedTuple):
  clip_norm: jax.Array


def dp_fedavg(*, clip_norm: float, noise_multiplier: float, expected_clients: float,
              adaptive: bool = False, target_quantile: float = 0.5,
              clip_learning_rate: float = 0.2, clipped_count_stddev: float = 0.0) -> Aggregator:
  """Client-level DP-FedAvg (McMahan et al. 2018), optionally with adaptive clipping.

  Every update is clipped to `clip_norm` and weighted uniformly: weighting by
  example count would let one client's data move the sum by more than the clip
  norm and void the bound. Gaussian noise of stddev noise_multiplier * clip_norm
  is added to the sum, which is divided by the expected (not the realised)
  number of clients so the divisor reveals nothing.

  With `adaptive`, the clip norm tracks the `target_quantile` of update norms
  (Andrew et al. 2021): the noised fraction of unclipped clients drives a
  geometric update of the norm, and the update noise is raised so that both
  releases together spend exactly `noise_multiplier`.

  Every round releases its noised aggregate, even one to which no client
  contributed: skipping it would reveal that nobody did.
  """
  delta_multiplier = noise_multiplier
  if adaptive and noise_multiplier > 0:
    delta_multiplier = mechanisms.adaptive_delta_noise_multiplier(
        noise_multiplier, clipped_count_stddev)

  def contribute(delta, num_examples, state):
    clipped, norm = mechanisms.clip(delta, state.clip_norm)
    return Contribution(clipped, jnp.ones((), jnp.float32),
                        (norm <= state.clip_norm).astype(jnp.float32))

  def finalize(total, count, state, rng):
    delta_rng, count_rng = jax.random.split(rng)
    noised = mechanisms.add_noise(delta_rng, total.delta, delta_multiplier * state.clip_norm)
    metrics = {'clip_norm': state.clip_norm,
               'clipped_fraction': 1.0 - total.unclipped / jnp.maximum(count, 1)}
    if adaptive:
      # The noise goes on the centred indicators b_i - 1/2, sensitivity 1/2, the count the
      # noise split assumes; the public expected_clients / 2 is added back afterwards.
      noisy_centred = (total.unclipped - count / 2
                       + clipped_count_stddev * jax.random.normal(count_rng))
      fraction = noisy_centred / expected_clients + 0.5
      state = ClipState(state.clip_norm * jnp.exp(
          -clip_learning_rate * (fraction - target_quantile)))
    mean = jax.tree.map(lambda x: x / expected_clients, noised)
    return Aggregate(mean, state, metrics, jnp.ones((), bool))

  return Aggregator(lambda: ClipState(jnp.asarray(clip_norm, jnp.float32)), contribute,
                    finalize)
