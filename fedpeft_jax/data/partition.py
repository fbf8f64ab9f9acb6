"""Splits of one dataset across federated clients, as index arrays."""
from __future__ import annotations

import numpy as np

from fedpeft_jax import errors

METHODS = ('iid', 'dirichlet')
_MAX_ATTEMPTS = 1000


def _check(labels, num_clients: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise errors.UserError(f'labels must be 1-D, got shape {labels.shape}.')
  if num_clients < 1:
    raise errors.UserError(f'num_clients must be >= 1, got {num_clients}.')
  return labels


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
  """Shuffles all examples and deals them into near-equal parts."""
  labels = _check(labels, num_clients)
  order = np.random.default_rng(seed).permutation(len(labels))
  return [np.sort(part).astype(np.int64)
          for part in np.array_split(order, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
              min_size: int = 10) -> list[np.ndarray]:
  """Label-skewed split: each class divided across clients ~ Dir(alpha).

  The scheme of Hsu et al. (2019) used throughout the FL literature: small
  alpha gives each client few classes, large alpha approaches `iid`. Draws are
  repeated until every client holds at least `min_size` examples.
  """
  labels = _check(labels, num_clients)
  if not alpha > 0:
    raise errors.UserError(f'Dirichlet alpha must be > 0, got {alpha}.')
  if min_size < 0:
    raise errors.UserError(f'min_size must be >= 0, got {min_size}.')
  incompatible = (f'cannot give each of num_clients={num_clients} clients '
                  f'min_size={min_size} of {len(labels)} examples')
  if len(labels) < num_clients * min_size:
    raise errors.UserError(f'Dirichlet partition {incompatible}; lower min_size or '
                     'num_clients.')
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  for _ in range(_MAX_ATTEMPTS):
    parts = [[] for _ in range(num_clients)]
    for c in classes:
      members = rng.permutation(np.flatnonzero(labels == c))
      shares = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
      for part, chunk in zip(parts, np.split(members, cuts)):
        part.append(chunk)
    parts = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    if min(len(p) for p in parts) >= min_size:
      return parts
  raise errors.UserError(f'Dirichlet partition with alpha={alpha} {incompatible} in '
                   f'{_MAX_ATTEMPTS} draws; raise alpha, or lower min_size or '
                   'num_clients.')


def partition(labels, *, method: str, num_clients: int, seed: int,
              alpha: float = 0.5, min_size: int = 10) -> list[np.ndarray]:
  """One index array per client; `alpha` and `min_size` are for dirichlet."""
  if method == 'iid':
    return iid(labels, num_clients, seed)
  if method == 'dirichlet':
    return dirichlet(labels, num_clients, alpha, seed, min_size)
  raise errors.UserError(f'Unknown partition method {method!r}; use one of {METHODS}.')
