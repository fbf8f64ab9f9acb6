"""What a PEFT method declares when it registers (`PeftMethod`), and helpers for its checks.

A method is a predicate over parameter paths (which leaves it trains) plus, for methods
that add modules to the backbone, those modules (`fedpeft_jax.model.vit.Addition`,
plugged in at the ViT's named hook points) and the names of the parameters they add.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

from fedpeft_jax.model import llama
from fedpeft_jax.model import vit

TRAINABLE = 'trainable'
FROZEN = 'frozen'

Path = tuple[str, ...]  # A parameter's path in the tree, e.g. ('head', 'bias').
Options = Mapping[str, Any]  # A method's options by name (its keys under --config.peft).
Problem = Optional[tuple[str, str]]  # (option name, what is allowed), or None.


def named(*names: str) -> Callable[[Path], bool]:
  """Whether any part of a path is one of `names` or starts with one of them and '_'
  (`named('lora')` matches 'lora_query_a', not 'lorax')."""
  return lambda path: any(p == n or p.startswith(n + '_') for p in path for n in names)


def is_decoder(size) -> bool:
  """Whether a model family's dimensions (`ModelFamily.dimensions`, the `size` a check
  gets) are a Llama-family decoder's (`llama.LlamaConfig`); else a ViT's (`vit.ViTSize`)."""
  return isinstance(size, llama.LlamaConfig)


def positive(options: Options, *names: str) -> Problem:
  """The first of `names` whose value is not a number > 0, as a `Problem`."""
  for name in names:
    value = options[name]
    if not (isinstance(value, (int, float)) and value > 0):
      return name, 'must be > 0'
  return None


class PeftMethod(NamedTuple):
  """A registered PEFT method (`PEFT_METHODS.register(name, PeftMethod(...))`).

  Fields:
    summary: one line for the README's table and `--help`-like listings.
    learning_rate: the client learning rate (`optim.lr`) a run of this method defaults
      to, e.g. the paper's; a composition takes its parts' smallest. None is refused at
      launch with one line (`peft.learning_rate`).
    trains: path -> whether the method trains that parameter (the classifier head is
      always trained, by every method). None: exactly the parameters it `adds`.
    adds: the parameter names it adds to the backbone: a path part equal to a name, or
      starting with it and '_', is the method's (`named`). The pretrained checkpoint
      loader leaves these out of what it expects in the file (`peft.is_added`).
    options: its own config keys (under `--config.peft.`) and their defaults, e.g.
      `{'lora_rank': 8}`; `addition`, `check` and `frozen` get their values as a mapping
      (`Options`) from option name to value.
    addition: options -> its modules at the ViT's hook points (`vit.Addition`); None for
      methods that add nothing.
    frozen: (path, options) -> whether a leaf it would train stays frozen under these
      options (FFA-LoRA's A matrices).
    check: (options, model size) -> the first bad option as (name, what is allowed), or
      None; run at launch for every method in `peft.method`. The size is the model
      family's `dimensions` (`vit.ViTSize`, or the decoder's `llama.LlamaConfig`:
      `is_decoder`); ('method', why) refuses the method itself on that model.
    identity_at_init: its additions, as initialised, leave the model's function unchanged
      (zero up-projection, zero LoRA B); False for prompts. The contract test holds every
      method to what it declares.
    order: place in listings (`peft.METHODS`, `--mode=masks`) and at the hook points.
  """
  summary: str
  learning_rate: Optional[float] = None
  trains: Optional[Callable[[Path], bool]] = None
  adds: tuple[str, ...] = ()
  options: Mapping[str, Any] = {}
  addition: Optional[Callable[[Options], vit.Addition]] = None
  frozen: Callable[[Path, Options], bool] = lambda path, options: False
  check: Callable[[Options, Any], Problem] = lambda options, size: None
  identity_at_init: bool = True
  order: int = 100

  def predicate(self) -> Callable[[Path], bool]:
    """Whether this method trains a parameter path (`trains`, else what it `adds`)."""
    return self.trains if self.trains is not None else named(*self.adds)
