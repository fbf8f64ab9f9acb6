"""Federated algorithms by name: each file here registers one (`ALGORITHMS`).

Adding one is adding a file that calls `ALGORITHMS.register(name, AlgorithmSpec(...))`;
see README "Extending" and `fednova.py` for a complete example.
"""
from fedpeft_jax import registry
from fedpeft_jax.federated.algorithms.base import (Algorithm, AlgorithmSpec, ClientsDone,
                                                   RoundEnd)

ALGORITHMS: registry.Registry[AlgorithmSpec] = registry.Registry('federated algorithm')

registry.import_all(__name__, __path__)

__all__ = ['ALGORITHMS', 'Algorithm', 'AlgorithmSpec', 'ClientsDone', 'RoundEnd']
