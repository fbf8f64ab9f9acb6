"""Bottleneck adapters (Houlsby et al. 2019; the paper's placement): one on every block's
MLP output, `x + up(gelu(down(x)))` with a zero-initialised up-projection, so the model
is unchanged at initialisation.

`adapter_shared` (the paper's code): one adapter, `Transformer/adapter/{down,up}`, used
by every block; else one per block, `Transformer/encoderblock_<i>/adapter/...`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn

from fedpeft_jax.model import vit
from fedpeft_jax.peft import PEFT_METHODS
from fedpeft_jax.peft.base import PeftMethod, positive


class Adapter(nn.Module):
  """Bottleneck adapter on [..., hidden]: hidden -> hidden // reduction -> hidden, residual.

  The zero up-projection makes it an identity at init."""
  reduction: int
  dtype: vit.Dtype
  param_dtype: vit.Dtype

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1]
    dense = lambda features, name, **kw: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
    h = dense(hidden // self.reduction, 'down')(x)
    h = nn.gelu(h)
    h = dense(hidden, 'up', kernel_init=nn.initializers.zeros)(h)
    return x + h


@dataclasses.dataclass(frozen=True)
class Adapters(vit.Addition):
  """Adapters at the `after_mlp` hook point; a shared one is made at `encoder`."""
  reduction: int = 8
  shared: bool = True

  def _make(self, site: vit.Site) -> Adapter:
    return Adapter(self.reduction, site.dtype, site.param_dtype, name='adapter')

  def encoder(self, site, x):
    return self._make(site) if self.shared else None  # Bound to `Transformer`.

  def after_mlp(self, site, y):
    return (site.state or self._make(site))(y)  # The shared one, else one in this block.


def _check(options, size: vit.ViTSize):
  problem = positive(options, 'adapter_reduction')
  if problem is None and size.hidden_size % options['adapter_reduction']:
    return 'adapter_reduction', f'must divide the hidden size {size.hidden_size}'
  return problem


PEFT_METHODS.register('adapter', PeftMethod(
    summary='one bottleneck adapter (reduction 8, zero up-projection) on every block\'s MLP '
            'output, shared by all blocks (`peft.adapter_shared=False`: one per block) + head',
    learning_rate=5e-3, adds=('adapter',),
    options={'adapter_reduction': 8, 'adapter_shared': True},
    addition=lambda o: Adapters(o['adapter_reduction'], o['adapter_shared']),
    check=_check, order=3))
