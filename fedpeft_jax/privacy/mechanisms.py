"""Clipping and Gaussian noise on pytrees: pure functions, safe under jit and vmap."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedpeft_jax import errors


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip(tree, clip_norm):
  """Scales `tree` to global L2 norm at most `clip_norm`; returns (clipped, norm)."""
  norm = global_norm(tree)
  # Never divide by a zero norm; a tree already within the bound is left exactly as is.
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
  return jax.tree.map(lambda x: (x * scale).astype(x.dtype), tree), norm


def gaussian_noise(rng, tree, stddev):
  """Independent N(0, stddev^2) noise shaped like `tree`, one key per leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  rngs = jax.random.split(rng, len(leaves))
  return jax.tree.unflatten(treedef, [
      stddev * jax.random.normal(r, x.shape, jnp.float32) for r, x in zip(rngs, leaves)])


def add_noise(rng, tree, stddev):
  return jax.tree.map(lambda x, n: (x + n).astype(x.dtype), tree,
                      gaussian_noise(rng, tree, stddev))


def adaptive_delta_noise_multiplier(noise_multiplier: float,
                                    clipped_count_stddev: float) -> float:
  """Noise multiplier left for the updates when the clip count also takes its share.

  Andrew et al. (2021), Theorem 1: releasing the noised sum of updates with
  multiplier z_delta and the noised sum of centred indicators b_i - 1/2 (an
  unclipped client's 1/2, a clipped one's -1/2: sensitivity 1/2) with stddev
  sigma_b is as private as one Gaussian mechanism with multiplier z where
  z^-2 = z_delta^-2 + (2 sigma_b)^-2.
  """
  remaining = noise_multiplier ** -2 - (2 * clipped_count_stddev) ** -2
  if remaining <= 0:
    raise errors.UserError(
        f'clipped_count_stddev={clipped_count_stddev} is too small for '
        f'noise_multiplier={noise_multiplier}: it must exceed '
        f'{noise_multiplier / 2:.4g} (noise_multiplier / 2)', argument='clipped_count_stddev')
  return remaining ** -0.5
