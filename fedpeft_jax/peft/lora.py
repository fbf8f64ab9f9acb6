"""LoRA (Hu et al. 2022): W x + (alpha / rank) B A x at the linear maps `peft.lora_targets`
names, A [in, rank] He-uniform, B [rank, out...] zero, so the model is unchanged at
initialisation.

Targets use the decoder's Hugging Face names (default 'q_proj,v_proj'; any of `q_proj`,
`k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`). On the ViT, q/k/v_proj
are its `query`, `key` and `value` (the only maps it exposes), so the default is the paper
setting there too. Parameters `lora_<map>_a`, `lora_<map>_b` live in the module holding the
map: ViT `MultiHeadDotProductAttention_1/lora_query_a` [hidden, rank] and `lora_query_b`
[rank, heads, head_dim]; decoder `model/layers/<i>/self_attn/lora_q_proj_a` [in, rank] and
`lora_q_proj_b` [rank, out] (`mlp/lora_gate_proj_a`, ...). A and B hold exactly the numbers
of Hugging Face PEFT's `lora_A` / `lora_B` (rank 8 on q and v of Llama-2-7B: 4,194,304).

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
from fedpeft_jax.peft.base import PeftMethod, is_decoder, positive

# Every target name, in the order a decoder block meets them (model/llama.py PROJECTIONS).
TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
# The ViT's projection hook names and the target each one is.
VIT_TARGETS = {'query': 'q_proj', 'key': 'k_proj', 'value': 'v_proj'}
PROJECTIONS = ('query', 'value')  # The ViT maps of the default targets.


def parse_targets(targets: str) -> tuple[str, ...]:
  """'q_proj, v_proj' -> ('q_proj', 'v_proj'): comma-separated, spaces ignored."""
  return tuple(t.strip() for t in targets.split(','))


@dataclasses.dataclass(frozen=True)
class LoRA(vit.Addition):
  """A low-rank update at the `projection` hook point of each targeted map."""
  rank: int = 8
  alpha: float = 8.0  # The update's scale is alpha / rank.
  targets: tuple[str, ...] = ('q_proj', 'v_proj')

  def projection(self, site, name, x, out):
    if VIT_TARGETS.get(name, name) not in self.targets:
      return out
    scope, hidden = site.scope, x.shape[-1]
    a = scope.param(f'lora_{name}_a', nn.initializers.he_uniform(),
                    (hidden, self.rank), site.param_dtype)
    # B's output axes: the map's own (ViT [heads, head_dim]; decoder [features]).
    features = out.shape[x.ndim - 1:]
    b = scope.param(f'lora_{name}_b', nn.initializers.zeros,
                    (self.rank,) + features, site.param_dtype)
    scale = self.alpha / self.rank
    axes = 'nhijk'[:len(features)]
    low_rank = jnp.einsum('...d,dr->...r', x, a.astype(site.dtype))
    return out + scale * jnp.einsum(f'...r,r{axes}->...{axes}', low_rank,
                                    b.astype(site.dtype))


def is_a_matrix(path) -> bool:
  """Whether a parameter path is one of LoRA's A matrices."""
  return path[-1].startswith('lora_') and path[-1].endswith('_a')


def _check(options, size):
  problem = positive(options, 'lora_rank', 'lora_alpha')
  if problem is not None:
    return problem
  targets = options['lora_targets']
  names = parse_targets(targets) if isinstance(targets, str) else ()
  allowed = TARGETS if is_decoder(size) else tuple(VIT_TARGETS.values())
  model = ('the decoder' if is_decoder(size) else
           "the ViT (its query, key and value are q_proj, k_proj, v_proj)")
  if not names or any(n not in allowed for n in names) or len(set(names)) != len(names):
    return 'lora_targets', (f'must be distinct comma-separated linear maps of {model}: '
                            f'{", ".join(allowed)}')
  return None


PEFT_METHODS.register('lora', PeftMethod(
    summary='rank 8 (`peft.lora_rank`) on query and value (`peft.lora_targets`), B '
            'zero-initialised + head',
    learning_rate=5e-3, adds=('lora',),
    options={'lora_rank': 8, 'lora_alpha': 8.0, 'lora_freeze_a': False,
             'lora_targets': 'q_proj,v_proj'},
    addition=lambda o: LoRA(o['lora_rank'], o['lora_alpha'],
                            parse_targets(o['lora_targets'])),
    frozen=lambda path, options: options['lora_freeze_a'] and is_a_matrix(path),
    check=_check, order=5))
