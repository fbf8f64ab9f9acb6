"""The experiment loop: one round function, called round after round, and callbacks.

Everything a run does besides training (evaluation, traffic and privacy
accounting, logs, TensorBoard, checkpoints, the console) is a `Callback`; the
loop knows nothing of them but their three hooks. Each round's `record` starts
as `{'round': r}` and every callback may add to it, in order, so later ones
(the metrics log, TensorBoard, the console) see what earlier ones computed.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from fedpeft_jax.federated import fedavg

RoundFn = Callable[[fedavg.ServerState], tuple[fedavg.ServerState, fedavg.RoundMetrics]]


class Callback:
  """Hooks of the loop; override the ones you need."""

  def on_run_start(self, state: fedavg.ServerState) -> None:
    """Before the first round this process runs (`state.round` rounds are done)."""

  def on_round_end(self, round_index: int, state: fedavg.ServerState,
                   metrics: fedavg.RoundMetrics, record: dict[str, Any]) -> None:
    """After round `round_index` (1-based); add this round's values to `record`."""

  def on_run_end(self, state: fedavg.ServerState) -> None:
    """After the last round."""


class Stateful(Callback):
  """A callback whose running values survive a restart (stored in the run checkpoint)."""

  def state_dict(self) -> dict[str, Any]:
    raise NotImplementedError

  def load_state_dict(self, saved: dict[str, Any]) -> None:
    raise NotImplementedError


def run(round_fn: RoundFn, state: fedavg.ServerState, rounds: int,
        callbacks: Sequence[Callback]) -> fedavg.ServerState:
  """Runs rounds `state.round + 1 .. rounds`; returns the final server state."""
  for callback in callbacks:
    callback.on_run_start(state)
  for round_index in range(int(state.round) + 1, rounds + 1):
    state, metrics = round_fn(state)
    record = {'round': round_index}
    for callback in callbacks:
      callback.on_round_end(round_index, state, metrics, record)
  for callback in callbacks:
    callback.on_run_end(state)
  return state
