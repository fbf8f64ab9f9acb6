"""Server optimizers on the averaged client update (Reddi et al. 2021, "Adaptive
Federated Optimization"), as optax transformations, by name (`SERVER_OPTIMIZERS`).

The round hands the server optimizer the negative average delta as its gradient:
`sgd` at learning rate 1 is plain FedAvg and `momentum` FedAvgM (Hsu et al. 2019).
Each file here registers its optimizers: a `ServerOptimizerSpec(make, default_lr)`, where
`make(learning_rate, momentum=, b1=, b2=, eps=)` takes the options it uses.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import optax

from fedpeft_jax import registry


class ServerOptimizerSpec(NamedTuple):
  make: Callable[..., optax.GradientTransformation]
  # What `learning_rate=None` means: the adaptive optimizers step about learning_rate in
  # every coordinate, whatever the size of the average update, so they need a small one.
  default_learning_rate: float
  summary: str


SERVER_OPTIMIZERS_REGISTRY: registry.Registry[ServerOptimizerSpec] = registry.Registry(
    'server optimizer', argument='name')

registry.import_all(__name__, __path__)

SERVER_OPTIMIZERS = SERVER_OPTIMIZERS_REGISTRY.names()
DEFAULT_LEARNING_RATES = {name: spec.default_learning_rate
                          for name, spec in SERVER_OPTIMIZERS_REGISTRY.items()}


def server_optimizer(name: str, learning_rate: float | None = None, *, momentum: float = 0.9,
                     b1: float = 0.9, b2: float = 0.99,
                     eps: float = 1e-3) -> optax.GradientTransformation:
  """The server optimizer called `name`; `learning_rate=None` is its default. Raises
  `UserError` (argument 'name') for an unknown name."""
  spec = SERVER_OPTIMIZERS_REGISTRY.get(name)
  lr = spec.default_learning_rate if learning_rate is None else learning_rate
  return spec.make(lr, momentum=momentum, b1=b1, b2=b2, eps=eps)
