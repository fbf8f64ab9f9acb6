"""End to end: config -> rounds -> metrics.jsonl, on synthetic data and on the shared testbed."""
import json
import subprocess
import sys

import pytest

from fedpeft_jax import train
from tests.conftest import PCAM, REPO, TI4_CHECKPOINT, needs, tiny_config

METRIC_KEYS = {'round', 'test_accuracy', 'train_loss', 'clients', 'bytes_up', 'bytes_down',
               'bytes_cumulative', 'trainable_params', 'trainable_sha256', 'wall_s',
               'clients_reported', 'clients_nonfinite'}


@pytest.mark.parametrize('method', ['head', 'bias', 'adapter', 'prompt', 'lora', 'full'])
def test_synthetic_run_learns_and_logs(tmp_path, method):
  config = tiny_config(method)
  config.fl.rounds = 4
  config.fl.eval_every = 2
  config.optim.lr = 0.1
  config.fl.local_epochs = 3
  config.data.num_test_examples = 256
  history = train.train(config, str(tmp_path))
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in lines] == [2, 4] and lines == history
  assert set(lines[0]) == METRIC_KEYS
  last = lines[-1]
  # 4 balanced classes: chance is 0.25 (std 0.027 over 256 test images).
  assert last['test_accuracy'] > 0.4
  assert len(set(last['clients'])) == config.fl.clients_per_round
  per_round = 4 * last['trainable_params'] * config.fl.clients_per_round
  assert last['bytes_up'] == last['bytes_down'] == per_round
  assert last['bytes_cumulative'] == 2 * per_round * 4
  assert lines[0]['trainable_sha256'] != last['trainable_sha256']


def test_same_seed_same_result_other_seed_differs(tmp_path):
  config = tiny_config('bias')
  config.fl.rounds = 2
  a = train.train(config, str(tmp_path / 'a'))[-1]['trainable_sha256']
  b = train.train(config, str(tmp_path / 'b'))[-1]['trainable_sha256']
  config.seed = 1
  c = train.train(config, str(tmp_path / 'c'))[-1]['trainable_sha256']
  assert a == b != c


@needs(PCAM)
@needs(TI4_CHECKPOINT)
def test_offline_pcam_config_runs_through_launch(tmp_path):
  """The README's main job, shortened: real data, real backbone, one round."""
  result = subprocess.run(
      [sys.executable, 'launch.py', '--config=experiments/pcam_vit_ti4.py:bias',
       f'--workdir={tmp_path}', '--config.fl.rounds=1', '--config.fl.num_clients=256',
       '--config.fl.clients_per_round=2'],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'round    1/1' in result.stdout
  record = json.loads((tmp_path / 'metrics.jsonl').read_text())
  # A pretrained backbone with a zero head predicts one class (~50%) before training;
  # one round on 2 clients must already move it.
  assert record['test_accuracy'] > 0.55, record
  assert record['trainable_params'] == 26_114


def test_cached_head_features_give_the_full_model_loss():
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from fedpeft_jax import peft
  from fedpeft_jax.data import preprocess
  config = tiny_config('head')
  model = train.build_model(config)
  params = train.init_params(config, model, jax.random.key(0))
  params['head']['kernel'] = jax.random.normal(jax.random.key(1),
                                               params['head']['kernel'].shape)
  trainable, frozen = peft.split(params, peft.labels('head', params))
  images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
  labels = jnp.arange(10) % 4
  features = train.head_features(model, frozen, images, 16, batch_size=4)
  cached = train.head_loss_fn(trainable, frozen, {'feature': features, 'label': labels}, None)
  logits = model.apply({'params': params}, preprocess.eval_images(images, 16))
  direct = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-5)
