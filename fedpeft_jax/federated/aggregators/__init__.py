"""Aggregators by name: each file here registers one or more (`AGGREGATORS`)."""
from fedpeft_jax import registry
from fedpeft_jax.federated.aggregators.base import (Aggregate, Aggregator,  # noqa: F401
                                                    AggregatorSpec, safe_mean)

AGGREGATORS: registry.Registry[AggregatorSpec] = registry.Registry('aggregator')

registry.import_all(__name__, __path__)

from fedpeft_jax.federated.aggregators.dp_fedavg import ClipState, dp_fedavg  # noqa: E402,F401
from fedpeft_jax.federated.aggregators.weighted_mean import weighted_mean  # noqa: E402,F401
