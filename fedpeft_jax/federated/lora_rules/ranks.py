"""Each client's LoRA rank (`peft.lora_client_ranks`), fixed for the run.

'' : every client at `lora_rank`. A comma list ('2,4,8,16'): each client draws one of
them, uniformly. A distribution over the levels 1, 2, 4, ... up to `lora_rank` (and
`lora_rank` itself), after FlexLoRA (Bai et al. 2024: clients' resources drawn
uniform, heavy-tailed or normal): 'uniform' (every level alike), 'heavy_tail' (level k of
K, k = 0 the lowest, with probability proportional to 1 / (k + 1): most clients small, a
long tail of large ones), 'normal' (proportional to exp(-(k - (K - 1) / 2)^2 / 2): most
clients in the middle). The draw is numpy's, from the run's seed (its own stream: no
other draw of the run changes).
"""
from __future__ import annotations

import numpy as np

from fedpeft_jax import errors

RANK_DISTRIBUTIONS = ('uniform', 'heavy_tail', 'normal')


def levels(max_rank: int) -> list[int]:
  """1, 2, 4, ... below `max_rank`, and `max_rank`."""
  out, r = [], 1
  while r < max_rank:
    out.append(r)
    r *= 2
  return out + [max_rank]


def _probabilities(name: str, count: int) -> np.ndarray:
  k = np.arange(count, dtype=np.float64)
  weights = {'uniform': np.ones(count), 'heavy_tail': 1.0 / (k + 1),
             'normal': np.exp(-0.5 * (k - (count - 1) / 2) ** 2)}[name]
  return weights / weights.sum()


def client_ranks(spec: str, max_rank: int, num_clients: int, seed: int) -> np.ndarray | None:
  """int32 [num_clients]: each client's rank (see the module docstring); None for ''.

  Raises `UserError` (argument 'ranks') for a list entry that is not an int in
  1..`max_rank` or an unknown distribution.
  """
  spec = spec.strip()
  if not spec:
    return None
  rng = np.random.default_rng([seed, 0x10AA])  # Its own stream of the run's seed.
  if spec in RANK_DISTRIBUTIONS:
    choices = levels(max_rank)
    probabilities = _probabilities(spec, len(choices))
  else:
    try:
      choices = [int(part) for part in spec.split(',')]
    except ValueError:
      choices = []
    if not choices or any(not 1 <= r <= max_rank for r in choices):
      raise errors.UserError(
          f'{spec!r}: use a comma list of ranks in 1..{max_rank} (peft.lora_rank, the '
          f'largest), e.g. \'2,4,8\', or one of {", ".join(RANK_DISTRIBUTIONS)}; \'\' puts '
          'every client at peft.lora_rank', argument='ranks')
    probabilities = None
  return np.asarray(rng.choice(choices, size=num_clients, p=probabilities), np.int32)
