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
The map's own kernel is `<same module>/<map>/kernel` [in, out...]; in this layout
(x @ W) the update is delta W = (alpha / rank) A @ B (the papers' B·A).

`lora_aggregation` (how the federated server combines the clients' factors; the rules
are `fedpeft_jax/federated/lora_rules/`) decides what trains too: 'ffa' is FFA-LoRA (Sun
et al. 2024; `lora_freeze_a` is its older name): A stays at its initialisation, shared by
every client through the run's seed, and only B trains. 'fedsb' (Fed-SB, 2025) freezes A
(He-uniform) and B (orthonormal rows, so the product is not degenerate) and trains an
r x r matrix R between them, zero-initialised: delta W = (alpha / rank) A @ R @ B, with R
at `lora_<map>_r`. LoRA is not in the FedPEFT paper; its default learning rate is the
adapters'.

The functions below (`sites`, `product`, `fold`, `mask_rank`) are LoRA's structure as
pure functions on parameter trees, for whoever needs the adapted maps' products (the
federated LoRA rules).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from fedpeft_jax.model import vit
from fedpeft_jax.peft import PEFT_METHODS
from fedpeft_jax.peft.base import PeftMethod, is_decoder, positive

# Every target name, in the order a decoder block meets them (model/llama.py PROJECTIONS).
TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
# The ViT's projection hook names and the target each one is.
VIT_TARGETS = {'query': 'q_proj', 'key': 'k_proj', 'value': 'v_proj'}
PROJECTIONS = ('query', 'value')  # The ViT maps of the default targets.
# The `lora_aggregation` values that change what LoRA trains (see the module docstring).
FROZEN_FACTORS = {'ffa': ('a',), 'fedsb': ('a', 'b')}
MIDDLE = ('fedsb',)  # Rules whose LoRA has the r x r matrix R between A and B.


def parse_targets(targets: str) -> tuple[str, ...]:
  """'q_proj, v_proj' -> ('q_proj', 'v_proj'): comma-separated, spaces ignored."""
  return tuple(t.strip() for t in targets.split(','))


def init_a(key, shape, dtype=jnp.float32):
  """A's initialiser: He-uniform over its input axis (fan-in = shape[0])."""
  return nn.initializers.he_uniform()(key, shape, dtype)


def init_b_orthonormal(key, shape, dtype=jnp.float32):
  """Fed-SB's fixed B [rank, out...]: orthonormal rows over the flattened output (rank <=
  outputs), so A @ R @ B has R's rank."""
  rank, outputs = shape[0], math.prod(shape[1:])
  rows = nn.initializers.orthogonal()(key, (rank, outputs), jnp.float32)
  return rows.reshape(shape).astype(dtype)


@dataclasses.dataclass(frozen=True)
class LoRA(vit.Addition):
  """A low-rank update at the `projection` hook point of each targeted map."""
  rank: int = 8
  alpha: float = 8.0  # The update's scale is alpha / rank.
  targets: tuple[str, ...] = ('q_proj', 'v_proj')
  middle: bool = False  # Fed-SB: x @ A @ R @ B, with R [rank, rank] zero-initialised.

  def projection(self, site, name, x, out):
    if VIT_TARGETS.get(name, name) not in self.targets:
      return out
    scope, hidden = site.scope, x.shape[-1]
    a = scope.param(f'lora_{name}_a', init_a, (hidden, self.rank), site.param_dtype)
    # B's output axes: the map's own (ViT [heads, head_dim]; decoder [features]).
    features = out.shape[x.ndim - 1:]
    b = scope.param(f'lora_{name}_b',
                    init_b_orthonormal if self.middle else nn.initializers.zeros,
                    (self.rank,) + features, site.param_dtype)
    scale = self.alpha / self.rank
    axes = 'nhijk'[:len(features)]
    low_rank = jnp.einsum('...d,dr->...r', x, a.astype(site.dtype))
    if self.middle:
      r = scope.param(f'lora_{name}_r', nn.initializers.zeros, (self.rank, self.rank),
                      site.param_dtype)
      low_rank = jnp.einsum('...r,rs->...s', low_rank, r.astype(site.dtype))
    return out + scale * jnp.einsum(f'...r,r{axes}->...{axes}', low_rank,
                                    b.astype(site.dtype))


def is_a_matrix(path) -> bool:
  """Whether a parameter path is one of LoRA's A matrices."""
  return path[-1].startswith('lora_') and path[-1].endswith('_a')


class Site(NamedTuple):
  """One adapted linear map: the module holding it (`parent`, a path) and its name."""
  parent: tuple[str, ...]
  name: str  # The map's name in that module, e.g. 'query', 'q_proj'.

  @property
  def a(self) -> tuple[str, ...]:
    return self.parent + (f'lora_{self.name}_a',)

  @property
  def b(self) -> tuple[str, ...]:
    return self.parent + (f'lora_{self.name}_b',)

  @property
  def r(self) -> tuple[str, ...]:  # Fed-SB's middle matrix.
    return self.parent + (f'lora_{self.name}_r',)

  @property
  def kernel(self) -> tuple[str, ...]:
    return self.parent + (self.name, 'kernel')


def sites(*trees) -> tuple[Site, ...]:
  """The adapted maps of parameter trees taken together (trainable and frozen: FFA-LoRA's
  A is frozen), in path order: one per `lora_<map>_a`."""
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree))
  found = [Site(path[:-1], path[-1][len('lora_'):-len('_a')]) for path in flat
           if is_a_matrix(path)]
  return tuple(sorted(found))


def product(a, b, r=None):
  """A @ (R @) B of one map as float32 [in, out] (B's output axes flattened): the update
  in units of the scale alpha / rank. a [..., in, rank], b [..., rank, out...]; r [...,
  rank, rank] or None; leading axes batch."""
  a = a.astype(jnp.float32)
  if r is not None:
    a = jnp.einsum('...ir,...rs->...is', a, r.astype(jnp.float32))
  b = b.astype(jnp.float32)
  b = b.reshape(b.shape[:a.ndim - 1] + (-1,))
  return jnp.einsum('...ir,...ro->...io', a, b)


def fold(kernel, dense, scale: float):
  """kernel + scale * dense: a dense update [in, out] (`product`'s units) folded into the
  map's kernel [in, out...], computed in float32 and returned in the kernel's dtype."""
  merged = kernel.astype(jnp.float32) + scale * dense.reshape(kernel.shape)
  return merged.astype(kernel.dtype)


def mask_rank(x, rank, axis: int):
  """`x` with the entries at index >= `rank` along `axis` zeroed: a factor at the largest
  rank cut to a client's rank (A: axis -1; B, R: axis 0; R also -1). `rank` a traced int."""
  keep = jnp.arange(x.shape[axis]) < rank
  shape = [1] * x.ndim
  shape[axis] = x.shape[axis]
  return jnp.where(keep.reshape(shape), x, jnp.zeros((), x.dtype))


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


def _frozen(path, options) -> bool:
  """FFA-LoRA's A (`lora_freeze_a` or 'ffa'); Fed-SB's A and B."""
  name = path[-1]
  if not name.startswith('lora_'):
    return False
  factors = FROZEN_FACTORS.get(options['lora_aggregation'], ())
  if options['lora_freeze_a']:
    factors = factors + ('a',)
  return any(name.endswith(f'_{f}') for f in factors)


PEFT_METHODS.register('lora', PeftMethod(
    summary='rank 8 (`peft.lora_rank`) on query and value (`peft.lora_targets`), B '
            'zero-initialised + head',
    learning_rate=5e-3, adds=('lora',),
    options={'lora_rank': 8, 'lora_alpha': 8.0, 'lora_freeze_a': False,
             'lora_targets': 'q_proj,v_proj', 'lora_aggregation': 'fedit',
             'lora_client_ranks': '', 'lora_aggregation_error': True,
             'lora_prune_strength': 0.0, 'lora_prune_decay': 0.9},
    addition=lambda o: LoRA(o['lora_rank'], o['lora_alpha'],
                            parse_targets(o['lora_targets']),
                            middle=o['lora_aggregation'] in MIDDLE),
    frozen=_frozen, check=_check, order=5))
