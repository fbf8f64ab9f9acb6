import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fedpeft_jax import peft as peft_lib
from fedpeft_jax.model import vit
from tests.conftest import TI4_CHECKPOINT, needs


def _params(peft=(), size='vit_test', classes=3, image=16):
  model = vit.VisionTransformer(vit.SIZES[size], classes, peft, dtype=jnp.float32)
  x = jax.random.uniform(jax.random.key(1), (2, image, image, 3), minval=-1, maxval=1)
  return model, model.init(jax.random.key(0), x)['params'], x


@needs(TI4_CHECKPOINT)
def test_tree_matches_official_checkpoint_layout():
  model = vit.VisionTransformer(vit.SIZES['vit_ti4'], 10)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  flat = {k: v.shape for k, v in traverse_util.flatten_dict(shapes['params'], sep='/').items()}
  with np.load(TI4_CHECKPOINT) as f:
    ckpt = {k: f[k].shape for k in f.files}
  assert flat == ckpt


@pytest.mark.parametrize('peft', [
    peft_lib.modules_for('adapter'),
    peft_lib.modules_for('adapter', adapter_shared=False),
    peft_lib.modules_for('lora', lora_rank=2),
])
def test_zero_initialised_additions_leave_the_backbone_function_unchanged(peft):
  base_model, base_params, x = _params()
  model, params, _ = _params(peft)
  flat = traverse_util.flatten_dict(params)
  for k, v in traverse_util.flatten_dict(base_params).items():
    flat[k] = v
  params = traverse_util.unflatten_dict(flat)
  # Make the head non-zero so that the logits depend on the features.
  params['head']['kernel'] = jax.random.normal(jax.random.key(2), params['head']['kernel'].shape)
  base_params['head']['kernel'] = params['head']['kernel']
  np.testing.assert_allclose(model.apply({'params': params}, x),
                             base_model.apply({'params': base_params}, x), atol=1e-5)
  # ...and perturbing the additions does change it (the test can fail).
  flat = traverse_util.flatten_dict(params)
  for i, k in enumerate(flat):
    if any(p.startswith(('adapter', 'lora')) for p in k):
      # Random, not constant: LayerNorm hides a shift shared by all features.
      flat[k] = flat[k] + jax.random.normal(jax.random.key(i), flat[k].shape)
  moved = model.apply({'params': traverse_util.unflatten_dict(flat)}, x)
  assert not np.allclose(moved, base_model.apply({'params': base_params}, x), atol=1e-3)


def test_shared_adapter_is_one_module_per_block_adapter_is_many():
  _, shared, _ = _params(peft_lib.modules_for('adapter'))
  _, per_block, _ = _params(peft_lib.modules_for('adapter', adapter_shared=False))
  shared_keys = [k for k in traverse_util.flatten_dict(shared, sep='/') if 'adapter' in k]
  block_keys = [k for k in traverse_util.flatten_dict(per_block, sep='/') if 'adapter' in k]
  assert len(block_keys) == vit.SIZES['vit_test'].num_layers * len(shared_keys)
  assert all(k.startswith('Transformer/adapter/') for k in shared_keys)


@pytest.mark.parametrize('deep', [True, False])
def test_prompts_are_used_at_the_configured_depth(deep):
  model, params, x = _params(peft_lib.modules_for('prompt', prompt_tokens=3, prompt_deep=deep))
  prompt = params['Transformer']['prompt']
  layers = vit.SIZES['vit_test'].num_layers
  assert prompt.shape == ((layers if deep else 1), 3, vit.SIZES['vit_test'].hidden_size)
  params['head']['kernel'] = jnp.ones_like(params['head']['kernel'])
  out = model.apply({'params': params}, x)
  # Changing the last layer's prompts matters only for deep prompts.
  params['Transformer']['prompt'] = prompt.at[-1].add(1.0)
  changed = model.apply({'params': params}, x)
  assert not np.allclose(out, changed)
  assert out.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params():
  model = vit.VisionTransformer(vit.SIZES['vit_test'], 3)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  leaves = jax.tree.leaves(variables)
  assert all(l.dtype == jnp.float32 for l in leaves)
  assert model.dtype == jnp.bfloat16


def test_padded_attention_with_sequence_lengths_equals_plain_attention():
  """The padding cuDNN needs, checked through XLA's implementation of the same masks."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 17, 2, 8)) for i in range(3))
  np.testing.assert_allclose(vit.attention(q, k, v, 'xla', pad_to=32),
                             vit.attention(q, k, v, None), atol=1e-5)


@dataclasses.dataclass(frozen=True)
class _Probe(vit.Addition):
  """value * (1 + p) at every hook point, p a zero parameter named by where it ran (a
  product, not a sum: attention ignores a shift shared by every key)."""

  def _add(self, site, name, value):
    return value * (1 + site.scope.param(name, nn.initializers.zeros, (value.shape[-1],)))

  def encoder(self, site, x):
    assert site.layer is None
    return 'state'

  def tokens(self, site, x):
    assert site.state == 'state'
    return self._add(site, f'probe_tokens_{site.layer}', x)

  def projection(self, site, name, x, out):
    return self._add(site, f'probe_{name}', out)

  def after_attention(self, site, y):
    return self._add(site, 'probe_after_attention', y)

  def after_mlp(self, site, y):
    return self._add(site, 'probe_after_mlp', y)


def test_hook_points_run_in_their_modules_and_each_changes_the_output():
  base_model, base_params, x = _params()
  model, params, _ = _params((_Probe(),))
  layers = vit.SIZES['vit_test'].num_layers
  expected = {f'Transformer/probe_tokens_{i}' for i in range(layers)}
  for i in range(layers):
    block = f'Transformer/encoderblock_{i}'
    expected |= {f'{block}/probe_after_attention', f'{block}/probe_after_mlp'}
    expected |= {f'{block}/MultiHeadDotProductAttention_1/probe_{p}'
                 for p in ('query', 'key', 'value')}
  flat = traverse_util.flatten_dict(params, sep='/')
  assert set(flat) - set(traverse_util.flatten_dict(base_params, sep='/')) == expected
  flat.update(traverse_util.flatten_dict(base_params, sep='/'))
  flat['head/kernel'] = jax.random.normal(jax.random.key(2), flat['head/kernel'].shape)
  base_params['head']['kernel'] = flat['head/kernel']
  base = base_model.apply({'params': base_params}, x)
  apply = lambda f: model.apply({'params': traverse_util.unflatten_dict(f, sep='/')}, x)
  np.testing.assert_array_equal(apply(flat), base)  # Zero probes: the plain ViT.
  for i, name in enumerate(sorted(expected)):  # Every hook point's value reaches the logits.
    moved = dict(flat, **{name: jax.random.normal(jax.random.key(i), flat[name].shape)})
    assert not np.allclose(apply(moved), base, atol=1e-4), name
