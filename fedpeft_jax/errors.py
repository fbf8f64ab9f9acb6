"""The one error type `launch.py` reports as a single line with exit status 2."""


class UserError(ValueError):
  """A problem with the user's config, data or files, with the fix in its message.

  Anything else that goes wrong is a bug and keeps its traceback.
  """
