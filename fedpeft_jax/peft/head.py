"""Linear probing: only the classifier head trains (every method trains it too).

With `cache_head_features` the run computes the frozen backbone's features once and
trains the head on them (`experiment/build.py`); the result is the same.
"""
from fedpeft_jax.peft import PEFT_METHODS
from fedpeft_jax.peft.base import PeftMethod

PEFT_METHODS.register('head', PeftMethod(
    summary='the classifier', learning_rate=5e-3, trains=lambda path: path[0] == 'head',
    options={'cache_head_features': True}, order=1))
