"""What every partition shares: the `Request` it splits, the `PartitionSpec` it registers
with its `Option`s, and the helpers that check its arguments and sort its parts.

A partition is a pure function `split(request, **options) -> list[np.ndarray]`: one
sorted int64 index array per client, disjoint, together covering the examples it keeps
(every example, for every partition here). `options` are its own arguments (Dirichlet's
`alpha`, `min_size`), read from the config keys its `Option`s declare.
"""
from __future__ import annotations

import inspect
import types
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import numpy as np

from fedpeft_jax import errors


class Request(NamedTuple):
  """What every partition is asked: `labels` int [N], one per example; `num_clients`;
  `seed`, what a random split depends on; `client_ids` [N], each example's client as the
  data names it (None: the data names none; see `PartitionSpec.needs_client_ids`)."""
  labels: np.ndarray
  num_clients: int
  seed: int
  client_ids: np.ndarray | None = None


def _any(value) -> str | None:
  del value
  return None


class Option(NamedTuple):
  """One of a partition's own arguments as a config key.

  `key`: the config key it is read from, under `data.` (e.g. 'data.alpha'); `default`:
  its value in `configs.base_config`; `check(value)`: what is allowed (e.g. 'must be > 0')
  when `value` is not, else None. Partitions reading the same key declare the same
  `Option` (e.g. `ALPHA`), so they agree on its default and check.
  """
  key: str
  default: Any
  check: Callable[[Any], str | None] = _any


def _no_floor() -> int:
  return 0


class PartitionSpec(NamedTuple):
  """A registered partition (`PARTITIONS.register(name, PartitionSpec(...))`).

  `split(request: Request, **options) -> list[np.ndarray]`: `request.num_clients` sorted
  int64 index arrays into `request.labels`, disjoint, covering every example; raises
  `errors.UserError` naming its argument ('alpha', 'min_size', 'num_clients', ...) for
  what the data cannot satisfy. `summary`: one line for listings. `options`: each of
  `split`'s own keyword arguments -> its `Option` (config key, default, check).
  `seeded`: the split depends on `request.seed` (then 'seed' is among the keys
  partition.json's `args` records). `min_client_size(**options it names) -> int`: how
  many examples every client holds at least, whatever the data: a floor known at launch
  (the DP delta check uses fl.num_clients times it, naming the keys of the options it
  takes: `client_floor`; 0: none). `needs_client_ids`: it splits by
  `request.client_ids`, so the data must name each example's client (the data source's
  `clients`). `check(config)`: its launch checks spanning its keys and others, returning
  the first problem as (config key, what is allowed) or None; each option's own `check`
  runs at launch whichever partition is chosen.
  """
  split: Callable[..., list[np.ndarray]]
  summary: str
  options: Mapping[str, Option] = types.MappingProxyType({})
  seeded: bool = True
  min_client_size: Callable[..., int] = _no_floor
  needs_client_ids: bool = False
  check: Callable[[Any], tuple[str, str] | None] = lambda config: None

  def recorded_keys(self) -> tuple[str, ...]:
    """The config keys the split depends on, as partition.json's `args` records them:
    'seed' if seeded, then its options' keys in their declared order."""
    seed = ('seed',) if self.seeded else ()
    return seed + tuple(option.key for option in self.options.values())

  def client_floor(self, options: Mapping[str, Any]) -> tuple[int, tuple[str, ...]]:
    """(`min_client_size` of the options it names, out of all of `split`'s `options`;
    the config keys of those it names)."""
    names = tuple(inspect.signature(self.min_client_size).parameters)
    floor = self.min_client_size(**{name: options[name] for name in names})
    return floor, tuple(self.options[name].key for name in names)

  def read_options(self, config) -> dict:
    """`split`'s own arguments from `config`, by its options' keys."""
    return {argument: _read_key(config, option.key)
            for argument, option in self.options.items()}


def _read_key(config, key: str):
  for part in key.split('.'):
    config = config[part]
  return config


def positive(value) -> str | None:
  return None if isinstance(value, (int, float)) and value > 0 else 'must be > 0'


def at_least(low: int) -> Callable[[Any], str | None]:
  """A check that a value is a number >= `low`."""
  def check(value) -> str | None:
    ok = isinstance(value, (int, float)) and value >= low
    return None if ok else f'must be >= {low}'
  return check


# Keys shared by several partitions: one declaration each.
ALPHA = Option('data.alpha', 0.1, positive)  # A Dirichlet concentration.
MIN_CLIENT_SIZE = Option('data.min_client_size', 10, at_least(0))


def check_labels(labels, num_clients: int) -> np.ndarray:
  """`labels` as a 1-D array; raises UserError for another shape or num_clients < 1
  (argument 'num_clients')."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise errors.UserError(f'labels must be 1-D, got shape {labels.shape}.')
  if num_clients < 1:
    raise errors.UserError(f'num_clients must be >= 1, got {num_clients}.',
                           argument='num_clients')
  return labels


def check_alpha(alpha: float) -> None:
  if not alpha > 0:
    raise errors.UserError(f'Dirichlet alpha must be > 0, got {alpha}.', argument='alpha')


def check_min_size(num_examples: int, num_clients: int, min_size: int, method: str) -> None:
  """Raises UserError (argument 'min_size') for min_size < 0, or when num_clients clients
  of min_size examples need more than num_examples."""
  if min_size < 0:
    raise errors.UserError(f'min_size must be >= 0, got {min_size}.', argument='min_size')
  if num_examples < num_clients * min_size:
    raise errors.UserError(
        f'{method} partition cannot give each of num_clients={num_clients} clients '
        f'min_size={min_size} of {num_examples} examples; lower min_size or num_clients.',
        argument='min_size')


def sorted_parts(parts) -> list[np.ndarray]:
  """Each part sorted, as int64."""
  return [np.sort(part).astype(np.int64) for part in parts]


def client_names(client_ids) -> np.ndarray:
  """The distinct client ids of the data, sorted: client k of `natural` holds the k-th."""
  return np.unique(np.asarray(client_ids))


def label_histograms(labels, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
  """[clients, classes]: how many examples of each class every client holds."""
  labels = np.asarray(labels)
  return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
