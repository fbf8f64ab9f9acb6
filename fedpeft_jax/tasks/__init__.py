"""Tasks by name (`TASKS`): what a model is trained and evaluated for, apart from the
model and from federation. Each file here registers one; the round sees only the task's
`loss_fn(trainable, frozen, batch, rng) -> per-example losses` and the dataset pytree."""
from fedpeft_jax import registry
from fedpeft_jax.tasks.base import ClientData, Task  # noqa: F401

TASKS: registry.Registry[Task] = registry.Registry('task')

registry.import_all(__name__, __path__)
