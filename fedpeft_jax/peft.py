"""PEFT methods as label trees over the parameter pytree.

A method maps the parameter tree to a tree of the same structure whose leaves
are `'trainable'` or `'frozen'`: exactly the `param_labels` that
`optax.multi_transform` / `optax.partition` take. `split` then cuts the
parameters into two disjoint pytrees; only the trainable one is ever copied
per client or sent over the wire.
"""
from __future__ import annotations

from typing import Callable

from flax import traverse_util

from fedpeft_jax import errors
from fedpeft_jax.model.vit import PeftModules

TRAINABLE = 'trainable'
FROZEN = 'frozen'

Path = tuple[str, ...]


def _head(path: Path) -> bool:
  return path[0] == 'head'


def _named(part: str) -> Callable[[Path], bool]:
  return lambda path: any(p == part or p.startswith(part + '_') for p in path)


# Each predicate says whether a parameter path is trained by that method. The
# classifier head is always new for the task, so every method trains it.
_PREDICATES: dict[str, Callable[[Path], bool]] = {
    'full': lambda path: True,
    'head': _head,
    'bias': lambda path: path[-1] == 'bias',  # BitFit, LayerNorm biases included.
    'adapter': _named('adapter'),
    'prompt': _named('prompt'),
    'lora': _named('lora'),
}
METHODS = tuple(_PREDICATES)


def parse_method(method: str) -> tuple[str, ...]:
  """Splits a composed method such as `'bias+lora'` and validates each part."""
  parts = tuple(p.strip() for p in method.split('+'))
  unknown = [p for p in parts if p not in _PREDICATES]
  if unknown or not parts:
    raise errors.UserError(f'peft.method={method!r}: unknown method(s) {unknown}; '
                     f"allowed: {', '.join(METHODS)}, joined with '+' (e.g. 'bias+lora')")
  return parts


def modules_for(method: str, *, adapter_reduction: int = 8, adapter_shared: bool = True,
                prompt_tokens: int = 10, prompt_deep: bool = True, lora_rank: int = 8,
                lora_alpha: float = 8.0) -> PeftModules:
  """The backbone additions a method needs (none for full, head and bias)."""
  parts = parse_method(method)
  return PeftModules(
      adapter='adapter' in parts, adapter_reduction=adapter_reduction,
      adapter_shared=adapter_shared,
      prompt_tokens=prompt_tokens if 'prompt' in parts else 0, prompt_deep=prompt_deep,
      lora_rank=lora_rank if 'lora' in parts else 0, lora_alpha=lora_alpha)


def _lora_a(path: Path) -> bool:
  return path[-1].startswith('lora_') and path[-1].endswith('_a')


def labels(method: str, params, *, freeze_lora_a: bool = False):
  """The `'trainable'`/`'frozen'` label tree of `method` for `params`.

  `freeze_lora_a`: FFA-LoRA (Sun et al. 2024). LoRA's A matrices stay at their
  initialisation, which every client shares (it comes from the run's seed), and
  only B is trained and sent: the average of the clients' B_i A is then exactly
  the average B times A, where averaging A and B separately is not the average
  of the products.
  """
  predicates = [_PREDICATES[p] for p in parse_method(method)] + [_head]
  flat = traverse_util.flatten_dict(params)
  trained = lambda path: (any(f(path) for f in predicates)
                          and not (freeze_lora_a and _lora_a(path)))
  return traverse_util.unflatten_dict({
      path: TRAINABLE if trained(path) else FROZEN for path in flat})


def split(params, label_tree):
  """Cuts `params` into (trainable, frozen) nested dicts by `label_tree`."""
  flat = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(label_tree)
  pick = lambda want: traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if flat_labels[k] == want})
  return pick(TRAINABLE), pick(FROZEN)


def merge(trainable, frozen):
  """Inverse of `split`: the full parameter tree for the model's `apply`."""
  return traverse_util.unflatten_dict(
      {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)})


def paths(tree) -> list[str]:
  return sorted('/'.join(k) for k in traverse_util.flatten_dict(tree))


def count(tree) -> int:
  return sum(int(v.size) for v in traverse_util.flatten_dict(tree).values())
