"""`shards`: pathological label skew of McMahan et al. (2017), `shards_per_client` shards of
the examples sorted by label for every client."""
from __future__ import annotations

import numpy as np

from fedpeft_jax import errors
from fedpeft_jax.data.partition import PARTITIONS
from fedpeft_jax.data.partition.base import (Option, PartitionSpec, Request, at_least,
                                             check_labels, sorted_parts)


def shards(labels: np.ndarray, num_clients: int, seed: int,
           shards_per_client: int = 2) -> list[np.ndarray]:
  """Pathological label skew of McMahan et al. (2017): examples sorted by label are cut
  into num_clients * shards_per_client near-equal shards, each client gets
  shards_per_client of them at random, so it sees about that many classes.

  Ties within a label are ordered at random, so a shard of a class is a random
  sample of it, not the first files of the dataset. Raises UserError (argument
  'shards_per_client') when it is < 1 or there are more shards than examples.
  """
  labels = check_labels(labels, num_clients)
  if shards_per_client < 1:
    raise errors.UserError(f'shards_per_client must be >= 1, got {shards_per_client}.',
                           argument='shards_per_client')
  num_shards = num_clients * shards_per_client
  if num_shards > len(labels):
    raise errors.UserError(
        f'num_clients={num_clients} x shards_per_client={shards_per_client} = {num_shards} '
        f'shards, more than the {len(labels)} examples; lower shards_per_client or '
        'num_clients.', argument='shards_per_client')
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(labels))
  order = order[np.argsort(labels[order], kind='stable')]
  pieces = np.array_split(order, num_shards)
  dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return sorted_parts(np.concatenate([pieces[s] for s in own]) for own in dealt)


def _split(request: Request, *, shards_per_client: int) -> list[np.ndarray]:
  return shards(request.labels, request.num_clients, request.seed, shards_per_client)


PARTITIONS.register('shards', PartitionSpec(
    split=_split, summary='label skew: shards_per_client shards of the examples sorted by label',
    options={'shards_per_client': Option('data.shards_per_client', 2, at_least(1))},
    # No more shards than examples: every shard holds one at least.
    min_client_size=lambda shards_per_client: shards_per_client))
