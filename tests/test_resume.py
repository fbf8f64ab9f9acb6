"""Run checkpoints: exact state round trips, config mismatches named, finished runs seen."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeft_jax import configs
from fedpeft_jax import resume
from fedpeft_jax.federated import types
from fedpeft_jax.federated import server_optimizers
from tests.conftest import tiny_config


def _state(round_index, value):
  return types.ServerState(
      trainable={'w': jnp.full((3,), value, jnp.float32)}, opt_state=(jnp.ones(2),),
      aggregator_state=(), round=jnp.asarray(round_index, jnp.int32),
      rng=jax.random.key(7))


def test_save_then_restore_gives_the_same_state_and_values(tmp_path):
  config = tiny_config()
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=2)
  assert checkpointer.latest(config, force=False) is None
  assert resume.latest_round(str(tmp_path)) is None
  for r in (1, 2, 3):
    checkpointer.save(_state(r, float(r)), {'traffic': {'bytes_cumulative': r}}, config)
  step, saved = checkpointer.latest(config, force=False)
  assert step == 3 == resume.latest_round(str(tmp_path))
  assert saved['traffic'] == {'bytes_cumulative': 3}
  restored = checkpointer.restore_state(step, _state(0, 0.0))
  np.testing.assert_array_equal(restored.trainable['w'], [3.0, 3.0, 3.0])
  assert int(restored.round) == 3
  np.testing.assert_array_equal(jax.random.key_data(restored.rng),
                                jax.random.key_data(jax.random.key(7)))
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['2', '3']  # keep=2


def test_another_config_is_named_key_by_key_and_resumable_keys_pass(tmp_path):
  config = tiny_config()
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=1)
  checkpointer.save(_state(1, 0.0), {}, config)
  longer = tiny_config()
  longer.fl.rounds, longer.checkpoint.every = 30, 7
  assert checkpointer.latest(longer, force=False)[0] == 1
  other = tiny_config()
  other.optim.lr, other.seed = 0.5, 3
  with pytest.raises(resume.ResumeError) as e:
    checkpointer.latest(other, force=False)
  assert 'optim.lr: checkpoint 0.01 vs now 0.5' in str(e.value)
  assert 'seed: checkpoint 0 vs now 3' in str(e.value) and 'fl.rounds' not in str(e.value)
  assert checkpointer.latest(other, force=True)[0] == 1


def test_a_key_newer_than_the_checkpoint_passes_at_its_default_only(tmp_path):
  older = tiny_config()
  del older.fl['prox_mu'], older.fl['algorithm']  # As a run saved before they existed.
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=1)
  checkpointer.save(_state(1, 0.0), {}, older)
  config = tiny_config()
  assert checkpointer.latest(config, force=False)[0] == 1
  config.fl.prox_mu = 0.1  # Not what the old run did.
  with pytest.raises(resume.ResumeError) as e:
    checkpointer.latest(config, force=False)
  assert 'fl.prox_mu: checkpoint None vs now 0.1' in str(e.value)
  assert 'fl.algorithm' not in str(e.value)


# Under DP a resume keeps the mechanism and the population, force or not (issue 19, item 4).

def _dp_config(rounds=3, **dp):
  config = tiny_config('bias,dp=client')
  config.fl.rounds = rounds
  for key, value in dp.items():
    config.dp[key] = value
  return config


def _changed(config, key):
  """`config` with flat key `key` set to another value of its type."""
  section, _, name = key.rpartition('.')
  node = config[section] if section else config
  value = node[name]
  if isinstance(value, bool):
    candidates = [not value]
  elif isinstance(value, (int, float)):
    candidates = [value + 1 if isinstance(value, int) else value * 0.5]
  elif isinstance(value, str):
    candidates = [value + '_other']
  else:  # An unset placeholder: whichever type it takes.
    candidates = [0.5, 3, 'other']
  for candidate in candidates:
    try:
      node[name] = candidate
      return config
    except TypeError:
      continue
  raise AssertionError(f'no other value for {key}')


def _locked_keys():
  flat = configs.flat_config(tiny_config('bias,dp=client'))
  return sorted(k for k in flat if k.startswith('dp.') and k != 'dp.mode') + sorted(
      resume.DP_LOCKED_KEYS)


def test_the_locked_keys_are_config_keys():
  flat = configs.flat_config(configs.base_config())
  assert resume.DP_LOCKED_KEYS <= set(flat)
  assert {'dp.mode', 'dp.sampling', 'dp.noise_multiplier'} <= {k for k in flat
                                                                if resume.dp_locked(k)}


@pytest.mark.parametrize('key', _locked_keys())
def test_under_dp_a_forced_resume_changing_a_locked_key_is_refused_naming_it(tmp_path, key):
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=1)
  # At the run's end and resumed with more rounds: only the locked key can be the reason.
  checkpointer.save(_state(3, 0.0), {}, _dp_config(3))
  config = _changed(_dp_config(6), key)
  with pytest.raises(resume.ResumeError) as e:
    checkpointer.latest(config, force=True)
  message = str(e.value)
  assert f'{key}: checkpoint ' in message and 'force' in message and '\n' not in message
  assert 'fl.rounds' not in message


@pytest.mark.parametrize('saved_mode,mode', [('none', 'client'), ('client', 'none'),
                                             ('client', 'sample'), ('none', 'sample')])
def test_switching_dp_on_off_or_between_modes_is_refused_even_forced(tmp_path, saved_mode,
                                                                     mode):
  saved, now = _dp_config(3), _dp_config(6)
  saved.dp.mode, now.dp.mode = saved_mode, mode
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=1)
  checkpointer.save(_state(3, 0.0), {}, saved)
  with pytest.raises(resume.ResumeError,
                     match=f"dp.mode: checkpoint '{saved_mode}' vs now '{mode}'"):
    checkpointer.latest(now, force=True)


def test_under_dp_rounds_still_grow(tmp_path):
  """From the end of a run, also under a target epsilon (the remaining rounds are
  calibrated); without a target, from any checkpoint (the noise stays as it ran)."""
  finished = resume.RunCheckpointer(str(tmp_path / 'finished'), keep=1)
  finished.save(_state(3, 0.0), {}, _dp_config(3, target_epsilon=8.0))
  assert finished.latest(_dp_config(6, target_epsilon=8.0), force=False)[0] == 3
  midway = resume.RunCheckpointer(str(tmp_path / 'midway'), keep=1)
  midway.save(_state(1, 0.0), {}, _dp_config(3))
  assert midway.latest(_dp_config(6), force=False)[0] == 1
  assert midway.latest(_dp_config(3), force=False)[0] == 1  # The same run: bit-identical.


def test_under_dp_a_mid_run_checkpoint_refuses_what_would_reuse_released_noise(tmp_path):
  """Rounds after a mid-run checkpoint may have been released; run again on the same keys
  with another computation or recalibrated noise, two releases would share their noise."""
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=1)
  checkpointer.save(_state(1, 0.0), {}, _dp_config(3, target_epsilon=8.0))
  grown = _dp_config(6, target_epsilon=8.0)
  with pytest.raises(resume.ResumeError,
                     match=r'round 1 of its 3-round DP run: rounds 2-3 .*fl\.rounds: '
                           r'checkpoint 3 vs now 6'):
    checkpointer.latest(grown, force=True)
  for key, value in (('fl.dropout_prob', 0.5), ('fl.server_optimizer', 'momentum'),
                     ('optim.lr', 0.5)):
    config = _dp_config(3, target_epsilon=8.0)
    section, name = key.split('.')
    config[section][name] = value
    for force in (False, True):
      with pytest.raises(resume.ResumeError, match=f'rounds 2-3 .*{key}: checkpoint'):
        checkpointer.latest(config, force=force)
  # From the end of a run no round after it was released: post-processing keys may change.
  finished = resume.RunCheckpointer(str(tmp_path / 'finished'), keep=1)
  finished.save(_state(3, 0.0), {}, _dp_config(3, target_epsilon=8.0))
  config = _dp_config(6, target_epsilon=8.0)
  config.fl.dropout_prob, config.fl.server_optimizer, config.optim.lr = 0.5, 'momentum', 0.5
  assert finished.latest(config, force=True)[0] == 3
  with pytest.raises(resume.ResumeError, match='resume anyway with'):
    finished.latest(config, force=False)


def test_without_dp_a_forced_resume_may_change_any_key_as_before(tmp_path):
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=1)
  checkpointer.save(_state(1, 0.0), {}, tiny_config())
  config = tiny_config()
  config.fl.num_clients, config.seed, config.dp.sampling, config.optim.lr = 16, 3, 'fixed', 0.5
  config.fl.rounds = 9
  with pytest.raises(resume.ResumeError, match='resume anyway with'):
    checkpointer.latest(config, force=False)
  assert checkpointer.latest(config, force=True)[0] == 1


# A forced resume that builds another state is one line naming the leaves (item 9).

def _head_state(classes, **fields):
  trainable = {'head': {'kernel': jnp.zeros((4, classes)), 'bias': jnp.zeros((classes,))},
               'w': jnp.ones((3,))}
  return types.ServerState(trainable=trainable, opt_state=(), aggregator_state=(),
                            round=jnp.asarray(2, jnp.int32), rng=jax.random.key(1), **fields)


def test_a_state_of_another_head_shape_is_refused_naming_the_shapes(tmp_path):
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=1)
  checkpointer.save(_head_state(3), {}, tiny_config())
  with pytest.raises(resume.ResumeError) as e:
    checkpointer.restore_state(2, _head_state(5))
  message = str(e.value)
  assert 'trainable/head/kernel: checkpoint (4, 3) float32 vs now (4, 5) float32' in message
  assert 'trainable/head/bias: checkpoint (3,) float32 vs now (5,) float32' in message
  assert 'trainable/w' not in message and '\n' not in message
  restored = checkpointer.restore_state(2, _head_state(3))  # The same shapes still restore.
  np.testing.assert_array_equal(restored.trainable['w'], np.ones(3))


def test_a_state_of_another_tree_or_dtype_is_refused_naming_the_first_paths(tmp_path):
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=1)
  checkpointer.save(_head_state(3), {}, tiny_config())
  # As SCAFFOLD (variates), FedAdam (opt_state), adaptive clipping (aggregator_state) and
  # another dtype of `w` would build it.
  template = _head_state(3, algorithm_state={'c': {'w': jnp.zeros((8, 3))}})
  template = template._replace(
      opt_state=({'mu': {'w': jnp.zeros(3)}, 'nu': {'w': jnp.zeros(3)}},),
      aggregator_state={'clip_norm': jnp.zeros(())},
      trainable={**template.trainable, 'w': jnp.ones((3,), jnp.bfloat16)})
  with pytest.raises(resume.ResumeError) as e:
    checkpointer.restore_state(2, template)
  message = str(e.value)
  assert 'opt_state/0/mu/w: now ((3,) float32), not in the checkpoint' in message
  assert 'algorithm_state/c/w: now ((8, 3) float32), not in the checkpoint' in message
  assert 'aggregator_state/clip_norm: now (() float32)' in message
  # Four named in path order, the fifth counted.
  assert 'trainable/w' not in message and 'and 1 more' in message
  with pytest.raises(resume.ResumeError,
                     match=r'trainable/w: checkpoint \(3,\) float32 vs now \(3,\) bfloat16'):
    checkpointer.restore_state(2, _head_state(3)._replace(
        trainable={**template.trainable, 'w': jnp.ones((3,), jnp.bfloat16)}))
  smaller = _head_state(3)._replace(trainable={'w': jnp.ones((3,))})  # Another PEFT method.
  with pytest.raises(resume.ResumeError,
                     match=r'trainable/head/bias: in the checkpoint \(\(3,\) float32\), not now'):
    checkpointer.restore_state(2, smaller)


@pytest.mark.parametrize('name', server_optimizers.SERVER_OPTIMIZERS)
def test_every_server_optimizers_state_restores_and_another_ones_is_named(tmp_path, name):
  """No false mismatch on the real optax states (empty states, named tuples, chains)."""
  trainable = {'w': jnp.arange(3.0), 'head': {'bias': jnp.ones(2)}}
  def state(optimizer):
    opt_state = server_optimizers.server_optimizer(optimizer).init(trainable)
    opt_state = jax.tree.map(lambda x: x + 1, opt_state)
    return _head_state(2)._replace(trainable=trainable, opt_state=opt_state)
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=1)
  checkpointer.save(state(name), {}, tiny_config())
  restored = checkpointer.restore_state(2, state(name))
  jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state(name).opt_state)
  other = 'momentum' if name == 'sgd' else 'sgd'
  with pytest.raises(resume.ResumeError, match=r'opt_state/0/\w+/w: '):
    checkpointer.restore_state(2, state(other))


def test_a_checkpoint_written_before_the_generic_algorithm_state_restores(tmp_path):
  """Checkpoints from before issue 20 name SCAFFOLD's variates `variates`: they restore
  into `algorithm_state`, values intact."""
  config = tiny_config()
  variates = {'w': jnp.arange(6.0).reshape(2, 3)}
  old = resume.LegacyServerState({'w': jnp.ones(3)}, (), (), jnp.asarray(2, jnp.int32),
                                 jax.random.key(4), variates)
  checkpointer = resume.RunCheckpointer(str(tmp_path), keep=2)
  checkpointer.save(old, {}, config)
  template = types.ServerState({'w': jnp.zeros(3)}, (), (), jnp.asarray(0, jnp.int32),
                               jax.random.key(0), {'w': jnp.zeros((2, 3))})
  restored = checkpointer.restore_state(2, template)
  np.testing.assert_array_equal(restored.algorithm_state['w'], variates['w'])
  np.testing.assert_array_equal(restored.trainable['w'], np.ones(3))
  assert int(restored.round) == 2
