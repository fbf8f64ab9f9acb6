"""Every mistake with the decoder's keys and files is one line naming the `--config.` key,
before any training (issue 21): a missing model directory, a tokenizer that does not fit
the model's vocabulary, a LoRA target the model lacks and `bias` on a bias-free model at
launch (`launch._check_before_training`); a field the data lacks when the data is loaded,
before the model is built."""
import json
import os
import shutil

import pytest

import launch
from fedpeft_jax import errors
from fedpeft_jax.experiment import build
from tests.conftest import SHARED, launch as run_launch, needs
from tests.test_sample import SHAKESPEARE, TINY_LLAMA, text_config

SHAKESPEARE_DATA = SHARED / 'data' / 'shakespeare_roles.tar.gz'
pytestmark = [needs(TINY_LLAMA / 'model.safetensors'), needs(SHAKESPEARE_DATA)]


def _one_line(e: pytest.ExceptionInfo, key: str) -> str:
  message = str(e.value)
  assert '\n' not in message and message.startswith(f'--config.{key}='), message
  return message


def _mistaken_tokenizer(tmp_path) -> str:
  """tiny_llama_en with one token id past its vocab_size (2048) in tokenizer.json."""
  directory = tmp_path / 'tokenizer_mismatch'
  directory.mkdir()
  for name in os.listdir(TINY_LLAMA):
    if name.endswith('.json') and name != 'tokenizer.json':
      shutil.copy(TINY_LLAMA / name, directory / name)
  os.symlink(TINY_LLAMA / 'model.safetensors', directory / 'model.safetensors')
  tokenizer = json.loads((TINY_LLAMA / 'tokenizer.json').read_text())
  tokenizer['model']['vocab']['zzz'] = 5000
  (directory / 'tokenizer.json').write_text(json.dumps(tokenizer))
  return str(directory)


def test_decoder_mistakes_are_one_line_at_launch(tmp_path):
  cases = {  # (method, key, value, key named, words in the message)
      'missing model directory': ('lora', 'model.checkpoint', str(tmp_path / 'nothere'),
                                  'model.checkpoint', 'does not exist'),
      'tokenizer of another vocabulary': ('lora', 'model.checkpoint',
                                          _mistaken_tokenizer(tmp_path),
                                          'model.checkpoint', "vocab_size is 2048"),
      'LoRA target the model lacks': ('lora', 'peft.lora_targets', 'foo_proj',
                                      'peft.lora_targets', 'q_proj'),
      'bias on a bias-free model': ('bias', None, None, 'peft.method', "'norm'"),
  }
  launch._check_before_training(text_config('lora'))  # The shipped config passes.
  for case, (method, key, value, named, words) in cases.items():
    config = text_config(method)
    if key:
      section, name = key.split('.')
      config[section][name] = value
    with pytest.raises(errors.UserError) as e:
      launch._check_before_training(config)
    assert words in _one_line(e, named), case


def _records(tmp_path):
  """A folder of train/test.jsonl with the fields text, client, question, answer."""
  folder = tmp_path / 'records'
  folder.mkdir()
  for split in ('train', 'test'):
    with open(folder / f'{split}.jsonl', 'w') as f:
      for i in range(4):
        f.write(json.dumps({'text': f'line {i}', 'client': f'c{i % 2}', 'question': 'q',
                            'answer': 'a'}) + '\n')
  return str(folder)


def test_a_field_the_data_lacks_is_one_line_naming_its_key(tmp_path):
  path = _records(tmp_path)
  cases = {'data.text_field': {'text_field': 'speech'},
           'data.client_field': {'client_field': 'role'},
           'data.prompt_field': {'prompt_field': 'instruction', 'response_field': 'answer'},
           'data.response_field': {'prompt_field': 'question', 'response_field': 'output'}}
  config = text_config('lora')
  config.data.path, config.data.min_client_examples = path, 1
  assert len(build.load_data(config, 'train').features['input_ids']) == 4
  for key, fields in cases.items():
    config = text_config('lora')
    config.data.path, config.data.min_client_examples = path, 1
    config.data.update(fields)
    with pytest.raises(errors.UserError) as e:
      build.load_data(config, 'train')
    assert 'has no field' in _one_line(e, key), key


@pytest.mark.cli
def test_launch_ends_a_run_whose_data_lacks_a_field_with_one_line_before_training(tmp_path):
  result = run_launch(tmp_path / 'work', '--config.data.text_field=speech',
                      config=SHAKESPEARE + ':lora')
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  assert lines[0].startswith("error: --config.data.text_field='speech': ")
  assert "has no field 'speech'" in lines[0] and 'initialising the model' not in result.stdout
  assert not (tmp_path / 'work' / 'metrics.jsonl').exists()
