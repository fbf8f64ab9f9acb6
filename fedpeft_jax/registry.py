"""Extension by name: one small registry per kind of component (big_vision's
`pp/registry.py`, absorbed). A component is a file that registers itself; the
package holding such files imports all of them (`import_all`), so adding one is
adding the file, with no list to edit anywhere else.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Generic, Iterator, TypeVar

from fedpeft_jax import errors

T = TypeVar('T')


class Registry(Generic[T]):
  """name -> entry for one kind of component (e.g. 'federated algorithm').

  `get` of an unknown name raises a `UserError` about `argument` that lists the
  choices and the closest name, e.g. "federated algorithm 'scafold': unknown; did
  you mean 'scaffold'? Choices: fedavg, fednova, fedprox, scaffold".
  """

  def __init__(self, kind: str, argument: str = 'name'):
    self.kind, self.argument = kind, argument
    self._entries: dict[str, T] = {}

  def register(self, name: str, entry: T | None = None):
    """`register(name, entry)`, or `@register(name)` above a class or function."""
    def add(entry: T) -> T:
      if name in self._entries and self._entries[name] is not entry:
        raise ValueError(f'{self.kind} {name!r} is registered twice')
      self._entries[name] = entry
      return entry
    return add if entry is None else add(entry)

  def get(self, name: str) -> T:
    if name not in self._entries:
      close = difflib.get_close_matches(str(name), self.names(), n=1)
      hint = f'did you mean {close[0]!r}? ' if close else ''
      raise errors.UserError(f'{self.kind} {name!r}: unknown; {hint}choices: '
                             f'{", ".join(self.names())}', argument=self.argument)
    return self._entries[name]

  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self._entries))

  def items(self) -> Iterator[tuple[str, T]]:
    return iter(sorted(self._entries.items()))

  def __contains__(self, name) -> bool:
    return name in self._entries

  def __len__(self) -> int:
    return len(self._entries)


def import_all(package_name: str, package_path) -> None:
  """Imports every module of a package, so that each registers its entries."""
  for module in pkgutil.iter_modules(package_path):
    if not module.name.startswith('_'):
      importlib.import_module(f'{package_name}.{module.name}')

