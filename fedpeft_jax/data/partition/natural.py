"""`natural`: the clients the data names, one per distinct client id, in sorted order."""
from __future__ import annotations

import numpy as np

from fedpeft_jax import errors
from fedpeft_jax.data.partition import PARTITIONS
from fedpeft_jax.data.partition.base import PartitionSpec, Request, check_labels, sorted_parts


def natural(client_ids, num_clients: int) -> list[np.ndarray]:
  """The clients the data names: one part per distinct id, in sorted order of ids
  (`client_names`).

  num_clients must be the number of distinct ids: taking only some of them would
  silently drop data, and more cannot be made up. Raises UserError (argument
  'num_clients') otherwise, naming the first ids.
  """
  client_ids = check_labels(client_ids, num_clients)
  names, client_of, counts = np.unique(client_ids, return_inverse=True, return_counts=True)
  if len(names) != num_clients:
    shown = ', '.join(map(str, names[:5])) + (', ...' if len(names) > 5 else '')
    raise errors.UserError(
        f'the data holds {len(names)} clients ({shown}), not num_clients={num_clients}; '
        f'set num_clients={len(names)}.', argument='num_clients')
  by_client = np.argsort(client_of.ravel(), kind='stable')
  return sorted_parts(np.split(by_client, np.cumsum(counts)[:-1]))


def _split(request: Request) -> list[np.ndarray]:
  return natural(request.client_ids, request.num_clients)


PARTITIONS.register('natural', PartitionSpec(
    split=_split, summary='the clients the data names', seeded=False,
    min_client_size=lambda: 1,  # A client the data names holds an example at least.
    needs_client_ids=True))
