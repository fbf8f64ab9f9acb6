"""Privacy accounting with dp-accounting: the epsilon a run delivers, never a closed form.

Client-level DP-FedAvg releases, every round, Gaussian-noised sums over the
sampled clients: of their clipped updates and, with adaptive clipping, of their
centred unclipped indicators b_i - 1/2:
- Poisson sampling (rate q = m / N) under add/remove-one-client: a
  `PoissonSampledDpEvent` of a Gaussian with the configured multiplier.
- Fixed-size sampling without replacement under replace-one-client: replacing
  a client moves a sum by up to twice its per-client bound (2 * clip_norm), so
  the Gaussian's multiplier relative to that sensitivity is noise_multiplier / 2.
The releases of one round compose into one Gaussian whose multiplier z has
z^-2 = sum over releases of (sensitivity / stddev)^2.
Sample-level DP-SGD releases, at every local step of a client, a noised sum of
clipped per-example gradients of a uniformly drawn batch (without replacement,
replace-one-example, multiplier / 2 likewise), composed over every local step
of every round (as if the client were picked every round). The guarantee printed
is that of the least protected client; a client without examples has none to give.

A run is recorded as a ledger: one JSON-serialisable record per round of the
mechanism executed (`round_record`), composed by `ledger_epsilon`;
`calibrate_remaining` sets the noise of the rounds still to run so that the
whole ledger meets a target epsilon.

The noise is pseudo-random: a reproducible function of the run's seed, which
is public (it is in the config). That is right for simulating what a private
run delivers, but no guarantee for a deployment, where anyone who knows the
seed can subtract the noise: there it must come from a secret, cryptographically
secure source.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Sequence

import numpy as np

from fedpeft_jax import errors
from fedpeft_jax.privacy import mechanisms

# dp-accounting (and scipy, a dependency of its own calibration) is imported where it is
# used: it pulls in scipy.signal, about 1.5 s at every launch, DP or not.
# Relation name -> dp_accounting.NeighboringRelation member.
RELATIONS = {'add_or_remove_one': 'ADD_OR_REMOVE_ONE', 'replace_one': 'REPLACE_ONE'}
RDP_ORDERS = tuple(np.concatenate([np.linspace(1.01, 8, 100), np.arange(8.5, 64, 0.5),
                                   np.arange(64, 1025, 16)]))
ACCOUNTANTS = ('auto', 'rdp', 'pld')
MAX_NOISE_MULTIPLIER = 1e3
# Calibration never goes below: its epsilon is vacuous already, and PLD slows sharply there.
MIN_NOISE_MULTIPLIER = 0.1


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
  # Adaptive clipping's noised count of unclipped clients; 0: no count is released.
  clipped_count_stddev: float = 0.0
  # Sample level: every client's number of examples and the local schedule.
  client_sizes: tuple[int, ...] = ()
  batch_size: int = 0
  local_epochs: int = 0

  @property
  def sampling_rate(self) -> float:
    if self.mode == 'client':
      return self.clients_per_round / self.num_clients
    return max((min(1.0, self.batch_size / n) for n in self.client_sizes if n), default=0.0)


def _relation(spec: PrivacySpec) -> str:
  if spec.mode == 'client' and spec.sampling == 'poisson':
    return 'add_or_remove_one'
  return 'replace_one'


def _accountant_name(requested: str, relation: str) -> str:
  """'auto' is PLD where dp-accounting's PLD supports the event, RDP elsewhere."""
  pld_ok = relation == 'add_or_remove_one'
  if requested == 'pld' and not pld_ok:
    raise errors.UserError(
        "PLD supports Poisson sampling only, not sampling without replacement "
        "(fixed-size client sampling or sample level): use accountant='rdp' or 'auto'",
        argument='accountant')
  if requested == 'auto':
    return 'pld' if pld_ok else 'rdp'
  return requested


def accountant_name(spec: PrivacySpec) -> str:
  return _accountant_name(spec.accountant, _relation(spec))


def _make_accountant(name: str, relation: str):
  import dp_accounting  # pylint: disable=g-import-not-at-top (see the imports)
  from dp_accounting.pld import pld_privacy_accountant  # pylint: disable=g-import-not-at-top
  from dp_accounting.rdp import rdp_privacy_accountant  # pylint: disable=g-import-not-at-top
  neighbours = getattr(dp_accounting.NeighboringRelation, RELATIONS[relation])
  if name == 'pld':
    return pld_privacy_accountant.PLDAccountant(neighbours)
  return rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS), neighbours)


def _check_delta(delta: float, mode: str, population: int, at_least: bool = False) -> None:
  if delta * population >= 1:
    what = 'clients' if mode == 'client' else 'training examples of all clients together'
    raise errors.UserError(
        f'delta={delta:g} must be below 1/{population} = {1 / population:.3g}, one over the '
        f'number of {what}{" (at least)" if at_least else ""}: at delta >= 1/n, publishing '
        'the data of one individual drawn at random meets the guarantee (TF Privacy: '
        'delta < 1/n); lower delta', argument='delta')


def check_delta(spec: PrivacySpec) -> None:
  """Raises UserError (argument 'delta') unless `spec.delta` < 1/n, n the individuals the
  guarantee protects: the clients (client level), or every client's examples together (sample
  level, where an individual is an example: a mechanism that publishes one training example
  drawn at random meets delta = 1/n). Call it once the sizes are known; no sizes, no check."""
  if spec.mode == 'client':
    _check_delta(spec.delta, 'client', spec.num_clients)
  elif sum(spec.client_sizes):
    _check_delta(spec.delta, 'sample', sum(spec.client_sizes))


def round_record(spec: PrivacySpec, noise_multiplier: float | None = None) -> dict:
  """One round of `spec`'s mechanism as executed (default noise: `spec.noise_multiplier`).

  A JSON-serialisable dict:
    mode: 'client' or 'sample'; sampling: 'poisson', 'fixed' or (sample level)
      'without_replacement'; relation: 'add_or_remove_one' or 'replace_one'.
    groups: who shares one guarantee, all clients (client level) or the clients
      of one size (sample level), each {'population', 'sample_size' (expected,
      under Poisson), 'sampling_rate', 'steps' (noised releases this round)}.
    releases: every noised sum of a step, {'name', 'noise_multiplier',
      'sensitivity'}: its stddev and L2 sensitivity, both over one individual's
      bound (the clip norm; 1/2 for a centred indicator).
  """
  z = spec.noise_multiplier if noise_multiplier is None else noise_multiplier
  relation = _relation(spec)
  sensitivity = 1.0 if relation == 'add_or_remove_one' else 2.0
  if spec.mode == 'sample':
    groups = [{'population': n, 'sample_size': min(n, spec.batch_size),
               'sampling_rate': min(n, spec.batch_size) / n,
               'steps': spec.local_epochs * math.ceil(n / spec.batch_size)}
              for n in sorted(set(spec.client_sizes)) if n]
    return {'mode': 'sample', 'sampling': 'without_replacement', 'relation': relation,
            'groups': groups,
            'releases': [{'name': 'gradient_sum', 'noise_multiplier': z,
                          'sensitivity': sensitivity}]}
  groups = [{'population': spec.num_clients, 'sample_size': spec.clients_per_round,
             'sampling_rate': spec.sampling_rate, 'steps': 1}]
  update_z, releases = z, []
  if spec.clipped_count_stddev:  # The same split as aggregators.dp_fedavg.
    if z > 0:
      update_z = mechanisms.adaptive_delta_noise_multiplier(z, spec.clipped_count_stddev)
    releases.append({'name': 'unclipped_count',
                     'noise_multiplier': 2 * spec.clipped_count_stddev,
                     'sensitivity': sensitivity})
  releases.insert(0, {'name': 'update_sum', 'noise_multiplier': update_z,
                      'sensitivity': sensitivity})
  return {'mode': 'client', 'sampling': spec.sampling, 'relation': relation,
          'groups': groups, 'releases': releases}


def _composed_multiplier(releases: Sequence[dict]) -> float:
  """The multiplier of one Gaussian as private as all `releases` of a step together."""
  ratios = [r['noise_multiplier'] / r['sensitivity'] for r in releases]
  smallest = min(ratios)
  if smallest == 0:
    return 0.0
  # z^-2 = sum of ratio^-2, factored so that a single release keeps its exact value.
  return smallest / math.sqrt(sum((smallest / r) ** 2 for r in ratios))


def _self_composed(event, count: int):
  from dp_accounting import dp_event  # pylint: disable=g-import-not-at-top (see the imports)
  return dp_event.SelfComposedDpEvent(event, count)


def _step_event(record: dict, group: dict, z: float):
  from dp_accounting import dp_event  # pylint: disable=g-import-not-at-top (see the imports)
  gaussian = dp_event.GaussianDpEvent(z)
  if record['sampling'] == 'poisson':
    return dp_event.PoissonSampledDpEvent(group['sampling_rate'], gaussian)
  return dp_event.SampledWithoutReplacementDpEvent(group['population'], group['sample_size'],
                                                   gaussian)


def ledger_epsilon(ledger: Sequence[dict], delta: float, accountant: str = 'auto') -> float:
  """Epsilon at `delta` of all `round_record`s in `ledger` composed, for the least
  protected group; `accountant` is 'auto', 'rdp' or 'pld'. math.inf without noise."""
  if not ledger:
    return 0.0
  kinds = {(record['mode'], record['relation']) for record in ledger}
  if len(kinds) > 1:
    raise errors.UserError(f'the ledger mixes DP modes or neighbouring relations '
                           f'{sorted(kinds)}: a run keeps one DP mode and one sampling scheme')
  (_, relation), = kinds
  name = _accountant_name(accountant, relation)
  for record in ledger:  # `check_delta` saw the exact sizes; a ledger holds a lower bound.
    populations = [group['population'] for group in record['groups']]
    if record['mode'] == 'client' and populations:
      _check_delta(delta, 'client', min(populations))
    elif sum(populations):  # Every size in the record is held by at least one client.
      _check_delta(delta, 'sample', sum(populations), at_least=True)
  events = {}  # Population -> its events: clients of one size share one guarantee.
  for record, run in itertools.groupby(ledger):  # A run of equal rounds is one event.
    rounds = len(list(run))
    z = _composed_multiplier(record['releases'])
    if z == 0:
      return math.inf
    for group in record['groups']:
      events.setdefault(group['population'], []).append(
          _self_composed(_step_event(record, group, z), group['steps'] * rounds))
  worst = 0.0
  for group_events in events.values():
    group_accountant = _make_accountant(name, relation)
    for event in group_events:
      group_accountant.compose(event)
    worst = max(worst, group_accountant.get_epsilon(delta))
  return worst


def epsilon(spec: PrivacySpec, rounds: int | None = None,
            noise_multiplier: float | None = None) -> float:
  """Epsilon at `spec.delta` after `rounds` rounds (default: all of them); UserError
  (argument 'delta') if `check_delta` refuses `spec`."""
  check_delta(spec)
  rounds = spec.rounds if rounds is None else rounds
  return ledger_epsilon([round_record(spec, noise_multiplier)] * rounds, spec.delta,
                        spec.accountant)


def calibrate_remaining(ledger: Sequence[dict], spec: PrivacySpec, target_epsilon: float,
                        remaining_rounds: int) -> float:
  """The smallest noise multiplier (within a factor 1 + 1e-4, at least MIN_NOISE_MULTIPLIER) for
  `remaining_rounds` more rounds of `spec` such that they and `ledger` together
  deliver `target_epsilon` at `spec.delta`.

  With adaptive clipping this is the total of both releases, which compose to
  exactly it; `aggregators.dp_fedavg` splits it.
  """
  if not target_epsilon > 0:
    raise errors.UserError(f'target_epsilon={target_epsilon} must be > 0',
                           argument='target_epsilon')
  total = dataclasses.replace(spec, clipped_count_stddev=0.0)

  @functools.lru_cache(maxsize=None)
  def gap(log_z: float) -> float:
    rounds = [round_record(total, math.exp(log_z))] * remaining_rounds
    return ledger_epsilon(list(ledger) + rounds, spec.delta, spec.accountant) - target_epsilon

  low, high = math.log(MIN_NOISE_MULTIPLIER), math.log(MAX_NOISE_MULTIPLIER)
  if gap(high) > 0:
    spent = (f'; the {len(ledger)} rounds run so far spent epsilon '
             f'{ledger_epsilon(ledger, spec.delta, spec.accountant):.4g}' if ledger else '')
    raise errors.UserError(
        f'target_epsilon={target_epsilon} cannot be reached at delta={spec.delta} even with '
        f'noise multiplier {MAX_NOISE_MULTIPLIER:g} for the {remaining_rounds} remaining '
        f'rounds{spent}: raise the target, sample fewer clients or run fewer rounds',
        argument='target_epsilon')
  # Bracket the root by factors of 2 from z = 1, the usual neighbourhood, then Brent.
  lower = upper = 0.0
  while gap(upper) > 0:
    lower, upper = upper, min(upper + math.log(2), high)
  while gap(lower) <= 0:
    if lower == low:
      return MIN_NOISE_MULTIPLIER
    lower, upper = max(lower - math.log(2), low), lower
  from scipy import optimize  # pylint: disable=g-import-not-at-top (see the imports)
  log_z = optimize.brentq(gap, lower, upper, xtol=1e-4)
  while gap(log_z) > 0:  # Brent stops within its tolerance on either side.
    log_z += 1e-4
  return math.exp(log_z)


def calibrate_noise(spec: PrivacySpec, target_epsilon: float) -> float:
  """The smallest noise multiplier that delivers `target_epsilon` over the run."""
  return calibrate_remaining([], spec, target_epsilon, spec.rounds)


def json_safe_epsilon(epsilon_value: float) -> float | str:
  """`epsilon_value` for a JSON file: the string 'inf' where it is infinite (no noise),
  since JSON has no infinity and Python would write the invalid token `Infinity`.
  float() reads both forms back."""
  return 'inf' if math.isinf(epsilon_value) else epsilon_value
