"""Run checkpoints: exact state round trips, config mismatches named, finished runs seen."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeft_jax import resume
from fedpeft_jax.federated import fedavg
from tests.conftest import tiny_config


def _state(round_index, value):
  return fedavg.ServerState(
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
