"""Llama-family decoder (Llama 2/3, TinyLlama, Mistral, Qwen2) whose parameters are named
as in Hugging Face checkpoints.

The architecture is transformers' `LlamaForCausalLM`: token embeddings, `num_hidden_layers`
pre-norm blocks (RMSNorm, grouped-query self-attention with rotary embeddings, RMSNorm,
SwiGLU MLP), a final RMSNorm and the language-model head (tied to the embeddings or not).

Parameter tree. Every Hugging Face tensor name, split at '.', is the parameter's path, with
the last component ('weight') renamed after the Flax convention of its kind:

  HF name (shape)                                   Flax path (shape)
  model.embed_tokens.weight [V, H]                  model/embed_tokens/embedding [V, H]
  model.layers.{i}.input_layernorm.weight [H]       model/layers/{i}/input_layernorm/scale [H]
  model.layers.{i}.self_attn.q_proj.weight [O, I]   model/layers/{i}/self_attn/q_proj/kernel [I, O]
  model.layers.{i}.self_attn.q_proj.bias [O]        model/layers/{i}/self_attn/q_proj/bias [O]
  ... k_proj, v_proj, o_proj; mlp.gate_proj, mlp.up_proj, mlp.down_proj: likewise
  model.layers.{i}.post_attention_layernorm.weight  model/layers/{i}/post_attention_layernorm/scale
  model.norm.weight [H]                             model/norm/scale [H]
  lm_head.weight [V, H] (untied models only)        lm_head/kernel [H, V]

that is, `params['model']['layers']['3']['self_attn']['q_proj']['kernel']` is the transpose
of `model.layers.3.self_attn.q_proj.weight` (a PyTorch Linear stores [out, in]; a Flax
Dense kernel is [in, out]). `fedpeft_jax.model.hf_checkpoint` maps files onto this tree.

Hook points for PEFT modules follow `vit.Addition` (the site's `size` is the
`LlamaConfig`): `encoder` (once, after the embeddings), `projection(site, name, x, out)`
after every linear map of a block (`name` one of `PROJECTIONS`, `out` [batch, tokens,
features]), `after_attention` and `after_mlp` (a block's branch before its residual sum).
`tokens(site, x)` before every block (in `LlamaLayers`; layer 0: what enters the first
block) may put tokens in FRONT of the sequence only (soft prompts): the model extends the
attention mask with ones and the positions (the prefix at 0..P-1, every token after it
shifted by P, as Hugging Face PEFT's prompt tuning does), and drops the prefix from the
output, so the logits keep the input's length.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedpeft_jax import errors
from fedpeft_jax.model import vit

Dtype = Any

# The decoder's linear maps, in the order a block meets them.
PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
MODEL_TYPES = ('llama', 'mistral', 'qwen2')
ROPE_TYPES = ('default', 'linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A config's `rope_scaling` (`rope_parameters` in transformers 5) beyond the default.

  'linear': every frequency divided by `factor`. 'llama3' (Llama 3.1/3.2): frequencies whose
  wavelength exceeds original_max_position_embeddings / low_freq_factor are divided by
  `factor`, those below original_max_position_embeddings / high_freq_factor kept, and the
  ones between interpolated smoothly (transformers' `_compute_llama3_parameters`)."""
  rope_type: str
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture, with Hugging Face's `config.json` names (`from_hf` reads one).

  `qkv_bias` / `o_proj_bias`: biases on the q, k, v and o projections (Llama's
  `attention_bias` sets both; Qwen2 has q, k, v biases only). `mlp_bias`: Llama's biases
  on gate, up and down. `sliding_window`: a token attends to the `sliding_window` most
  recent tokens, itself included (Mistral), None: all earlier tokens."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_proj_bias: bool = False
  mlp_bias: bool = False
  sliding_window: Optional[int] = None
  max_position_embeddings: int = 2048
  model_type: str = 'llama'

  # The names `vit.Site.size` users read.
  @property
  def num_layers(self) -> int:
    return self.num_hidden_layers

  @property
  def num_heads(self) -> int:
    return self.num_attention_heads

  @classmethod
  def from_hf(cls, config: dict, source: str = 'config.json') -> 'LlamaConfig':
    """Reads a Hugging Face `config.json` dict (transformers 4 or 5 form).

    Raises: `errors.UserError` (one line naming `source`) for a missing key, a model type
    other than `MODEL_TYPES`, an activation other than silu, heads that do not group, or
    an unsupported rope type."""
    return _from_hf(cls, config, source)

  @classmethod
  def from_file(cls, path: str) -> 'LlamaConfig':
    """Reads `path` (a `config.json`); a missing or unreadable file is one UserError line."""
    try:
      with open(path) as f:
        config = json.load(f)
    except FileNotFoundError:
      raise errors.UserError(
          f'{path} does not exist: pass a Hugging Face model directory with its '
          f'config.json', argument='path') from None
    except (OSError, ValueError) as e:
      raise errors.UserError(f'{path} is not readable JSON ({e}): download it again',
                             argument='path') from None
    if not isinstance(config, dict):
      raise errors.UserError(f'{path} is not a JSON object: download it again',
                             argument='path')
    return cls.from_hf(config, path)


def _require(config: dict, key: str, source: str):
  if config.get(key) is None:
    raise errors.UserError(f'{source} has no {key!r}: it is not a Llama-family '
                           f'config.json (use the model directory\'s own)', argument='path')
  return config[key]


def _rope(config: dict, source: str) -> tuple[float, Optional[RopeScaling]]:
  """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or the older
  top-level `rope_theta` and `rope_scaling` (`type` or `rope_type`)."""
  params = dict(config.get('rope_parameters') or {})
  theta = params.pop('rope_theta', None) or config.get('rope_theta') or 10000.0
  scaling = params or dict(config.get('rope_scaling') or {})
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind not in ROPE_TYPES:
    raise errors.UserError(
        f'{source}: rope type {kind!r} is not supported: use a model with one of '
        f'{", ".join(ROPE_TYPES)}', argument='path')
  if kind == 'default':
    return float(theta), None
  fields = {f.name for f in dataclasses.fields(RopeScaling)} - {'rope_type'}
  if 'factor' not in scaling:
    raise errors.UserError(f'{source}: rope type {kind!r} without a factor: add '
                           f'"factor" to its rope_scaling', argument='path')
  kept = {k: v for k, v in scaling.items() if k in fields}
  return float(theta), RopeScaling(kind, **kept)


def _from_hf(cls, config: dict, source: str) -> LlamaConfig:
  model_type = config.get('model_type', 'llama')
  if model_type not in MODEL_TYPES:
    raise errors.UserError(
        f'{source}: model_type {model_type!r} is not a supported decoder: use one of '
        f'{", ".join(MODEL_TYPES)}', argument='path')
  act = config.get('hidden_act', 'silu')
  if act != 'silu':
    raise errors.UserError(f'{source}: hidden_act {act!r} is not supported: the '
                           f'decoder computes SwiGLU (silu)', argument='path')
  hidden = int(_require(config, 'hidden_size', source))
  heads = int(_require(config, 'num_attention_heads', source))
  kv_heads = int(config.get('num_key_value_heads') or heads)
  if heads % kv_heads:
    raise errors.UserError(f'{source}: num_attention_heads {heads} is not a multiple of '
                           f'num_key_value_heads {kv_heads}', argument='path')
  theta, scaling = _rope(config, source)
  attention_bias = bool(config.get('attention_bias', False))
  qwen2 = model_type == 'qwen2'
  window = config.get('sliding_window')
  if qwen2 and config.get('use_sliding_window'):
    raise errors.UserError(f'{source}: Qwen2 with use_sliding_window is not supported: '
                           f'set it to false', argument='path')
  return cls(
      vocab_size=int(_require(config, 'vocab_size', source)), hidden_size=hidden,
      intermediate_size=int(_require(config, 'intermediate_size', source)),
      num_hidden_layers=int(_require(config, 'num_hidden_layers', source)),
      num_attention_heads=heads, num_key_value_heads=kv_heads,
      head_dim=int(config.get('head_dim') or hidden // heads),
      rms_norm_eps=float(config.get('rms_norm_eps', 1e-6)), rope_theta=theta,
      rope_scaling=scaling,
      tie_word_embeddings=bool(config.get('tie_word_embeddings', False)),
      qkv_bias=attention_bias or qwen2, o_proj_bias=attention_bias,
      mlp_bias=bool(config.get('mlp_bias', False)),
      sliding_window=None if qwen2 or window is None else int(window),
      max_position_embeddings=int(config.get('max_position_embeddings', 2048)),
      model_type=model_type)


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
  """The rotary inverse frequencies [head_dim // 2], float32, radians per position.

  theta ** (-2j / head_dim) for j < head_dim / 2, computed in float32 as transformers does
  (`_compute_default_rope_parameters`), then scaled as `config.rope_scaling` says
  (`RopeScaling`); Llama 3's formula is transformers' `_compute_llama3_parameters`."""
  dim = config.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / np.float32(config.rope_theta) ** exponent)
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq.astype(np.float32)
  if scaling.rope_type == 'linear':
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  old = scaling.original_max_position_embeddings
  low_wavelen = old / scaling.low_freq_factor
  high_wavelen = old / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = ((old / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x [batch, tokens, heads, head_dim] by positions [batch, tokens] (int).

  transformers' convention: the angles are positions * inv_freq in float32, repeated for
  both halves of head_dim, and x * cos + rotate_half(x) * sin with
  rotate_half(x) = concat(-x2, x1) (not interleaved pairs); cos and sin are cast to x's
  dtype first."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def attention_mask_4d(attention_mask: jax.Array, window: Optional[int] = None) -> jax.Array:
  """[batch, 1, tokens, tokens] bool: query t may see key s when s <= t, key s is a real
  token (attention_mask [batch, tokens] of 1/0) and, with a window, t - s < window.

  A padding query may see nothing; the attention then spreads evenly (finite, ignored)."""
  length = attention_mask.shape[-1]
  t, s = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
  allowed = s <= t
  if window is not None:
    allowed = allowed & (t - s < window)
  return allowed[None, None] & (attention_mask[:, None, None, :] != 0)


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale, statistics in float32 (transformers' LlamaRMSNorm:
  the normalised x is cast to the compute dtype before the scale multiplies it)."""
  eps: float
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


def _dense(module: nn.Module, sites: list, name: str, features: int, bias: bool, x):
  """A linear map named `name` (kernel [in, features]) in `module` (called from its
  compact method), then each of its additions' `projection` hook."""
  out = nn.Dense(features, use_bias=bias, dtype=module.dtype,
                 param_dtype=module.param_dtype,
                 kernel_init=nn.initializers.normal(0.02), name=name)(x)
  for addition, site in zip(module.additions, sites):
    out = addition.projection(site, name, x, out)
  return out


def _sites(module: nn.Module) -> list:
  """One `vit.Site` per addition of a block's module, with that addition's state."""
  return [vit.Site(module, module.config, module.dtype, module.param_dtype, module.layer,
                   state) for state in module.states]


class LlamaAttention(nn.Module):
  """Grouped-query self-attention: num_attention_heads query heads share
  num_key_value_heads key/value heads, query head n using key/value head
  n // (heads / kv_heads) (transformers' `repeat_kv`); scores scaled by head_dim ** -0.5,
  rotary embeddings on queries and keys."""
  config: LlamaConfig
  dtype: Dtype
  param_dtype: Dtype
  implementation: Optional[str] = None  # jax.nn.dot_product_attention's.
  layer: int = 0
  additions: vit.Additions = ()
  states: tuple = ()

  @nn.compact
  def __call__(self, x, mask, positions):
    c = self.config
    sites = _sites(self)
    dense = lambda name, n, bias, y: _dense(self, sites, name, n, bias, y)
    batch, length = x.shape[:2]
    heads = lambda y, n: y.reshape(batch, length, n, c.head_dim)
    q = heads(dense('q_proj', c.num_attention_heads * c.head_dim, c.qkv_bias, x),
              c.num_attention_heads)
    k = heads(dense('k_proj', c.num_key_value_heads * c.head_dim, c.qkv_bias, x),
              c.num_key_value_heads)
    v = heads(dense('v_proj', c.num_key_value_heads * c.head_dim, c.qkv_bias, x),
              c.num_key_value_heads)
    inv_freq = rope_frequencies(c)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
    y = y.reshape(batch, length, c.num_attention_heads * c.head_dim)
    return dense('o_proj', c.hidden_size, c.o_proj_bias, y)


class LlamaMLP(nn.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""
  config: LlamaConfig
  dtype: Dtype
  param_dtype: Dtype
  layer: int = 0
  additions: vit.Additions = ()
  states: tuple = ()

  @nn.compact
  def __call__(self, x):
    c = self.config
    sites = _sites(self)
    dense = lambda name, n, y: _dense(self, sites, name, n, c.mlp_bias, y)
    y = nn.silu(dense('gate_proj', c.intermediate_size, x)) * dense(
        'up_proj', c.intermediate_size, x)
    return dense('down_proj', c.hidden_size, y)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).
  Hook points: `Addition.after_attention`, `Addition.after_mlp`."""
  config: LlamaConfig
  dtype: Dtype
  param_dtype: Dtype
  implementation: Optional[str] = None
  layer: int = 0
  additions: vit.Additions = ()
  states: tuple = ()

  @nn.compact
  def __call__(self, x, mask, positions):
    c, dt, pdt = self.config, self.dtype, self.param_dtype
    sites = _sites(self)
    y = RMSNorm(c.rms_norm_eps, dt, pdt, name='input_layernorm')(x)
    y = LlamaAttention(c, dt, pdt, self.implementation, self.layer, self.additions,
                       self.states, name='self_attn')(y, mask, positions)
    for addition, site in zip(self.additions, sites):
      y = addition.after_attention(site, y)
    x = x + y
    y = RMSNorm(c.rms_norm_eps, dt, pdt, name='post_attention_layernorm')(x)
    y = LlamaMLP(c, dt, pdt, self.layer, self.additions, self.states, name='mlp')(y)
    for addition, site in zip(self.additions, sites):
      y = addition.after_mlp(site, y)
    return x + y


def extend_prefix(attention_mask: jax.Array, positions: jax.Array, added: int):
  """The attention mask and positions [batch, tokens] of a sequence with `added` tokens
  put in front: the new tokens are real (mask 1) at positions 0..added-1, and every
  position after them grows by `added`."""
  batch = attention_mask.shape[0]
  front = jnp.broadcast_to(jnp.arange(added, dtype=positions.dtype), (batch, added))
  return (jnp.concatenate([jnp.ones((batch, added), attention_mask.dtype), attention_mask],
                          axis=1),
          jnp.concatenate([front, positions + added], axis=1))


class LlamaLayers(nn.Module):
  """The blocks, named '0', '1', ... (HF's `model.layers.{i}`). Hook points:
  `Addition.encoder` once, before block 0 (its result is each addition's `site.state`);
  `Addition.tokens` before every block, which may only put tokens in front (a prefix,
  `extend_prefix`); the prefix is dropped from the output."""
  config: LlamaConfig
  dtype: Dtype
  param_dtype: Dtype
  implementation: Optional[str] = None
  additions: vit.Additions = ()

  @nn.compact
  def __call__(self, x, attention_mask, positions):
    c = self.config
    states = tuple(addition.encoder(
        vit.Site(self, c, self.dtype, self.param_dtype, None, None), x)
        for addition in self.additions)
    prefix, mask = 0, None
    for i in range(c.num_hidden_layers):
      length = x.shape[1]
      for addition, state in zip(self.additions, states):
        x = addition.tokens(vit.Site(self, c, self.dtype, self.param_dtype, i, state), x)
      added = x.shape[1] - length
      if added < 0:
        raise ValueError(f'a tokens hook removed {-added} tokens before block {i}: the '
                         'decoder only allows tokens put in front')
      if added:
        attention_mask, positions = extend_prefix(attention_mask, positions, added)
        prefix, mask = prefix + added, None
      if mask is None:
        mask = attention_mask_4d(attention_mask, c.sliding_window)
      x = LlamaDecoderLayer(c, self.dtype, self.param_dtype, self.implementation, i,
                            self.additions, states, name=str(i))(x, mask, positions)
    return x[:, prefix:]


class LlamaModel(nn.Module):
  """HF's `model`: embed_tokens, layers, norm. Returns the final hidden states."""
  config: LlamaConfig
  dtype: Dtype
  param_dtype: Dtype
  implementation: Optional[str] = None
  additions: vit.Additions = ()

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                                 param_dtype=self.param_dtype,
                                 embedding_init=nn.initializers.normal(0.02))
    self.layers = LlamaLayers(c, self.dtype, self.param_dtype, self.implementation,
                              self.additions)
    self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)

  def __call__(self, input_ids, attention_mask, positions):
    x = self.embed_tokens(input_ids)
    return self.norm(self.layers(x, attention_mask, positions))

  def attend(self, x):
    """x [..., hidden] times the embedding table transposed: the tied head."""
    return self.embed_tokens.attend(x)


class LlamaForCausalLM(nn.Module):
  """The decoder with its language-model head.

  `apply({'params': params}, input_ids, attention_mask=None, positions=None)`:
  input_ids [batch, tokens] int; attention_mask [batch, tokens] of 1 (token) / 0 (padding),
  None: all ones; positions [batch, tokens] int, None: each real token's index among the
  real tokens of its row (cumsum(attention_mask) - 1, 0 at padding), so left padding
  does not shift the rotary positions. Returns logits [batch, tokens, vocab_size] float32.
  Padding positions' logits are finite and meaningless.

  `dtype` is the compute dtype, `param_dtype` the parameters' (bfloat16 frozen weights:
  load them in bfloat16, `hf_checkpoint.load_params(dtype=jnp.bfloat16)`). In float32 on
  CPU it reproduces transformers' logits to 1e-5 (tests/test_llama.py); GPUs may multiply
  float32 in TF32 unless `jax.default_matmul_precision('highest')` is set.
  """
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: Optional[str] = None  # None/'xla', or 'cudnn' on GPUs.
  additions: vit.Additions = ()

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, positions=None):
    c = self.config
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    attention_mask = attention_mask.astype(jnp.int32)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    model = LlamaModel(c, self.dtype, self.param_dtype, self.attention,
                       tuple(self.additions), name='model')
    x = model(input_ids, attention_mask, positions)
    if c.tie_word_embeddings:
      logits = model.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.normal(0.02), name='lm_head')(x)
    return logits.astype(jnp.float32)

