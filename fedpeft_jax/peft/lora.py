"""LoRA (Hu et al. 2022) on the query and value projections: W x + (alpha / rank) B A x,
A [hidden, rank] He-uniform, B [rank, heads, head_dim] zero, so the model is unchanged at
initialisation. Parameters `lora_query_a`, `lora_query_b`, `lora_value_a`,
`lora_value_b` in every block's `MultiHeadDotProductAttention_1`.

`lora_freeze_a`: FFA-LoRA (Sun et al. 2024): A stays at its initialisation, shared by
every client through the run's seed, and only B trains. LoRA is not in the FedPEFT
paper; its default learning rate is the adapters'.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from fedpeft_jax.model import vit
from fedpeft_jax.peft import PEFT_METHODS
from fedpeft_jax.peft.base import PeftMethod, positive

PROJECTIONS = ('query', 'value')


@dataclasses.dataclass(frozen=True)
class LoRA(vit.Addition):
  """A low-rank update at the `projection` hook point of query and value."""
  rank: int = 8
  alpha: float = 8.0  # The update's scale is alpha / rank.

  def projection(self, site, name, x, out):
    if name not in PROJECTIONS:
      return out
    scope, hidden = site.scope, x.shape[-1]
    a = scope.param(f'lora_{name}_a', nn.initializers.he_uniform(),
                    (hidden, self.rank), site.param_dtype)
    b = scope.param(f'lora_{name}_b', nn.initializers.zeros,
                    (self.rank,) + out.shape[-2:], site.param_dtype)
    scale = self.alpha / self.rank
    low_rank = jnp.einsum('...d,dr->...r', x, a.astype(site.dtype))
    return out + scale * jnp.einsum('...r,rnh->...nh', low_rank, b.astype(site.dtype))


def is_a_matrix(path) -> bool:
  """Whether a parameter path is one of LoRA's A matrices."""
  return path[-1].startswith('lora_') and path[-1].endswith('_a')


PEFT_METHODS.register('lora', PeftMethod(
    summary='rank 8 (`peft.lora_rank`) on query and value, B zero-initialised + head',
    learning_rate=5e-3, adds=('lora',),
    options={'lora_rank': 8, 'lora_alpha': 8.0, 'lora_freeze_a': False},
    addition=lambda o: LoRA(o['lora_rank'], o['lora_alpha']),
    frozen=lambda path, options: options['lora_freeze_a'] and is_a_matrix(path),
    check=lambda options, size: positive(options, 'lora_rank', 'lora_alpha'), order=5))
