"""Hugging Face model directories for the Llama-family decoder (`model/llama.py`).

A directory as `save_pretrained` writes it and the Hub serves it: `config.json`, the
weights as `model.safetensors` or as shards `model-0000k-of-0000n.safetensors` listed in
`model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`), and for text
`tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`). Weights are read
with `safetensors` into numpy (no torch); a Hub id (`org/name`) is fetched with
`huggingface_hub.snapshot_download` into its cache.

Names map one to one (`flax_path`, `hf_name`): a tensor's name split at '.' is its path in
the parameter tree, with the last component renamed: a Linear's `weight` [out, in] is the
`kernel` [in, out] (transposed), an Embedding's `weight` is `embedding`, an RMSNorm's
`weight` is `scale`, `bias` stays `bias`. See `llama.py`'s docstring for the table.

Every problem with the files is one `errors.UserError` line naming the file and the fix;
`check_compatible` finds them from `config.json` and the safetensors headers alone.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Any, Optional

import numpy as np

from fedpeft_jax import errors
from fedpeft_jax.model import llama

SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
# Bytes per element of the safetensors dtypes; only floating ones hold weights.
ITEMSIZE = {'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'F8_E4M3': 1, 'F8_E5M2': 1,
            'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1, 'U64': 8, 'U32': 4, 'U16': 2, 'U8': 1,
            'BOOL': 1, 'C64': 8}
FLOATS = ('F64', 'F32', 'F16', 'BF16')
# Tensors some checkpoints carry that the decoder computes itself (rotary buffers).
_IGNORED = re.compile(r'.*\.rotary_emb\.inv_freq$')
_HUB_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$')
HUB_FILES = ['config.json', 'generation_config.json', '*.safetensors', INDEX,
             'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json']
_SHOWN = 3  # Names shown per kind of problem: the message stays one line.


class CheckpointError(errors.UserError):
  pass


def _fail(message: str):
  raise CheckpointError(message, argument='path')


def flax_path(name: str) -> tuple[tuple[str, ...], bool]:
  """A Hugging Face tensor name -> (its path in the parameter tree, whether transposed).

  'model.layers.3.self_attn.q_proj.weight' -> (('model', 'layers', '3', 'self_attn',
  'q_proj', 'kernel'), True); embeddings -> 'embedding', norms -> 'scale'."""
  parts = name.split('.')
  if parts[-1] != 'weight':
    return tuple(parts), False
  owner = parts[-2]
  if owner == 'embed_tokens':
    return tuple(parts[:-1]) + ('embedding',), False
  if owner.endswith('norm'):
    return tuple(parts[:-1]) + ('scale',), False
  return tuple(parts[:-1]) + ('kernel',), True


def hf_name(path: tuple[str, ...]) -> str:
  """The inverse of `flax_path`: a parameter path -> its Hugging Face tensor name."""
  last = 'weight' if path[-1] in ('kernel', 'embedding', 'scale') else path[-1]
  return '.'.join(tuple(path[:-1]) + (last,))


def expected_shapes(config: llama.LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor the checkpoint of `config` holds, by HF name, in HF's orientation
  (Linear weights [out, in]). A tied model has no `lm_head.weight`."""
  c = config
  hidden, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, (
      c.num_key_value_heads * c.head_dim)
  shapes = {'model.embed_tokens.weight': (c.vocab_size, hidden), 'model.norm.weight': (hidden,)}
  linear = {'self_attn.q_proj': (q, hidden, c.qkv_bias),
            'self_attn.k_proj': (kv, hidden, c.qkv_bias),
            'self_attn.v_proj': (kv, hidden, c.qkv_bias),
            'self_attn.o_proj': (hidden, q, c.o_proj_bias),
            'mlp.gate_proj': (c.intermediate_size, hidden, c.mlp_bias),
            'mlp.up_proj': (c.intermediate_size, hidden, c.mlp_bias),
            'mlp.down_proj': (hidden, c.intermediate_size, c.mlp_bias)}
  for i in range(c.num_hidden_layers):
    prefix = f'model.layers.{i}.'
    shapes[prefix + 'input_layernorm.weight'] = (hidden,)
    shapes[prefix + 'post_attention_layernorm.weight'] = (hidden,)
    for name, (out, inp, bias) in linear.items():
      shapes[prefix + name + '.weight'] = (out, inp)
      if bias:
        shapes[prefix + name + '.bias'] = (out,)
  if not c.tie_word_embeddings:
    shapes['lm_head.weight'] = (c.vocab_size, hidden)
  return shapes


def read_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """A safetensors file's tensors, {name: (dtype, shape)}, from its header alone.

  The format: an 8-byte little-endian header length N, N bytes of JSON
  ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the
  data. Raises one UserError line for a missing file, an unreadable header or a file
  shorter than its header says (truncated)."""
  if not os.path.isfile(path):
    _fail(f'{path} does not exist: download the model again (all of its files)')
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    length = struct.unpack('<Q', head)[0] if len(head) == 8 else None
    if length is None or 8 + length > size:
      _fail(f'{path} is truncated ({size} bytes, shorter than its header): download it again')
    try:
      header = json.loads(f.read(length))
    except (ValueError, UnicodeDecodeError):
      header = None
  if not isinstance(header, dict):
    _fail(f'{path} is not a safetensors file (unreadable header): download it again')
  tensors, end = {}, 0
  for name, info in header.items():
    if name == '__metadata__':
      continue
    try:
      (begin, stop), shape, dtype = info['data_offsets'], tuple(info['shape']), info['dtype']
      count = int(np.prod(shape, dtype=np.int64))
    except (KeyError, TypeError, ValueError):
      count, begin, stop, dtype = -1, 0, 0, None
    if count < 0 or stop - begin != count * ITEMSIZE.get(dtype, 0):
      _fail(f'{path}: tensor {name} has a corrupt header entry: download the file again')
    tensors[name], end = (dtype, shape), max(end, stop)
  if 8 + length + end > size:
    _fail(f'{path} is truncated ({size} bytes; its header describes {8 + length + end}): '
          f'download it again')
  return tensors


def weight_files(directory: str) -> dict[str, tuple[str, str, tuple[int, ...]]]:
  """{tensor name: (file, dtype, shape)} over the directory's `model.safetensors`, or the
  shards its `model.safetensors.index.json` lists (each shard's header read once)."""
  single, index = os.path.join(directory, SINGLE), os.path.join(directory, INDEX)
  if os.path.exists(single):
    return {n: (single,) + v for n, v in read_header(single).items()}
  if not os.path.exists(index):
    other = [f for f in sorted(os.listdir(directory)) if f.endswith(('.bin', '.pth', '.pt'))]
    hint = (f' ({other[0]} is a PyTorch pickle, not read: save the model with '
            f'safe_serialization)' if other else '')
    _fail(f'{directory} has neither {SINGLE} nor {INDEX}{hint}: download the model\'s '
          f'safetensors weights')
  try:
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
  except (OSError, ValueError, KeyError, TypeError):
    _fail(f'{index} is not a safetensors index (no readable "weight_map"): download it again')
  found, headers = {}, {}
  for name, shard in sorted(weight_map.items()):
    path = os.path.join(directory, shard)
    if path not in headers:
      if not os.path.isfile(path):
        _fail(f'{index} lists {shard}, which is missing from {directory}: download it')
      headers[path] = read_header(path)
    if name not in headers[path]:
      _fail(f'{index} puts {name} in {shard}, which lacks it: download both again')
    found[name] = (path,) + headers[path][name]
  return found


def _names(names) -> str:
  names = sorted(names)
  more = f' and {len(names) - _SHOWN} more' if len(names) > _SHOWN else ''
  return ', '.join(names[:_SHOWN]) + more


def _compare(config: llama.LlamaConfig, files: dict, source: str) -> None:
  """One line for the first kind of mismatch between `config` and the tensors found."""
  want = expected_shapes(config)
  missing = [n for n in want if n not in files]
  if missing:
    single = os.path.join(source, SINGLE)
    where = single if os.path.exists(single) else os.path.join(source, INDEX)
    _fail(f'{where} lacks {len(missing)} tensor(s) its config.json needs '
          f'({_names(missing)}): the weights belong to another model; use the '
          f'directory\'s own files')
  extra = [n for n in files if n not in want and not _IGNORED.match(n)
           and not (n == 'lm_head.weight' and config.tie_word_embeddings)]
  if extra:
    _fail(f'{files[extra[0]][0]} holds {len(extra)} tensor(s) a {config.model_type} '
          f'decoder of its config.json does not have ({_names(extra)}): not a supported '
          f'Llama-family checkpoint, or config.json is from another model')
  for name, shape in want.items():
    path, dtype, found = files[name]
    if found != shape:
      _fail(f'{path}: {name} has shape {list(found)}, but config.json says {list(shape)}: '
            f'the weights and config.json are from different models; use matching files')
    if dtype not in FLOATS:
      _fail(f'{path}: {name} is {dtype}, not a float type ({", ".join(FLOATS)}): '
            f'quantized checkpoints are not read; use the unquantized weights')


def check_compatible(directory: str) -> llama.LlamaConfig:
  """Checks a model directory without reading any weight; returns its `LlamaConfig`.

  Reads `config.json` and the safetensors headers: every tensor the config implies is
  there with its shape and a float dtype, no file is truncated, no tensor is unexpected.
  Raises `CheckpointError` (a `UserError`, one line naming the file and the fix)."""
  if not os.path.isdir(directory):
    what = 'is a file, not a directory' if os.path.exists(directory) else 'does not exist'
    _fail(f'model directory {directory} {what} (working directory {os.getcwd()}): pass a '
          f'Hugging Face model directory (config.json + model.safetensors) or a Hub id')
  config = llama.LlamaConfig.from_file(os.path.join(directory, 'config.json'))
  _compare(config, weight_files(directory), directory)
  return config


def load_params(directory: str, dtype: Any = np.float32) -> tuple[llama.LlamaConfig, dict]:
  """(config, params) of a model directory, params the nested dict `LlamaForCausalLM`
  applies (`{'params': params}`), as host numpy arrays of `dtype` (e.g. jnp.bfloat16 for
  bfloat16 frozen weights), Linear weights transposed to kernels.

  Runs `check_compatible` first, so every problem is one `CheckpointError` line."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  config = check_compatible(directory)
  files = weight_files(directory)
  wanted = expected_shapes(config)
  by_file: dict[str, list[str]] = {}
  for name in wanted:
    by_file.setdefault(files[name][0], []).append(name)
  params: dict = {}
  for path, names in by_file.items():
    with safe_open(path, framework='np') as f:
      for name in names:
        tree_path, transposed = flax_path(name)
        value = f.get_tensor(name)
        value = np.ascontiguousarray(value.T if transposed else value, dtype=np.dtype(dtype))
        node = params
        for key in tree_path[:-1]:
          node = node.setdefault(key, {})
        node[tree_path[-1]] = value
  return config, params


def is_hub_id(name: str) -> bool:
  """Whether `name` reads as a Hub repository id (`org/name`) rather than a path."""
  return bool(_HUB_ID.match(name)) and '..' not in name


def resolve(name_or_path: str, cache_dir: Optional[str] = None,
            local_files_only: bool = False) -> str:
  """The local model directory for a path, or for a Hub id (`org/name` that is not an
  existing path) the snapshot `huggingface_hub.snapshot_download` fetches into its cache
  (`cache_dir`, None: the Hub's default, `HF_HUB_CACHE`): config, safetensors weights and
  tokenizer files only. A missing path, or a Hub id that cannot be fetched (offline,
  unknown, gated), is one `CheckpointError` line naming it and the cache directory."""
  if os.path.exists(name_or_path) or not is_hub_id(name_or_path):
    return name_or_path  # `check_compatible` names what is wrong with a path.
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
  try:
    return huggingface_hub.snapshot_download(
        name_or_path, cache_dir=cache_dir, allow_patterns=HUB_FILES,
        local_files_only=local_files_only)
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    _fail(f'{name_or_path} is neither a local directory (working directory {os.getcwd()}) '
          f'nor fetched from the Hugging Face Hub into {cache} ({type(e).__name__}: '
          f'{reason}): connect to the internet, or download it elsewhere and pass its '
          f'directory')


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A model's `tokenizers.Tokenizer` and special ids. `eos_ids` holds every end token
  (Llama 3 lists several; `eos_id` is the first). An id is None where the model defines
  none (many decoders have no pad token: the caller picks one and masks it)."""
  tokenizer: Any
  bos_id: Optional[int]
  eos_ids: tuple[int, ...]
  pad_id: Optional[int]

  @property
  def eos_id(self) -> Optional[int]:
    return self.eos_ids[0] if self.eos_ids else None


def _json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    _fail(f'{path} is not readable JSON ({e}): download it again')
  return value if isinstance(value, dict) else {}


def _special_id(directory: str, key: str, tokenizer) -> Optional[tuple[int, ...]]:
  """`{key}_token_id` from config.json, else generation_config.json, else the token
  string `{key}_token` of tokenizer_config.json (a string or {"content": ...})."""
  for name in ('config.json', 'generation_config.json'):
    value = _json(os.path.join(directory, name)).get(f'{key}_token_id')
    if value is not None:
      return tuple(value) if isinstance(value, list) else (int(value),)
  path = os.path.join(directory, 'tokenizer_config.json')
  token = _json(path).get(f'{key}_token')
  if isinstance(token, dict):
    token = token.get('content')
  if token is None:
    return None
  token_id = tokenizer.token_to_id(token)
  if token_id is None:
    _fail(f'{path}: {key}_token {token!r} is not in tokenizer.json: use the tokenizer '
          f'files saved with this model')
  return (token_id,)


def load_tokenizer(directory: str, vocab_size: int) -> Tokenizer:
  """The directory's `tokenizer.json` (Hugging Face `tokenizers`) with bos, eos and pad
  ids from the model's config (`_special_id`'s order). One `CheckpointError` line when
  the file is missing or unreadable, or when a token id (vocabulary or special) does not
  fit the model's `vocab_size` embeddings."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  path = os.path.join(directory, 'tokenizer.json')
  if not os.path.isfile(path):
    _fail(f'{path} does not exist: the model directory needs its tokenizer.json '
          f'(save the tokenizer with save_pretrained)')
  try:
    tokenizer = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except
    _fail(f'{path} is not a readable tokenizer ({str(e).splitlines()[0][:120]}): '
          f'download it again')
  largest = max(tokenizer.get_vocab(with_added_tokens=True).values())
  if largest >= vocab_size:
    _fail(f'{path} has token ids up to {largest}, but the model\'s vocab_size is '
          f'{vocab_size}: use the tokenizer saved with this model')
  ids = {key: _special_id(directory, key, tokenizer) for key in ('bos', 'eos', 'pad')}
  for key, values in ids.items():
    if values and max(values) >= vocab_size:
      _fail(f'{directory}: {key}_token_id {max(values)} is outside the model\'s '
            f'vocab_size {vocab_size}: use the config files saved with this model')
  first = lambda values: values[0] if values else None
  return Tokenizer(tokenizer, first(ids['bos']), ids['eos'] or (), first(ids['pad']))
