"""experiment.build: the pieces a run is made of, as benchmarks and notebooks use them."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from fedpeft_jax import peft, validation
from fedpeft_jax.data import preprocess
from fedpeft_jax.experiment import build
from fedpeft_jax.tasks import image_classification
from tests.conftest import tiny_config


def test_cached_head_features_give_the_full_model_loss():
  config = tiny_config('head')
  model = build.build_model(config)
  params = build.init_params(config, model, jax.random.key(0))
  params['head']['kernel'] = jax.random.normal(jax.random.key(1),
                                               params['head']['kernel'].shape)
  trainable, frozen = peft.split(params, peft.labels('head', params))
  images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
  labels = jnp.arange(10) % 4
  features = image_classification.head_features(model, frozen, images, 16, batch_size=4)
  cached = image_classification.head_loss_fn(trainable, frozen, {'feature': features, 'label': labels}, None)
  logits = model.apply({'params': params}, preprocess.eval_images(images, 16))
  direct = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-5)


def _save_params(path, params, **replace):
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  np.savez(path, **{**flat, **replace})
  return str(path)


def test_checkpoint_check_reads_headers_only_and_names_the_config_key(tmp_path, monkeypatch):
  config = tiny_config('bias')
  model = build.build_model(config)
  params = build.init_params(config, model, jax.random.key(0))
  config.model.checkpoint = _save_params(tmp_path / 'ok.npz', params)
  loads = []
  monkeypatch.setattr(np, 'load', lambda *a, **k: loads.append(a))
  build.check_pretrained(config, model)  # Matches, and no array was loaded.
  assert loads == []
  config.model.checkpoint = _save_params(tmp_path / 'bad.npz', params, cls=np.zeros((1, 1, 7)))
  with pytest.raises(validation.ConfigError) as e:
    build.check_pretrained(config, model)
  assert str(e.value).startswith(f"--config.model.checkpoint='{tmp_path / 'bad.npz'}': ")
  assert 'mis-shaped (1): cls: checkpoint (1, 1, 7) vs model (1, 1, 32)' in str(e.value)
  assert '\n' not in str(e.value)


def test_init_params_resamples_position_embeddings_as_configured(tmp_path):
  """model.posemb_resample reaches the loader; a bad value names its config key."""
  from fedpeft_jax.model import checkpoint
  config = tiny_config('bias')  # 4x4 patches.
  model = build.build_model(config)
  params = build.init_params(config, model, jax.random.key(0))
  posemb = np.random.default_rng(0).normal(size=(1, 1 + 8 * 8, 32)).astype(np.float32)
  config.model.checkpoint = _save_params(
      tmp_path / 'at_32px.npz', params, **{'Transformer/posembed_input/pos_embedding': posemb})
  for method in checkpoint.POSEMB_RESAMPLERS:
    config.model.posemb_resample = method
    loaded = build.init_params(config, model, jax.random.key(0))
    np.testing.assert_array_equal(loaded['Transformer']['posembed_input']['pos_embedding'],
                                  checkpoint.resample_posemb(posemb, 17, method))
  config.model.posemb_resample = 'bilinear'
  with pytest.raises(validation.ConfigError,
                     match=r"^--config\.model\.posemb_resample='bilinear': .*zoom, bicubic$"):
    build.init_params(config, model, jax.random.key(0))


def test_build_gives_a_round_that_trains_and_an_evaluation():
  config = tiny_config('bias')
  experiment = build.build(config)
  assert experiment.num_trainable == peft.count(experiment.state.trainable)
  assert len(experiment.client_sizes) == config.fl.num_clients
  assert experiment.privacy is None
  round_fn = experiment.compile_round(experiment.state)
  before = experiment.evaluate(experiment.state.trainable)
  state, metrics = round_fn(experiment.state)
  assert int(state.round) == 1 and int(metrics.num_reported) == config.fl.clients_per_round
  after = experiment.evaluate(state.trainable)
  assert set(before) == set(after) == {'test_accuracy'}
  assert 0.0 <= before['test_accuracy'] <= 1.0 and 0.0 <= after['test_accuracy'] <= 1.0
