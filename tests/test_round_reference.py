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
CASES = [(a, s, d) for a in ALGORITHMS for s in ('packed', 'padded') for d in DP
         if not (a == 'scaffold' and d == 'client')]  # Refused: see the validation tests.


def _fingerprint() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{cpu} | jax {jax.__version__} | {jax.default_backend()}'


def _two_rounds(algorithm: str, schedule: str, dp: str):
  config = tiny_config('bias')
  overrides = {'fl.schedule': schedule, 'fl.rounds': 2, **ALGORITHMS[algorithm], **DP[dp]}
  for key, value in overrides.items():
    section, name = key.split('.')
    setattr(config[section], name, value)
  experiment = build.build(config)
  step, state = experiment.compile_round(experiment.state), experiment.state
  for _ in range(2):
    state, _ = step(state)
  return jax.device_get(state.trainable)


@pytest.mark.parametrize('algorithm,schedule,dp', CASES)
def test_two_rounds_match_the_recorded_parameters(algorithm, schedule, dp):
  name = f'{algorithm}/{schedule}/dp-{dp}'
  trainable = _two_rounds(algorithm, schedule, dp)
  digest = callbacks.tree_sha256(trainable)
  flat = {k: np.asarray(v).ravel().tolist()
          for k, v in traverse_util.flatten_dict(trainable, sep='/').items()}
  if RECORD:
    saved = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {'cases': {}}
    saved['fingerprint'] = _fingerprint()
    saved['cases'][name] = {'trainable_sha256': digest, 'trainable': flat}
    REFERENCE.write_text(json.dumps(saved, indent=0, sort_keys=True))
    pytest.skip('recorded')
  saved = json.loads(REFERENCE.read_text())
  expected = saved['cases'][name]
  assert sorted(flat) == sorted(expected['trainable'])
  for key in flat:
    np.testing.assert_allclose(flat[key], expected['trainable'][key], rtol=2e-6, atol=1e-7,
                               err_msg=f'{name}: {key}')
  if saved['fingerprint'] == _fingerprint():
    assert digest == expected['trainable_sha256'], name
