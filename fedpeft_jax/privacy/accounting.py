"""Privacy accounting with dp-accounting: the epsilon a run delivers, never a closed form.

Client-level DP-FedAvg releases, every round, a Gaussian-noised sum of the
sampled clients' clipped updates:
- Poisson sampling (rate q = m / N) under add/remove-one-client: a
  `PoissonSampledDpEvent` of a Gaussian with the configured multiplier.
- Fixed-size sampling without replacement under replace-one-client: replacing
  a client moves the sum by up to 2 * clip_norm, so the Gaussian's multiplier
  relative to that sensitivity is noise_multiplier / 2.
Sample-level DP-SGD releases, at every local step of a client, a noised sum of
clipped per-example gradients of a uniformly drawn batch (without replacement,
replace-one-example, multiplier / 2 likewise), composed over every local step
of every round (as if the client were picked every round). The guarantee printed
is that of the least protected client.
"""
from __future__ import annotations

import dataclasses
import math

import dp_accounting
import numpy as np
from dp_accounting import dp_event
from dp_accounting import mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedpeft_jax import errors

NeighborRel = dp_accounting.NeighboringRelation
RDP_ORDERS = tuple(np.concatenate([np.linspace(1.01, 8, 100), np.arange(8.5, 64, 0.5),
                                   np.arange(64, 1025, 16)]))
ACCOUNTANTS = ('auto', 'rdp', 'pld')
MAX_NOISE_MULTIPLIER = 1e3


@dataclasses.dataclass(frozen=True)
class PrivacySpec:
  """What the accountant needs to know about a run."""
  mode: str  # 'client' or 'sample'.
  noise_multiplier: float
  delta: float
  rounds: int
  accountant: str = 'auto'
  # Client level.
  sampling: str = 'poisson'  # 'poisson' or 'fixed'.
  num_clients: int = 0
  clients_per_round: int = 0
  # Sample level: every client's number of examples and the local schedule.
  client_sizes: tuple[int, ...] = ()
  batch_size: int = 0
  local_epochs: int = 0

  @property
  def sampling_rate(self) -> float:
    if self.mode == 'client':
      return self.clients_per_round / self.num_clients
    return max(min(1.0, self.batch_size / n) for n in self.client_sizes)


def _relation(spec: PrivacySpec):
  if spec.mode == 'client' and spec.sampling == 'poisson':
    return NeighborRel.ADD_OR_REMOVE_ONE
  return NeighborRel.REPLACE_ONE


def accountant_name(spec: PrivacySpec) -> str:
  """'auto' is PLD where dp-accounting's PLD supports the event, RDP elsewhere."""
  pld_ok = _relation(spec) == NeighborRel.ADD_OR_REMOVE_ONE
  if spec.accountant == 'pld' and not pld_ok:
    raise errors.UserError(
        "PLD supports Poisson sampling only, not sampling without replacement "
        "(dp.sampling='fixed' or dp.mode='sample'): use dp.accountant='rdp' or 'auto'")
  if spec.accountant == 'auto':
    return 'pld' if pld_ok else 'rdp'
  return spec.accountant


def _make_accountant(name: str, relation):
  if name == 'pld':
    return pld_privacy_accountant.PLDAccountant(relation)
  return rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS), relation)


def _events(spec: PrivacySpec, noise_multiplier: float, rounds: int) -> list:
  """One composed event per group of clients with the same guarantee."""
  if spec.mode == 'client':
    if spec.sampling == 'poisson':
      step = dp_event.PoissonSampledDpEvent(
          spec.sampling_rate, dp_event.GaussianDpEvent(noise_multiplier))
    else:
      step = dp_event.SampledWithoutReplacementDpEvent(
          spec.num_clients, spec.clients_per_round,
          dp_event.GaussianDpEvent(noise_multiplier / 2))
    return [dp_event.SelfComposedDpEvent(step, rounds)]
  events = []
  for n in sorted(set(spec.client_sizes)):
    steps = rounds * spec.local_epochs * math.ceil(n / spec.batch_size)
    step = dp_event.SampledWithoutReplacementDpEvent(
        n, min(n, spec.batch_size), dp_event.GaussianDpEvent(noise_multiplier / 2))
    events.append(dp_event.SelfComposedDpEvent(step, steps))
  return events


def epsilon(spec: PrivacySpec, rounds: int | None = None,
            noise_multiplier: float | None = None) -> float:
  """Epsilon at `spec.delta` after `rounds` rounds (default: all of them)."""
  rounds = spec.rounds if rounds is None else rounds
  z = spec.noise_multiplier if noise_multiplier is None else noise_multiplier
  if rounds == 0:
    return 0.0
  if z == 0:
    return math.inf
  name, relation = accountant_name(spec), _relation(spec)
  worst = 0.0
  for event in _events(spec, z, rounds):
    accountant = _make_accountant(name, relation)
    accountant.compose(event)
    worst = max(worst, accountant.get_epsilon(spec.delta))
  return worst


def calibrate_noise(spec: PrivacySpec, target_epsilon: float) -> float:
  """The smallest noise multiplier that delivers `target_epsilon` over the run."""
  if not target_epsilon > 0:
    raise errors.UserError(f'dp.target_epsilon={target_epsilon} must be > 0')
  if epsilon(spec, noise_multiplier=MAX_NOISE_MULTIPLIER) > target_epsilon:
    raise errors.UserError(
        f'dp.target_epsilon={target_epsilon} cannot be reached at dp.delta={spec.delta} '
        f'even with noise multiplier {MAX_NOISE_MULTIPLIER:g}: raise the target, sample '
        'fewer clients or run fewer rounds')
  name, relation = accountant_name(spec), _relation(spec)
  if len(_events(spec, 1.0, spec.rounds)) == 1:
    make_event = lambda z: _events(spec, z, spec.rounds)[0]
    z = mechanism_calibration.calibrate_dp_mechanism(
        lambda: _make_accountant(name, relation), make_event, target_epsilon, spec.delta,
        mechanism_calibration.LowerEndpointAndGuess(0.0, 1.0), tol=1e-4)
  else:  # The worst client decides: bisect on the maximum over clients.
    low, high = 0.0, MAX_NOISE_MULTIPLIER
    while high - low > 1e-4 * max(high, 1.0):
      mid = (low + high) / 2
      low, high = (mid, high) if epsilon(spec, noise_multiplier=mid) > target_epsilon else (
          low, mid)
    z = high
  # Brent's method stops within its tolerance on either side: step up until it holds.
  while epsilon(spec, noise_multiplier=z) > target_epsilon:
    z *= 1.0001
  return float(z)
