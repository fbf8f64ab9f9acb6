"""Clipping, noise, DP-FedAvg, local DP-SGD and the accountant."""
import dataclasses
import json
import math
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
from fedpeft_jax.data import sources
from fedpeft_jax.experiment import build
from fedpeft_jax.federated import aggregators, client as client_lib, types
from fedpeft_jax.privacy import accounting, mechanisms
from fedpeft_jax.privacy.ledger import PrivacyLedger
from tests.conftest import REPO, fedavg_round, launch, linear_loss_fn, linear_problem, tiny_config
from tests.test_launch import _one_error_line

# No subnormals: XLA on CPU flushes them to zero in any arithmetic (x * 1.0 included).
_tree = st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32),
                 min_size=1, max_size=12)


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
  dataset, parts, trainable, frozen = linear_problem()
  table = types.ClientTable.from_partition(parts)
  algorithm = fedavg_round(
      linear_loss_fn, client_lib.sgd(0.1, 0.9, 0.0), num_epochs=1, batch_size=4,
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
  _, _, trainable, _ = linear_problem()
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


def test_adaptive_clipping_delivers_the_printed_epsilon():
  """The audit's configuration: 8 expected of 64 clients, Poisson, count stddev 0.6.

  Each release's sensitivity is measured by adding one client under the same noise,
  its stddev over many keys; the Gaussians compose by z^-2 = sum (sensitivity/stddev)^2.
  """
  z, count_stddev, expected, rate, rounds, lr, quantile = 0.654, 0.6, 8, 8 / 64, 10, 1.0, 0.5
  agg = aggregators.dp_fedavg(clip_norm=1.0, noise_multiplier=z, expected_clients=expected,
                              adaptive=True, target_quantile=quantile, clip_learning_rate=lr,
                              clipped_count_stddev=count_stddev)
  state = agg.init()

  def releases(updates, rng):
    """The noised update sum and the noised count the server publishes for `updates`."""
    contributions = jax.vmap(agg.contribute, in_axes=(0, 0, None))(
        updates, jnp.ones(len(updates), jnp.int32), state)
    total = jax.tree.map(lambda x: x.sum(0), contributions)
    out = agg.finalize(total, jnp.asarray(len(updates)), state, rng)
    # The clip norm's geometric step, inverted, gives back the noised count.
    count = (quantile - jnp.log(out.state.clip_norm / state.clip_norm) / lr) * expected
    return out.mean_delta * expected, count

  updates = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
  key = jax.random.key(0)
  base_sum, base_count = releases(updates, key)
  sum_sensitivity = count_sensitivity = 0.0
  for norm in (0.5, 3.0):  # An added client within the clip norm, and one beyond it.
    added = jnp.concatenate([updates, jnp.full((1, 4), norm / 2)])
    new_sum, new_count = releases(added, key)
    sum_sensitivity = max(sum_sensitivity, float(jnp.linalg.norm(new_sum - base_sum)))
    count_sensitivity = max(count_sensitivity, abs(float(new_count - base_count)))
  sums, counts = jax.vmap(releases, in_axes=(None, 0))(
      updates, jax.random.split(jax.random.key(1), 40_000))
  sum_stddev, count_stddev_seen = float(jnp.std(sums, axis=0).mean()), float(jnp.std(counts))
  delivered = ((sum_sensitivity / sum_stddev) ** 2
               + (count_sensitivity / count_stddev_seen) ** 2) ** -0.5
  event = dp_event.SelfComposedDpEvent(
      dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(delivered)), rounds)
  delivered_epsilon = _direct_epsilon(
      event, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, 1e-5, 'pld')
  printed = accounting.epsilon(accounting.PrivacySpec(
      mode='client', noise_multiplier=z, delta=1e-5, rounds=rounds, num_clients=64,
      clients_per_round=expected, clipped_count_stddev=count_stddev))
  assert delivered_epsilon == pytest.approx(printed, rel=0.03), (delivered, z)


def test_a_dp_round_without_reports_still_releases_its_noise():
  clip, z, rounds = 1e-2, 1.0, 8
  state, history, _ = _round(aggregators.dp_fedavg(clip_norm=clip, noise_multiplier=z,
                                                   expected_clients=3),
                             rounds=rounds, dropout_prob=0.999)
  assert all(int(m.num_reported) == 0 for m in history)
  _, _, trainable, _ = linear_problem()
  moved = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(state.trainable),
                                                          jax.tree.leaves(trainable))])
  # Every round adds noise of stddev z * clip to the sum, divided by 3 expected clients.
  assert moved.std() == pytest.approx(np.sqrt(rounds) * z * clip / 3, rel=0.25)


def test_sample_level_dp_sgd_clips_each_example():
  dataset, parts, trainable, frozen = linear_problem()
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


def test_sample_level_dp_sgd_ignores_nonfinite_and_padded_examples():
  dataset, parts, trainable, frozen = linear_problem()
  poisoned = int(parts[1][0])
  dataset['poison'] = jnp.zeros(len(dataset['y'])).at[poisoned].set(1.0)

  def loss_scaled_by(poison_factor):
    def loss(p, f, b, rng):
      losses = optax.softmax_cross_entropy_with_integer_labels(
          b['x'] @ f['proj'] @ p['w'] + p['b'], b['y'])
      return losses * jnp.where(b['poison'] > 0, poison_factor, 1.0)
    return loss

  def update(loss_fn, ids, num_examples):
    fn = client_lib.make_client_update(
        loss_fn, optax.sgd(1.0), num_epochs=1, batch_size=8, max_examples=len(ids),
        sample_dp=client_lib.SampleDP(clip_norm=1e-2, noise_multiplier=0.5))
    return jax.jit(fn)(trainable, frozen, dataset, jnp.asarray(ids, jnp.int32), num_examples,
                       jax.random.key(1))

  ids = list(parts[0]) + [poisoned]
  # A real example whose loss and gradient are NaN counts as one whose gradient is zero.
  nan_example = update(loss_scaled_by(jnp.nan), ids, 6)
  zero_example = update(loss_scaled_by(0.0), ids, 6)
  assert np.isfinite(float(nan_example.loss_sum))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
               nan_example.delta, zero_example.delta)
  # Padding that points at a NaN example leaves no trace either.
  nan_padding = update(loss_scaled_by(jnp.nan), ids, 5)
  clean_padding = update(loss_scaled_by(jnp.nan), list(parts[0]) + [0], 5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
               nan_padding.delta, clean_padding.delta)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(nan_padding.delta))


def test_a_client_without_examples_under_sample_level_dp():
  dataset, parts, trainable, frozen = linear_problem(sizes=(5, 0, 9))
  table = types.ClientTable.from_partition(parts)
  algorithm = fedavg_round(
      linear_loss_fn, optax.sgd(0.1), num_epochs=1, batch_size=4, max_examples=table.max_examples,
      clients_per_round=3, num_clients=3,
      sample_dp=client_lib.SampleDP(clip_norm=1.0, noise_multiplier=1.0))
  state, metrics = jax.jit(algorithm.apply)(algorithm.init(trainable, jax.random.key(0)),
                                            frozen, dataset, table)
  assert int(metrics.num_reported) == 2  # The empty client has no update to report.
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.trainable))
  # It has no examples to protect: the guarantee is that of the others.
  spec = lambda sizes: accounting.PrivacySpec(mode='sample', noise_multiplier=1.0, delta=1e-5,
                                              rounds=2, client_sizes=sizes, batch_size=4,
                                              local_epochs=1)
  assert accounting.epsilon(spec((5, 0, 9))) == accounting.epsilon(spec((5, 9))) > 0


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
    ('dp.delta', 1 / 8, 'must be below 1/8'),  # One over the number of clients.
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


@pytest.mark.parametrize('partition', ['dirichlet', 'quantity'])
def test_sample_level_delta_is_checked_against_all_training_examples_at_validation(partition):
  """An individual is an example: 1 / data.min_client_size (the smallest client, the weakest
  bound) let deltas through that one over the training set's examples does not."""
  config = tiny_config('bias,dp=sample')
  config.data.partition, config.data.min_client_size = partition, 10
  total = config.data.num_train_examples  # 256 synthetic images, every one on a client.
  config.dp.delta = 0.09  # Below 1/10, above 1/256.
  with pytest.raises(validation.ConfigError,
                     match=rf'dp\.delta=0\.09: must be below 1/{total} .*training example'):
    validation.validate(config)
  config.dp.delta = 0.99 / total
  validation.validate(config)
  # Without data.num_train_examples (real data), each of fl.num_clients clients holds at
  # least data.min_client_size: a lower bound on the examples, known at launch.
  config.data.source, config.data.num_train_examples = 'folder', None
  floor = config.fl.num_clients * config.data.min_client_size
  config.dp.delta = 1.0 / floor
  with pytest.raises(validation.ConfigError, match=rf'must be below 1/{floor} .*at least'):
    validation.validate(config, needs_data=False)
  config.dp.delta = 0.99 / floor
  validation.validate(config, needs_data=False)


def test_sample_level_delta_is_checked_against_all_clients_examples_once_loaded():
  config = tiny_config('bias,dp=sample')
  sizes = (5, 100)
  config.dp.delta = 0.05  # Below 1/5, the smallest client's bound; above 1/105.
  with pytest.raises(validation.ConfigError,
                     match=rf'^--config\.dp\.delta=0\.05: .*below 1/{sum(sizes)} '):
    build.privacy_spec(config, sizes)
  config.dp.delta = 0.99 / sum(sizes)
  assert build.privacy_spec(config, sizes).delta == config.dp.delta


_NAN, _INF = math.nan, math.inf


# (dp.mode, key, value, what the one line says). Every dp.* number a run uses.
@pytest.mark.parametrize('mode,key,value,needle', [
    *[(mode, 'dp.clip_norm', v, 'must be > 0 and finite') for mode in ('client', 'sample')
      for v in (0.0, -1.0, _NAN, _INF)],
    *[(mode, 'dp.noise_multiplier', v, 'must be >= 0 and finite') for mode in ('client', 'sample')
      for v in (-1.0, _NAN, _INF)],
    *[(mode, 'dp.delta', v, 'must be in (0, 1)') for mode in ('client', 'sample')
      for v in (0.0, -1e-5, 1.0, 1.5, _NAN)],
    *[(mode, 'dp.target_epsilon', v, 'must be > 0 and finite') for mode in ('client', 'sample')
      for v in (0.0, -1.0, _NAN, _INF)],
    *[('adaptive', 'dp.target_quantile', v, 'must be in (0, 1)') for v in (0.0, 1.0, -0.5, _NAN)],
    *[('adaptive', 'dp.clip_lr', v, 'must be > 0 and finite') for v in (0.0, -0.2, _NAN, _INF)],
    *[('adaptive', 'dp.clipped_count_stddev', v, 'must be > 0 and finite')
      for v in (0.0, -0.5, _NAN, _INF)],
])
def test_every_invalid_dp_number_is_one_line_at_validation(mode, key, value, needle):
  config = tiny_config(f'bias,dp={"sample" if mode == "sample" else "client"}')
  config.dp.adaptive_clip = mode == 'adaptive'
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(config)
  message = str(e.value)
  assert message.startswith(f'--config.{key}={value!r}: ') and needle in message, message
  assert '\n' not in message


def test_a_zero_clipped_count_stddev_is_one_line_at_launch_not_a_traceback(tmp_path):
  result = launch(tmp_path, '--config.dp.adaptive_clip=True',
                  '--config.dp.clipped_count_stddev=0', '--mode=privacy',
                  config='experiments/synthetic_tiny.py:bias,dp=client')
  _one_error_line(result, '--config.dp.clipped_count_stddev=0.0: must be > 0 and finite')


def _adaptive_resume_config(rounds):
  """Every client every round (rate 1 keeps calibration quick), adaptive clipping under a
  target epsilon."""
  config = tiny_config('bias,dp=client')
  config.fl.clients_per_round, config.fl.rounds = config.fl.num_clients, rounds
  config.dp.adaptive_clip, config.dp.target_epsilon = True, 8.0
  return config


def test_a_grown_resume_with_adaptive_clipping_is_checked_against_the_remaining_calibration():
  """Validation calibrates fl.rounds from scratch; a resume that grows a finished run
  calibrates the rounds left after its ledger, which need far more noise: a count noise that
  leaves the fresh calibration a share may leave the remaining one none. That is one line
  naming the keys and the way out, not a traceback naming no key once the data is loaded."""
  first = _adaptive_resume_config(3)
  first.dp.clipped_count_stddev = 5.0
  spec = build.privacy_spec(first)
  ledger = [accounting.round_record(spec)] * 3  # The finished 3-round run...
  grown = _adaptive_resume_config(4)  # ... resumed with 4 rounds.
  grown.dp.clipped_count_stddev = 5.0
  fresh = accounting.calibrate_noise(dataclasses.replace(spec, rounds=4), 8.0)
  assert fresh < 2 * 5.0
  validation.validate(grown)  # Passes: the fresh calibration leaves the updates a share.
  with pytest.raises(validation.ConfigError) as e:
    build.privacy_spec(grown, ledger=PrivacyLedger(ledger, calibrated_for_rounds=3,
                                                   noise_multiplier=spec.noise_multiplier))
  message = str(e.value)
  assert message.startswith('--config.fl.rounds=4: ') and '\n' not in message, message
  assert "the 1 round left after the checkpoint's 3 needs noise multiplier" in message
  assert 'dp.clipped_count_stddev=5 must exceed half' in message
  assert 'keep fl.rounds at 3, or start a new --workdir' in message  # Its own 3 rounds work.
  # The aggregator built from such a noise names its key too, should anything reach it.
  too_noisy = dataclasses.replace(spec, noise_multiplier=11.0)
  with pytest.raises(validation.ConfigError, match=r'^--config\.dp\.clipped_count_stddev='):
    build.build_algorithm(grown, linear_loss_fn, 8, too_noisy)


def test_the_largest_resumable_rounds_is_the_last_whose_remaining_noise_splits(monkeypatch):
  """The bisection for 'grow fl.rounds to at most R', on a stand-in calibration whose noise
  grows with the rounds left; R found by trying every fl.rounds in turn."""
  remaining_noise = lambda remaining: 1.0 + 0.1 * remaining
  monkeypatch.setattr(accounting, 'calibrate_remaining',
                      lambda ledger, spec, target, remaining: remaining_noise(remaining))
  config = _adaptive_resume_config(40)
  config.dp.clipped_count_stddev = 1.23  # The split needs a noise below 2.46.
  done, calibrated_for = 2, 5
  expected = max(r for r in range(calibrated_for, 41) if remaining_noise(r - done) < 2.46)
  with pytest.raises(validation.ConfigError, match=rf'grow fl\.rounds to at most {expected},'):
    validation.check_remaining_adaptive_noise(config, None, [{}] * done, calibrated_for,
                                              remaining_noise(40 - done))


def test_adaptive_clipping_with_a_target_epsilon_is_checked_at_validation():
  config = tiny_config('bias,dp=client')
  config.dp.adaptive_clip, config.dp.target_epsilon = True, 2.0
  config.dp.clipped_count_stddev = 0.2  # Leaves the updates no noise at the calibrated z.
  with pytest.raises(validation.ConfigError, match=r'dp\.clipped_count_stddev=0\.2') as e:
    validation.validate(config)
  assert 'calibrated to dp.target_epsilon=2.0' in str(e.value)
  config.dp.clipped_count_stddev = 5.0
  validation.validate(config)


def test_unreachable_target_epsilon_exits_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, 'launch.py', '--config=experiments/pcam_vit_ti4.py:bias,dp=client',
       '--mode=privacy', f'--workdir={tmp_path}', '--config.dp.target_epsilon=0.000001'],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2
  assert 'cannot be reached' in result.stderr and 'Traceback' not in result.stderr


def _partition_config(mode):
  config = tiny_config('bias' if mode == 'none' else f'bias,dp={mode}')
  config.data.partition, config.fl.num_clients = 'natural', 3
  return config


def _natural_data():
  """6 examples of 2 classes on 3 named clients, and their natural partition."""
  labels = np.array([0, 1, 1, 0, 0, 1], np.int32)
  ids = np.array(['carol', 'alice', 'carol', 'bob', 'alice', 'carol'])
  data = sources.Dataset(np.zeros((6, 2, 2, 3), np.uint8), labels, ('cat', 'dog'), ids)
  return data, [np.array([1, 4]), np.array([3]), np.array([0, 2, 5])]


@pytest.mark.parametrize('mode', ['client', 'sample'])
def test_under_dp_partition_json_holds_no_per_client_data(mode):
  data, parts = _natural_data()
  described = build.describe_partition(_partition_config(mode), data, parts)
  assert described == {'method': 'natural', 'args': {}, 'class_names': ['cat', 'dog'],
                       'num_clients': 3}
  text = json.dumps(described)
  assert not any(name in text for name in ('alice', 'bob', 'carol', 'size', 'histogram'))
  # Without DP, every client's size, histogram and id (as before).
  clients = build.describe_partition(_partition_config('none'), data, parts)['clients']
  assert clients == [{'size': 2, 'label_histogram': [1, 1], 'id': 'alice'},
                     {'size': 1, 'label_histogram': [1, 0], 'id': 'bob'},
                     {'size': 3, 'label_histogram': [1, 2], 'id': 'carol'}]


def test_under_dp_the_start_line_does_not_print_the_client_sizes(capsys):
  config = tiny_config('bias,dp=sample')
  config.data.partition = 'quantity'  # Clients of different sizes.
  experiment = build.build(config)
  line = next(l for l in capsys.readouterr().out.splitlines() if 'trainable of' in l)
  assert line.endswith('; 8 clients'), line
  assert 'clients' not in experiment.partition
  assert experiment.partition['num_clients'] == 8
  assert experiment.privacy.client_sizes == tuple(experiment.client_sizes)


def _dropout_steps(arg, sampling, seeds, dropout_prob=0.5):
  """One round from the same model for each seed, built as training builds it, on 64
  linear-problem clients (32 a round) whose labels share a learnable signal: the flat
  step of every round and how many clients reported. DP: no noise, no clipping."""
  config = tiny_config(arg)
  config.fl.num_clients, config.fl.clients_per_round = 64, 32
  config.fl.dropout_prob, config.fl.batch_size, config.optim.lr = dropout_prob, 4, 0.1
  config.dp.sampling, config.dp.clip_norm, config.dp.noise_multiplier = sampling, 1e6, 0.0
  if config.dp.mode == 'none':
    config.fl.aggregation = 'uniform'
  sizes = tuple(int(n) for n in np.random.default_rng(3).integers(2, 20, 64))
  dataset, parts, trainable, frozen = linear_problem(sizes)
  signal = jnp.asarray(np.random.default_rng(5).normal(size=(6, 3)), jnp.float32)
  dataset['y'] = jnp.argmax(dataset['x'] @ frozen['proj'] @ signal, -1).astype(jnp.int32)
  table = types.ClientTable.from_partition(parts)
  algorithm = build.build_algorithm(config, linear_loss_fn, table.max_examples,
                                    build.privacy_spec(config))
  apply = jax.jit(algorithm.apply)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  steps, reported = [], []
  for seed in seeds:
    state, metrics = apply(algorithm.init(trainable, jax.random.key(seed)), frozen, dataset,
                           table)
    steps.append(flat(state.trainable) - flat(trainable))
    reported.append(int(metrics.num_reported))
  return np.array(steps), np.array(reported)


def test_under_dropout_the_dp_step_is_the_survivors_mean_in_expectation():
  """DP-FedAvg divides the sum by the expected number of reporters m (1 - p), not by m:
  with no noise and no clipping, each round's step is the non-DP uniform mean of the
  survivors times realised / expected survivors, and over many rounds the steps match in
  size (dividing by m would make them half as large at p = 0.5)."""
  seeds = range(200)
  plain, plain_reported = _dropout_steps('bias', 'fixed', seeds)
  private, reported = _dropout_steps('bias,dp=client', 'fixed', seeds)
  assert (reported == plain_reported).all() and len(set(reported)) > 3
  expected_survivors = 32 * (1 - 0.5)
  np.testing.assert_allclose(private, plain * (reported / expected_survivors)[:, None],
                             rtol=1e-4, atol=1e-7)
  magnitude = lambda steps: np.linalg.norm(steps, axis=1).mean()
  assert magnitude(private) / magnitude(plain) == pytest.approx(1.0, abs=0.05)
  # Poisson sampling: the expected cohort is m too, each surviving with 1 - p.
  poisson, poisson_reported = _dropout_steps('bias,dp=client', 'poisson', seeds)
  assert len(set(poisson_reported)) > 3
  assert magnitude(poisson) / magnitude(plain) == pytest.approx(1.0, abs=0.05)
  direction = plain.mean(0) / np.linalg.norm(plain.mean(0))
  for steps in (private, poisson):  # The mean step along the mean direction, too.
    assert (steps @ direction).mean() / (plain @ direction).mean() == pytest.approx(1.0,
                                                                                   abs=0.05)
