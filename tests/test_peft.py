import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedpeft_jax import peft
from fedpeft_jax.model import vit

# The paper's implementation: ViT-B/16, 100 classes.
PAPER_COUNTS = {'full': 85_875_556, 'head': 76_900, 'bias': 179_812,
                'prompt': 169_060, 'adapter': 225_220}


def _tiny(method):
  model = vit.VisionTransformer(vit.SIZES['vit_test'], 3, peft.modules_for(
      method, prompt_tokens=2, lora_rank=2), dtype=jnp.float32)
  return model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']


def test_labels_select_the_method_parameters():
  params = _tiny('bias+lora')
  trainable, frozen = peft.split(params, peft.labels('bias+lora', params))
  names = peft.paths(trainable)
  assert all(n.endswith('/bias') or 'lora_' in n or n.startswith('head/') for n in names)
  assert 'Transformer/encoderblock_0/LayerNorm_2/bias' in names
  assert 'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/lora_value_b' in names
  assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' in peft.paths(frozen)
  assert peft.count(trainable) + peft.count(frozen) == peft.count(params)


def test_composed_method_is_the_union_of_its_parts():
  params = _tiny('bias+lora')
  union = set(peft.paths(peft.split(params, peft.labels('bias', params))[0])) | set(
      peft.paths(peft.split(params, peft.labels('lora', params))[0]))
  assert set(peft.paths(peft.split(params, peft.labels('bias+lora', params))[0])) == union


def test_split_and_merge_round_trip():
  params = _tiny('prompt')
  merged = peft.merge(*peft.split(params, peft.labels('prompt', params)))
  jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_label_tree_drives_optax_partition_like_the_split():
  """Training the split trainable tree equals optax.partition on the full tree."""
  params = _tiny('adapter')
  labels = peft.labels('adapter', params)
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax.sgd(0.1, momentum=0.9)
  full_tx = optax.partition({peft.TRAINABLE: tx, peft.FROZEN: optax.set_to_zero()}, labels)
  updates, _ = full_tx.update(grads, full_tx.init(params), params)
  via_partition = optax.apply_updates(params, updates)

  trainable, frozen = peft.split(params, labels)
  t_updates, _ = tx.update(peft.split(grads, labels)[0], tx.init(trainable), trainable)
  via_split = peft.merge(optax.apply_updates(trainable, t_updates), frozen)
  jax.tree.map(np.testing.assert_allclose, via_partition, via_split)
  assert not np.allclose(via_split['head']['bias'], params['head']['bias'])


def test_unknown_method_is_rejected_with_the_allowed_ones():
  with pytest.raises(ValueError, match=r"peft.method='bias\+lorra'.*allowed: full"):
    peft.parse_method('bias+lorra')
