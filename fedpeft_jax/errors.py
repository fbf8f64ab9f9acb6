"""The one error type `launch.py` reports as a single line with exit status 2."""
from __future__ import annotations


class UserError(ValueError):
  """A problem with the user's config, data or files, with the fix in its message.

  Library code names its own `argument` (e.g. 'path'); the layer that maps a
  config onto library arguments translates it into the `--config.` key the
  user typed (`validation.config_keys`). Anything else that goes wrong is a
  bug and keeps its traceback.
  """

  def __init__(self, message: str, *, argument: str | None = None):
    super().__init__(message)
    self.argument = argument
