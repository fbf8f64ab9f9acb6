"""A federated algorithm as hooks on the one round (after fedjax's `FederatedAlgorithm`
and pfl-research's algorithm hooks): what the server keeps across rounds, what each
client receives besides the model, how it changes the client's gradients, and what
the server does with the clients' updates. FedAvg is every hook at its default.

The round calls, in order:
  state  = init(trainable, num_clients)                          once, at the start
  shared = round_input(state)                                    once a round
  input  = client_input(state, shared, client)                   per client
  frozen = frozen(state, frozen)                                 once a round: what clients see
  start  = start(trainable, input)                               per client (if given)
  grads  = gradient(grads, params, global_params, input)         per local step
  delta  = client_delta(delta, num_steps)                        per client, before the aggregator
  acc    = begin(state); acc = add_clients(acc, shared, done)    per group of finished clients
  mean_delta, state = finish(acc, mean_delta)                    once a round, after the aggregator
    (or, if given, mean_delta, state, metrics = finish_round(acc, mean_delta, RoundEnd(...)))

and, outside the round, `served(state, trainable, frozen) -> (trainable, frozen)`: the
global model as evaluated (default: the trainable tree and `frozen(state, frozen)`).
The hooks past `finish` (`start`, `frozen`, `finish_round`, `served`) are for algorithms
that give clients different starting points or change the frozen weights the model is
evaluated with (the federated LoRA rules, `fedpeft_jax/federated/lora_rules/`); at their
defaults the round is exactly what it was without them.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax

PyTree = Any


class ClientsDone(NamedTuple):
  """A group of clients whose local training ended, one per lane."""
  ids: jax.Array  # int32 [lanes]; a lane without a client holds 0 and is not `use`d.
  delta: PyTree  # The lanes' updates, as trained (before `client_delta`).
  num_examples: jax.Array  # int32 [lanes]
  num_steps: jax.Array  # int32 [lanes]: local steps taken.
  weight: jax.Array  # float32 [lanes]: the aggregator's weight of each update.
  # Zeroes what is not aggregated (padding lanes, NaN updates) and gathers a [lanes, ...]
  # value for a sum in one fixed order on every device: apply it to anything summed.
  used: Callable[[jax.Array], jax.Array]
  # The round's global trainable parameters (each client's `delta` is from its own
  # start: `Algorithm.start` of these) and the frozen tree the clients trained against.
  trainable: PyTree = None
  frozen: PyTree = None


class RoundEnd(NamedTuple):
  """What `Algorithm.finish_round` knows of the round besides the sums."""
  trainable: PyTree  # The global trainable parameters the round started from.
  frozen: PyTree  # The frozen tree its clients trained against (`Algorithm.frozen`).
  round: jax.Array  # int32: rounds completed before this one (0 in the first).
  rng: jax.Array  # The run's key.


def _identity_gradient(grads, params, global_params, client_input):
  return grads


def identity_frozen(state, frozen):
  """The default `Algorithm.frozen`: the backbone as given."""
  return frozen


class Algorithm(NamedTuple):
  """The hooks; see the module docstring for when each runs."""
  init: Callable[[PyTree, int], PyTree] = lambda trainable, num_clients: ()
  round_input: Callable[[PyTree], PyTree] = lambda state: ()
  client_input: Callable[[PyTree, PyTree, jax.Array], PyTree] = (
      lambda state, shared, client: None)
  gradient: Callable[[PyTree, PyTree, PyTree, PyTree], PyTree] = _identity_gradient
  client_delta: Callable[[PyTree, jax.Array], PyTree] = lambda delta, num_steps: delta
  begin: Callable[[PyTree], PyTree] = lambda state: state
  add_clients: Callable[[PyTree, PyTree, ClientsDone], PyTree] = (
      lambda acc, shared, done: acc)
  finish: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]] = (
      lambda acc, mean_delta: (mean_delta, acc))
  # (global trainable, client input) -> the trainable parameters the client starts from;
  # its update is from there. None: the global ones.
  start: Optional[Callable[[PyTree, PyTree], PyTree]] = None
  # (state, frozen) -> the frozen tree the round's clients train against.
  frozen: Callable[[PyTree, PyTree], PyTree] = identity_frozen
  # (acc, mean_delta, RoundEnd) -> (mean_delta, state, metrics: {name: float32 scalar});
  # replaces `finish` when given.
  finish_round: Optional[Callable[..., tuple[PyTree, PyTree, dict]]] = None
  # (state, trainable, frozen) -> (trainable, frozen) of the global model as evaluated;
  # None: (trainable, frozen(state, frozen)).
  served: Optional[Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]]] = None


class AlgorithmSpec(NamedTuple):
  """A registered algorithm: how to make it, what it needs from the config, what it costs.

  `arguments(config) -> dict` maps the config keys it reads onto `make`'s arguments
  (the one place in the file that speaks in `--config.` keys); `check(config)` returns
  a problem as (key, allowed) or None. `trees_per_transfer`: trainable-sized trees sent
  each way per client (SCAFFOLD: 2). `dp_modes`: the `dp.mode`s it supports.
  """
  make: Callable[..., Algorithm]
  summary: str
  arguments: Callable[[Any], dict] = lambda config: {}
  check: Callable[[Any], tuple[str, str] | None] = lambda config: None
  trees_per_transfer: int = 1
  dp_modes: tuple[str, ...] = ('none', 'client', 'sample')
