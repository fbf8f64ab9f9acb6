"""Llama-family decoders (Llama 2/3, TinyLlama, Mistral, Qwen2) from Hugging Face model
directories, for causal language modelling (`--config.model.family=llama`).

`model.checkpoint` is the model directory (`config.json` + safetensors weights) or a Hub id
(`org/name`, fetched into the Hub cache by `hf_checkpoint.resolve`). Without weights,
`model.hf_config` describes the model by its `config.json` values (a dict, e.g.
`experiments/llama2_7b.py`): `--mode=masks` then counts every method's parameters with
nothing downloaded, and a run starts from random weights. With both, they must describe the
same model (the launch check names the first difference).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedpeft_jax import errors
from fedpeft_jax import peft
from fedpeft_jax.model import hf_checkpoint
from fedpeft_jax.model import llama
from fedpeft_jax.model.families import MODEL_FAMILIES
from fedpeft_jax.model.families.base import ModelFamily

HF_CONFIG = 'model.hf_config'


def _hf_config(config) -> dict:
  """`model.hf_config` as a plain dict ({} when unset)."""
  value = config.model.get('hf_config') or {}
  return dict(value.to_dict() if hasattr(value, 'to_dict') else value)


def _config_file(checkpoint: str) -> str:
  """The `config.json` of a model directory, or of a Hub id (that file alone is fetched
  into the Hub cache: no weights). A missing one is named by `LlamaConfig.from_file`."""
  if os.path.exists(checkpoint) or not hf_checkpoint.is_hub_id(checkpoint):
    if not os.path.isdir(checkpoint):
      what = 'is a file, not a directory' if os.path.exists(checkpoint) else 'does not exist'
      raise errors.UserError(
          f'model directory {checkpoint} {what} (working directory {os.getcwd()}): pass a '
          'Hugging Face model directory (config.json + model.safetensors) or a Hub id',
          argument='path')
    return os.path.join(checkpoint, 'config.json')
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  try:
    return huggingface_hub.hf_hub_download(checkpoint, 'config.json')
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise errors.UserError(
        f'{checkpoint} is neither a local directory (working directory {os.getcwd()}) nor '
        f'fetched from the Hugging Face Hub into {huggingface_hub.constants.HF_HUB_CACHE} '
        f'({type(e).__name__}: {reason}): connect to the internet, or download it '
        'elsewhere and pass its directory', argument='path') from None


@functools.lru_cache(maxsize=16)
def _read_config(path: str, mtime: float) -> llama.LlamaConfig:  # Cached per file version.
  del mtime
  return llama.LlamaConfig.from_file(path)


def llama_config(config) -> llama.LlamaConfig:
  """The decoder `config.model` describes: the checkpoint's `config.json` (no weights
  read), else `model.hf_config`. Raises `UserError` with argument 'path' (the checkpoint)
  or 'hf_config'."""
  checkpoint = config.model.checkpoint
  if checkpoint:
    path = _config_file(checkpoint)
    return _read_config(path, os.path.getmtime(path) if os.path.exists(path) else 0.0)
  described = _hf_config(config)
  if not described:
    raise errors.UserError(
        'the llama family needs --config.model.checkpoint (a Hugging Face model directory '
        'or Hub id), or --config.model.hf_config (its config.json values: counts and '
        'random weights only)', argument='path')
  try:
    return llama.LlamaConfig.from_hf(described, HF_CONFIG)
  except errors.UserError as e:
    raise errors.UserError(str(e), argument='hf_config') from None


def build(config, method: str, peft_options: dict) -> llama.LlamaForCausalLM:
  """The decoder of `config.model` with the additions of `method`, computing in
  `model.dtype` with float32 parameters."""
  return llama.LlamaForCausalLM(
      llama_config(config), dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.float32,
      attention=config.model.attention or None,
      additions=peft.modules_for(method, **peft_options))


def dummy_input(config) -> tuple:
  """Token ids and attention mask [1, 8]: the shapes of `LlamaForCausalLM.init`."""
  return jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)


def _directory(config) -> str:
  return hf_checkpoint.resolve(config.model.checkpoint)


def _backbone(tree) -> dict:
  """The flat {path: leaf} of a parameter tree without any PEFT method's additions."""
  return {k: v for k, v in traverse_util.flatten_dict(tree).items() if not peft.is_added(k)}


def load_pretrained(config, params):
  """`params` (a fresh tree, additions included) with every backbone leaf replaced by the
  checkpoint's weight in the leaf's dtype (`hf_checkpoint.load_params`); the additions
  keep their initial values."""
  _, loaded = hf_checkpoint.load_params(_directory(config))
  loaded = traverse_util.flatten_dict(loaded)
  fresh = traverse_util.flatten_dict(params)
  missing = sorted('/'.join(k) for k in _backbone(params) if k not in loaded)
  if missing:  # check_compatible compared the file with config.json, the model's source.
    raise hf_checkpoint.CheckpointError(
        f'{config.model.checkpoint} lacks {len(missing)} of the model\'s parameters '
        f'({", ".join(missing[:3])}): use the directory\'s own config.json', argument='path')
  return traverse_util.unflatten_dict({
      k: (np.asarray(loaded[k], v.dtype) if k in loaded else v) for k, v in fresh.items()})


def check_pretrained(config, abstract_params) -> None:
  """The directory's `config.json` and safetensors headers (no weights read) hold every
  backbone parameter of the model with its shape (`hf_checkpoint.check_compatible`)."""
  found = hf_checkpoint.check_compatible(_directory(config))
  want = hf_checkpoint.expected_shapes(found)
  for path, leaf in _backbone(abstract_params).items():
    name = hf_checkpoint.hf_name(path)
    shape = want.get(name)
    if shape is None or tuple(reversed(shape) if path[-1] == 'kernel' else shape) != tuple(
        leaf.shape):
      raise hf_checkpoint.CheckpointError(
          f'{config.model.checkpoint} has {name} {shape}, the model {tuple(leaf.shape)}: '
          'the model was described by another config.json', argument='path')


def _difference(a: llama.LlamaConfig, b: llama.LlamaConfig) -> str:
  for field in dataclasses.fields(llama.LlamaConfig):
    x, y = getattr(a, field.name), getattr(b, field.name)
    if x != y:
      return f'{field.name} {x!r} there, {y!r} here'
  return ''


def checks(config, needs_weights: bool):
  """A model the config describes (checkpoint or `model.hf_config`); with weights
  needed, the checkpoint's files complete (headers only); with both, the same model."""
  try:
    found = llama_config(config)
  except errors.UserError as e:
    yield ('model.hf_config' if e.argument == 'hf_config' else 'model.checkpoint'), str(e)
    return
  described = _hf_config(config)
  if config.model.checkpoint and described:
    try:
      differs = _difference(found, llama.LlamaConfig.from_hf(described, HF_CONFIG))
    except errors.UserError as e:
      differs = str(e)
    if differs:
      yield HF_CONFIG, (f'describes another model than {config.model.checkpoint} '
                        f'({differs}): make it agree with its config.json, or leave it empty')
      return
  if config.model.checkpoint and needs_weights:
    try:
      hf_checkpoint.check_compatible(_directory(config))
    except errors.UserError as e:
      yield 'model.checkpoint', str(e)


def dimensions(config) -> llama.LlamaConfig:
  return llama_config(config)


MODEL_FAMILIES.register('llama', ModelFamily(
    build=build, dummy_input=dummy_input, load_pretrained=load_pretrained,
    check_pretrained=check_pretrained, task='causal_lm', checks=checks,
    dimensions=dimensions,
    summary='Llama-family decoder, Hugging Face model directories or Hub ids'))
