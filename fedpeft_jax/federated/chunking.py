"""How many clients train at once, and the widths the packed schedule steps them in."""
from __future__ import annotations

from fedpeft_jax import errors


def chunk_for_memory(clients_per_round: int, per_client_bytes: int, available_bytes: int,
                     multiple: int = 1) -> int:
  """The largest chunk of clients (a divisor of `clients_per_round` and a multiple of
  `multiple`, the device count) whose working memory fits in `available_bytes`.

  Raises `UserError` when not even `multiple` clients fit.
  """
  fitting = [c for c in range(multiple, clients_per_round + 1, multiple)
             if clients_per_round % c == 0 and c * per_client_bytes <= available_bytes]
  if not fitting:
    raise errors.UserError(
        f'one chunk of {multiple} client(s) needs {multiple * per_client_bytes / 2**30:.1f} '
        f'GiB but {available_bytes / 2**30:.1f} GiB are free: lower fl.batch_size or use '
        'a PEFT method')
  return max(fitting)


def packed_widths(lanes_per_device: int) -> tuple[int, ...]:
  """The vmap widths a packed step runs its lanes in, widest first: all lanes, then
  powers of four below (fewer copies of the step to compile than powers of two, for at
  most three pieces of a width). Width 1 is among them, so (on one device) no lane
  computes without a client."""
  return tuple(sorted({lanes_per_device} | {4**p for p in range(lanes_per_device.bit_length())
                                            if 4**p < lanes_per_device}, reverse=True))
