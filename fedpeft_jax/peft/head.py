"""Linear probing: only the classifier head trains (every method trains it too).

With `cache_head_features` the run computes the frozen backbone's features once and
trains the head on them (`experiment/build.py`); the result is the same.

On a Llama-family decoder the head is the pretrained `lm_head` [hidden, vocab], which no
other method trains (Hugging Face PEFT's counts leave it out too). A decoder with tied
embeddings (`tie_word_embeddings`, e.g. the shared tiny_llama_en) has no head of its own:
its output layer is the input embedding table, so `head` is refused there at launch
rather than silently training the embeddings (`full` does that).
"""
from fedpeft_jax.peft import PEFT_METHODS
from fedpeft_jax.peft.base import PeftMethod, is_decoder


def _check(options, size):
  if is_decoder(size) and size.tie_word_embeddings:
    return 'method', ('head trains an untied lm_head, and this decoder ties its output '
                      'layer to the input embeddings (tie_word_embeddings): use norm, lora, '
                      'adapter, prompt, or full (which trains the shared embeddings)')
  return None


PEFT_METHODS.register('head', PeftMethod(
    summary='the classifier', learning_rate=5e-3,
    trains=lambda path: path[0] in ('head', 'lm_head'),
    options={'cache_head_features': True}, check=_check, order=1))
