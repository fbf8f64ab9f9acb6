"""Vision Transformer whose parameter tree matches the official ViT checkpoints.

The module and parameter names follow google-research/vision_transformer so an
official `.npz` file maps one-to-one onto `params`. PEFT additions (adapters,
visual prompts, LoRA) live under names of their own (`adapter`, `prompt`,
`lora_*`) so that checkpoints never mention them and masks can select them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

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


@dataclasses.dataclass(frozen=True)
class PeftModules:
  """Which trainable additions the backbone carries (none by default)."""
  adapter: bool = False
  adapter_reduction: int = 8
  adapter_shared: bool = True  # One adapter for all blocks, as in the paper's code.
  prompt_tokens: int = 0  # VPT; 0 disables prompts.
  prompt_deep: bool = True  # Fresh prompts at every layer, else the first only.
  lora_rank: int = 0  # LoRA on query and value; 0 disables it.
  lora_alpha: float = 1.0  # Scale of the LoRA update is lora_alpha / lora_rank.


class Adapter(nn.Module):
  """Bottleneck adapter; the zero up-projection makes it an identity at init."""
  reduction: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1]
    dense = lambda features, name, **kw: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
    h = dense(hidden // self.reduction, 'down')(x)
    h = nn.gelu(h)
    h = dense(hidden, 'up', kernel_init=nn.initializers.zeros)(h)
    return x + h


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
  """Self-attention with the official parameter layout, fused attention kernel."""
  num_heads: int
  lora_rank: int
  lora_alpha: float
  dtype: Dtype
  param_dtype: Dtype
  implementation: Optional[str] = None  # jax.nn.dot_product_attention's; 'cudnn' on GPUs.

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads

    def project(name):
      out = nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)(x)
      if self.lora_rank and name in ('query', 'value'):
        a = self.param(f'lora_{name}_a', nn.initializers.he_uniform(),
                       (hidden, self.lora_rank), self.param_dtype)
        b = self.param(f'lora_{name}_b', nn.initializers.zeros,
                       (self.lora_rank, self.num_heads, head_dim), self.param_dtype)
        scale = self.lora_alpha / self.lora_rank
        low_rank = jnp.einsum('...d,dr->...r', x, a.astype(self.dtype))
        out = out + scale * jnp.einsum('...r,rnh->...nh', low_rank, b.astype(self.dtype))
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
  mlp_dim: int
  num_heads: int
  peft: PeftModules
  adapter: Optional[nn.Module]  # A shared adapter, bound at the encoder's scope.
  dtype: Dtype
  param_dtype: Dtype
  attention: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    # Explicit names: the official checkpoints number submodules across types.
    y = norm('LayerNorm_0')(x)
    y = MultiHeadDotProductAttention(
        self.num_heads, self.peft.lora_rank, self.peft.lora_alpha, self.dtype,
        self.param_dtype, self.attention, name='MultiHeadDotProductAttention_1')(y)
    x = x + y
    y = norm('LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.dtype, self.param_dtype, name='MlpBlock_3')(y)
    if self.adapter is not None:
      y = self.adapter(y)
    elif self.peft.adapter:
      y = Adapter(self.peft.adapter_reduction, self.dtype, self.param_dtype,
                  name='adapter')(y)
    return x + y


class Encoder(nn.Module):
  size: ViTSize
  peft: PeftModules
  dtype: Dtype
  param_dtype: Dtype
  attention: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    batch, _, hidden = x.shape
    x = AddPositionEmbs(self.dtype, self.param_dtype, name='posembed_input')(x)

    peft = self.peft
    shared_adapter = None
    if peft.adapter and peft.adapter_shared:
      shared_adapter = Adapter(peft.adapter_reduction, self.dtype,
                               self.param_dtype, name='adapter')
    prompts = None
    if peft.prompt_tokens:
      # VPT's uniform Xavier init over the patch fan-in and the hidden size.
      fan_in = 3 * self.size.patch_size ** 2
      bound = (6.0 / (fan_in + hidden)) ** 0.5
      layers = self.size.num_layers if peft.prompt_deep else 1
      init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
      prompts = self.param('prompt', init, (layers, peft.prompt_tokens, hidden),
                           self.param_dtype).astype(self.dtype)
      tokens = lambda i: jnp.broadcast_to(prompts[i], (batch,) + prompts.shape[1:])
      x = jnp.concatenate([x[:, :1], tokens(0), x[:, 1:]], axis=1)

    for i in range(self.size.num_layers):
      if prompts is not None and peft.prompt_deep and i > 0:
        x = jnp.concatenate(
            [x[:, :1], tokens(i), x[:, 1 + peft.prompt_tokens:]], axis=1)
      x = Encoder1DBlock(self.size.mlp_dim, self.size.num_heads, peft,
                         shared_adapter, self.dtype, self.param_dtype, self.attention,
                         name=f'encoderblock_{i}')(x)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                        name='encoder_norm')(x)


class VisionTransformer(nn.Module):
  """ViT classifier. Inputs are images in [-1, 1], NHWC; outputs float32 logits."""
  size: ViTSize
  num_classes: int
  peft: PeftModules = PeftModules()
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
    x = Encoder(self.size, self.peft, self.dtype, self.param_dtype, self.attention,
                name='Transformer')(x)
    x = x[:, 0]
    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                           param_dtype=self.param_dtype, name='pre_logits')(x))
    if self.features_only:
      return x.astype(jnp.float32)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                      dtype=self.dtype, param_dtype=self.param_dtype, name='head')(x)
    return logits.astype(jnp.float32)
