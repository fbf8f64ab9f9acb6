"""Model families by name (`MODEL_FAMILIES`, `model.family`): how a family's model is
built with a PEFT method's additions, initialised (from a pretrained checkpoint when
`model.checkpoint` names one) and checked at launch, and which task it serves by default.
Each file here registers one."""
from fedpeft_jax import registry
from fedpeft_jax.model.families.base import ModelFamily  # noqa: F401

MODEL_FAMILIES: registry.Registry[ModelFamily] = registry.Registry('model family',
                                                                   argument='family')

registry.import_all(__name__, __path__)
