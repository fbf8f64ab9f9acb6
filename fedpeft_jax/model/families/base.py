"""The model-family contract."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple


class ModelFamily(NamedTuple):
  """A registered model family.

  `build(config, method, peft_options) -> flax module` with `method`'s additions at its
  hook points; `dummy_input(config)`: the positional inputs of `module.init` (shapes
  only matter); `load_pretrained(config, params) -> params`: the checkpoint's weights into
  a fresh tree (`UserError` with argument 'path' for a bad file); `check_pretrained(config,
  abstract_params)`: the same from headers alone, at launch; `task`: the `TASKS` name it
  serves by default. `checks(config, needs_weights)` yields its own config problems as
  (key, what is allowed), at launch, before any data or weights are read.
  """
  build: Callable[..., Any]
  dummy_input: Callable[[Any], tuple]
  load_pretrained: Callable[[Any, Any], Any]
  check_pretrained: Callable[[Any, Any], None]
  task: str
  summary: str
  checks: Callable[[Any, bool], Any] = lambda config, needs_weights: ()
  # The model's dimensions (e.g. `vit.ViTSize`), which PEFT methods check options against.
  dimensions: Callable[[Any], Any] = lambda config: None
