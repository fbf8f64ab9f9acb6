"""Several hosts (processes) running one experiment under `jax.distributed`.

Every process runs the same program on its own devices; what is written once
(metrics, TensorBoard, reports, `trainable.npz`) comes from process 0, and Orbax
writes checkpoints collectively. A user error on one process must end all of
them, not leave the others waiting in a collective: `agree` does that.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from fedpeft_jax import errors

T = TypeVar('T')


def is_primary() -> bool:
  return jax.process_index() == 0


def agree(step: Callable[[], T]) -> T:
  """Runs `step` on every process; if it raises a `UserError` on any, it raises on all."""
  error = None
  try:
    result = step()
  except errors.UserError as e:
    error = e
  if jax.process_count() > 1:
    failed = np.asarray(multihost_utils.process_allgather(np.asarray(error is not None)))
    if error is None and failed.any():
      raise errors.UserError(f'process {int(np.argmax(failed))} stopped with an error; its '
                             'output says which')
  if error is not None:
    raise error
  return result
