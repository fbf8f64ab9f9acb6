"""The records a federated round reads and writes: the server's state, the table of
every client's examples, the round's metrics and its keys."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
# The example id of padding: past the end of any dataset, so a gather in 'fill' mode
# reads zeros for it and never another client's example.
PADDING_ID = np.iinfo(np.int32).max


class ServerState(NamedTuple):
  trainable: PyTree
  opt_state: PyTree  # The server optimizer's.
  aggregator_state: PyTree
  round: jax.Array  # Rounds completed so far.
  rng: jax.Array  # The run's key; every round's randomness is folded from it.
  # What the federated algorithm keeps across rounds (SCAFFOLD: every client's control
  # variate, [num_clients, ...] on each trainable leaf); () for FedAvg.
  algorithm_state: PyTree = ()


class ClientTable(NamedTuple):
  """Every client's example ids into the shared dataset, padded to one length.

  The padding is `PADDING_ID`, an id past the end of any dataset: a padded position
  reads zeros, never another client's example.
  """
  example_ids: jax.Array  # int32 [num_clients, max_examples]
  num_examples: jax.Array  # int32 [num_clients]

  @classmethod
  def from_partition(cls, client_indices: list[np.ndarray]) -> 'ClientTable':
    max_examples = max(1, max(len(ids) for ids in client_indices))
    table = np.full((len(client_indices), max_examples), PADDING_ID, np.int32)
    for row, ids in zip(table, client_indices):
      row[:len(ids)] = ids
    return cls(jnp.asarray(table),
               jnp.asarray([len(ids) for ids in client_indices], jnp.int32))

  @property
  def num_clients(self) -> int:
    return self.example_ids.shape[0]

  @property
  def max_examples(self) -> int:
    return self.example_ids.shape[1]


class RoundMetrics(NamedTuple):
  clients: jax.Array  # int32 [cohort capacity]: sampled ids first, then -1.
  reported: jax.Array  # bool [cohort capacity]: the sampled clients that reported.
  num_sampled: jax.Array
  num_reported: jax.Array  # Reported a finite update with examples: what was aggregated.
  num_nonfinite: jax.Array  # Reported NaN or Inf and were left out.
  train_loss: jax.Array  # Mean per-example local training loss; NaN if none aggregated.
  aggregator: dict
  # Batch rows holding the reporting clients' real examples, and all rows the round
  # computed, padding included: their ratio is the share of its work that was real.
  # (0 in metrics built by hand.)
  examples_trained: jax.Array = 0
  examples_computed: jax.Array = 0
  # The federated algorithm's own scalars (`Algorithm.finish_round`), e.g. the LoRA rules'
  # {'lora_aggregation_error': ...}; empty for the others.
  algorithm: dict = {}


class RoundKeys(NamedTuple):
  sampling: jax.Array
  dropout: jax.Array
  clients: jax.Array  # Parent of every client's key: fold in the client id.
  aggregation: jax.Array


def round_keys(rng, round_index) -> RoundKeys:
  """Round `round_index`'s keys, folded from the run's key: reproducible per round."""
  return RoundKeys(*jax.random.split(jax.random.fold_in(rng, round_index), 4))
