"""The run's own console lines: what it is doing, how long that took, progress.

Library INFO logging (Orbax, the XLA bridge) stays off the console unless
asked for with absl's --verbosity; these lines are always printed.
"""
from __future__ import annotations

import contextlib
import time

import jax


def say(line: str) -> None:
  """Prints on process 0 only: several hosts run one experiment, one console tells it."""
  if jax.process_index() == 0:
    print(line, flush=True)


@contextlib.contextmanager
def phase(what: str):
  """Prints `what` before a long step and its duration after it."""
  say(f'{what} ...')
  start = time.perf_counter()
  yield
  say(f'{what}: done in {time.perf_counter() - start:.1f} s')
