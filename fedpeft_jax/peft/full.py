"""Full fine-tuning: every parameter trains (the baseline PEFT is measured against)."""
from fedpeft_jax.peft import PEFT_METHODS
from fedpeft_jax.peft.base import PeftMethod

PEFT_METHODS.register('full', PeftMethod(
    summary='every parameter', learning_rate=1e-3, trains=lambda path: True, order=0))
