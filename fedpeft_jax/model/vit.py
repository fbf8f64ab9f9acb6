"""Vision Transformer whose parameter tree matches the official ViT checkpoints.

The module and parameter names follow google-research/vision_transformer so an
official `.npz` file maps one-to-one onto `params`. The model knows no PEFT
method: it exposes named hook points (`Addition`) where a method's modules plug
in, and the modules themselves live in `fedpeft_jax/peft/<method>.py`. What a
method adds is named by the method (`adapter`, `prompt`, `lora_*`), so that
checkpoints never mention it and masks can select it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ViTSize:
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  image_size: int  # The size the official checkpoint was trained at.


SIZES = {
    # ViT-B/16 as released with the ImageNet-21k checkpoints.
    'vit_b16': ViTSize(16, 768, 12, 12, 3072, 224),
    # ViT-Ti/4 of ../shared/backbones/vit_ti4_cifar10.npz.
    'vit_ti4': ViTSize(4, 192, 12, 3, 768, 32),
    # For tests: tiny and fast on CPU.
    'vit_test': ViTSize(4, 32, 2, 2, 64, 16),
}


class Site(NamedTuple):
  """Where a hook runs. `scope` is the module the hook point is in: parameters the hook
  makes with `site.scope.param(name, ...)` and modules it constructs (`Module(name=...)`)
  live under that module's path. `layer` is the encoder block's index (None in
  `Addition.encoder`); `state` is what the addition's own `encoder` hook returned."""
  scope: nn.Module
  size: ViTSize
  dtype: Dtype  # Compute dtype.
  param_dtype: Dtype
  layer: Optional[int]
  state: Any


class Addition:
  """A PEFT method's modules in the ViT: one method per hook point it overrides.

  Every hook defaults to the identity. The hook points, in the order a forward pass
  meets them (x: [batch, tokens, hidden] in the compute dtype):

    encoder(site, x) -> state: once, in `Transformer`, after the position embeddings and
      before block 0; what it returns (e.g. a module shared by every block) comes back as
      `site.state` at this addition's other hooks.
    tokens(site, x) -> x: the token sequence entering block `site.layer`, in
      `Transformer` (layer 0: what enters the encoder); may change its length.
    projection(site, name, x, out) -> out: in a block's
      `MultiHeadDotProductAttention_1`, right after its `name` ('query', 'key', 'value')
      projection: x [batch, tokens, hidden] its input, out [batch, tokens, heads, head_dim].
    after_attention(site, y) -> y: in block `encoderblock_{layer}`, the attention's
      output before the residual sum.
    after_mlp(site, y) -> y: in block `encoderblock_{layer}`, the MLP's output before the
      residual sum.

  Subclasses are frozen dataclasses (hashable, as every field of a Flax module is).
  Parameter-creation order within a scope fixes their random initialisation, so an
  addition creates its parameters in one fixed order.
  """

  def encoder(self, site: Site, x: jax.Array) -> Any:
    return None

  def tokens(self, site: Site, x: jax.Array) -> jax.Array:
    return x

  def projection(self, site: Site, name: str, x: jax.Array, out: jax.Array) -> jax.Array:
    return out

  def after_attention(self, site: Site, y: jax.Array) -> jax.Array:
    return y

  def after_mlp(self, site: Site, y: jax.Array) -> jax.Array:
    return y


Additions = tuple[Addition, ...]


def _sites(module: nn.Module, size: ViTSize, layer: Optional[int], states: tuple):
  return [Site(module, size, module.dtype, module.param_dtype, layer, s) for s in states]


def attention(q, k, v, implementation: Optional[str], pad_to: Optional[int] = None):
  """`jax.nn.dot_product_attention`, optionally padding the sequence.

  cuDNN's fused kernels refuse some sequence lengths (ViT-B/16's 197 in the
  backward pass), so for them the tokens are padded to a multiple of `pad_to`
  and the padding is masked out by sequence lengths.
  """
  if pad_to is None:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  batch, length = q.shape[:2]
  padded = -(-length // pad_to) * pad_to
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
  lengths = jnp.full((batch,), length, jnp.int32)
  y = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), query_seq_lengths=lengths,
                                   key_value_seq_lengths=lengths,
                                   implementation=implementation)
  return y[:, :length]


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with the official parameter layout, fused attention kernel.

  Hook point: `Addition.projection` after each of query, key and value."""
  size: ViTSize
  dtype: Dtype
  param_dtype: Dtype
  implementation: Optional[str] = None  # jax.nn.dot_product_attention's; 'cudnn' on GPUs.
  layer: int = 0
  additions: Additions = ()
  states: tuple = ()  # Each addition's `encoder` state.

  @nn.compact
  def __call__(self, x):
    hidden, num_heads = x.shape[-1], self.size.num_heads
    sites = _sites(self, self.size, self.layer, self.states)

    def project(name):
      out = nn.DenseGeneral((num_heads, hidden // num_heads), dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)(x)
      for addition, site in zip(self.additions, sites):
        out = addition.projection(site, name, x, out)
      return out

    q, k, v = project('query'), project('key'), project('value')
    y = attention(q, k, v, self.implementation,
                  pad_to=64 if self.implementation == 'cudnn' else None)
    return nn.DenseGeneral(hidden, axis=(-2, -1), dtype=self.dtype,
                           param_dtype=self.param_dtype, name='out')(y)


class AddPositionEmbs(nn.Module):
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    pos = self.param('pos_embedding', nn.initializers.normal(0.02),
                     (1,) + x.shape[1:], self.param_dtype)
    return x + pos.astype(self.dtype)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 name='Dense_0')(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                    name='Dense_1')(x)


class Encoder1DBlock(nn.Module):
  """Pre-norm block. Hook points: `Addition.after_attention`, `Addition.after_mlp`."""
  size: ViTSize
  layer: int
  dtype: Dtype
  param_dtype: Dtype
  attention: Optional[str] = None
  additions: Additions = ()
  states: tuple = ()  # Each addition's `encoder` state (e.g. a shared module).

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    sites = _sites(self, self.size, self.layer, self.states)
    # Explicit names: the official checkpoints number submodules across types.
    y = norm('LayerNorm_0')(x)
    y = MultiHeadDotProductAttention(
        self.size, self.dtype, self.param_dtype, self.attention, self.layer,
        self.additions, self.states, name='MultiHeadDotProductAttention_1')(y)
    for addition, site in zip(self.additions, sites):
      y = addition.after_attention(site, y)
    x = x + y
    y = norm('LayerNorm_2')(x)
    y = MlpBlock(self.size.mlp_dim, self.dtype, self.param_dtype, name='MlpBlock_3')(y)
    for addition, site in zip(self.additions, sites):
      y = addition.after_mlp(site, y)
    return x + y


class Encoder(nn.Module):
  """Position embeddings, the blocks, the final norm. Hook points: `Addition.encoder`
  (once) and `Addition.tokens` (before every block)."""
  size: ViTSize
  additions: Additions
  dtype: Dtype
  param_dtype: Dtype
  attention: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    x = AddPositionEmbs(self.dtype, self.param_dtype, name='posembed_input')(x)
    states = tuple(addition.encoder(site, x) for addition, site in zip(
        self.additions, _sites(self, self.size, None, (None,) * len(self.additions))))
    for i in range(self.size.num_layers):
      for addition, site in zip(self.additions, _sites(self, self.size, i, states)):
        x = addition.tokens(site, x)
      x = Encoder1DBlock(self.size, i, self.dtype, self.param_dtype, self.attention,
                         self.additions, states, name=f'encoderblock_{i}')(x)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                        name='encoder_norm')(x)


class VisionTransformer(nn.Module):
  """ViT classifier. Inputs are images in [-1, 1], NHWC; outputs float32 logits.

  `additions`: the PEFT methods' modules at the hook points (`Addition`), applied in
  this order at each point; `fedpeft_jax.peft.modules_for(method)` makes them.
  """
  size: ViTSize
  num_classes: int
  additions: Additions = ()
  representation_size: Optional[int] = None  # `pre_logits` of the original i21k files.
  features_only: bool = False  # Return the representation the head reads.
  attention: Optional[str] = None  # None/'xla', or 'cudnn' (fused, padded) on GPUs.
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    p, hidden = self.size.patch_size, self.size.hidden_size
    x = nn.Conv(hidden, (p, p), strides=(p, p), padding='VALID',
                dtype=self.dtype, param_dtype=self.param_dtype,
                name='embedding')(images.astype(self.dtype))
    batch, h, w, _ = x.shape
    x = x.reshape(batch, h * w, hidden)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, hidden), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, hidden)), x],
                        axis=1)
    x = Encoder(self.size, tuple(self.additions), self.dtype, self.param_dtype,
                self.attention, name='Transformer')(x)
    x = x[:, 0]
    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                           param_dtype=self.param_dtype, name='pre_logits')(x))
    if self.features_only:
      return x.astype(jnp.float32)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                      dtype=self.dtype, param_dtype=self.param_dtype, name='head')(x)
    return logits.astype(jnp.float32)
