"""`dirichlet`: label skew of Hsu et al. (2019), each class divided among the clients
~ Dir(alpha), redrawn until every client holds `min_size` examples."""
from __future__ import annotations

import numpy as np

from fedpeft_jax import errors
from fedpeft_jax.data.partition import PARTITIONS
from fedpeft_jax.data.partition.base import (ALPHA, MIN_CLIENT_SIZE, PartitionSpec, Request,
                                             check_alpha, check_labels, check_min_size,
                                             sorted_parts)

MAX_ATTEMPTS = 1000


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
              min_size: int = 10) -> list[np.ndarray]:
  """Label-skewed split: each class divided across clients ~ Dir(alpha).

  The scheme of Hsu et al. (2019) used throughout the FL literature: small
  alpha gives each client few classes, large alpha approaches `iid`. Draws are
  repeated until every client holds at least `min_size` examples. Raises UserError
  (argument 'alpha') for alpha <= 0 or when MAX_ATTEMPTS draws all leave a client
  smaller, ('min_size') when the data cannot give every client min_size.
  """
  labels = check_labels(labels, num_clients)
  check_alpha(alpha)
  check_min_size(len(labels), num_clients, min_size, 'Dirichlet')
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  for _ in range(MAX_ATTEMPTS):
    parts = [[] for _ in range(num_clients)]
    for c in classes:
      members = rng.permutation(np.flatnonzero(labels == c))
      shares = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
      for part, chunk in zip(parts, np.split(members, cuts)):
        part.append(chunk)
    parts = sorted_parts(np.concatenate(p) for p in parts)
    if min(len(p) for p in parts) >= min_size:
      return parts
  raise errors.UserError(
      f'Dirichlet partition with alpha={alpha} cannot give each of num_clients={num_clients} '
      f'clients min_size={min_size} of {len(labels)} examples in {MAX_ATTEMPTS} draws; '
      'raise alpha, or lower min_size or num_clients.', argument='alpha')


def _split(request: Request, *, alpha: float, min_size: int) -> list[np.ndarray]:
  return dirichlet(request.labels, request.num_clients, alpha, request.seed, min_size)


PARTITIONS.register('dirichlet', PartitionSpec(
    split=_split, summary='label skew: each class divided among the clients ~ Dir(alpha)',
    options={'alpha': ALPHA, 'min_size': MIN_CLIENT_SIZE},
    min_client_size=lambda min_size: min_size))
