"""--mode=sample: the decoder continues a prompt (experiment/sample.py,
tasks/causal_lm.make_generate), checked against transformers' logits in
../shared/backbones/tiny_llama_en/reference.npz and against a plain loop of full forward
passes on growing, unpadded sequences (not the fixed buffer)."""
import dataclasses
import importlib.util
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeft_jax import errors
from fedpeft_jax import peft
from fedpeft_jax import resume
from fedpeft_jax import validation
from fedpeft_jax.experiment import build
from fedpeft_jax.experiment import sample
from fedpeft_jax.experiment import train
from fedpeft_jax.tasks import causal_lm
from tests.conftest import REPO, SHARED, launch, needs

TINY_LLAMA = SHARED / 'backbones' / 'tiny_llama_en'
SHAKESPEARE = 'experiments/shakespeare_tiny_llama.py'
pytestmark = needs(TINY_LLAMA / 'reference.npz')
PROMPT = 'And God said unto'  # Continued for more than 8 tokens before any eos.


def text_config(arg: str = 'lora'):
  """experiments/shakespeare_tiny_llama.py's config (the tiny Llama)."""
  spec = importlib.util.spec_from_file_location('shakespeare_tiny_llama', REPO / SHAKESPEARE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope='module')
def lora():
  """Untrained LoRA (B = 0): the pretrained model itself."""
  return sample.load(text_config('lora'))


@pytest.fixture(scope='module')
def reference():
  return np.load(TINY_LLAMA / 'reference.npz')


def _prompt(reference, row: int) -> list[int]:
  """Row `row`'s real tokens (bos + text) of reference.npz."""
  return reference['input_ids'][row][reference['attention_mask'][row] == 1].tolist()


def _loop_greedy(sampler, prompt_ids, steps):
  """Greedy decoding by a plain loop: each step one forward pass over the unpadded
  sequence so far, the argmax of its last logits appended (numpy), eos ends it."""
  ids = list(prompt_ids)
  apply = jax.jit(lambda p, x: sampler.model.apply({'params': p}, x)[0, -1])
  for _ in range(steps):
    token = int(np.argmax(np.asarray(apply(sampler.params, jnp.asarray([ids], jnp.int32)))))
    ids.append(token)
    if token in sampler.tokenizer.eos_ids:
      break
  return ids[len(prompt_ids):]


def test_greedy_first_token_is_the_argmax_of_transformers_logits(lora, reference):
  for row in range(len(reference['input_ids'])):
    prompt = _prompt(reference, row)
    logits = reference['logits'][row, len(prompt) - 1]
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] > 1e-3  # Not a tie: the check can tell.
    assert sample.generate_ids(lora, prompt, max_new_tokens=1) == [int(np.argmax(logits))]


@pytest.mark.parametrize('method', ['lora', 'prompt'])
def test_greedy_continuation_equals_a_loop_of_full_forward_passes(method, lora):
  # prompt: random soft prompts in front (not identity at init), positions shifted by them.
  sampler = lora if method == 'lora' else sample.load(text_config('prompt'))
  prompt = sample.encode(sampler, PROMPT)
  assert prompt[0] == sampler.tokenizer.bos_id and len(prompt) > 2
  got = sample.generate_ids(sampler, prompt, max_new_tokens=5)
  assert got == _loop_greedy(sampler, prompt, 5) and len(got) == 5
  if method == 'prompt':  # The soft prompts are in effect: other logits than the model's.
    logits = lambda s: np.asarray(s.model.apply({'params': s.params}, jnp.asarray([prompt])))
    assert np.abs(logits(sampler) - logits(lora)).max() > 0.1


def test_generation_stops_at_eos_keeping_it_and_at_the_model_length(lora):
  prompt = sample.encode(lora, PROMPT)
  greedy = sample.generate_ids(lora, prompt, max_new_tokens=6)
  # Make the 4th greedy token an end token: generation stops right after writing it.
  stop_at = greedy[3]
  generate = causal_lm.make_generate(lora.model, (stop_at,))
  tokens = np.zeros(len(prompt) + 6, np.int32)
  tokens[:len(prompt)] = prompt
  out, end = generate(lora.params, tokens, len(prompt), len(tokens), 0.0, jax.random.key(0))
  first = greedy.index(stop_at)
  assert int(end) == len(prompt) + first + 1
  assert np.asarray(out)[len(prompt):int(end)].tolist() == greedy[:first + 1]
  short = dataclasses.replace(lora, max_length=len(prompt) + 3)  # max_position_embeddings.
  assert sample.generate_ids(short, prompt, max_new_tokens=6) == greedy[:3]
  with pytest.raises(errors.UserError, match='shorten it') as e:
    sample.generate_ids(dataclasses.replace(lora, max_length=len(prompt)), prompt)
  assert e.value.argument == 'prompt'


def test_sampling_is_reproducible_per_seed_and_differs_across_seeds(lora):
  prompt = sample.encode(lora, PROMPT)
  draw = lambda seed: sample.generate_ids(lora, prompt, 16, temperature=1.0, seed=seed)
  first = draw(0)
  assert draw(0) == first
  assert draw(1) != first and draw(2) != first
  assert first != sample.generate_ids(lora, prompt, 16)  # Not greedy.


def test_first_sampled_token_follows_softmax_of_transformers_logits_over_temperature(
    lora, reference):
  """2,000 draws of the first token at temperature 2 against softmax(logits / 2) of the
  reference logits: each of the 5 likeliest tokens' frequency within 4.5 sigma."""
  prompt = _prompt(reference, 0)
  temperature, n = 2.0, 2000
  tokens = np.zeros(len(prompt) + 1, np.int32)
  tokens[:len(prompt)] = prompt
  draws = jax.vmap(lambda key: lora.generate(lora.params, tokens, len(prompt), len(tokens),
                                             temperature, key)[0][-1])(
      jax.random.split(jax.random.key(7), n))
  logits = reference['logits'][0, len(prompt) - 1].astype(np.float64) / temperature
  p = np.exp(logits - logits.max())
  p /= p.sum()
  counts = np.bincount(np.asarray(draws), minlength=len(p))
  for token in np.argsort(p)[-5:]:
    sigma = np.sqrt(p[token] * (1 - p[token]) / n)
    assert abs(counts[token] / n - p[token]) < 4.5 * sigma, (token, counts[token], p[token])


def test_trainable_npz_reads_back_and_a_file_of_another_config_is_one_line(tmp_path):
  tree = {'model': {'layers': {'0': {'lora_a': np.arange(6.0).reshape(2, 3)}},
                    'norm': {'scale': np.ones(4, np.float32)}}}
  path = str(tmp_path / 'trainable.npz')
  resume.export_trainable(path, tree)
  template = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  back = resume.load_trainable(path, template)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  np.testing.assert_array_equal(back['model']['layers']['0']['lora_a'], np.arange(6.0).reshape(2, 3))
  assert back['model']['layers']['0']['lora_a'].dtype == np.float32
  other = {'model': {'layers': {'0': {'lora_a': jnp.zeros((2, 4))}}, 'head': jnp.zeros(2)}}
  with pytest.raises(errors.UserError, match='use the config') as e:
    resume.load_trainable(path, other)
  message = str(e.value)
  assert '\n' not in message and e.value.argument == 'path'
  assert 'head (2,) trained now, not in the file' in message
  assert 'model/layers/0/lora_a (2, 3) in the file, (2, 4) now' in message
  assert '(and 1 more)' in message  # model/norm/scale: in the file, not trained now.
  with pytest.raises(errors.UserError, match='does not exist'):
    resume.load_trainable(str(tmp_path / 'none.npz'), template)


def _export_untrained(config, workdir):
  """What a run's end writes, for the untrained trainable tree (as `build.build` makes it)."""
  model = build.build_model(config)
  params = build.init_params(config, model, jax.random.split(jax.random.key(config.seed))[0])
  trainable, _ = peft.split(params, peft.labels(config.peft.method, params,
                                                **build.peft_options(config)))
  workdir.mkdir()
  resume.export_trainable(str(workdir / 'trainable.npz'), trainable)


@pytest.mark.cli
def test_launch_sample_prints_a_continuation_and_refuses_a_workdir_without_trainable(
    lora, tmp_path):
  _export_untrained(text_config('lora'), tmp_path / 'run')
  prompt = PROMPT
  runs = {name: launch(tmp_path / name, '--mode=sample', f'--prompt={prompt}',
                       '--max_new_tokens=12', config=SHAKESPEARE + ':lora', wait=False)
          for name in ('run', 'empty')}
  outputs = {name: p.communicate(timeout=300) for name, p in runs.items()}
  done = {name: subprocess.CompletedProcess(p.args, p.returncode, *outputs[name])
          for name, p in runs.items()}
  ok = done['run']
  assert ok.returncode == 0, ok.stderr[-2000:]
  ids = sample.encode(lora, prompt)
  expected = sample.decode(lora, ids, sample.generate_ids(lora, ids, 12))
  assert ok.stdout == expected + '\n' and expected.strip()
  missing = done['empty']
  lines = missing.stderr.strip().splitlines()
  assert missing.returncode == 2 and len(lines) == 1, missing.stderr[-2000:]
  assert lines[0].startswith('error: ') and 'no trainable.npz' in lines[0]
  assert 'train first' in lines[0] and not (tmp_path / 'empty').exists()


def _speeches(folder, clients=4, per_client=6):
  """train/test.jsonl of short speeches, a role (client) each: the text source's fields."""
  folder.mkdir()
  words = ('the king', 'my lord', 'good night', 'sweet love', 'o heaven', 'fair sir')
  for split, count in (('train', per_client), ('test', 2)):
    with open(folder / f'{split}.jsonl', 'w') as f:
      for c in range(clients):
        for i in range(count):
          text = f'{words[(c + i) % 6]} and {words[(c * i + 1) % 6]}, {words[i % 6]}.'
          f.write(json.dumps({'text': text, 'client': f'role{c}'}) + '\n')
  return str(folder)


def _rule_config(rule, data_path):
  """The tiny Llama on 4 roles of hand-made speeches, two rounds of LoRA under `rule`."""
  config = text_config('lora')
  config.peft.lora_aggregation = rule
  config.data.path, config.data.min_client_examples = data_path, 1
  config.data.num_test_examples, config.data.max_length = None, 24
  config.fl.num_clients = config.fl.clients_per_round = 4
  config.fl.rounds, config.fl.batch_size, config.eval.batch_size = 2, 4, 8
  return config


# FLoRA and FedEx-LoRA fold their merges into the kernels through `Algorithm.frozen`, whose
# export (build.merged_deltas) is the same path; FlexLoRA alone adds `Algorithm.served`.
# One rule keeps the suite's time (each is a run, a build and a sampler).
@pytest.mark.parametrize('rule', ['flexlora'])
def test_a_merging_rule_is_sampled_as_its_run_served_it(rule, tmp_path):
  """FlexLoRA serves the rest of W_g beyond its factors (`Algorithm.served`), which is
  not in trainable.npz. merged.npz
  holds it: trainable.npz + merged.npz evaluate as the run's final round did, and the
  trainable factors alone do not; without merged.npz sampling is refused in one line."""
  config = _rule_config(rule, _speeches(tmp_path / 'speeches'))
  validation.validate(config)
  workdir = tmp_path / 'run'
  history = train.train(config, str(workdir))
  final = history[-1]['test_perplexity']
  merged = sample.merged_path(config, str(workdir))
  with np.load(merged) as data:
    deltas = {k: data[k] for k in data.files}
  assert sorted(deltas) == [f'model/layers/{i}/self_attn/{m}/kernel'
                            for i in range(len(deltas) // 2) for m in ('q_proj', 'v_proj')]
  assert all(d.dtype == np.float32 and np.abs(d).max() > 0 for d in deltas.values())
  experiment = build.build(config)
  model, trainable, frozen = sample.load_trees(config, sample.trainable_path(str(workdir)),
                                               merged)
  served = experiment.evaluate(trainable, frozen)['test_perplexity']
  assert served == pytest.approx(final, rel=1e-5)
  _, _, unmerged = sample.load_trees(config, sample.trainable_path(str(workdir)))
  factors_only = experiment.evaluate(trainable, unmerged)['test_perplexity']
  assert abs(factors_only - final) > 1e-3 * final  # The check can tell.
  # The sampler is that model: its logits are the evaluated trees'.
  sampler = sample.load(config, sample.trainable_path(str(workdir)), merged)
  ids = jnp.asarray([sample.encode(sampler, PROMPT)])
  np.testing.assert_array_equal(
      sampler.model.apply({'params': sampler.params}, ids),
      model.apply({'params': peft.merge(trainable, frozen)}, ids))
  assert sample.sample(config, str(workdir), PROMPT, max_new_tokens=4)

  os.remove(merged)
  with pytest.raises(errors.UserError) as e:
    sample.sample(config, str(workdir), PROMPT)
  assert str(e.value) == (
      f'--workdir={workdir} holds no merged.npz, which --config.peft.lora_aggregation='
      f'{rule} needs (the updates it merged into the kernels are not in trainable.npz; a '
      'run writes both at its end): train again with this version, then sample')


def test_merged_npz_of_another_config_is_one_line(tmp_path):
  """A merged.npz beside a config whose rule does not merge, or whose kernels are not the
  frozen tree's, is refused naming the file; a rule that does not merge needs none."""
  config = text_config('lora')
  assert sample.merged_path(config, str(tmp_path)) is None  # fedit: nothing merged.
  frozen = {'layer': {'kernel': jnp.ones((2, 3), jnp.bfloat16), 'scale': jnp.ones(3)}}
  path = tmp_path / 'merged.npz'
  np.savez(path, **{'layer/kernel': np.full((2, 3), 0.5, np.float32)})
  with pytest.raises(errors.UserError, match=r'holds merged.npz, written by a LoRA rule '
                     r'that merges \(fedex, flexlora, flora\), and --config.peft.'
                     'lora_aggregation=fedit does not merge: use the config that trained it'):
    sample.merged_path(config, str(tmp_path))
  folded = sample.fold_merged(str(path), frozen)
  assert folded['layer']['kernel'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(folded['layer']['kernel'], np.float32), 1.5)
  assert folded['layer']['scale'] is frozen['layer']['scale']
  np.savez(path, **{'layer/kernel': np.zeros((3, 2), np.float32),
                    'other/kernel': np.zeros(1, np.float32)})
  with pytest.raises(errors.UserError) as e:
    sample.fold_merged(str(path), frozen)
  assert str(e.value) == (
      f'{path} holds other merged kernels than this config adapts: layer/kernel (3, 2) in '
      'the file, (2, 3) now; other/kernel not a frozen weight now: use the config '
      '(peft.method and its options) that trained it')
  assert e.value.argument == 'path'
  config.peft.lora_aggregation = 'fedex'
  assert sample.merged_path(config, str(tmp_path)) == str(path)
