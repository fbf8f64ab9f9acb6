import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fedpeft_jax.model import checkpoint, vit
from tests.conftest import CIFAR10, TI4_CHECKPOINT, needs


def _init(size='vit_ti4', classes=2, image=32, **kw):
  model = vit.VisionTransformer(vit.SIZES[size], classes, dtype=jnp.float32, **kw)
  return model, model.init(jax.random.key(0), jnp.zeros((1, image, image, 3)))['params']


def _save(tmp_path, flat):
  path = tmp_path / 'ckpt.npz'
  np.savez(path, **flat)
  return str(path)


@needs(TI4_CHECKPOINT)
def test_loads_values_and_replaces_head():
  _, params = _init()
  loaded = checkpoint.load_pretrained(str(TI4_CHECKPOINT), params)
  flat = traverse_util.flatten_dict(loaded, sep='/')
  with np.load(TI4_CHECKPOINT) as f:
    for key in f.files:
      if key.startswith('head/'):
        continue
      np.testing.assert_array_equal(flat[key], f[key].astype(np.float32))
  assert flat['head/kernel'].shape == (192, 2)


@needs(TI4_CHECKPOINT)
@needs(CIFAR10)
def test_pretrained_backbone_classifies_cifar10(optimized_xla):
  """The loaded model, head included, is the real pretrained classifier."""
  from fedpeft_jax.data import preprocess, sources
  test = sources.load('folder', path=str(CIFAR10), split='test')
  model, params = _init(classes=10)
  with np.load(TI4_CHECKPOINT) as f:
    head = {k: f[k] for k in ('head/kernel', 'head/bias')}
  flat = traverse_util.flatten_dict(checkpoint.load_pretrained(str(TI4_CHECKPOINT), params),
                                    sep='/')
  flat.update({k: jnp.asarray(v, jnp.float32) for k, v in head.items()})
  params = traverse_util.unflatten_dict(flat, sep='/')
  idx = np.random.default_rng(0).choice(len(test), 500, replace=False)
  logits = model.apply({'params': params}, preprocess.eval_images(test.images[idx], 32))
  accuracy = np.mean(np.argmax(logits, -1) == test.labels[idx])
  assert accuracy > 0.65, accuracy  # The README states 78.6% on the full test split.


def test_error_names_every_missing_unexpected_and_misshaped_key(tmp_path):
  _, params = _init('vit_test', image=16)
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  del flat['cls']
  del flat['Transformer/encoderblock_1/LayerNorm_0/scale']
  flat['Transformer/extra/kernel'] = np.zeros(3)
  flat['embedding/bias'] = np.zeros(7)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load_pretrained(_save(tmp_path, flat), params)
  message = str(e.value)
  for needle in ('missing (2)', 'cls', 'encoderblock_1/LayerNorm_0/scale', 'unexpected (1)',
                 'Transformer/extra/kernel', 'mis-shaped (1)', 'embedding/bias: checkpoint (7,)'):
    assert needle in message


def test_missing_file_says_how_to_fix(tmp_path):
  _, params = _init('vit_test', image=16)
  with pytest.raises(checkpoint.CheckpointError, match=r"nope.npz' does not exist.*or ''"):
    checkpoint.load_pretrained(str(tmp_path / 'nope.npz'), params)


def test_position_embeddings_are_interpolated_for_a_new_image_size(tmp_path):
  _, small = _init('vit_test', image=16)  # 4x4 patches + cls.
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(small, sep='/').items()}
  grid = np.arange(16, dtype=np.float32).reshape(1, 16, 1) * np.ones((1, 1, 32), np.float32)
  flat['Transformer/posembed_input/pos_embedding'] = np.concatenate(
      [np.full((1, 1, 32), 7.0, np.float32), grid], axis=1)
  _, big = _init('vit_test', image=32)  # 8x8 patches + cls.
  loaded = checkpoint.load_pretrained(_save(tmp_path, flat), big)
  pos = np.asarray(loaded['Transformer']['posembed_input']['pos_embedding'])
  assert pos.shape == (1, 65, 32)
  np.testing.assert_allclose(pos[0, 0], 7.0)
  patch = pos[0, 1:, 0].reshape(8, 8)
  assert patch[0, 0] < patch[0, -1] < patch[-1, -1]  # The ramp survives the resize.


def test_pre_logits_is_dropped_with_a_warning_or_loaded_when_modelled(tmp_path, caplog):
  _, with_pre = _init('vit_test', image=16, representation_size=32)
  flat = {k: np.asarray(v) + 1.0
          for k, v in traverse_util.flatten_dict(with_pre, sep='/').items()}
  path = _save(tmp_path, flat)
  loaded = checkpoint.load_pretrained(path, with_pre)
  np.testing.assert_allclose(loaded['pre_logits']['kernel'], flat['pre_logits/kernel'])
  _, without = _init('vit_test', image=16)
  with caplog.at_level(logging.WARNING):
    loaded = checkpoint.load_pretrained(path, without)
  assert 'pre_logits' not in loaded
  assert 'dropping' in caplog.text
