"""The decoder as a model family ('llama'), the causal-LM task and PEFT on the decoder
(issue 21): Llama-2-7B's masks from its published config.json without weights (Hugging
Face PEFT's count), each method's trainable parameters on the shared tiny_llama_en, the
task's token-averaged loss and test perplexity against numpy on the model's own logits,
and one federated LoRA round that lowers the loss."""
import importlib.util
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fedpeft_jax import configs, errors, peft, tasks, validation
from fedpeft_jax.experiment import build, reports
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import types as fl_types
from fedpeft_jax.model import hf_checkpoint, llama
from fedpeft_jax.model.families import llama as llama_family
from tests.conftest import REPO, SHARED, launch, needs

TINY_LLAMA = SHARED / 'backbones' / 'tiny_llama_en'
needs_tiny = needs(TINY_LLAMA / 'model.safetensors')
# tiny_llama_en: hidden 128, 4 layers, 4 heads and 2 key-value heads of 32, MLP 384,
# vocabulary 2048, tied embeddings; bos 0, eos 1, pad 2.
H, LAYERS, Q, KV, MLP, VOCAB = 128, 4, 4 * 32, 2 * 32, 384, 2048


@pytest.fixture(autouse=True)
def full_float32_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def _load(name):
  spec = importlib.util.spec_from_file_location(name, REPO / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_llama_config(method: str = 'lora'):
  """A float32 run of the shared tiny_llama_en (text data is given by each test)."""
  c = configs.base_config(method)
  c.model.family = 'llama'
  c.model.checkpoint = str(TINY_LLAMA)
  c.model.dtype = 'float32'
  c.eval.batch_size = 4
  return c


def _split(config, method=None, abstract=False):
  """(model, params, (trainable, frozen)) of `method`; params loaded from the checkpoint,
  or with `abstract` only their shapes (no weights read)."""
  method = method or config.peft.method
  model = build.build_model(config, method)
  params = (build.abstract_params(config, model) if abstract else
            build.init_params(config, model, jax.random.key(0)))
  return model, params, peft.split(params, peft.labels(method, params,
                                                       **build.peft_options(config)))


# --- Masks without weights: Llama-2-7B --------------------------------------------------------

def test_llama2_7b_masks_give_hugging_face_peft_lora_count_without_weights():
  config = _load('llama2_7b').get_config('lora')
  assert (config.fl.num_clients, config.fl.clients_per_round) == (20, 2)
  assert (config.peft.lora_rank, config.peft.lora_alpha) == (32, 64.0)
  assert config.model.checkpoint == ''  # Nothing to download.
  validation.validate(config, needs_weights=False, needs_data=False, method_list=True)
  config.peft.lora_rank = 8
  config.peft.method = 'lora,norm,head'
  report = reports.mask_report(config)
  # What Hugging Face PEFT prints for LoraConfig(r=8, target_modules=['q_proj', 'v_proj'])
  # on meta-llama/Llama-2-7b-hf: "trainable params: 4,194,304 || all params: 6,742,609,920".
  assert report['lora']['trainable'] == 4_194_304 == 32 * 2 * (4096 * 8 + 8 * 4096)
  assert report['lora']['total'] == 6_742_609_920
  assert report['lora']['groups'] == {**dict.fromkeys(reports.DECODER_GROUPS, 0),
                                      'peft_additions': 4_194_304}
  assert report['norm']['trainable'] == 2 * 32 * 4096 + 4096  # Two RMSNorms a block + final.
  assert report['head']['trainable'] == 32000 * 4096  # The untied lm_head.
  assert report['head']['total'] == 6_738_415_616  # The backbone alone.
  # bias is refused on this bias-free model, at launch, in one line naming the key.
  config.peft.method = 'bias'
  with pytest.raises(validation.ConfigError, match=r"^--config.peft.method='bias': bias "
                     r'trains biases, and this llama decoder has none') as e:
    validation.validate(config, needs_weights=False, needs_data=False)
  assert '\n' not in str(e.value)


def test_mask_mode_on_llama2_7b_prints_the_count_and_total(tmp_path):
  result = launch(tmp_path, '--mode=masks', '--config.peft.lora_rank=8',
                  '--config.peft.method=lora,norm', config='experiments/llama2_7b.py')
  assert result.returncode == 0, result.stderr[-2000:]
  row = result.stdout.splitlines()[1].split()
  assert row[0] == 'lora' and row[1] == '4,194,304' and row[-1] == '6,742,609,920'
  assert (tmp_path / 'masks.png').exists()


def test_masks_without_a_comma_list_leave_out_the_methods_the_model_refuses(capsys):
  config = _load('llama2_7b').get_config('lora')
  assert 'bias' not in reports.compared_methods(config)
  assert set(reports.compared_methods(config)) == set(peft.METHODS) - {'bias'}
  assert 'not compared: bias' in capsys.readouterr().out


def test_hf_config_problems_and_disagreement_with_a_checkpoint_are_one_line(tmp_path):
  config = _load('llama2_7b').get_config('lora')
  del config.model.hf_config['hidden_size']
  with pytest.raises(validation.ConfigError, match=r"^--config.model.hf_config=\{.*"
                     r"model.hf_config has no 'hidden_size'"):
    validation.validate(config, needs_weights=False, needs_data=False)
  config = _load('llama2_7b').get_config('lora')
  config.model.hf_config = {}
  with pytest.raises(validation.ConfigError, match='needs --config.model.checkpoint'):
    validation.validate(config, needs_weights=False, needs_data=False)
  config.model.checkpoint = str(tmp_path / 'nowhere')
  with pytest.raises(validation.ConfigError, match=r"^--config.model.checkpoint='.*nowhere'"
                     r': model directory .*nowhere does not exist') as e:
    validation.validate(config, needs_weights=False, needs_data=False)
  assert '\n' not in str(e.value)


@needs_tiny
def test_hf_config_must_agree_with_the_checkpoint():
  config = tiny_llama_config()
  config.model.hf_config = hf_checkpoint._json(str(TINY_LLAMA / 'config.json'))
  assert list(llama_family.checks(config, True)) == []
  config.model.hf_config.num_hidden_layers = 5
  assert list(llama_family.checks(config, False)) == [(
      'model.hf_config', f'describes another model than {TINY_LLAMA} (num_hidden_layers 4 '
      'there, 5 here): make it agree with its config.json, or leave it empty')]


# --- PEFT on the decoder ----------------------------------------------------------------------

def _trained(trainable) -> set:
  return set(peft.paths(trainable))


@needs_tiny
def test_each_method_trains_what_it_says_on_the_tiny_decoder():
  config = tiny_llama_config()
  layer = lambda i: f'model/layers/{i}'
  cases = {
      'lora': {f'{layer(i)}/self_attn/lora_{m}_proj_{ab}' for i in range(LAYERS)
               for m in 'qv' for ab in 'ab'},
      'norm': {f'{layer(i)}/{n}/scale' for i in range(LAYERS)
               for n in ('input_layernorm', 'post_attention_layernorm')} | {'model/norm/scale'},
      'adapter': {f'model/layers/adapter/{d}/{p}' for d in ('down', 'up')
                  for p in ('kernel', 'bias')},
      'prompt': {'model/layers/prompt'},
  }
  for method, expected in cases.items():
    _, params, (trainable, frozen) = _split(config, method, abstract=True)
    assert _trained(trainable) == expected, method
    assert peft.count(trainable) + peft.count(frozen) == peft.count(params)
    if method == 'lora':  # q_proj: [128 -> 128], v_proj: [128 -> 64] (2 kv heads); rank 8.
      assert peft.count(trainable) == LAYERS * (H * 8 + 8 * Q + H * 8 + 8 * KV)
    if method == 'prompt':
      assert trainable['model']['layers']['prompt'].shape == (LAYERS, 10, H)
  _, _, (trainable, frozen) = _split(config, 'full', abstract=True)
  assert peft.count(frozen) == 0 and peft.count(trainable) == 1_049_728


@needs_tiny
def test_lora_targets_rank_alpha_and_ffa_on_the_decoder():
  config = tiny_llama_config()
  config.peft.lora_targets = 'k_proj, o_proj,down_proj'
  config.peft.lora_rank = 4
  _, params, (trainable, _) = _split(config, abstract=True)
  blocks = trainable['model']['layers']
  assert set(blocks['0']['self_attn']) == {'lora_k_proj_a', 'lora_k_proj_b',
                                           'lora_o_proj_a', 'lora_o_proj_b'}
  assert set(blocks['0']['mlp']) == {'lora_down_proj_a', 'lora_down_proj_b'}
  assert blocks['0']['mlp']['lora_down_proj_a'].shape == (MLP, 4)
  assert blocks['0']['mlp']['lora_down_proj_b'].shape == (4, H)
  assert blocks['0']['self_attn']['lora_k_proj_b'].shape == (4, KV)
  config.peft.lora_freeze_a = True  # FFA-LoRA: only B trains.
  _, _, (trainable, frozen) = _split(config, abstract=True)
  assert all(p.endswith('_b') for p in peft.paths(trainable))
  assert {p[:-2] + '_b' for p in peft.paths(frozen) if 'lora_' in p} == set(
      peft.paths(trainable))
  for bad in ('q_proj,qq_proj', 'q_proj,q_proj', ''):
    config.peft.lora_targets = bad
    with pytest.raises(validation.ConfigError, match=r'^--config.peft.lora_targets=.*must be '
                       'distinct comma-separated linear maps of the decoder: q_proj, k_proj'):
      validation.validate(config, needs_weights=False, needs_data=False)


def test_lora_targets_on_the_vit_are_its_query_key_value():
  config = configs.base_config('lora')
  config.model.name = 'vit_test'
  config.peft.lora_targets = 'q_proj,k_proj'
  _, _, (trainable, _) = _split(config, abstract=True)
  attention = trainable['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']
  assert set(attention) == {'lora_query_a', 'lora_query_b', 'lora_key_a', 'lora_key_b'}
  assert attention['lora_key_b'].shape == (8, 2, 16)  # [rank, heads, head_dim], as before.
  config.peft.lora_targets = 'q_proj,gate_proj'
  with pytest.raises(validation.ConfigError, match='linear maps of the ViT'):
    validation.validate(config, needs_weights=False, needs_data=False)


@needs_tiny
def test_bias_and_head_are_refused_on_the_tied_bias_free_tiny_decoder_qwen2_biases_train():
  config = tiny_llama_config('bias')
  with pytest.raises(validation.ConfigError, match="bias trains biases.*use 'norm'"):
    validation.validate(config, needs_weights=True, needs_data=False)
  config = tiny_llama_config('head')
  with pytest.raises(validation.ConfigError, match=r"^--config.peft.method='head': head "
                     'trains an untied lm_head, and this decoder ties'):
    validation.validate(config, needs_weights=True, needs_data=False)
  qwen2 = llama.LlamaConfig.from_hf(dict(
      model_type='qwen2', vocab_size=40, hidden_size=16, intermediate_size=24,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
  assert peft.check('bias', {}, qwen2) is None
  params = jax.eval_shape(llama.LlamaForCausalLM(qwen2).init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32))['params']
  trainable, _ = peft.split(params, peft.labels('bias', params))
  assert {p.split('/')[-2:][0] for p in peft.paths(trainable)} == {'q_proj', 'k_proj', 'v_proj'}


def _logits(model, params, ids):
  return np.asarray(model.apply({'params': params}, ids))


@needs_tiny
@pytest.mark.parametrize('method', ['lora', 'adapter', 'prompt'])
def test_additions_keep_the_pretrained_function_as_declared_and_move_it(method):
  config = tiny_llama_config()
  plain, plain_params, _ = _split(config, 'full')
  model, params, _ = _split(config, method)
  ids = np.random.default_rng(0).integers(3, VOCAB, (2, 12)).astype(np.int32)
  base = _logits(plain, plain_params, ids)
  flat = traverse_util.flatten_dict(params, sep='/')
  # The backbone loaded from the checkpoint, the additions not.
  for k, v in traverse_util.flatten_dict(plain_params, sep='/').items():
    np.testing.assert_array_equal(flat[k], v)
  got = _logits(model, params, ids)
  assert got.shape == base.shape  # Prompts are dropped from the logits.
  if peft.PEFT_METHODS.get(method).identity_at_init:
    np.testing.assert_allclose(got, base, atol=1e-5)
  else:
    assert not np.allclose(got, base, atol=1e-3)
  added = [k for k in flat if peft.is_added(tuple(k.split('/')))]
  moved = {k: v + (0.5 * jax.random.normal(jax.random.key(i), v.shape) if k in added else 0)
           for i, (k, v) in enumerate(flat.items())}
  moved = _logits(model, traverse_util.unflatten_dict(moved, sep='/'), ids)
  assert np.abs(moved - got).max() > 1e-2


@needs_tiny
def test_a_shallow_soft_prompt_is_the_prompt_tokens_put_in_front():
  """Prompt vectors equal to token embeddings: the same logits as those tokens in front of
  the input, positions shifted (Hugging Face PEFT's prompt tuning)."""
  config = tiny_llama_config('prompt')
  config.peft.prompt_deep = False
  config.peft.prompt_tokens = 3
  model, params, _ = _split(config)
  plain, plain_params, _ = _split(config, 'full')
  front = np.array([5, 17, 300], np.int32)
  table = params['model']['embed_tokens']['embedding']
  params['model']['layers']['prompt'] = np.asarray(table)[front][None]
  ids = np.random.default_rng(1).integers(3, VOCAB, (2, 9)).astype(np.int32)
  joined = np.concatenate([np.broadcast_to(front, (2, 3)), ids], axis=1)
  np.testing.assert_allclose(_logits(model, params, ids),
                             _logits(plain, plain_params, joined)[:, 3:], atol=2e-5)
  # Padding after the text changes nothing before it, prompts or not.
  padded = np.concatenate([ids, np.full((2, 3), 2, np.int32)], axis=1)
  mask = np.concatenate([np.ones_like(ids), np.zeros((2, 3), np.int32)], axis=1)
  with_pad = np.asarray(model.apply({'params': params}, padded, mask))
  np.testing.assert_allclose(with_pad[:, :9], _logits(model, params, ids), atol=2e-5)


# --- The causal-LM task -----------------------------------------------------------------------

def token_rows(rng, rows: int, length: int, lengths=None):
  """`features` as the text source makes them: bos 0 + tokens + eos 1, right-padded with
  pad 2; loss_mask 1 on every token after bos up to eos."""
  lengths = lengths if lengths is not None else rng.integers(3, length + 1, rows)
  ids = np.full((rows, length), 2, np.int32)
  mask = np.zeros((rows, length), np.uint8)
  for i, n in enumerate(lengths):
    ids[i, :n] = np.concatenate([[0], rng.integers(3, VOCAB, n - 2), [1]])
    mask[i, 1:n] = 1
  return {'input_ids': ids, 'loss_mask': mask}


class text_set(types.SimpleNamespace):  # pylint: disable=invalid-name
  """A Dataset-like split of token rows (the text source's layout)."""

  def __init__(self, features):
    n = len(features['input_ids'])
    super().__init__(features=features, images=None, labels=np.zeros(n, np.int32),
                     class_names=('text',))

  def __len__(self):
    return len(self.labels)


def numpy_token_losses(logits, features):
  """(cross-entropy [rows, T - 1] in float64, targets [rows, T - 1], argmax hits)."""
  z = np.asarray(logits, np.float64)[:, :-1]
  log_p = z - z.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  targets = features['input_ids'][:, 1:]
  ce = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  weight = features['loss_mask'][:, 1:].astype(np.float64)
  return ce * weight, weight, (z.argmax(-1) == targets) * weight


@needs_tiny
def test_the_loss_is_the_mean_over_predicted_tokens_and_padding_rows_are_finite():
  config = tiny_llama_config()
  model, params, (trainable, frozen) = _split(config)
  features = token_rows(np.random.default_rng(0), 4, 16, lengths=[16, 3, 9, 5])
  data = tasks.TASKS.get('causal_lm').client_data(config, model, frozen, text_set(features))
  ids = jnp.asarray([0, 1, 2, 3, client_lib.PADDING_ID, client_lib.PADDING_ID])
  batch = client_lib.gather_batch(jax.device_put(data.dataset), ids)
  assert not batch['input_ids'][4:].any() and not batch['loss_mask'][4:].any()
  losses = np.asarray(jax.jit(data.loss_fn)(trainable, frozen, batch, jax.random.key(0)))
  assert losses.shape == (6,) and np.all(np.isfinite(losses)) and np.all(losses[4:] == 0)
  ce, weight, _ = numpy_token_losses(_logits(model, params, features['input_ids']), features)
  # The round's mean over real rows is the mean over the batch's 29 predicted tokens.
  assert weight.sum() == 15 + 2 + 8 + 4
  np.testing.assert_allclose(losses[:4].mean(), ce.sum() / weight.sum(), rtol=1e-5)
  np.testing.assert_allclose(losses[:4], ce.sum(1) * 4 / weight.sum(), rtol=1e-5)
  # Gradients through padding rows are finite.
  grads = jax.grad(lambda t: data.loss_fn(t, frozen, batch, None)[:4].mean())(trainable)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@needs_tiny
def test_evaluation_is_perplexity_over_the_test_tokens_padded_to_whole_batches():
  config = tiny_llama_config()
  config.eval.batch_size = 4
  model, params, (trainable, frozen) = _split(config)
  features = token_rows(np.random.default_rng(3), 7, 12)  # 7 rows: 1 row of padding.
  evaluate = tasks.TASKS.get('causal_lm').make_evaluate(
      config, model, frozen, text_set(features), jax.device_put, trainable)
  metrics = evaluate(trainable)
  assert tuple(metrics) == tasks.TASKS.get('causal_lm').metrics
  ce, weight, hits = numpy_token_losses(_logits(model, params, features['input_ids']),
                                        features)
  loss = ce.sum() / weight.sum()
  np.testing.assert_allclose(metrics['test_loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['test_perplexity'], np.exp(loss), rtol=1e-5)
  assert metrics['test_accuracy'] == hits.sum() / weight.sum()
  # Other trainable values, the same compiled function.
  moved = jax.tree.map(lambda x: x + 0.1, trainable)
  assert evaluate(moved)['test_loss'] != metrics['test_loss']


@needs_tiny
def test_the_task_refuses_data_without_tokens():
  config = tiny_llama_config()
  model, _, (_, frozen) = _split(config)
  images = types.SimpleNamespace(features=None, images=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(errors.UserError, match='causal_lm needs token data.*data.source=text'):
    tasks.TASKS.get('causal_lm').client_data(config, model, frozen, images)


# --- One federated round ----------------------------------------------------------------------

@needs_tiny
def test_one_federated_lora_round_of_the_tiny_decoder_lowers_the_loss():
  config = tiny_llama_config('lora')
  config.fl.num_clients = config.fl.clients_per_round = 2
  config.fl.local_epochs, config.fl.batch_size = 3, 4
  config.optim.lr = 0.05
  model, params, (trainable, frozen) = _split(config)
  # 8 rows of one repeated phrase, each client 4 of them.
  phrase = np.random.default_rng(5).integers(3, VOCAB, 10)
  features = token_rows(np.random.default_rng(6), 8, 16, lengths=[12] * 8)
  features['input_ids'][:, 1:11] = phrase
  data = tasks.TASKS.get('causal_lm').client_data(config, model, frozen, text_set(features))
  table = fl_types.ClientTable.from_partition([np.arange(4), np.arange(4, 8)])
  algorithm = build.build_algorithm(config, data.loss_fn, table.max_examples, None)
  state = algorithm.init(trainable, jax.random.key(1))
  state, metrics = jax.jit(algorithm.apply)(state, frozen, jax.device_put(data.dataset), table)
  assert int(metrics.num_reported) == 2
  loss = lambda t: (lambda ce, w, _: ce.sum() / w.sum())(*numpy_token_losses(
      _logits(model, peft.merge(t, frozen), features['input_ids']), features))
  before, after = loss(trainable), loss(state.trainable)
  assert after < 0.8 * before, (before, after)
  # Only LoRA moved; the backbone is the frozen tree, untouched.
  assert _trained(state.trainable) == _trained(trainable)
