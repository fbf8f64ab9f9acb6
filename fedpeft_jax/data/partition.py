"""Splits of one dataset across federated clients, as index arrays.

Every method is a pure function returning one sorted int64 index array per
client; the arrays are disjoint and together cover the data.
"""
from __future__ import annotations

import numpy as np

from fedpeft_jax import errors

METHODS = ('iid', 'dirichlet', 'shards', 'quantity', 'natural')
_MAX_ATTEMPTS = 1000


def _check(labels, num_clients: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise errors.UserError(f'labels must be 1-D, got shape {labels.shape}.')
  if num_clients < 1:
    raise errors.UserError(f'num_clients must be >= 1, got {num_clients}.',
                           argument='num_clients')
  return labels


def _check_min_size(num_examples: int, num_clients: int, min_size: int, method: str) -> None:
  if min_size < 0:
    raise errors.UserError(f'min_size must be >= 0, got {min_size}.', argument='min_size')
  if num_examples < num_clients * min_size:
    raise errors.UserError(
        f'{method} partition cannot give each of num_clients={num_clients} clients '
        f'min_size={min_size} of {num_examples} examples; lower min_size or num_clients.',
        argument='min_size')


def _sorted_parts(parts) -> list[np.ndarray]:
  return [np.sort(part).astype(np.int64) for part in parts]


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
  """Shuffles all examples and deals them into near-equal parts."""
  labels = _check(labels, num_clients)
  order = np.random.default_rng(seed).permutation(len(labels))
  return _sorted_parts(np.array_split(order, num_clients))


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
              min_size: int = 10) -> list[np.ndarray]:
  """Label-skewed split: each class divided across clients ~ Dir(alpha).

  The scheme of Hsu et al. (2019) used throughout the FL literature: small
  alpha gives each client few classes, large alpha approaches `iid`. Draws are
  repeated until every client holds at least `min_size` examples.
  """
  labels = _check(labels, num_clients)
  if not alpha > 0:
    raise errors.UserError(f'Dirichlet alpha must be > 0, got {alpha}.', argument='alpha')
  _check_min_size(len(labels), num_clients, min_size, 'Dirichlet')
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
    parts = _sorted_parts(np.concatenate(p) for p in parts)
    if min(len(p) for p in parts) >= min_size:
      return parts
  raise errors.UserError(
      f'Dirichlet partition with alpha={alpha} cannot give each of num_clients={num_clients} '
      f'clients min_size={min_size} of {len(labels)} examples in {_MAX_ATTEMPTS} draws; '
      'raise alpha, or lower min_size or num_clients.', argument='alpha')


def shards(labels: np.ndarray, num_clients: int, seed: int,
           shards_per_client: int = 2) -> list[np.ndarray]:
  """Pathological label skew of McMahan et al. (2017): examples sorted by label are cut
  into num_clients * shards_per_client near-equal shards, each client gets
  shards_per_client of them at random, so it sees about that many classes.

  Ties within a label are ordered at random, so a shard of a class is a random
  sample of it, not the first files of the dataset.
  """
  labels = _check(labels, num_clients)
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
  return _sorted_parts(np.concatenate([pieces[s] for s in own]) for own in dealt)


def quantity(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
             min_size: int = 10) -> list[np.ndarray]:
  """Quantity skew: labels IID, client sizes skewed. Each client holds min_size examples
  plus a share ~ Dir(alpha) of the rest: small alpha gives a few large clients and many of
  about min_size, large alpha near-equal sizes."""
  labels = _check(labels, num_clients)
  if not alpha > 0:
    raise errors.UserError(f'Dirichlet alpha must be > 0, got {alpha}.', argument='alpha')
  _check_min_size(len(labels), num_clients, min_size, 'Quantity')
  rng = np.random.default_rng(seed)
  rest = len(labels) - num_clients * min_size
  cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * rest).astype(int)
  sizes = min_size + np.diff(np.concatenate([[0], cuts, [rest]]))
  order = rng.permutation(len(labels))
  return _sorted_parts(np.split(order, np.cumsum(sizes)[:-1]))


def client_names(client_ids) -> np.ndarray:
  """The distinct client ids of the data, sorted: client k of `natural` holds the k-th."""
  return np.unique(np.asarray(client_ids))


def natural(client_ids, num_clients: int) -> list[np.ndarray]:
  """The clients the data names: one part per distinct id, in sorted order of ids.

  num_clients must be the number of distinct ids: taking only some of them would
  silently drop data, and more cannot be made up.
  """
  client_ids = _check(client_ids, num_clients)
  names, client_of, counts = np.unique(client_ids, return_inverse=True, return_counts=True)
  if len(names) != num_clients:
    shown = ', '.join(map(str, names[:5])) + (', ...' if len(names) > 5 else '')
    raise errors.UserError(
        f'the data holds {len(names)} clients ({shown}), not num_clients={num_clients}; '
        f'set num_clients={len(names)}.', argument='num_clients')
  by_client = np.argsort(client_of.ravel(), kind='stable')
  return _sorted_parts(np.split(by_client, np.cumsum(counts)[:-1]))


def label_histograms(labels, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
  """[clients, classes]: how many examples of each class every client holds."""
  labels = np.asarray(labels)
  return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def partition(labels, *, method: str, num_clients: int, seed: int, alpha: float = 0.5,
              min_size: int = 10, shards_per_client: int = 2,
              client_ids=None) -> list[np.ndarray]:
  """One index array per client. `alpha` is for dirichlet and quantity, `min_size` too,
  `shards_per_client` for shards, `client_ids` (one per example) for natural."""
  if method == 'iid':
    return iid(labels, num_clients, seed)
  if method == 'dirichlet':
    return dirichlet(labels, num_clients, alpha, seed, min_size)
  if method == 'shards':
    return shards(labels, num_clients, seed, shards_per_client)
  if method == 'quantity':
    return quantity(labels, num_clients, alpha, seed, min_size)
  if method == 'natural':
    if client_ids is None:
      raise errors.UserError('The natural partition needs client_ids, one per example.',
                             argument='client_ids')
    if len(client_ids) != len(labels):
      raise errors.UserError(f'{len(client_ids)} client_ids for {len(labels)} labels: give '
                             'one per example.', argument='client_ids')
    return natural(client_ids, num_clients)
  raise errors.UserError(f'Unknown partition method {method!r}; use one of {METHODS}.',
                         argument='method')
