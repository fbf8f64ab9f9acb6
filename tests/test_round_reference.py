"""The round's arithmetic, pinned: `trainable_sha256` after 2 rounds of synthetic_tiny for
every algorithm x schedule x DP mode, against a file recorded before the round was split
into parts (issue 20). Moving code must not change a bit.

XLA's CPU code may differ between processors, so bits are compared where the recording
machine's fingerprint (CPU model, jax version) matches; elsewhere the parameters are
compared to float32 rounding. `FEDPEFT_RECORD_ROUND_REFERENCE=1` rewrites the file.
"""
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fedpeft_jax.experiment import build
from fedpeft_jax.experiment import callbacks
from tests.conftest import REPO, tiny_config

REFERENCE = REPO / 'tests' / 'data' / 'round_reference.json'
RECORD = os.environ.get('FEDPEFT_RECORD_ROUND_REFERENCE') == '1'

ALGORITHMS = {'fedavg': {}, 'fedprox': {'fl.prox_mu': 0.1},
              'scaffold': {'fl.algorithm': 'scaffold'}, 'fedadam': {'fl.server_optimizer': 'adam'}}
DP = {'none': {}, 'client': {'dp.mode': 'client', 'dp.sampling': 'fixed',
                             'dp.noise_multiplier': 0.5, 'dp.clip_norm': 0.1},
      'sample': {'dp.mode': 'sample', 'dp.noise_multiplier': 0.5, 'dp.clip_norm': 1.0}}
CASES = {dp: [(a, s) for a in ALGORITHMS for s in ('packed', 'padded')
              if not (a == 'scaffold' and dp == 'client')]  # Refused: see test_validation.
         for dp in DP}


def _fingerprint() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{cpu} | jax {jax.__version__} | {jax.default_backend()}'


def _configured(dp: str, **overrides):
  config = tiny_config('bias')
  for key, value in {'fl.rounds': 2, **DP[dp], **overrides}.items():
    section, name = key.split('.')
    setattr(config[section], name, value)
  return config


def _two_rounds_each(dp: str, schedule: str):
  """Builds the experiment once for the DP mode, then each case's round on it: the data,
  model and initial state are what `build.build` makes for the case's own config (its
  algorithm and schedule change neither), so only the rounds compile per case."""
  experiment = build.build(_configured(dp))
  for algorithm, case_schedule in CASES[dp]:
    if case_schedule != schedule:
      continue
    config = _configured(dp, **{'fl.schedule': schedule, **ALGORITHMS[algorithm]})
    fl_round = build.build_algorithm(config, experiment.loss_fn, experiment.table.max_examples,
                                     experiment.privacy)
    rng = jax.random.wrap_key_data(jnp.copy(jax.random.key_data(experiment.state.rng)))
    # Copies: the round donates its state.
    state = fl_round.init(jax.tree.map(jnp.copy, experiment.state.trainable), rng)
    step = jax.jit(fl_round.apply, donate_argnums=0)
    for _ in range(2):
      state, _ = step(state, experiment.frozen, experiment.dataset, experiment.table)
    yield f'{algorithm}/{schedule}/dp-{dp}', jax.device_get(state.trainable)


@pytest.mark.parametrize('schedule', ('packed', 'padded'))
@pytest.mark.parametrize('dp', DP)
def test_two_rounds_match_the_recorded_parameters(dp, schedule):
  saved = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {'cases': {}}
  same_machine = saved.get('fingerprint') == _fingerprint()
  seen = []
  for name, trainable in _two_rounds_each(dp, schedule):
    seen.append(name)
    digest = callbacks.tree_sha256(trainable)
    flat = {k: np.asarray(v).ravel().tolist()
            for k, v in traverse_util.flatten_dict(trainable, sep='/').items()}
    if RECORD:
      saved['cases'][name] = {'trainable_sha256': digest, 'trainable': flat}
      continue
    expected = saved['cases'][name]
    assert sorted(flat) == sorted(expected['trainable'])
    for key in flat:
      np.testing.assert_allclose(flat[key], expected['trainable'][key], rtol=2e-6, atol=1e-7,
                                 err_msg=f'{name}: {key}')
    if same_machine:
      assert digest == expected['trainable_sha256'], name
  assert len(seen) == len(CASES[dp]) // 2 == (3 if dp == 'client' else 4)
  if RECORD:
    saved['fingerprint'] = _fingerprint()
    REFERENCE.write_text(json.dumps(saved, indent=0, sort_keys=True))
    pytest.skip('recorded')
