"""TEMPORARY shim while the round moves to `round.make_round` (issue 20); removed below."""
from __future__ import annotations

from typing import NamedTuple

from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import round as round_lib
from fedpeft_jax.federated.algorithms import base, fedprox
from fedpeft_jax.federated.algorithms import scaffold as scaffold_lib
from fedpeft_jax.federated.chunking import chunk_for_memory  # noqa: F401
from fedpeft_jax.federated.sampling import SAMPLINGS, sample_clients, sample_cohort  # noqa: F401
from fedpeft_jax.federated.schedules import SCHEDULES  # noqa: F401
from fedpeft_jax.federated.types import (ClientTable, RoundKeys, RoundMetrics,  # noqa: F401
                                         ServerState, round_keys)

ALGORITHMS = ('fedavg', 'scaffold')
FederatedAlgorithm = round_lib.FederatedRound


class Scaffold(NamedTuple):
  local_learning_rate: float


def fedavg(loss_fn, client_optimizer, *, num_epochs, batch_size, max_examples,
           clients_per_round, num_clients, client_chunk=None, sampling='fixed',
           dropout_prob=0.0, aggregator=None, server_optimizer=None, sample_dp=None, mesh=None,
           schedule='packed', prox_mu=0.0, scaffold=None):
  algorithm = (base.Algorithm() if scaffold is None
               else scaffold_lib.scaffold(scaffold.local_learning_rate))
  algorithm = fedprox.with_proximal_term(algorithm, prox_mu)
  return round_lib.make_round(
      loss_fn, client_optimizer,
      client_lib.LocalSpec(num_epochs, batch_size, max_examples, sample_dp),
      round_lib.Cohort(clients_per_round, num_clients, sampling, dropout_prob),
      algorithm=algorithm, aggregator=aggregator, server_optimizer=server_optimizer,
      execution=round_lib.Execution(schedule, client_chunk, mesh))
