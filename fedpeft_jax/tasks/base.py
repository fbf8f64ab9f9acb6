"""The task contract: how a model's outputs become per-example losses on the clients'
data and metrics on the test split."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

PyTree = Any


class ClientData(NamedTuple):
  """What every client's examples are, on device: `dataset` a pytree of arrays with a
  leading example axis (clients index into it), and the per-example loss on its rows."""
  dataset: dict
  loss_fn: Callable  # (trainable, frozen, batch, rng) -> per-example losses [batch].


class Task(NamedTuple):
  """A registered task.

  `client_data(config, model, frozen, train_set) -> ClientData`: the training split as
  the round reads it (a task may precompute from the frozen backbone, e.g. head features).
  `make_evaluate(config, model, frozen, test_set, place, trainable) -> evaluate(trainable,
  frozen=None) -> {metric: float}` compiles its evaluation now, once, for trees shaped like
  `trainable` and `frozen` (`place` puts host arrays on the devices the round uses);
  `evaluate`'s second argument, when given, replaces the frozen tree (same shapes and
  placement): the backbone a federated algorithm serves (a LoRA rule's merged weights).
  `metrics`: the names `evaluate` returns, the first the headline one.
  """
  client_data: Callable[..., ClientData]
  make_evaluate: Callable[..., Callable[..., dict]]
  metrics: tuple[str, ...]
  summary: str
