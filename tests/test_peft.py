import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from fedpeft_jax import configs, errors, peft, validation
from fedpeft_jax.model import checkpoint, vit
from tests.conftest import TI4_CHECKPOINT, launch, needs, tiny_config
from tests.test_launch import _one_error_line

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


def test_the_papers_methods_are_listed_in_the_papers_order():
  assert peft.METHODS[:6] == ('full', 'head', 'bias', 'adapter', 'prompt', 'lora')
  assert set(peft.METHODS) == set(peft.PEFT_METHODS.names())


# The contract every registered method passes by being registered: a new method's file is
# tested here without a line of its own.
NAMES = peft.PEFT_METHODS.names()


def _apply_fn(method, size='vit_test', classes=3):
  """(model, params at init, inputs) of `method` with its default options, float32."""
  model = vit.VisionTransformer(vit.SIZES[size], classes, peft.modules_for(method),
                                dtype=jnp.float32)
  image = vit.SIZES[size].image_size
  x = jax.random.uniform(jax.random.key(1), (2, image, image, 3), minval=-1, maxval=1)
  return model, model.init(jax.random.key(0), x)['params'], x


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


@pytest.mark.parametrize('name', NAMES)
def test_contract_labels_cover_the_tree_and_what_it_adds_is_what_it_declares(name):
  entry = peft.PEFT_METHODS.get(name)
  _, params, _ = _apply_fn(name)
  _, plain, _ = _apply_fn('full')  # The backbone without additions.
  label_tree = peft.labels(name, params)
  assert jax.tree.structure(label_tree) == jax.tree.structure(params)
  labels = _flat(label_tree)
  assert set(labels.values()) <= {peft.TRAINABLE, peft.FROZEN}
  assert labels['head/kernel'] == labels['head/bias'] == peft.TRAINABLE
  trainable, frozen = peft.split(params, label_tree)
  assert not set(peft.paths(trainable)) & set(peft.paths(frozen))
  assert peft.count(trainable) + peft.count(frozen) == peft.count(params)
  # The leaves it adds are exactly those its declared names select, and it trains them:
  # a name missing from `adds` would make the checkpoint loader expect it in the file.
  added = set(_flat(params)) - set(_flat(plain))
  assert added == {k for k in _flat(params) if peft.is_added(tuple(k.split('/')))}
  assert bool(added) == bool(entry.adds) == (entry.addition is not None)
  assert all(labels[k] == peft.TRAINABLE for k in added)
  assert set(_flat(plain)) - added == set(_flat(plain))


def test_contract_every_composition_trains_the_union_of_its_parts():
  everything = '+'.join(NAMES)
  _, params, _ = _apply_fn(everything)
  trained = lambda method: set(peft.paths(peft.split(params, peft.labels(method, params))[0]))
  assert set().union(*map(trained, NAMES)) == trained(everything)
  for name in NAMES:  # Order and repetition do not matter.
    assert trained(f'{name}+bias') == trained(f'bias+{name}+{name}') == (
        trained(name) | trained('bias'))


@pytest.mark.parametrize('name', NAMES)
def test_contract_additions_as_initialised_keep_the_function_as_declared(name):
  entry = peft.PEFT_METHODS.get(name)
  if entry.addition is None:
    pytest.skip(f'{name} adds nothing')
  plain_model, plain, x = _apply_fn('full')
  model, params, _ = _apply_fn(name)
  flat = {**_flat(params), **_flat(plain)}  # The same backbone and head...
  flat['head/kernel'] = jax.random.normal(jax.random.key(2), flat['head/kernel'].shape)
  plain = traverse_util.unflatten_dict({**_flat(plain), 'head/kernel': flat['head/kernel']},
                                       sep='/')
  base = plain_model.apply({'params': plain}, x)
  apply = lambda f: model.apply({'params': traverse_util.unflatten_dict(f, sep='/')}, x)
  if entry.identity_at_init:  # ...and zero-initialised additions: the same function.
    np.testing.assert_allclose(apply(flat), base, atol=1e-6)
  else:
    assert not np.allclose(apply(flat), base, atol=1e-4)
  # The additions are used: random values move the logits (random, not constant: LayerNorm
  # hides a shift shared by every feature).
  added = [k for k in flat if peft.is_added(tuple(k.split('/')))]
  moved = {k: v + (jax.random.normal(jax.random.key(i), v.shape) if k in added else 0)
           for i, (k, v) in enumerate(flat.items())}
  assert not np.allclose(apply(moved), base, atol=1e-3)


@needs(TI4_CHECKPOINT)
@pytest.mark.parametrize('name', NAMES)
def test_contract_the_shared_pretrained_backbone_loads_with_its_additions(name):
  model = vit.VisionTransformer(vit.SIZES['vit_ti4'], 10, peft.modules_for(name))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  init = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), abstract['params'])
  loaded = _flat(checkpoint.load_pretrained(str(TI4_CHECKPOINT), init))
  with np.load(TI4_CHECKPOINT) as f:
    backbone = [k for k in f.files if not k.startswith('head/')]
    for k in backbone:
      np.testing.assert_array_equal(loaded[k], f[k], err_msg=k)
  new = set(loaded) - set(backbone)  # The head and the additions keep their initial values.
  assert {k for k in new if not k.startswith('head/')} == {
      k for k in loaded if peft.is_added(tuple(k.split('/')))}
  assert all(np.all(loaded[k] == 7.0) for k in new)


@pytest.mark.parametrize('name', NAMES)
def test_contract_a_default_learning_rate_and_options_in_the_config(name):
  entry = peft.PEFT_METHODS.get(name)
  assert isinstance(entry.learning_rate, float) and entry.learning_rate > 0
  config = configs.base_config(name)
  assert config.optim.lr == entry.learning_rate == peft.learning_rate(name)
  for option, default in entry.options.items():  # Its keys under --config.peft.
    assert option != 'method' and config.peft[option] == default
    assert type(config.peft[option]) is type(default)
  others = [o for n in NAMES if n != name for o in peft.PEFT_METHODS.get(n).options]
  assert not set(entry.options) & set(others), 'an option belongs to one method'
  for size in vit.SIZES.values():  # Its defaults pass its own checks on every model.
    assert entry.check(dict(entry.options), size) is None
  config.model.name = 'vit_test'  # And the launch's validation.
  validation.validate(config, needs_weights=False, needs_data=False)


def test_a_composition_defaults_to_the_smallest_rate_of_its_parts():
  assert peft.learning_rate('bias+lora') == min(configs.LEARNING_RATES['bias'],
                                                configs.LEARNING_RATES['lora']) == 5e-3
  assert configs.base_config('prompt+bias').optim.lr == 1e-2


_NO_RATE = peft.PeftMethod(summary='a method that forgot its learning rate',
                           trains=lambda path: path[-1] == 'scale')


def test_a_method_without_a_default_learning_rate_is_refused_in_one_line(monkeypatch):
  monkeypatch.setitem(peft.PEFT_METHODS._entries, 'norate', _NO_RATE)
  with pytest.raises(errors.UserError) as e:
    configs.base_config('bias+norate')
  assert str(e.value) == ("PEFT method 'norate' declares no default learning rate: give its "
                          'PeftMethod entry learning_rate=... (the rate its runs default to)')


_NO_RATE_CONFIG = '''
from fedpeft_jax import configs, peft
peft.PEFT_METHODS.register('norate', peft.PeftMethod(summary='no learning rate'))

def get_config(arg='norate'):
  return configs.base_config(arg)
'''


def test_launch_refuses_a_method_without_a_default_learning_rate(tmp_path):
  (tmp_path / 'norate.py').write_text(_NO_RATE_CONFIG)
  result = launch(tmp_path / 'run', '--mode=config', config=str(tmp_path / 'norate.py'))
  _one_error_line(result, "PEFT method 'norate' declares no default learning rate")


@pytest.mark.parametrize('method,key,value,needle', [
    ('adapter', 'adapter_reduction', 0, 'must be > 0'),
    ('bias+adapter', 'adapter_reduction', 3, 'must divide the hidden size 32'),
    ('prompt', 'prompt_tokens', 0, 'must be > 0'),
    ('lora', 'lora_rank', -1, 'must be > 0'),
    ('lora+prompt', 'lora_alpha', 0.0, 'must be > 0'),
])
def test_a_methods_own_checks_run_at_launch_named_by_config_key(method, key, value, needle):
  config = tiny_config(method)
  config.peft[key] = value
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(config)
  assert str(e.value) == f'--config.peft.{key}={value!r}: {needle}'
  config.peft.method = 'bias'  # Only the methods in peft.method are checked.
  validation.validate(config)
