"""Client-level DP-FedAvg (McMahan et al. 2018) with optional adaptive clipping (Andrew et
al. 2021): every update clipped, the sum noised, divided by a public expected count."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedpeft_jax.federated.aggregators import AGGREGATORS
from fedpeft_jax.federated.aggregators.base import Aggregate, Aggregator, AggregatorSpec
from fedpeft_jax.privacy import mechanisms


class DPContribution(NamedTuple):
  delta: Any  # The clipped update.
  weight: jax.Array  # 1: uniform, so one client moves the sum by at most the clip norm.
  unclipped: jax.Array  # 1.0 where the update was within the clip norm.


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
    return DPContribution(clipped, jnp.ones((), jnp.float32),
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


def expected_reporters(config) -> float:
  """The expected number of clients that report a round: fl.clients_per_round sampled (the
  expected cohort under Poisson sampling too), each dropping out with fl.dropout_prob.

  DP-FedAvg divides its noised sum by this, so the mean step is the survivors' mean in
  expectation (dividing by fl.clients_per_round would shrink every update by
  1 - fl.dropout_prob). It is computed from public config values only: no privacy cost.
  """
  return config.fl.clients_per_round * (1.0 - config.fl.dropout_prob)


def clipped_count_stddev(config) -> float:
  """`dp.clipped_count_stddev`, or Andrew et al.'s default: the expected clients / 20."""
  if config.dp.clipped_count_stddev is not None:
    return config.dp.clipped_count_stddev
  return config.fl.clients_per_round / 20


def _arguments(config, privacy) -> dict:
  dp = config.dp
  return dict(clip_norm=dp.clip_norm, noise_multiplier=privacy.noise_multiplier,
              expected_clients=expected_reporters(config), adaptive=dp.adaptive_clip,
              target_quantile=dp.target_quantile, clip_learning_rate=dp.clip_lr,
              clipped_count_stddev=clipped_count_stddev(config))


AGGREGATORS.register('dp_fedavg', AggregatorSpec(
    make=dp_fedavg, arguments=_arguments, dp_modes=('client',),
    summary='clipped, noised sum over the expected reporters (client-level DP)'))
