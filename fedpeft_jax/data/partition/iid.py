"""`iid`: every client a random, near-equal share of the examples."""
from __future__ import annotations

import numpy as np

from fedpeft_jax.data.partition import PARTITIONS
from fedpeft_jax.data.partition.base import PartitionSpec, Request, check_labels, sorted_parts


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
  """Shuffles all examples and deals them into near-equal parts (sizes differ by at most
  one; a client is empty when there are fewer examples than clients)."""
  labels = check_labels(labels, num_clients)
  order = np.random.default_rng(seed).permutation(len(labels))
  return sorted_parts(np.array_split(order, num_clients))


def _split(request: Request) -> list[np.ndarray]:
  return iid(request.labels, request.num_clients, request.seed)


PARTITIONS.register('iid', PartitionSpec(split=_split, summary='a random, near-equal share'))
