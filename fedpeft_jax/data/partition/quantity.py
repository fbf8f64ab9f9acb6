"""`quantity`: size skew with labels IID, `min_size` examples plus a share ~ Dir(alpha) of
the rest for every client."""
from __future__ import annotations

import numpy as np

from fedpeft_jax.data.partition import PARTITIONS
from fedpeft_jax.data.partition.base import (ALPHA, MIN_CLIENT_SIZE, PartitionSpec, Request,
                                             check_alpha, check_labels, check_min_size,
                                             sorted_parts)


def quantity(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
             min_size: int = 10) -> list[np.ndarray]:
  """Quantity skew: labels IID, client sizes skewed. Each client holds min_size examples
  plus a share ~ Dir(alpha) of the rest: small alpha gives a few large clients and many of
  about min_size, large alpha near-equal sizes. Raises UserError (argument 'alpha') for
  alpha <= 0, ('min_size') when the data cannot give every client min_size."""
  labels = check_labels(labels, num_clients)
  check_alpha(alpha)
  check_min_size(len(labels), num_clients, min_size, 'Quantity')
  rng = np.random.default_rng(seed)
  rest = len(labels) - num_clients * min_size
  cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * rest).astype(int)
  sizes = min_size + np.diff(np.concatenate([[0], cuts, [rest]]))
  order = rng.permutation(len(labels))
  return sorted_parts(np.split(order, np.cumsum(sizes)[:-1]))


def _split(request: Request, *, alpha: float, min_size: int) -> list[np.ndarray]:
  return quantity(request.labels, request.num_clients, alpha, request.seed, min_size)


PARTITIONS.register('quantity', PartitionSpec(
    split=_split, summary='size skew, labels IID: min_size plus a share ~ Dir(alpha)',
    options={'alpha': ALPHA, 'min_size': MIN_CLIENT_SIZE},
    min_client_size=lambda min_size: min_size))
