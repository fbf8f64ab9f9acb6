"""FedAvg (McMahan et al. 2017): clients run local SGD from the global model; the server
applies the aggregate of their updates. Every hook at its default."""
from fedpeft_jax.federated.algorithms import ALGORITHMS
from fedpeft_jax.federated.algorithms.base import Algorithm, AlgorithmSpec

ALGORITHMS.register('fedavg', AlgorithmSpec(
    make=Algorithm, summary='local SGD, the server applies the mean update'))
