"""The Llama-family decoder (fedpeft_jax/model/llama.py) and its Hugging Face checkpoint
loading (fedpeft_jax/model/hf_checkpoint.py), checked against transformers' own logits
(../shared/backbones/tiny_llama_en/reference.npz), a float64 numpy transcription of the
forward pass, and Meta's published Llama 3 rope-scaling formula (issue 21)."""
import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from fedpeft_jax import errors
from fedpeft_jax.model import hf_checkpoint as hc
from fedpeft_jax.model import llama
from fedpeft_jax.model import vit
from tests.conftest import SHARED, needs

TINY_LLAMA = SHARED / 'backbones' / 'tiny_llama_en'


@pytest.fixture(autouse=True)
def full_float32_matmuls():
  """GPUs may multiply float32 in TF32 by default; the 1e-4 comparisons need float32."""
  with jax.default_matmul_precision('highest'):
    yield

# A small synthetic decoder: grouped-query attention (4 heads, 2 kv heads), untied head.
SMALL = {'model_type': 'llama', 'vocab_size': 40, 'hidden_size': 16,
         'intermediate_size': 24, 'num_hidden_layers': 2, 'num_attention_heads': 4,
         'num_key_value_heads': 2, 'rms_norm_eps': 1e-5, 'rope_theta': 10000.0,
         'tie_word_embeddings': False, 'hidden_act': 'silu'}


def _weights(config: dict, seed: int = 0) -> dict:
  """Random HF-named float32 tensors for `config` (norm weights near 1)."""
  rng = np.random.default_rng(seed)
  shapes = hc.expected_shapes(llama.LlamaConfig.from_hf(config))
  return {name: ((1.0 if 'norm' in name else 0.0) + rng.normal(0, 0.3, shape)
                 ).astype(np.float32) for name, shape in shapes.items()}


def _write(directory, config: dict, tensors: dict, shards: int = 1) -> str:
  """A model directory: config.json and the tensors in one file or `shards` shards."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f)
  if shards == 1:
    save_file(tensors, os.path.join(directory, hc.SINGLE))
    return str(directory)
  names, weight_map = sorted(tensors), {}
  for k in range(shards):
    shard = f'model-{k + 1:05d}-of-{shards:05d}.safetensors'
    part = {n: tensors[n] for n in names[k::shards]}
    save_file(part, os.path.join(directory, shard))
    weight_map.update({n: shard for n in part})
  with open(os.path.join(directory, hc.INDEX), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  return str(directory)


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
  with pytest.raises(errors.UserError, match=match) as info:
    fn(*args, **kwargs)
  assert '\n' not in str(info.value)
  return str(info.value)


def _logits(config, params, ids, mask=None, dtype=jnp.float32):
  model = llama.LlamaForCausalLM(config, dtype=dtype)
  return np.asarray(model.apply({'params': params}, jnp.asarray(ids, jnp.int32),
                                None if mask is None else jnp.asarray(mask)))


def _meta_llama3_scaling(freqs, factor, low, high, old_context):
  """Meta's `apply_scaling` (meta-llama/llama-models, llama3 reference code), one
  frequency at a time."""
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < old_context / high:
      out.append(freq)
    elif wavelen > old_context / low:
      out.append(freq / factor)
    else:
      smooth = (old_context / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


# --- An independent float64 numpy transcription of the forward pass -----------------------

def _numpy_logits(c: llama.LlamaConfig, tensors: dict, ids, mask) -> np.ndarray:
  """transformers' LlamaForCausalLM written out on the HF tensors themselves (weights
  [out, in]): rotary embeddings as complex rotations of (x_j, x_{j + d/2}) pairs, key and
  value heads repeated for grouped-query attention, float64 throughout."""
  w = {k: v.astype(np.float64) for k, v in tensors.items()}
  linear = lambda x, name: x @ w[name + '.weight'].T + w.get(name + '.bias', 0.0)
  rms = lambda x, name: x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_norm_eps) * w[
      name + '.weight']
  d, g = c.head_dim, c.num_attention_heads // c.num_key_value_heads
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  freq = c.rope_theta ** (-np.arange(0, d, 2) / d)
  if c.rope_scaling is not None:
    r = c.rope_scaling
    freq = _meta_llama3_scaling(freq, r.factor, r.low_freq_factor, r.high_freq_factor,
                                r.original_max_position_embeddings)
  turn = np.exp(1j * pos[..., None, None] * freq)  # [B, T, 1, d/2]

  def rope(x):
    z = (x[..., :d // 2] + 1j * x[..., d // 2:]) * turn
    return np.concatenate([z.real, z.imag], -1)

  b, t = ids.shape
  allowed = np.tril(np.ones((t, t), bool))[None] & (mask[:, None, :] == 1)
  if c.sliding_window:  # Mistral: the `sliding_window` latest keys, the query's own included.
    allowed &= ~np.tril(np.ones((t, t), bool), -c.sliding_window)[None]
  x = w['model.embed_tokens.weight'][ids]
  for i in range(c.num_hidden_layers):
    p = f'model.layers.{i}.'
    h = rms(x, p + 'input_layernorm')
    q = rope(linear(h, p + 'self_attn.q_proj').reshape(b, t, -1, d))
    k = np.repeat(rope(linear(h, p + 'self_attn.k_proj').reshape(b, t, -1, d)), g, 2)
    v = np.repeat(linear(h, p + 'self_attn.v_proj').reshape(b, t, -1, d), g, 2)
    s = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(d)
    s = np.where(allowed[:, None], s, -1e30)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = np.einsum('bhqk,bkhd->bqhd', a, v).reshape(b, t, -1)
    x = x + linear(y, p + 'self_attn.o_proj')
    h = rms(x, p + 'post_attention_layernorm')
    gate = linear(h, p + 'mlp.gate_proj')
    x = x + linear(gate / (1 + np.exp(-gate)) * linear(h, p + 'mlp.up_proj'),
                   p + 'mlp.down_proj')
  x = rms(x, 'model.norm')
  head = w['lm_head.weight'] if 'lm_head.weight' in w else w['model.embed_tokens.weight']
  return x @ head.T


# --- The real checkpoint ------------------------------------------------------------------

@needs(TINY_LLAMA)
def test_tiny_llama_reproduces_transformers_logits():
  config, params = hc.load_params(str(TINY_LLAMA))
  assert config.num_key_value_heads == 2 and config.tie_word_embeddings
  assert sum(v.size for v in jax.tree_util.tree_leaves(params)) == 1_049_728
  ref = np.load(TINY_LLAMA / 'reference.npz')
  logits = _logits(config, params, ref['input_ids'], ref['attention_mask'])
  real = ref['attention_mask'] == 1
  assert logits.dtype == np.float32 and logits.shape == ref['logits'].shape
  assert np.abs(logits - ref['logits'])[real].max() <= 1e-4


@needs(TINY_LLAMA)
def test_tiny_llama_tokenizer_and_special_ids():
  config = hc.check_compatible(str(TINY_LLAMA))
  tok = hc.load_tokenizer(str(TINY_LLAMA), config.vocab_size)
  assert (tok.bos_id, tok.eos_ids, tok.eos_id, tok.pad_id) == (0, (1,), 1, 2)
  ids = tok.tokenizer.encode('In the beginning', add_special_tokens=False).ids
  assert ids and max(ids) < config.vocab_size and tok.tokenizer.decode(ids) == 'In the beginning'
  _one_line_error(r'tokenizer\.json has token ids up to 2047.*vocab_size is 1000',
                  hc.load_tokenizer, str(TINY_LLAMA), 1000)


def test_special_ids_fall_back_to_tokenizer_config_and_are_checked(tmp_path):
  if not (TINY_LLAMA / 'tokenizer.json').exists():
    pytest.skip(f'{TINY_LLAMA} (../shared) is not here')
  shutil.copy(TINY_LLAMA / 'tokenizer.json', tmp_path)
  with open(tmp_path / 'tokenizer_config.json', 'w') as f:
    json.dump({'bos_token': {'content': '</s>'}, 'eos_token': '<pad>'}, f)
  tok = hc.load_tokenizer(str(tmp_path), 2048)
  assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2,), None)
  with open(tmp_path / 'generation_config.json', 'w') as f:
    json.dump({'eos_token_id': [1, 5000]}, f)
  _one_line_error(r'eos_token_id 5000 is outside .* vocab_size 2048',
                  hc.load_tokenizer, str(tmp_path), 2048)
  os.remove(tmp_path / 'tokenizer.json')
  _one_line_error(r'tokenizer\.json does not exist', hc.load_tokenizer, str(tmp_path), 2048)


# --- Against the numpy transcription ------------------------------------------------------

@pytest.mark.parametrize('variant', ['llama', 'qwen2_tied', 'llama3_rope', 'mistral'])
def test_decoder_equals_a_numpy_transcription(tmp_path, variant):
  config = dict(SMALL)
  if variant == 'qwen2_tied':  # q, k, v biases (no o_proj bias), tied head.
    config.update(model_type='qwen2', tie_word_embeddings=True)
  if variant == 'llama3_rope':  # head_dim 4: frequencies 1 (smoothed) and 0.01 (divided).
    config.update(rope_theta=None, rope_parameters={
        'rope_type': 'llama3', 'rope_theta': 10000.0, 'factor': 4.0, 'low_freq_factor': 1.0,
        'high_freq_factor': 4.0, 'original_max_position_embeddings': 16})
  if variant == 'mistral':
    config.update(model_type='mistral', sliding_window=3)
  tensors = _weights(config)
  c, params = hc.load_params(_write(tmp_path, config, tensors))
  assert (c.sliding_window == 3) == (variant == 'mistral')
  if variant == 'qwen2_tied':
    assert c.qkv_bias and not c.o_proj_bias and 'model.layers.1.self_attn.k_proj.bias' in tensors
  ids = np.random.default_rng(1).integers(0, 40, (2, 7))
  mask = np.array([[1] * 7, [1] * 5 + [0] * 2])
  want = _numpy_logits(c, tensors, ids, mask)
  got = _logits(c, params, ids, mask)
  real = mask == 1
  assert np.abs(got - want)[real].max() < 1e-4 * max(1.0, np.abs(want).max())


# --- Rotary embeddings ----------------------------------------------------------------------

def test_llama3_rope_scaling_equals_the_published_formula():
  # Llama 3.1 8B's values, in transformers 4's form and in transformers 5's.
  base = dict(SMALL, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8)
  scaling = {'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
             'original_max_position_embeddings': 8192}
  old = llama.LlamaConfig.from_hf(dict(base, rope_theta=500000.0,
                                       rope_scaling=dict(scaling, rope_type='llama3')))
  new = llama.LlamaConfig.from_hf(dict(base, rope_parameters=dict(
      scaling, rope_type='llama3', rope_theta=500000.0)))
  assert old == new and old.rope_scaling.factor == 8.0 and old.head_dim == 128
  plain = 500000.0 ** (-np.arange(0, 128, 2) / 128)
  want = _meta_llama3_scaling(plain, 8.0, 1.0, 4.0, 8192)
  got = llama.rope_frequencies(old)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  # All three regimes occur: kept, divided by 8, and smoothed in between.
  assert np.isclose(got[0], plain[0]) and np.isclose(got[-1], plain[-1] / 8)
  assert np.any((got < plain * 0.99) & (got > plain / 8 * 1.01))
  linear = llama.LlamaConfig.from_hf(dict(base, rope_scaling={'type': 'linear', 'factor': 2}))
  np.testing.assert_allclose(llama.rope_frequencies(linear), 10000.0 ** (
      -np.arange(0, 128, 2) / 128) / 2, rtol=2e-6)


# --- Grouped-query attention, padding, dtypes -----------------------------------------------

def test_grouped_query_attention_equals_repeating_key_value_heads(tmp_path):
  c, params = hc.load_params(_write(tmp_path, SMALL, _weights(SMALL)))
  full = llama.LlamaConfig.from_hf(dict(SMALL, num_key_value_heads=4))
  repeated = jax.tree_util.tree_map(np.array, params)
  for layer in repeated['model']['layers'].values():
    for name in ('k_proj', 'v_proj'):
      kernel = layer['self_attn'][name]['kernel']  # [hidden, kv_heads * head_dim]
      heads = kernel.reshape(kernel.shape[0], c.num_key_value_heads, c.head_dim)
      layer['self_attn'][name]['kernel'] = np.repeat(heads, 2, axis=1).reshape(
          kernel.shape[0], -1)
  ids = np.random.default_rng(2).integers(0, 40, (2, 9))
  grouped, plain = _logits(c, params, ids), _logits(full, repeated, ids)
  np.testing.assert_allclose(grouped, plain, atol=1e-5)
  assert np.abs(grouped).max() > 1.0  # Not a trivially constant model.


def test_padding_does_not_change_the_real_tokens_logits(tmp_path):
  c, params = hc.load_params(_write(tmp_path, SMALL, _weights(SMALL)))
  ids = np.random.default_rng(3).integers(3, 40, (1, 6))
  alone = _logits(c, params, ids)[0]
  pad = np.full((1, 4), 2)
  right = _logits(c, params, np.concatenate([ids, pad], 1), np.array([[1] * 6 + [0] * 4]))
  left = _logits(c, params, np.concatenate([pad, ids], 1), np.array([[0] * 4 + [1] * 6]))
  np.testing.assert_allclose(right[0, :6], alone, atol=1e-5)
  np.testing.assert_allclose(left[0, 4:], alone, atol=1e-5)
  assert np.isfinite(left).all() and np.isfinite(right).all()
  # The mask matters: attending to the padding would change them.
  unmasked = _logits(c, params, np.concatenate([pad, ids], 1))[0, 4:]
  assert np.abs(unmasked - alone).max() > 1e-2


@needs(TINY_LLAMA)
def test_bfloat16_frozen_weights_run():
  config, params32 = hc.load_params(str(TINY_LLAMA))
  _, params16 = hc.load_params(str(TINY_LLAMA), dtype=jnp.bfloat16)
  assert {v.dtype for v in jax.tree_util.tree_leaves(params16)} == {np.dtype(jnp.bfloat16)}
  ref = np.load(TINY_LLAMA / 'reference.npz')
  real = ref['attention_mask'] == 1
  for dtype in (jnp.float32, jnp.bfloat16):
    logits = _logits(config, params16, ref['input_ids'], ref['attention_mask'], dtype)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    agree = (logits.argmax(-1) == ref['logits'].argmax(-1))[real].mean()
    assert agree > 0.95 and np.abs(logits - ref['logits'])[real].mean() < 0.05, (dtype, agree)


# --- Parameter counts -----------------------------------------------------------------------

LLAMA2_7B = {'model_type': 'llama', 'vocab_size': 32000, 'hidden_size': 4096,
             'intermediate_size': 11008, 'num_hidden_layers': 32, 'num_attention_heads': 32,
             'num_key_value_heads': 32, 'rms_norm_eps': 1e-5, 'tie_word_embeddings': False,
             'max_position_embeddings': 4096}


def test_llama2_7b_parameter_count_without_weights():
  config = llama.LlamaConfig.from_hf(LLAMA2_7B)
  shapes = jax.eval_shape(llama.LlamaForCausalLM(config).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 4), jnp.int32))
  leaves = jax.tree_util.tree_leaves_with_path(shapes['params'])
  assert sum(math.prod(v.shape) for _, v in leaves) == 6_738_415_616
  # Every parameter is named as in the HF checkpoint, with HF's shape transposed for kernels.
  expected = hc.expected_shapes(config)
  names = {hc.hf_name(tuple(k.key for k in path)): v.shape for path, v in leaves}
  assert set(names) == set(expected)
  for name, shape in names.items():
    assert shape == expected[name][::-1] if hc.flax_path(name)[1] else expected[name]


# --- The loader's one-line errors -----------------------------------------------------------

def test_sharded_checkpoint_loads_as_the_single_file(tmp_path):
  tensors = _weights(SMALL)
  _, single = hc.load_params(_write(tmp_path / 'one', SMALL, tensors))
  sharded_dir = _write(tmp_path / 'three', SMALL, tensors, shards=3)
  _, sharded = hc.load_params(sharded_dir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, single, sharded)
  np.testing.assert_array_equal(single['model']['layers']['1']['mlp']['up_proj']['kernel'],
                                tensors['model.layers.1.mlp.up_proj.weight'].T)
  os.remove(os.path.join(sharded_dir, 'model-00002-of-00003.safetensors'))
  _one_line_error(r'model\.safetensors\.index\.json lists model-00002-of-00003\.safetensors, '
                  r'which is missing', hc.check_compatible, sharded_dir)


def test_missing_directory_config_and_weights(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _one_line_error(r'model directory nowhere/at/all does not exist \(working directory '
                  + str(tmp_path), hc.check_compatible, 'nowhere/at/all')
  os.makedirs('empty')
  _one_line_error(r'empty/config\.json does not exist', hc.check_compatible, 'empty')
  with open('empty/config.json', 'w') as f:
    json.dump(SMALL, f)
  open('empty/pytorch_model.bin', 'w').close()
  _one_line_error(r'neither model\.safetensors nor .*pytorch_model\.bin is a PyTorch pickle',
                  hc.check_compatible, 'empty')


def test_truncated_safetensors_file(tmp_path):
  directory = _write(tmp_path, SMALL, _weights(SMALL))
  path = os.path.join(directory, hc.SINGLE)
  data = open(path, 'rb').read()
  for size in (len(data) - 10, 100, 5):
    with open(path, 'wb') as f:
      f.write(data[:size])
    _one_line_error(rf'{path} is truncated .*download it again', hc.check_compatible,
                    directory)


def test_wrong_missing_and_unexpected_tensors(tmp_path):
  tensors = _weights(SMALL)
  wrong = dict(tensors)
  wrong['model.layers.1.self_attn.k_proj.weight'] = np.zeros((16, 16), np.float32)
  _one_line_error(r'model\.safetensors: model\.layers\.1\.self_attn\.k_proj\.weight has '
                  r'shape \[16, 16\], but config\.json says \[8, 16\]',
                  hc.check_compatible, _write(tmp_path / 'wrong', SMALL, wrong))
  missing = {k: v for k, v in tensors.items() if k != 'lm_head.weight'}
  _one_line_error(r'lacks 1 tensor.*lm_head\.weight', hc.check_compatible,
                  _write(tmp_path / 'missing', SMALL, missing))
  extra = dict(tensors, **{'model.layers.0.self_attn.q_norm.weight': np.ones(4, np.float32)})
  _one_line_error(r'holds 1 tensor.*q_norm\.weight', hc.check_compatible,
                  _write(tmp_path / 'extra', SMALL, extra))
  ints = dict(tensors, **{'model.norm.weight': np.ones(16, np.int8)})
  _one_line_error(r'model\.norm\.weight is I8, not a float type', hc.check_compatible,
                  _write(tmp_path / 'ints', SMALL, ints))
  # Tied models may carry the duplicate head, and old files rotary buffers: both ignored.
  tied = dict(SMALL, tie_word_embeddings=True)
  harmless = dict(tensors, **{'model.layers.0.self_attn.rotary_emb.inv_freq':
                              np.ones(2, np.float32)})
  assert hc.check_compatible(_write(tmp_path / 'tied', tied, harmless)).tie_word_embeddings


@pytest.mark.parametrize('change, match', [
    ({'model_type': 'mixtral'}, r"model_type 'mixtral' is not a supported decoder"),
    ({'hidden_act': 'gelu'}, r"hidden_act 'gelu' is not supported"),
    ({'num_key_value_heads': 3}, r'num_attention_heads 4 is not a multiple of '
                                 r'num_key_value_heads 3'),
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 4}}, r"rope type 'yarn' is not supported"),
    ({'vocab_size': None}, r"has no 'vocab_size'"),
])
def test_config_mistakes_are_one_line(change, match):
  _one_line_error(match, llama.LlamaConfig.from_hf, dict(SMALL, **change))


def test_hub_ids_fetch_into_the_cache_or_fail_in_one_line(tmp_path, monkeypatch):
  assert hc.resolve(str(tmp_path)) == str(tmp_path)  # A local directory is used as is.
  assert hc.is_hub_id('meta-llama/Llama-2-7b-hf') and not hc.is_hub_id('/abs/dir')
  message = _one_line_error(r'no-such-org/no-such-model is neither a local directory',
                            hc.resolve, 'no-such-org/no-such-model',
                            cache_dir=str(tmp_path / 'cache'), local_files_only=True)
  assert str(tmp_path / 'cache') in message
  calls = []
  import huggingface_hub
  monkeypatch.setattr(huggingface_hub, 'snapshot_download',
                      lambda repo, **kw: calls.append((repo, kw)) or '/snapshot')
  assert hc.resolve('org/name', cache_dir='/c') == '/snapshot'
  assert calls[0][0] == 'org/name' and calls[0][1]['cache_dir'] == '/c'
  assert '*.safetensors' in calls[0][1]['allow_patterns']


def test_projection_hooks_see_every_linear_map(tmp_path):
  seen = []

  @dataclasses.dataclass(frozen=True)
  class Record(vit.Addition):
    def projection(self, site, name, x, out):
      seen.append((site.layer, name, out.shape[-1]))
      return out + 1.0 if name == 'down_proj' and site.layer == 1 else out

  c, params = hc.load_params(_write(tmp_path, SMALL, _weights(SMALL)))
  ids = np.zeros((1, 3), np.int32)
  hooked = llama.LlamaForCausalLM(c, additions=(Record(),)).apply({'params': params}, ids)
  assert [(l, n) for l, n, _ in seen] == [(l, n) for l in (0, 1) for n in llama.PROJECTIONS]
  assert dict((n, f) for _, n, f in seen) == {'q_proj': 16, 'k_proj': 8, 'v_proj': 8,
                                              'o_proj': 16, 'gate_proj': 24, 'up_proj': 24,
                                              'down_proj': 16}
  assert np.abs(np.asarray(hooked) - _logits(c, params, ids)).max() > 1e-3
