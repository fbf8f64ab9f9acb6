import logging

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import scipy.ndimage
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


_POSEMB = 'Transformer/posembed_input/pos_embedding'
_CLS = 7.0  # The class token's embedding in the test checkpoints.


def _posemb_grid(side: int, hidden: int = 32) -> np.ndarray:
  """(side, side, hidden): channel 0 a column ramp 0..side-1, channel 1 a row ramp, the
  rest random."""
  grid = np.random.default_rng(side).normal(size=(side, side, hidden)).astype(np.float32)
  grid[..., 0] = np.arange(side)[None, :]
  grid[..., 1] = np.arange(side)[:, None]
  return grid


def _load_posemb(tmp_path, grid: np.ndarray, new_side: int, **kw) -> np.ndarray:
  """Loads a vit_test checkpoint whose position embeddings are [cls] + `grid` into the
  model at new_side x new_side patches; returns the (1, 1 + new_side**2, 32) result."""
  _, small = _init('vit_test', image=16)
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(small, sep='/').items()}
  side, _, hidden = grid.shape
  flat[_POSEMB] = np.concatenate([np.full((1, 1, hidden), _CLS, np.float32),
                                  grid.reshape(1, side * side, hidden)], axis=1)
  _, model = _init('vit_test', image=4 * new_side)  # vit_test's patches are 4 px.
  loaded = checkpoint.load_pretrained(_save(tmp_path, flat), model, **kw)
  pos = np.asarray(traverse_util.flatten_dict(loaded, sep='/')[_POSEMB])
  assert pos.shape == (1, 1 + new_side * new_side, hidden)
  return pos


@pytest.mark.parametrize('old,new', [(14, 16), (24, 14), (8, 4)])
def test_position_embeddings_are_resampled_as_the_official_release(tmp_path, old, new):
  """google-research/vision_transformer's `load_pretrained`: the class token kept, the grid
  through scipy.ndimage.zoom(order=1); a 0..old-1 ramp lands on align-corners points."""
  grid = _posemb_grid(old)
  pos = _load_posemb(tmp_path, grid, new)
  np.testing.assert_array_equal(pos[0, 0], _CLS)
  official = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  np.testing.assert_allclose(pos[0, 1:].reshape(new, new, -1), official, rtol=0, atol=1e-6)
  # Linear interpolation is exact on a ramp: output i sits at input i*(old-1)/(new-1).
  ramp = np.linspace(0.0, old - 1, new)
  np.testing.assert_allclose(pos[0, 1:, 0].reshape(new, new), np.tile(ramp, (new, 1)),
                             atol=1e-5)
  np.testing.assert_allclose(pos[0, 1:, 1].reshape(new, new), np.tile(ramp, (new, 1)).T,
                             atol=1e-5)


def test_shrinking_keeps_the_corner_tokens_as_the_official_release(tmp_path):
  """The issue's example: 8x8 -> 4x4 (32 px -> 16 px) on a 0..7 ramp. Antialiased
  resizing gave the corner token 0.714; the official zoom keeps the corners: 0 and 7."""
  grid = _posemb_grid(8)
  patch = _load_posemb(tmp_path, grid, 4)[0, 1:].reshape(4, 4, -1)
  for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
    np.testing.assert_allclose(patch[i, j], grid[i, j], rtol=0, atol=1e-6)
  assert patch[0, 0, 0] == 0.0 and patch[0, -1, 0] == 7.0


def _torch_bicubic_aa_weights(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) weights of PyTorch's `F.interpolate(mode='bicubic',
  align_corners=False, antialias=True)` along one axis, written from ATen's
  `_compute_indices_min_size_weights_aa` (UpSampleKernel.cpp): Keys' cubic with a = -0.5,
  support 2 widened by the scale when shrinking, the window cut at the borders and
  renormalised."""
  def cubic(x, a=-0.5):
    x = abs(x)
    if x < 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0
  scale = size_in / size_out
  support = 2 * scale if scale >= 1 else 2.0
  invscale = 1 / scale if scale >= 1 else 1.0
  weights = np.zeros((size_out, size_in))
  for i in range(size_out):
    center = scale * (i + 0.5)
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), size_in)
    for j in range(xmin, xmax):
      weights[i, j] = cubic((j - center + 0.5) * invscale)
    weights[i] /= weights[i].sum()
  return weights


@pytest.mark.parametrize('old,new', [(14, 16), (24, 14), (8, 4)])
def test_bicubic_option_resamples_as_timm(tmp_path, old, new):
  """timm's `resample_abs_pos_embed` defaults (bicubic, antialias=True), against PyTorch's
  formula in numpy and against PIL, whose resampler PyTorch's antialiased path copies."""
  grid = _posemb_grid(old)
  pos = _load_posemb(tmp_path, grid, new, posemb_resample='bicubic')
  np.testing.assert_array_equal(pos[0, 0], _CLS)
  resized = pos[0, 1:].reshape(new, new, -1)
  w = _torch_bicubic_aa_weights(old, new)
  timm = np.einsum('ij,jkc,lk->ilc', w, grid.astype(np.float64), w)
  np.testing.assert_allclose(resized, timm, rtol=0, atol=2e-5)  # float32 on values <= 23.
  pil = np.stack([np.asarray(PIL.Image.fromarray(grid[..., c], mode='F').resize(
      (new, new), PIL.Image.BICUBIC)) for c in range(grid.shape[-1])], axis=-1)
  np.testing.assert_allclose(resized, pil, rtol=0, atol=2e-5)
  official = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  assert np.abs(timm - official).max() > 0.01  # The two options differ.


def test_without_a_class_token_every_token_is_the_grid():
  """The official loader's `classifier != 'token'` branch: no token is set aside."""
  grid = _posemb_grid(6, hidden=3)
  out = checkpoint.resample_posemb(grid.reshape(1, 36, 3), 16, class_token=False)
  np.testing.assert_allclose(out.reshape(4, 4, 3),
                             scipy.ndimage.zoom(grid, (4 / 6, 4 / 6, 1), order=1), atol=1e-6)


def test_an_unknown_resampler_is_refused_before_any_weight_is_read(tmp_path):
  _, params = _init('vit_test', image=16)
  with pytest.raises(checkpoint.CheckpointError, match="'bilinear': use one of zoom, bicubic") as e:
    checkpoint.load_pretrained(str(tmp_path / 'not_read.npz'), params, 'bilinear')
  assert e.value.argument == 'posemb_resample'


def test_a_non_square_position_grid_is_refused_at_launch(tmp_path):
  """`check_compatible` (headers only) refuses what the loader could not resample."""
  _, params = _init('vit_test', image=16)
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  flat[_POSEMB] = np.zeros((1, 1 + 4 * 6, 32), np.float32)  # A 4x6 grid.
  with pytest.raises(checkpoint.CheckpointError, match=r'mis-shaped \(1\): .*pos_embedding'):
    checkpoint.check_compatible(_save(tmp_path, flat), params)


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
