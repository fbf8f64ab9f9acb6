"""Clipping, noise, DP-FedAvg, local DP-SGD and the accountant."""
import json
import subprocess
import sys

import dp_accounting
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedpeft_jax import validation
from fedpeft_jax.federated import aggregators, client as client_lib, fedavg
from fedpeft_jax.privacy import accounting, mechanisms
from tests.conftest import REPO, tiny_config
from tests.test_fedavg import _loss_fn, _setup

_tree = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=12)


@hypothesis.settings(deadline=None, max_examples=60)
@hypothesis.given(_tree, _tree, st.floats(1e-3, 1e3))
def test_clipped_update_never_exceeds_the_clip_norm(a, b, clip_norm):
  tree = {'a': jnp.asarray(a, jnp.float32), 'b': {'c': jnp.asarray(b, jnp.float32)}}
  clipped, norm = mechanisms.clip(tree, clip_norm)
  assert float(mechanisms.global_norm(clipped)) <= clip_norm * (1 + 1e-5)
  if float(norm) <= clip_norm:  # Small updates pass through unchanged.
    jax.tree.map(np.testing.assert_array_equal, clipped, tree)
  else:  # Large ones keep their direction.
    np.testing.assert_allclose(float(mechanisms.global_norm(clipped)), clip_norm, rtol=1e-4)


def test_noise_has_the_configured_stddev():
  tree = {'w': jnp.zeros((300, 100)), 'b': jnp.zeros(1000)}
  noised = mechanisms.add_noise(jax.random.key(0), tree, 0.7)
  samples = np.concatenate([np.ravel(x) for x in jax.tree.leaves(noised)])
  # 31,000 samples: the sample stddev is within 2% of 0.7 with overwhelming probability.
  assert abs(samples.std() - 0.7) < 0.014
  assert abs(samples.mean()) < 0.02
  # Leaves get independent noise.
  assert not np.allclose(np.ravel(noised['w'])[:1000], noised['b'])


def _round(aggregator, sampling='fixed', rounds=1, **kw):
  dataset, parts, trainable, frozen = _setup()
  table = fedavg.ClientTable.from_partition(parts)
  algorithm = fedavg.fedavg(
      _loss_fn, client_lib.sgd(0.1, 0.9, 0.0), num_epochs=1, batch_size=4,
      max_examples=table.max_examples, clients_per_round=3, num_clients=len(parts),
      aggregator=aggregator, sampling=sampling, **kw)
  apply = jax.jit(algorithm.apply)
  state = algorithm.init(trainable, jax.random.key(7))
  history = []
  for _ in range(rounds):
    state, metrics = apply(state, frozen, dataset, table)
    history.append(metrics)
  return state, history, apply


def test_dp_fedavg_without_noise_or_clipping_is_uniform_fedavg():
  private, _, _ = _round(aggregators.dp_fedavg(clip_norm=1e6, noise_multiplier=0.0,
                                               expected_clients=3))
  plain, _, _ = _round(aggregators.weighted_mean(by_examples=False))
  weighted, _, _ = _round(aggregators.weighted_mean(by_examples=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               private.trainable, plain.trainable)
  assert not np.allclose(plain.trainable['w'], weighted.trainable['w'])


def test_dp_fedavg_bounds_each_client_and_adds_noise():
  clip = 1e-3
  quiet, history, _ = _round(aggregators.dp_fedavg(clip_norm=clip, noise_multiplier=0.0,
                                                   expected_clients=3))
  _, _, trainable, _ = _setup()
  step = jax.tree.map(jnp.subtract, quiet.trainable, trainable)
  assert float(mechanisms.global_norm(step)) <= clip * (1 + 1e-5)  # Mean of clipped.
  assert float(history[0].aggregator['clipped_fraction']) == 1.0
  noisy, _, _ = _round(aggregators.dp_fedavg(clip_norm=clip, noise_multiplier=1.0,
                                             expected_clients=3))
  # Noise stddev clip on the sum, divided by 3 clients, over 21 parameters.
  moved = float(mechanisms.global_norm(jax.tree.map(jnp.subtract, noisy.trainable,
                                                    quiet.trainable)))
  assert 0.3 * clip * np.sqrt(21) / 3 < moved < 3 * clip * np.sqrt(21) / 3


def test_poisson_cohorts_vary_in_size_with_one_compilation():
  _, history, apply = _round(aggregators.dp_fedavg(
      clip_norm=1.0, noise_multiplier=1.0, expected_clients=3), sampling='poisson', rounds=8)
  sizes = [int(m.num_sampled) for m in history]
  assert len(set(sizes)) > 1, sizes
  assert all(int(m.num_reported) == s for m, s in zip(history, sizes))
  assert apply._cache_size() == 1


def test_adaptive_clipping_moves_the_clip_norm_towards_the_quantile():
  agg = aggregators.dp_fedavg(clip_norm=1e-4, noise_multiplier=1.0, expected_clients=3,
                              adaptive=True, clipped_count_stddev=1.0)
  state, history, _ = _round(agg, rounds=4)
  # Every update exceeds a tiny clip norm, so it must grow each round.
  norms = [float(m.aggregator['clip_norm']) for m in history]
  assert norms[0] == pytest.approx(1e-4) and float(state.aggregator_state.clip_norm) > norms[0]
  # The update noise takes a larger multiplier so the two releases spend z = 1.
  z_delta = mechanisms.adaptive_delta_noise_multiplier(1.0, 1.0)
  assert z_delta ** -2 + (2 * 1.0) ** -2 == pytest.approx(1.0)


def test_sample_level_dp_sgd_clips_each_example():
  dataset, parts, trainable, frozen = _setup()
  ids = jnp.asarray(parts[0], jnp.int32)  # 5 examples, one full batch of 8.

  def deterministic_loss(p, f, b, rng):  # No augmentation noise: both paths see the same.
    return optax.softmax_cross_entropy_with_integer_labels(b['x'] @ f['proj'] @ p['w'] + p['b'],
                                                           b['y'])

  sgd = optax.sgd(1.0)

  def update(sample_dp):
    fn = client_lib.make_client_update(deterministic_loss, sgd, num_epochs=1, batch_size=8,
                                       max_examples=5, sample_dp=sample_dp)
    return jax.jit(fn)(trainable, frozen, dataset, ids, 5, jax.random.key(1)).delta

  plain = update(None)
  huge_clip = update(client_lib.SampleDP(clip_norm=1e6, noise_multiplier=0.0))
  # Same examples; DP-SGD divides by the batch size 8, plain SGD by the 5 real examples.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a * 5 / 8, b, rtol=1e-5, atol=1e-7),
               plain, huge_clip)
  tiny_clip = update(client_lib.SampleDP(clip_norm=1e-3, noise_multiplier=0.0))
  assert float(mechanisms.global_norm(tiny_clip)) <= 5 * 1e-3 / 8 * (1 + 1e-5)
  noisy = update(client_lib.SampleDP(clip_norm=1e-3, noise_multiplier=2.0))
  # Noise stddev 2 * 1e-3 / 8 per coordinate, 21 coordinates.
  expected = 2 * 1e-3 / 8 * np.sqrt(21)
  moved = float(mechanisms.global_norm(jax.tree.map(jnp.subtract, noisy, tiny_clip)))
  assert 0.3 * expected < moved < 3 * expected


def _direct_epsilon(event, relation, delta, accountant='rdp'):
  if accountant == 'pld':
    acc = pld_privacy_accountant.PLDAccountant(relation)
  else:
    acc = rdp_privacy_accountant.RdpAccountant(list(accounting.RDP_ORDERS), relation)
  return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize('sampling,accountant', [('poisson', 'pld'), ('poisson', 'rdp'),
                                                 ('fixed', 'rdp')])
def test_privacy_mode_equals_dp_accounting_called_directly(tmp_path, sampling, accountant):
  result = subprocess.run(
      [sys.executable, 'launch.py', '--config=experiments/pcam_vit_ti4.py:bias,dp=client',
       '--mode=privacy', f'--workdir={tmp_path}', f'--config.dp.sampling={sampling}',
       f'--config.dp.accountant={accountant}', '--config.dp.noise_multiplier=1.3',
       '--config.fl.rounds=40'], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / 'privacy.json').read_text())
  rel = dp_accounting.NeighboringRelation
  if sampling == 'poisson':
    event = dp_event.PoissonSampledDpEvent(8 / 64, dp_event.GaussianDpEvent(1.3))
    relation = rel.ADD_OR_REMOVE_ONE
  else:  # Replace-one doubles the sensitivity of the sum.
    event = dp_event.SampledWithoutReplacementDpEvent(64, 8, dp_event.GaussianDpEvent(0.65))
    relation = rel.REPLACE_ONE
  expected = _direct_epsilon(dp_event.SelfComposedDpEvent(event, 40), relation, 1e-5,
                             accountant)
  assert report['epsilon'] == pytest.approx(expected, rel=1e-9)
  assert report['accountant'] == accountant and report['rounds'] == 40
  assert report['sampling_rate'] == 8 / 64 and report['noise_multiplier'] == 1.3


def test_sample_level_epsilon_is_the_worst_client():
  spec = accounting.PrivacySpec(mode='sample', noise_multiplier=1.5, delta=1e-5, rounds=3,
                                client_sizes=(40, 100, 40), batch_size=16, local_epochs=2)
  rel = dp_accounting.NeighboringRelation.REPLACE_ONE
  per_client = [_direct_epsilon(dp_event.SelfComposedDpEvent(
      dp_event.SampledWithoutReplacementDpEvent(n, 16, dp_event.GaussianDpEvent(0.75)),
      3 * 2 * -(-n // 16)), rel, 1e-5) for n in (40, 100)]
  assert accounting.epsilon(spec) == pytest.approx(max(per_client))


def test_target_epsilon_calibrates_the_noise():
  spec = accounting.PrivacySpec(mode='client', noise_multiplier=0.0, delta=1e-5, rounds=30,
                                num_clients=100, clients_per_round=10)
  z = accounting.calibrate_noise(spec, 4.0)
  assert accounting.epsilon(spec, noise_multiplier=z) <= 4.0
  assert accounting.epsilon(spec, noise_multiplier=z * 0.98) > 4.0  # Not more than needed.
  with pytest.raises(ValueError, match='cannot be reached'):
    accounting.calibrate_noise(spec, 1e-6)


@pytest.mark.parametrize('key,value,needle', [
    ('dp.clip_norm', 0.0, 'must be > 0'),
    ('dp.noise_multiplier', -1.0, 'must be >= 0'),
    ('dp.delta', 1.0, 'must be in (0, 1)'),
    ('fl.aggregation', 'weighted', "must be 'uniform'"),
    ('dp.accountant', 'pld', 'PLD supports Poisson'),
])
def test_bad_privacy_settings_fail_at_validation(key, value, needle):
  config = tiny_config('bias,dp=client')
  if key == 'dp.accountant':
    config.dp.sampling = 'fixed'
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(validation.ConfigError, match=key.replace('.', r'\.')) as e:
    validation.validate(config)
  assert needle in str(e.value)


def test_unreachable_target_epsilon_exits_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, 'launch.py', '--config=experiments/pcam_vit_ti4.py:bias,dp=client',
       '--mode=privacy', f'--workdir={tmp_path}', '--config.dp.target_epsilon=0.000001'],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2
  assert 'cannot be reached' in result.stderr and 'Traceback' not in result.stderr
