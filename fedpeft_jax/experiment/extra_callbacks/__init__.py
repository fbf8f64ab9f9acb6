"""Optional callbacks by name (`CALLBACKS`): a run adds those `callbacks.extra` names
(comma-separated), e.g. `c.callbacks.extra = 'early_stop'` in an experiment config. Each
file here registers one `CallbackSpec`: its options (config keys under `callbacks.`, with
their defaults, which `configs.base_config` adds) and `make(options, experiment) ->
loop.Callback`."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from fedpeft_jax import registry


class CallbackSpec(NamedTuple):
  make: Callable[[dict, Any], Any]  # (its options by name, the build.Experiment) -> Callback.
  summary: str
  options: dict = {}  # Option name (a `callbacks.` config key) -> default.
  # (its options) -> a problem as (option name, what is allowed), or None.
  check: Callable[[dict], Any] = lambda options: None


CALLBACKS: registry.Registry[CallbackSpec] = registry.Registry('callback', argument='extra')

registry.import_all(__name__, __path__)


def names(extra: str) -> list[str]:
  """The comma-separated `callbacks.extra` as a list ('' is none)."""
  return [name.strip() for name in extra.split(',') if name.strip()]


def option_defaults() -> dict:
  """Every registered callback's options with their defaults."""
  return {key: value for _, spec in CALLBACKS.items() for key, value in spec.options.items()}


def make_all(config, experiment) -> list:
  """The callbacks `config.callbacks.extra` names, made from their options."""
  made = []
  for name in names(config.callbacks.extra):
    spec = CALLBACKS.get(name)
    made.append(spec.make({key: config.callbacks[key] for key in spec.options}, experiment))
  return made
