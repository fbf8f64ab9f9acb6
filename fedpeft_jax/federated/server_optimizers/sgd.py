"""FedAvg's server step (sgd at learning rate 1) and FedAvgM (Hsu et al. 2019)."""
import optax

from fedpeft_jax.federated.server_optimizers import SERVER_OPTIMIZERS_REGISTRY, ServerOptimizerSpec

SERVER_OPTIMIZERS_REGISTRY.register('sgd', ServerOptimizerSpec(
    lambda lr, **options: optax.sgd(lr), 1.0, 'x += lr * mean update (FedAvg at lr 1)'))
SERVER_OPTIMIZERS_REGISTRY.register('momentum', ServerOptimizerSpec(
    lambda lr, momentum, **options: optax.sgd(lr, momentum=momentum), 1.0,
    'FedAvgM: heavy-ball momentum on the mean update'))
