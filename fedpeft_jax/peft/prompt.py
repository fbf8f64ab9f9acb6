"""Visual prompt tuning (Jia et al. 2022, VPT): `prompt_tokens` learned tokens inserted
after the class token; VPT-deep (`prompt_deep`) replaces them with fresh ones before
every block, VPT-shallow inserts them before the first only.

One parameter, `Transformer/prompt`: [layers, prompt_tokens, hidden], layers the
block count (deep) or 1, initialised uniformly (Xavier over the patch fan-in and the
hidden size, as VPT does). Prompts are not zero: the model changes at initialisation.

On a Llama-family decoder the prompts go in FRONT of the sequence (soft prompt tuning,
Lester et al. 2021; deep: a fresh set before every block, as P-tuning v2 places one per
layer), `model/layers/prompt`, initialised uniformly over +-sqrt(3 / hidden) (Xavier with
fan-in = fan-out = hidden); the decoder extends the attention mask and positions for them
and drops them from its logits (`llama.LlamaLayers`), so the task sees the input's length.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedpeft_jax.model import vit
from fedpeft_jax.peft import PEFT_METHODS
from fedpeft_jax.peft.base import PeftMethod, is_decoder, positive


@dataclasses.dataclass(frozen=True)
class Prompts(vit.Addition):
  """The prompt parameter at the `encoder` hook point; tokens in and out at `tokens`."""
  num_tokens: int = 10
  deep: bool = True

  def encoder(self, site, x):
    hidden, size = x.shape[-1], site.size
    # VPT's uniform Xavier init over the patch fan-in and the hidden size (decoder: the
    # hidden size, a token embedding's).
    fan_in = hidden if is_decoder(size) else 3 * size.patch_size ** 2
    bound = (6.0 / (fan_in + hidden)) ** 0.5
    layers = size.num_layers if self.deep else 1
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    return site.scope.param('prompt', init, (layers, self.num_tokens, hidden),
                            site.param_dtype).astype(site.dtype)

  def tokens(self, site, x):
    prompts, i = site.state, site.layer
    if i > 0 and not self.deep:
      return x
    tokens = jnp.broadcast_to(prompts[i], (x.shape[0],) + prompts.shape[1:])
    if is_decoder(site.size):  # In front; the decoder extends its mask and positions.
      return jnp.concatenate([tokens, x if i == 0 else x[:, self.num_tokens:]], axis=1)
    rest = x[:, 1:] if i == 0 else x[:, 1 + self.num_tokens:]  # Insert, else replace.
    return jnp.concatenate([x[:, :1], tokens, rest], axis=1)


PEFT_METHODS.register('prompt', PeftMethod(
    summary='VPT-deep: 10 tokens at every layer (`peft.prompt_deep=False`: first layer '
            'only) + head',
    learning_rate=1e-2, adds=('prompt',),
    options={'prompt_tokens': 10, 'prompt_deep': True},
    addition=lambda o: Prompts(o['prompt_tokens'], o['prompt_deep']),
    check=lambda options, size: positive(options, 'prompt_tokens'),
    identity_at_init=False, order=4))
