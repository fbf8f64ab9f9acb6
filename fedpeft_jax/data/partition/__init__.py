"""Splits of one dataset across federated clients, as index arrays, by name
(`PARTITIONS`): each file here registers one.

Every partition is a pure function returning one sorted int64 index array per client;
the arrays are disjoint and together cover the data. Registered: `iid`, `dirichlet`
(label skew, Hsu et al. 2019), `shards` (label skew, McMahan et al. 2017), `quantity`
(size skew) and `natural` (the clients the data names). Each declares its config keys
with their defaults and checks, the floor of its clients' sizes and whether it needs the
data's client ids (`base.PartitionSpec`).

Adding a partition is adding a file that calls `PARTITIONS.register(name,
PartitionSpec(...))` (README "Extending"). The package also keeps each method's own
function under its name (`partition.dirichlet(labels, ...)`), which hides the module of
the same name: reach a method through `PARTITIONS.get(name)`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from fedpeft_jax import errors
from fedpeft_jax import registry
from fedpeft_jax.data.partition.base import (Option, PartitionSpec, Request, client_names,
                                             label_histograms)

PARTITIONS: registry.Registry[PartitionSpec] = registry.Registry('partition',
                                                                 argument='method')

registry.import_all(__name__, __path__)

# pylint: disable=wrong-import-position
from fedpeft_jax.data.partition.dirichlet import dirichlet  # noqa: E402
from fedpeft_jax.data.partition.iid import iid  # noqa: E402
from fedpeft_jax.data.partition.natural import natural  # noqa: E402
from fedpeft_jax.data.partition.quantity import quantity  # noqa: E402
from fedpeft_jax.data.partition.shards import shards  # noqa: E402

METHODS = PARTITIONS.names()


def option_defaults() -> dict[str, Any]:
  """Every registered partition's config keys -> their defaults, each key once, e.g.
  {'data.alpha': 0.1, 'data.min_client_size': 10, 'data.shards_per_client': 2}: what
  `configs.base_config` holds. Raises ValueError for a key outside `data.`, or one that two
  partitions declare with different defaults."""
  defaults: dict[str, Any] = {}
  for name, spec in PARTITIONS.items():
    for option in spec.options.values():
      if not option.key.startswith('data.') or option.key.count('.') != 1:
        raise ValueError(f'partition {name!r} declares the config key {option.key!r}; '
                         "a partition's keys are data.<name>")
      if defaults.setdefault(option.key, option.default) != option.default:
        raise ValueError(f'partition {name!r} declares {option.key} with default '
                         f'{option.default!r}, another partition {defaults[option.key]!r}')
  return defaults


def partition(labels, *, method: str, num_clients: int, seed: int, alpha: float = 0.5,
              min_size: int = 10, shards_per_client: int = 2, client_ids=None,
              **options) -> list[np.ndarray]:
  """One sorted int64 index array per client into `labels` [N], by the partition named
  `method` (`PARTITIONS`).

  Each partition takes its own arguments (`PartitionSpec.options`) and ignores the rest:
  `alpha` for dirichlet and quantity, `min_size` too, `shards_per_client` for shards, and
  in `options` those of other registered partitions (not given: their declared default).
  `client_ids` [N] (one per example) for natural. Raises UserError (argument 'method')
  for an unknown method, ('client_ids') when a partition that needs them has none or not
  one per example, and the partition's own errors; TypeError for an option that no
  registered partition takes.
  """
  spec = PARTITIONS.get(method)
  known = {name for _, s in PARTITIONS.items() for name in s.options}
  unknown = sorted(set(options) - known)
  if unknown:
    raise TypeError(f'no registered partition takes {unknown}; their options: '
                    f'{sorted(known | {"alpha", "min_size", "shards_per_client"})}')
  given = dict(alpha=alpha, min_size=min_size, shards_per_client=shards_per_client,
               **options)
  if spec.needs_client_ids:
    if client_ids is None:
      raise errors.UserError(f'The {method} partition needs client_ids, one per example.',
                             argument='client_ids')
    if len(client_ids) != len(labels):
      raise errors.UserError(f'{len(client_ids)} client_ids for {len(labels)} labels: give '
                             'one per example.', argument='client_ids')
  own = {name: given.get(name, option.default) for name, option in spec.options.items()}
  return spec.split(Request(labels, num_clients, seed, client_ids), **own)


__all__ = ['METHODS', 'PARTITIONS', 'Option', 'PartitionSpec', 'Request', 'client_names',
           'dirichlet', 'iid', 'label_histograms', 'natural', 'option_defaults', 'partition',
           'quantity', 'shards']
