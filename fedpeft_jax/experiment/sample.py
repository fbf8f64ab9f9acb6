"""`launch.py --mode=sample`: the trained decoder continues a prompt.

The model is the config's (its backbone from `model.checkpoint`, built by `build.py` as a
run builds it, with the same seeded initial additions, e.g. FFA-LoRA's frozen A) with the
trainable parameters of the workdir's `trainable.npz` (`resume.export_trainable`, written
at a run's end) and, for a LoRA rule that merges updates into the adapted kernels
(`peft.lora_aggregation` fedex, flora, flexlora: the served model is not the trainable
factors alone), the kernel deltas of the workdir's `merged.npz` folded into the frozen
kernels (`callbacks.ExportMerged`), so the sampled model is the one the run evaluated.
The prompt is tokenized by the model directory's `tokenizer.json` as the
text source tokenizes a record: bos + its tokens, no eos. Generation
(`tasks.causal_lm.make_generate`) is greedy at temperature 0, else sampled with keys from
`seed`; it stops at eos, after `max_new_tokens`, or where the positions reach the model's
`max_position_embeddings` (a soft prompt's tokens count).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedpeft_jax import errors
from fedpeft_jax import peft
from fedpeft_jax import resume
from fedpeft_jax import validation
from fedpeft_jax.experiment import build
from fedpeft_jax.federated import lora_rules
from fedpeft_jax.model import hf_checkpoint
from fedpeft_jax.peft import lora
from fedpeft_jax.tasks import causal_lm

TRAINABLE_FILE = 'trainable.npz'
MERGED_FILE = 'merged.npz'


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A decoder ready to continue prompts: its module, whole parameter tree, tokenizer
  (`hf_checkpoint.Tokenizer`), how many positions a sequence may take (the model's
  `max_position_embeddings` less any soft-prompt tokens in front) and its jitted
  `causal_lm.make_generate` (stopping at the tokenizer's eos ids), compiled once per
  buffer length and reused by every `generate_ids` call."""
  model: Any
  params: Any
  tokenizer: hf_checkpoint.Tokenizer
  max_length: int
  generate: Callable


def check_task(config) -> None:
  """Raises UserError unless `config`'s model family serves `causal_lm` (a decoder)."""
  task = build.model_family(config).task
  if task != 'causal_lm':
    raise errors.UserError(
        f'--mode=sample continues text with a decoder; --config.model.family='
        f'{config.model.family!r} serves {task!r}: use a causal_lm config, e.g. '
        'experiments/shakespeare_tiny_llama.py')


def trainable_path(workdir: str) -> str:
  """`workdir`'s trainable.npz; UserError (one line) when there is none."""
  path = os.path.join(workdir, TRAINABLE_FILE)
  if not os.path.isfile(path):
    raise errors.UserError(
        f'--workdir={workdir} holds no {TRAINABLE_FILE} (a run writes it at its end): train '
        'first with the same --config and --workdir, then sample')
  return path


def merging_rule(config) -> str | None:
  """The config's LoRA aggregation rule if it merges updates into the frozen kernels
  (`LoraRuleSpec.folds`: fedex, flora, flexlora), else None."""
  if 'lora' not in peft.parse_method(config.peft.method):
    return None
  name = build.lora_rule(config)
  return name if lora_rules.LORA_RULES.get(name).folds else None


def merging_rules() -> list[str]:
  """The registered LoRA rules that merge updates into the frozen kernels."""
  return [n for n in lora_rules.LORA_RULES.names() if lora_rules.LORA_RULES.get(n).folds]


def merged_path(config, workdir: str) -> str | None:
  """`workdir`'s merged.npz when `config`'s rule merges (`merging_rule`), else None.
  UserError (one line) when the rule merges and the file is missing, or when the file is
  there and the config's rule does not merge (the workdir is of another config)."""
  path, rule = os.path.join(workdir, MERGED_FILE), merging_rule(config)
  if rule is not None and not os.path.isfile(path):
    raise errors.UserError(
        f'--workdir={workdir} holds no {MERGED_FILE}, which --config.peft.lora_aggregation='
        f'{rule} needs (the updates it merged into the kernels are not in {TRAINABLE_FILE}; '
        'a run writes both at its end): train again with this version, then sample')
  if rule is None and os.path.isfile(path):
    raise errors.UserError(
        f'--workdir={workdir} holds {MERGED_FILE}, written by a LoRA rule that merges '
        f'({", ".join(merging_rules())}), and --config.peft.lora_aggregation='
        f'{config.peft.lora_aggregation} does not merge: use the config that trained it')
  return path if rule is not None else None


def fold_merged(path: str, frozen):
  """`frozen` with the deltas of `path` (`MERGED_FILE`: {kernel path: float32 delta})
  added to their kernels in float32, cast back to each kernel's dtype (`lora.fold`).
  UserError (argument 'path') for an unreadable file or one whose kernels are not this
  config's frozen ones (naming the first differences)."""
  deltas = resume.read_npz(path)
  flat = traverse_util.flatten_dict(frozen, sep='/')
  problems = [f'{k} not a frozen weight now' if k not in flat else
              f'{k} {v.shape} in the file, {tuple(flat[k].shape)} now'
              for k, v in sorted(deltas.items())
              if k not in flat or tuple(v.shape) != tuple(flat[k].shape)]
  if problems or not deltas:
    raise errors.UserError(
        f'{path} holds other merged kernels than this config adapts: '
        f'{"; ".join(problems[:2]) or "none"}: use the config (peft.method and its options) '
        'that trained it', argument='path')
  flat.update({k: lora.fold(flat[k], jnp.asarray(v), 1.0) for k, v in deltas.items()})
  return traverse_util.unflatten_dict(flat, sep='/')


def _tokenizer(config, vocab_size: int) -> hf_checkpoint.Tokenizer:
  if not config.model.checkpoint:
    raise validation.ConfigError('model.checkpoint', config.model.checkpoint, 'sampling needs the model '
                                 "directory's tokenizer.json: set the model directory")
  with validation.config_keys(config, path='model.checkpoint'):
    tokenizer = hf_checkpoint.load_tokenizer(hf_checkpoint.resolve(config.model.checkpoint),
                                             vocab_size)
  tokenizer.tokenizer.no_truncation()  # As the text source: our own limit applies.
  tokenizer.tokenizer.no_padding()
  return tokenizer


def _prefix_tokens(config) -> int:
  """Tokens a soft-prompt method puts in front of the sequence (they take positions)."""
  return config.peft.prompt_tokens if 'prompt' in peft.parse_method(config.peft.method) else 0


def load_trees(config, trainable_file: str | None = None, merged_file: str | None = None):
  """(model, trainable, frozen): the config's model with the trainable parameters of
  `trainable_file` (None: the untrained ones, i.e. the pretrained model plus the methods'
  initial additions) and the frozen ones with `merged_file`'s deltas folded in
  (`fold_merged`; None: as built).

  The parameters are made as `build.build` makes them (`init_params` from the same seeded
  key, split by `peft.labels`, the frozen part in `model.frozen_dtype`). Raises UserError
  (a ConfigError naming the key, or naming the file) for a file of another config."""
  model = build.build_model(config)
  init_rng, _ = jax.random.split(jax.random.key(config.seed))  # build.build's split.
  params = build.init_params(config, model, init_rng)
  trainable, frozen = peft.split(params, peft.labels(config.peft.method, params,
                                                    **build.peft_options(config)))
  if trainable_file is not None:
    trainable = resume.load_trainable(trainable_file, trainable)
  if config.model.frozen_dtype:
    frozen = jax.tree.map(lambda x: x.astype(config.model.frozen_dtype), frozen)
  if merged_file is not None:  # After the cast: the run folds into kernels of that dtype.
    frozen = fold_merged(merged_file, frozen)
  return model, trainable, frozen


def load(config, trainable_file: str | None = None,
         merged_file: str | None = None) -> Sampler:
  """The config's decoder with the trees of `load_trees` (same arguments and errors)."""
  model, trainable, frozen = load_trees(config, trainable_file, merged_file)
  size = model.config
  tokenizer = _tokenizer(config, size.vocab_size)
  return Sampler(model, peft.merge(trainable, frozen), tokenizer,
                 size.max_position_embeddings - _prefix_tokens(config),
                 causal_lm.make_generate(model, tokenizer.eos_ids))


def encode(sampler: Sampler, prompt: str) -> list[int]:
  """bos (when the model has one) + the prompt's token ids, as the text source writes a
  record's start."""
  head = [] if sampler.tokenizer.bos_id is None else [sampler.tokenizer.bos_id]
  return head + sampler.tokenizer.tokenizer.encode(prompt, add_special_tokens=False).ids


def generate_ids(sampler: Sampler, prompt_ids: list[int], max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0) -> list[int]:
  """The continuation's token ids (eos included when generated) of `prompt_ids`.

  The buffer holds min(len(prompt_ids) + max_new_tokens, sampler.max_length) tokens.
  Raises UserError (argument 'prompt', 'max_new_tokens' or 'temperature') for an empty
  prompt, one that leaves no position to generate at, max_new_tokens < 1 or a negative
  temperature."""
  start = len(prompt_ids)
  if max_new_tokens < 1:
    raise errors.UserError(f'max_new_tokens={max_new_tokens}: must be >= 1',
                           argument='max_new_tokens')
  if not temperature >= 0:  # NaN too.
    raise errors.UserError(f'temperature={temperature}: must be >= 0 (0: greedy)',
                           argument='temperature')
  if start == 0:
    raise errors.UserError('the prompt is empty and the model has no bos token: give some '
                           'text to continue', argument='prompt')
  if start >= sampler.max_length:
    raise errors.UserError(
        f'the prompt is {start} tokens, and the model takes {sampler.max_length} '
        '(max_position_embeddings, less any soft-prompt tokens): shorten it',
        argument='prompt')
  length = min(start + max_new_tokens, sampler.max_length)
  tokens = np.zeros(length, np.int32)
  tokens[:start] = prompt_ids
  out, end = sampler.generate(sampler.params, tokens, start, length, jnp.float32(temperature),
                      jax.random.key(seed))
  return np.asarray(out)[start:int(end)].tolist()


def decode(sampler: Sampler, prompt_ids: list[int], new_ids: list[int]) -> str:
  """The text `new_ids` add after the prompt (special tokens left out): the decoded whole
  less the decoded prompt, so a token's leading space or merged bytes stay right."""
  tok = sampler.tokenizer.tokenizer
  whole = tok.decode(prompt_ids + new_ids, skip_special_tokens=True)
  head = tok.decode(prompt_ids, skip_special_tokens=True)
  return whole[len(head):] if whole.startswith(head) else tok.decode(
      new_ids, skip_special_tokens=True)


def sample(config, workdir: str, prompt: str, max_new_tokens: int = 64,
           temperature: float = 0.0, seed: int = 0) -> str:
  """The continuation of `prompt` by `config`'s decoder with `workdir`'s trainable.npz
  (and merged.npz, for a rule that merges: `merged_path`).

  Raises UserError (one line) for a config that is not causal_lm, a workdir without
  trainable.npz (or merged.npz where the rule needs it) or with one of another config,
  and `generate_ids`'s mistakes (argument 'prompt', 'max_new_tokens', 'temperature')."""
  check_task(config)
  sampler = load(config, trainable_path(workdir), merged_path(config, workdir))
  prompt_ids = encode(sampler, prompt)
  new_ids = generate_ids(sampler, prompt_ids, max_new_tokens, temperature, seed)
  return decode(sampler, prompt_ids, new_ids)
