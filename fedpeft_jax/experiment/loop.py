"""The experiment loop: one round function, called round after round, and callbacks.

Everything a run does besides training (evaluation, traffic and privacy
accounting, logs, TensorBoard, checkpoints, the console) is a `Callback`; the
loop knows nothing of them but their hooks and their declared `phase`. It calls
them by phase, `PHASES` in order, and within a phase in the order given:

- 'compute': adds values to the round's record (traffic, loss, accuracy, epsilon, time);
- 'filter': rewrites the record, e.g. removes or moves what must not be released;
- 'write': reads the finished record (metrics file, TensorBoard, console);
- 'persist': saves what a restart needs (checkpoints) or the run's result.

A fresh run (`state.round == 0`) first makes round 0, the record of the initial
(pretrained) model before any training, through every callback's `on_round_zero` (by
phase, like a round; a resumed run has it already). Each round's record starts as
`{'round': r}`. A callback sees it read-only and
returns what it contributes: a compute callback a dict of the keys it adds (merged
in; a key already there is an error: each key has one author), a filter callback
the whole record as it should be written, the others None.

Two ways to end a run early:
- `return Stop(reason)` (from any phase): the round still runs every phase, so its
  record is written and its checkpoint saved as usual; then every callback's
  `on_run_end` runs (a `Checkpoint` saves the stopped round there if it was not due),
  and `run` returns. A stopped run is not finished: the same command resumes it.
- raise an exception (`callbacks.TrainingError`): the run ends at once, so the rest of
  the round (its record, its checkpoint) and `on_run_end` never happen; the last
  checkpoint written stays the latest.
"""
from __future__ import annotations

import dataclasses
import logging
import types as pytypes
from typing import Any, Callable, Mapping, Sequence

from fedpeft_jax.experiment import console
from fedpeft_jax.federated import types

RoundFn = Callable[[types.ServerState], tuple[types.ServerState, types.RoundMetrics]]
PHASES = ('compute', 'filter', 'write', 'persist')
Record = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Stop:
  """Returned by `on_round_end`: end the run after this round's persist phase.

  reason: said on the console ('round R: REASON; the run stops here').
  values: what the callback adds to the record too (compute and filter phases as usual).
  """
  reason: str
  values: Mapping[str, Any] | None = None


class Callback:
  """Hooks of the loop; override the ones you need and declare your `phase`."""
  phase = 'compute'

  def on_run_start(self, state: types.ServerState) -> None:
    """Before the first round this process runs (`state.round` rounds are done)."""

  def on_round_end(self, round_index: int, state: types.ServerState,
                   metrics: types.RoundMetrics, record: Record) -> dict | Stop | None:
    """After round `round_index` (1-based). `record`: read-only, what the callbacks before
    this one made of the round. Returns this callback's part (see the module docstring):
    a dict, a `Stop`, or None for nothing."""
    return None

  def on_round_zero(self, state: types.ServerState, record: Record) -> dict | None:
    """A fresh run's round 0, after `on_run_start` and before round 1: `state` holds the
    initial (untrained) model, and no client took part. Returns what `on_round_end` does,
    but never a `Stop`; by default nothing (a callback that only counts rounds skips it)."""
    return None

  def on_run_end(self, state: types.ServerState) -> None:
    """After the last round (or the round that returned a `Stop`)."""


class Stateful(Callback):
  """A callback whose running values survive a restart: the run checkpoint holds its
  `state_dict()` under its `name`, and `restore` gives them back."""
  name: str

  def state_dict(self) -> dict[str, Any]:
    """Its running values, JSON-serialisable."""
    raise NotImplementedError

  def load_state_dict(self, saved: dict[str, Any]) -> None:
    """Restores what `state_dict` returned, as read back from JSON."""
    raise NotImplementedError

  def missing_state(self, source: str) -> None:
    """The checkpoint in `source` holds no values under `name`: an older version, before
    this callback, wrote it. By default the callback keeps its fresh values, with a one-line
    warning; one whose fresh start would misreport raises instead."""
    logging.warning('the checkpoint in %s holds no values of callback %r (it predates '
                    'that callback): it starts fresh', source, self.name)


def restore(callbacks: Sequence[Callback], saved: Mapping[str, Any], source: str) -> None:
  """Gives every `Stateful` in `callbacks` its values from a checkpoint's `saved` (by
  `name`); one that `saved` lacks gets `missing_state(source)`."""
  for callback in callbacks:
    if isinstance(callback, Stateful):
      if callback.name in saved:
        callback.load_state_dict(saved[callback.name])
      else:
        callback.missing_state(source)


def in_phase_order(callbacks: Sequence[Callback]) -> list[Callback]:
  """`callbacks` sorted by `PHASES`, keeping the given order within a phase; ValueError
  naming a callback whose `phase` is not one of them."""
  for callback in callbacks:
    if callback.phase not in PHASES:
      raise ValueError(f'{type(callback).__name__}.phase={callback.phase!r}: must be one of '
                       f'{", ".join(PHASES)}')
  return sorted(callbacks, key=lambda c: PHASES.index(c.phase))


def _merge(callback: Callback, part, record: dict, round_index: int,
           hook: str = 'on_round_end') -> dict:
  """`record` with `callback`'s returned `part` (a dict or None) taken in."""
  name = type(callback).__name__
  if part is None:
    return record
  if not isinstance(part, Mapping):
    stop = ', a loop.Stop' if hook == 'on_round_end' else ''
    raise TypeError(f'{name}.{hook} returned {type(part).__name__}: return a dict{stop} '
                    'or None')
  if callback.phase == 'filter':
    if part.get('round') != round_index:
      raise ValueError(f"{name} (a filter) returned a record without 'round': {round_index}")
    return dict(part)
  if callback.phase != 'compute':
    raise TypeError(f'{name} ({callback.phase} phase) returned {sorted(part)}: only compute '
                    'callbacks add to the record; declare phase = "compute"')
  clash = sorted(set(part) & set(record))
  if clash:
    raise ValueError(f'{name} adds {clash}, already in the record: each key has one author')
  return {**record, **part}


def end_round(callbacks: Sequence[Callback], round_index: int, state: types.ServerState,
              metrics: types.RoundMetrics) -> tuple[dict, Stop | None]:
  """Runs every callback's `on_round_end` in the order given (`in_phase_order`); returns the
  round's record and the first `Stop` returned (None if none)."""
  record, stop = {'round': round_index}, None
  for callback in callbacks:
    part = callback.on_round_end(round_index, state, metrics,
                                 pytypes.MappingProxyType(record))
    if isinstance(part, Stop):
      stop, part = stop or part, part.values
    record = _merge(callback, part, record, round_index)
  return record, stop


def round_zero(callbacks: Sequence[Callback], state: types.ServerState) -> dict:
  """Runs every callback's `on_round_zero` in the order given (`in_phase_order`) on the
  initial `state`; returns round 0's record."""
  record = {'round': 0}
  for callback in callbacks:
    part = callback.on_round_zero(state, pytypes.MappingProxyType(record))
    record = _merge(callback, part, record, 0, 'on_round_zero')
  return record


def run(round_fn: RoundFn, state: types.ServerState, rounds: int,
        callbacks: Sequence[Callback]) -> types.ServerState:
  """Runs rounds `state.round + 1 .. rounds` (fewer if a callback returns a `Stop`), with
  `callbacks` in phase order whatever their order in the list; returns the final state.
  A fresh run (`state.round == 0`) makes round 0 first (`round_zero`)."""
  callbacks = in_phase_order(callbacks)
  for callback in callbacks:
    callback.on_run_start(state)
  if int(state.round) == 0:
    round_zero(callbacks, state)
  for round_index in range(int(state.round) + 1, rounds + 1):
    state, metrics = round_fn(state)
    _, stop = end_round(callbacks, round_index, state, metrics)
    if stop is not None:
      console.say(f'round {round_index}: {stop.reason}; the run stops here')
      break
  for callback in callbacks:
    callback.on_run_end(state)
  return state
