"""The accountant against independent computations: a closed form, and dp-accounting itself."""
import dataclasses
import json
import math

import dp_accounting
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedpeft_jax import errors
from fedpeft_jax.privacy import accounting

REL = dp_accounting.NeighboringRelation


def _direct_epsilon(events, relation, delta, accountant):
  if accountant == 'pld':
    acc = pld_privacy_accountant.PLDAccountant(relation)
  else:
    acc = rdp_privacy_accountant.RdpAccountant(list(accounting.RDP_ORDERS), relation)
  for event in events:
    acc.compose(event)
  return acc.get_epsilon(delta)


def _gaussian_cdf(x):
  return 0.5 * math.erfc(-x / math.sqrt(2))  # erfc keeps the far left tail accurate.


def _analytic_gaussian_epsilon(sensitivity_over_stddev, delta):
  """Balle and Wang (2018), Theorem 8: the exact epsilon of one Gaussian release,
  delta(eps) = Phi(a/2 - eps/a) - e^eps Phi(-a/2 - eps/a) for a = Delta / sigma,
  solved for eps by bisection (delta(eps) decreases in eps)."""
  a = sensitivity_over_stddev
  delta_at = lambda eps: (_gaussian_cdf(a / 2 - eps / a)
                          - math.exp(eps) * _gaussian_cdf(-a / 2 - eps / a))
  low, high = 0.0, 200.0
  for _ in range(200):
    mid = (low + high) / 2
    low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
  return high


# One release at sampling rate 1: add/remove moves the sum by one clip norm,
# replace-one by two.
@pytest.mark.parametrize('z', [1.0, 2.0])
@pytest.mark.parametrize('spec,accountant,sensitivity', [
    (dict(mode='client', sampling='poisson', num_clients=10, clients_per_round=10), 'pld', 1),
    (dict(mode='client', sampling='poisson', num_clients=10, clients_per_round=10), 'rdp', 1),
    (dict(mode='client', sampling='fixed', num_clients=10, clients_per_round=10), 'rdp', 2),
    (dict(mode='sample', client_sizes=(8,), batch_size=8, local_epochs=1), 'rdp', 2),
])
def test_one_release_at_rate_one_is_the_analytic_gaussian_mechanism(z, spec, accountant,
                                                                     sensitivity):
  exact = _analytic_gaussian_epsilon(sensitivity / z, 1e-5)
  ours = accounting.epsilon(accounting.PrivacySpec(
      noise_multiplier=z, delta=1e-5, rounds=1, accountant=accountant, **spec))
  if accountant == 'pld':  # Tight up to its discretisation, which rounds up.
    assert exact <= ours * (1 + 1e-9) and ours == pytest.approx(exact, rel=0.01)
  else:  # An upper bound, well within the factor 2 a change of convention would make.
    assert exact <= ours < 1.3 * exact


def _sample_events(sizes, z, rounds, batch_size, local_epochs):
  return {n: [dp_event.SelfComposedDpEvent(dp_event.SampledWithoutReplacementDpEvent(
      n, min(n, batch_size), dp_event.GaussianDpEvent(z / 2)),
      rounds * local_epochs * math.ceil(n / batch_size))] for n in sizes}


@pytest.mark.parametrize('spec,target', [
    (dict(mode='client', sampling='fixed', num_clients=64, clients_per_round=8), 8.0),
    (dict(mode='client', sampling='poisson', num_clients=64, clients_per_round=8,
          accountant='rdp'), 8.0),
    (dict(mode='sample', client_sizes=(50, 50), batch_size=16, local_epochs=1), 8.0),
    (dict(mode='sample', client_sizes=(8, 50, 8), batch_size=16, local_epochs=1), 8.0),
])
def test_calibrated_noise_just_meets_the_target(spec, target):
  spec = accounting.PrivacySpec(noise_multiplier=0.0, delta=1e-5, rounds=10, **spec)
  z = accounting.calibrate_noise(spec, target)

  def direct(noise):  # dp-accounting on the events built here, the worst client's.
    if spec.mode == 'sample':
      return max(_direct_epsilon(events, REL.REPLACE_ONE, 1e-5, 'rdp') for events in
                 _sample_events(set(spec.client_sizes), noise, 10, spec.batch_size,
                                spec.local_epochs).values())
    if spec.sampling == 'fixed':
      step, relation = dp_event.SampledWithoutReplacementDpEvent(
          64, 8, dp_event.GaussianDpEvent(noise / 2)), REL.REPLACE_ONE
    else:
      step, relation = dp_event.PoissonSampledDpEvent(
          8 / 64, dp_event.GaussianDpEvent(noise)), REL.ADD_OR_REMOVE_ONE
    return _direct_epsilon([dp_event.SelfComposedDpEvent(step, 10)], relation, 1e-5, 'rdp')

  assert direct(z) <= target < direct(0.98 * z)


def _poisson(z, rounds):
  return dp_event.SelfComposedDpEvent(
      dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(z)), rounds)


@pytest.mark.parametrize('accountant', ['pld', 'rdp'])
def test_a_ledger_composes_the_rounds_it_records(accountant):
  spec = accounting.PrivacySpec(mode='client', noise_multiplier=0.0, delta=1e-5, rounds=6,
                                num_clients=100, clients_per_round=10, accountant=accountant)
  ledger = [accounting.round_record(spec, 1.2)] * 3 + [accounting.round_record(spec, 0.8)] * 3
  ledger = json.loads(json.dumps(ledger))  # As a checkpoint stores it.
  spent = lambda *events: _direct_epsilon([_poisson(1.2, 3), _poisson(0.8, 3), *events],
                                          REL.ADD_OR_REMOVE_ONE, 1e-5, accountant)
  assert accounting.ledger_epsilon(ledger, 1e-5, accountant) == pytest.approx(spent(),
                                                                               rel=1e-9)


def test_the_remaining_rounds_are_calibrated_to_meet_the_target_over_the_whole_ledger():
  # Every client every round (rate 1) keeps the many evaluations of calibration quick.
  spec = accounting.PrivacySpec(mode='client', noise_multiplier=0.0, delta=1e-5, rounds=6,
                                num_clients=10, clients_per_round=10)
  ledger = [accounting.round_record(spec, 4.0)] * 3 + [accounting.round_record(spec, 6.0)] * 3
  rate_one = lambda z, rounds: dp_event.SelfComposedDpEvent(
      dp_event.PoissonSampledDpEvent(1.0, dp_event.GaussianDpEvent(z)), rounds)
  spent = lambda *events: _direct_epsilon([rate_one(4.0, 3), rate_one(6.0, 3), *events],
                                          REL.ADD_OR_REMOVE_ONE, 1e-5, 'pld')
  z = accounting.calibrate_remaining(ledger, spec, 5.0, remaining_rounds=4)
  assert spent(rate_one(z, 4)) <= 5.0 < spent(rate_one(0.98 * z, 4))
  with pytest.raises(errors.UserError, match='rounds run so far spent epsilon'):
    accounting.calibrate_remaining(ledger, spec, 0.5 * spent(), remaining_rounds=4)


def test_a_sample_level_ledger_is_the_worst_client_over_its_rounds():
  spec = accounting.PrivacySpec(mode='sample', noise_multiplier=0.0, delta=1e-5, rounds=3,
                                client_sizes=(40, 0, 16), batch_size=16, local_epochs=2)
  ledger = [accounting.round_record(spec, 1.5), accounting.round_record(spec, 3.0)]
  expected = max(
      _direct_epsilon(low + high, REL.REPLACE_ONE, 1e-5, 'rdp') for low, high in zip(
          _sample_events((40, 16), 1.5, 1, 16, 2).values(),
          _sample_events((40, 16), 3.0, 1, 16, 2).values()))
  assert accounting.ledger_epsilon(ledger, 1e-5) == pytest.approx(expected, rel=1e-9)


def test_a_ledger_cannot_mix_relations():
  record = lambda sampling: accounting.round_record(accounting.PrivacySpec(
      mode='client', noise_multiplier=1.0, delta=1e-5, rounds=1, sampling=sampling,
      num_clients=10, clients_per_round=2))
  with pytest.raises(errors.UserError, match='mixes'):
    accounting.ledger_epsilon([record('poisson'), record('fixed')], 1e-5)


def test_delta_must_be_below_one_over_the_individuals_protected():
  """At sample level an individual is an example: delta < 1 / (all clients' examples), not
  1 / (the smallest client's), which a delta of 0.05 with clients of 5 and 40 would pass."""
  sizes = (40, 5, 0, 40)
  total = sum(sizes)  # 85: every example of every client.
  sample = accounting.PrivacySpec(mode='sample', noise_multiplier=1.0, delta=0.05, rounds=1,
                                  client_sizes=sizes, batch_size=4, local_epochs=1)
  assert sample.delta * min(n for n in sizes if n) < 1  # The old, weakest bound passed it.
  for check in (accounting.check_delta, accounting.epsilon):
    with pytest.raises(errors.UserError, match=rf'below 1/{total} .*training examples') as e:
      check(sample)
    assert e.value.argument == 'delta'
  accounting.check_delta(dataclasses.replace(sample, delta=0.99 / total))
  # A ledger holds each client size once: it checks against their sum, a lower bound.
  ledger = [accounting.round_record(sample)]
  with pytest.raises(errors.UserError, match=r'below 1/45 .*\(at least\)'):
    accounting.ledger_epsilon(ledger, 1 / 45)
  client = accounting.PrivacySpec(mode='client', noise_multiplier=1.0, delta=0.1, rounds=1,
                                  num_clients=10, clients_per_round=2)
  with pytest.raises(errors.UserError, match=r'below 1/10 .*number of clients'):
    accounting.check_delta(client)


def test_an_infinite_epsilon_is_written_as_valid_json():
  spec = accounting.PrivacySpec(mode='client', noise_multiplier=0.0, delta=1e-5, rounds=3,
                                num_clients=10, clients_per_round=2)
  assert accounting.epsilon(spec) == math.inf
  text = json.dumps({'epsilon': accounting.json_safe_epsilon(accounting.epsilon(spec))},
                    allow_nan=False)
  assert float(json.loads(text)['epsilon']) == math.inf
  assert accounting.json_safe_epsilon(2.5) == 2.5
