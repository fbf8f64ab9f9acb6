"""PEFT methods as label trees over the parameter pytree, registered by name.

A method maps the parameter tree to a tree of the same structure whose leaves
are `'trainable'` or `'frozen'`: exactly the `param_labels` that
`optax.multi_transform` / `optax.partition` take. `split` then cuts the
parameters into two disjoint pytrees; only the trainable one is ever copied
per client or sent over the wire.

Each file of this package registers one method in `PEFT_METHODS` (`base.PeftMethod`):
which parameters it trains, the modules and parameter names it adds to the backbone,
its default learning rate, its options and their checks. Adding a method is adding a
file; see README "Extending" and `adapter.py` for a complete example. Methods compose
with '+' (`'bias+lora'`): the union of what the parts train.
"""
from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util

from fedpeft_jax import errors
from fedpeft_jax import registry
from fedpeft_jax.model import vit
from fedpeft_jax.peft.base import FROZEN, TRAINABLE, Path, PeftMethod, Problem, named
from fedpeft_jax.peft.trees import count, merge, paths, split

PEFT_METHODS: registry.Registry[PeftMethod] = registry.Registry('PEFT method', 'method')

registry.import_all(__name__, __path__)


def method_names() -> tuple[str, ...]:
  """The registered methods in listing order (`PeftMethod.order`, then name)."""
  return tuple(sorted(PEFT_METHODS.names(), key=lambda n: (PEFT_METHODS.get(n).order, n)))


METHODS = method_names()  # 'full', 'head', 'bias', 'adapter', 'prompt', 'lora', ...


def _head(path: Path) -> bool:
  return path[0] == 'head'


def parse_method(method: str) -> tuple[str, ...]:
  """Splits a composed method such as `'bias+lora'` and validates each part.

  Raises `UserError` (argument 'method') naming the unknown parts and the choices.
  """
  parts = tuple(p.strip() for p in method.split('+'))
  unknown = [p for p in parts if p not in PEFT_METHODS]
  if unknown or not parts:
    raise errors.UserError(f'peft.method={method!r}: unknown method(s) {unknown}; '
                           f"allowed: {', '.join(method_names())}, joined with '+' "
                           "(e.g. 'bias+lora')", argument='method')
  return parts


def _entries(method: str) -> list[tuple[str, PeftMethod]]:
  """The distinct parts of `method` in listing order: 'lora+bias' builds what 'bias+lora'
  does."""
  parts = set(parse_method(method))
  return [(name, PEFT_METHODS.get(name)) for name in method_names() if name in parts]


def option_defaults() -> dict[str, Any]:
  """Every registered method's options and their defaults, in listing order: the keys
  `--config.peft.` holds besides `method`."""
  defaults = {}
  for name in method_names():
    defaults.update(PEFT_METHODS.get(name).options)
  return defaults


def _options_of(entry: PeftMethod, options: Mapping[str, Any]) -> dict[str, Any]:
  return {k: options.get(k, default) for k, default in entry.options.items()}


def _check_names(options: Mapping[str, Any]) -> None:
  unknown = sorted(set(options) - set(option_defaults()))
  if unknown:
    raise TypeError(f'unknown PEFT option(s) {unknown}; the registered methods declare '
                    f'{", ".join(option_defaults())}')


def modules_for(method: str, **options) -> vit.Additions:
  """The backbone additions `method` needs (none for full, head and bias), in listing order.

  `options`: any registered method's options by name (e.g. `lora_rank=8`); those of
  methods not in `method` are ignored and missing ones take their declared defaults.
  Raises `UserError` for an unknown method, `TypeError` for an unknown option.
  """
  _check_names(options)
  return tuple(entry.addition(_options_of(entry, options))
               for _, entry in _entries(method) if entry.addition is not None)


def labels(method: str, params, *, freeze_lora_a: bool = False, **options):
  """The `'trainable'`/`'frozen'` label tree of `method` for `params`.

  Every method trains the classifier head (`head/...`, the ViT's new one; a decoder's
  pretrained `lm_head` trains under `head` alone, as Hugging Face PEFT counts). `options` are the methods' options by name
  (those that decide what is frozen, e.g. `lora_freeze_a`). `freeze_lora_a`: FFA-LoRA
  (Sun et al. 2024), the same as `lora_freeze_a=True`: LoRA's A matrices stay at their
  initialisation, which every client shares (it comes from the run's seed), and only B
  is trained and sent: the average of the clients' B_i A is then exactly the average B
  times A, where averaging A and B separately is not the average of the products.
  """
  options = {**options, **({'lora_freeze_a': True} if freeze_lora_a else {})}
  _check_names(options)
  entries = [(entry.predicate(), entry, _options_of(entry, options))
             for _, entry in _entries(method)]
  trains = lambda path: _head(path) or any(p(path) for p, _, _ in entries)
  frozen = lambda path: any(entry.frozen(path, o) for _, entry, o in entries)
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({
      path: TRAINABLE if trains(path) and not frozen(path) else FROZEN for path in flat})


def is_added(path: Path) -> bool:
  """Whether a parameter path is one that some registered method adds to the backbone
  (`PeftMethod.adds`): a pretrained checkpoint does not hold it."""
  return named(*(n for _, entry in PEFT_METHODS.items() for n in entry.adds))(path)


def learning_rate(method: str) -> float:
  """The default client learning rate of `method`: a composition (e.g. 'bias+lora')
  takes the smallest of its parts' (`PeftMethod.learning_rate`).

  Parts that are not registered methods are skipped (validation names them at launch;
  a comma list of methods for `--mode=masks` trains nothing); when none is, 'full''s.
  Raises `UserError` (argument 'method') for a registered part without a default rate.
  """
  names = [p.strip() for p in method.split('+')]
  rates = []
  for name in (n for n in names if n in PEFT_METHODS):
    rate = PEFT_METHODS.get(name).learning_rate
    if rate is None:
      raise errors.UserError(
          f'PEFT method {name!r} declares no default learning rate: give its PeftMethod '
          'entry learning_rate=... (the rate its runs default to)', argument='method')
    rates.append(rate)
  return min(rates, default=PEFT_METHODS.get('full').learning_rate)


def check(method: str, options: Mapping[str, Any], size: vit.ViTSize) -> Problem:
  """The first problem of the options of `method`'s parts (`PeftMethod.check`) on a
  model of `size`, as (option name, what is allowed); None when all pass."""
  for _, entry in _entries(method):
    problem = entry.check(_options_of(entry, options), size)
    if problem is not None:
      return problem
  return None


__all__ = ['FROZEN', 'METHODS', 'PEFT_METHODS', 'PeftMethod', 'TRAINABLE', 'check', 'count',
           'is_added', 'labels', 'learning_rate', 'merge', 'method_names', 'modules_for',
           'option_defaults', 'parse_method', 'paths', 'split']
