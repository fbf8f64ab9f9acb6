"""BitFit (Ben Zaken et al. 2022): every bias trains, LayerNorm biases included, + head."""
from fedpeft_jax.peft import PEFT_METHODS
from fedpeft_jax.peft.base import PeftMethod

PEFT_METHODS.register('bias', PeftMethod(
    summary='every bias (LayerNorm too, BitFit) + head', learning_rate=1e-2,
    trains=lambda path: path[-1] == 'bias', order=2))
