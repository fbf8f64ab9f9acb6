"""The `text` data source (issue 21): records of JSON lines, CSV or Parquet files (a folder,
a .tar.gz, the shared Shakespeare archive) tokenized by the model directory's tokenizer.

Expected ids come from `tokenizers.Tokenizer.from_file` called here on the shared
tiny_llama_en tokenizer.json with the special ids of its config.json, not from the
project's tokenizer wrapper; expected clients from counting the records with `json`.
"""
import csv
import json
import shutil
import tarfile

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import tokenizers

from fedpeft_jax import configs, errors, validation
from fedpeft_jax.data import sources
from fedpeft_jax.data.sources import text
from fedpeft_jax.experiment import build
from tests.conftest import SHARED, needs, tiny_config

TINY_LLAMA = SHARED / 'backbones' / 'tiny_llama_en'
SHAKESPEARE = SHARED / 'data' / 'shakespeare_roles.tar.gz'
pytestmark = needs(TINY_LLAMA / 'tokenizer.json')

TRAIN = [  # (client, text): a 3, b 1, c 2 records.
    ('a', 'In the beginning God created the heaven and the earth.'),
    ('b', 'And the earth was without form, and void; and darkness was upon the face of '
          'the deep. And the Spirit of God moved upon the face of the waters.'),
    ('a', ''),
    ('c', 'Fortune favours the bold, and the fortune cookie knows it: ünïcødé too.'),
    ('a', 'To be, or not to be, that is the question.'),
    ('c', 'apt-get install debian-reference-en'),
]
TEST = [('a', 'Let there be light.'), ('b', 'And there was light.'), ('d', 'Only in test.')]


def _expected_tokenizer():
  """(tokenizer, bos, eos, pad) read independently of fedpeft_jax."""
  tokenizer = tokenizers.Tokenizer.from_file(str(TINY_LLAMA / 'tokenizer.json'))
  config = json.loads((TINY_LLAMA / 'config.json').read_text())
  return tokenizer, config['bos_token_id'], config['eos_token_id'], config['pad_token_id']


def _expected(texts, max_length, prompts=None):
  """input_ids and loss_mask as the module docstring defines them, in plain lists."""
  tokenizer, bos, eos, pad = _expected_tokenizer()
  ids, masks = [], []
  for i, body in enumerate(texts):
    prompt = [bos] + (tokenizer.encode(prompts[i], add_special_tokens=False).ids
                      if prompts else [])
    full = prompt + tokenizer.encode(body, add_special_tokens=False).ids + [eos]
    kept = full[:max_length]
    ids.append(kept + [pad] * (max_length - len(kept)))
    # A target wherever a kept token is no bos or prompt token.
    masks.append([int(len(prompt) <= t < len(kept)) for t in range(max_length)])
  return np.asarray(ids), np.asarray(masks)


def _write(folder, kind, split, rows, fields=('client', 'text')):
  """`rows` (tuples in `fields` order) as folder/split.<kind>."""
  folder.mkdir(parents=True, exist_ok=True)
  records = [dict(zip(fields, row)) for row in rows]
  path = folder / f'{split}.{kind}'
  if kind == 'jsonl':
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  elif kind == 'csv':
    with open(path, 'w', newline='') as f:
      writer = csv.DictWriter(f, fields)
      writer.writeheader()
      writer.writerows(records)
  else:
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
  return path


def _folder(tmp_path, kind='jsonl', train=TRAIN, test=TEST, fields=('client', 'text')):
  folder = tmp_path / f'data_{kind}'
  _write(folder, kind, 'train', train, fields)
  _write(folder, kind, 'test', test, fields)
  return folder


def _load(path, split='train', **options):
  return sources.load('text', split=split, path=str(path), checkpoint=str(TINY_LLAMA),
                      **options)


@pytest.mark.parametrize('kind', ['jsonl', 'csv', 'parquet'])
def test_ids_are_the_tokenizers_own_with_bos_eos_truncated_and_padded(tmp_path, kind):
  ds = _load(_folder(tmp_path, kind), max_length=16)
  ids, mask = _expected([t for _, t in TRAIN], 16)
  assert ds.images is None and set(ds.features) == {'input_ids', 'loss_mask'}
  assert ds.features['input_ids'].dtype == np.int32 and ds.features['loss_mask'].dtype == np.uint8
  np.testing.assert_array_equal(ds.features['input_ids'], ids)
  np.testing.assert_array_equal(ds.features['loss_mask'], mask)
  # The long record is cut at 16 with no eos; the empty one is bos, eos, then padding.
  assert len(_expected_tokenizer()[0].encode(TRAIN[1][1]).ids) > 16 and 1 not in ids[1]
  assert ids[2][:3].tolist() == [0, 1, 2] and mask[2][:3].tolist() == [0, 1, 0]
  assert ds.labels.dtype == np.int32 and not ds.labels.any() and ds.class_names == ('text',)
  assert ds.client_ids is None and ds.dropped_clients is None  # Clients not asked for.


def test_loss_mask_covers_the_response_and_eos_only(tmp_path):
  fields = ('prompt', 'response')
  rows = [('Question: who made the heaven?\nAnswer:', ' God.'),
          ('Say nothing.', ''),
          ('A prompt so long that it fills every position of the sequence by itself, '
           'and then some more words to be sure of it.', ' Lost.')]
  folder = _folder(tmp_path, 'jsonl', rows, rows, fields)
  ds = _load(folder, prompt_field='prompt', response_field='response', max_length=20)
  ids, mask = _expected([r for _, r in rows], 20, prompts=[p for p, _ in rows])
  np.testing.assert_array_equal(ds.features['input_ids'], ids)
  np.testing.assert_array_equal(ds.features['loss_mask'], mask)
  tokenizer = _expected_tokenizer()[0]
  prompt_length = 1 + len(tokenizer.encode(rows[0][0], add_special_tokens=False).ids)
  assert not mask[0][:prompt_length].any() and mask[0][prompt_length]  # The response.
  assert mask[1].sum() == 1  # An empty response: eos alone is predicted.
  assert not mask[2].any()  # The prompt alone fills max_length: nothing to learn.


def test_pack_without_bos_or_eos_never_predicts_the_first_token():
  # By hand: a model without bos starts at the first text token, which nothing predicts.
  ids, mask = text.pack([[5, 6, 7], [8]], 4, None, None, 9)
  assert ids.tolist() == [[5, 6, 7, 9], [8, 9, 9, 9]]
  assert mask.tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]
  ids, mask = text.pack([[5, 6]], 5, None, 1, 1, prompts=[[3]])
  assert ids.tolist() == [[3, 5, 6, 1, 1]] and mask.tolist() == [[0, 1, 1, 1, 0]]


def test_client_ids_and_min_client_examples_drop_small_clients_from_every_split(tmp_path):
  folder = _folder(tmp_path)
  everyone = _load(folder, clients=True)
  assert everyone.client_ids.tolist() == [c for c, _ in TRAIN] and everyone.dropped_clients == 0
  train = _load(folder, clients=True, min_client_examples=2)
  assert train.client_ids.tolist() == ['a', 'a', 'c', 'a', 'c'] and train.dropped_clients == 1
  ids, _ = _expected([t for c, t in TRAIN if c != 'b'], 128)
  np.testing.assert_array_equal(train.features['input_ids'], ids)
  # b has 1 training record, d none: both leave the test split too.
  test = _load(folder, 'test', clients=True, min_client_examples=2)
  assert test.client_ids.tolist() == ['a'] and test.dropped_clients == 2
  # Without the natural partition the same records are kept, without their ids.
  plain = _load(folder, min_client_examples=3)
  assert len(plain) == 3 and plain.client_ids is None and plain.dropped_clients == 2


def test_a_tar_gz_of_a_wrapped_folder_and_subsets(tmp_path):
  folder = _folder(tmp_path)
  archive = tmp_path / 'roles.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(folder, arcname='roles')
  from_folder, from_archive = _load(folder, 'test'), _load(archive, 'test')
  np.testing.assert_array_equal(from_archive.features['input_ids'],
                                from_folder.features['input_ids'])
  half = [_load(archive, num_examples=3, seed=seed, clients=True) for seed in (0, 1)]
  full = _load(archive, clients=True)
  rows = {(r.tobytes(), c) for r, c in zip(full.features['input_ids'], full.client_ids)}
  for ds in half:  # The same rows for every seed, each a row of the split with its client.
    assert len(ds) == 3 and ds.labels.shape == (3,)
    assert all((r.tobytes(), c) in rows for r, c in zip(ds.features['input_ids'], ds.client_ids))
    np.testing.assert_array_equal(ds.features['loss_mask'], half[0].features['loss_mask'])
    np.testing.assert_array_equal(ds.client_ids, half[0].client_ids)


# The contract every source of features keeps (test_sources.py keeps the image sources').
TINY_TEXT = {'text': lambda tmp_path: {'path': str(_folder(tmp_path)),
                                       'checkpoint': str(TINY_LLAMA)}}


@pytest.mark.parametrize('name', [n for n, s in sources.SOURCES.items() if s.features])
def test_every_source_of_features_keeps_the_contract(name, tmp_path):
  if name not in TINY_TEXT:
    pytest.fail(f'data source {name!r} has no tiny data: add it to TINY_TEXT in this file')
  spec, options = sources.SOURCES.get(name), TINY_TEXT[name](tmp_path)
  assert spec.summary and set(spec.keys.values()) <= set(configs.flat_config(
      configs.base_config())), spec.keys
  train = sources.load(name, split='train', **options)
  assert train.images is None and tuple(train.features) == spec.features
  assert all(len(v) == len(train) > 0 for v in train.features.values())
  test = sources.load(name, split='test', class_names=train.class_names, **options)
  assert test.class_names == train.class_names
  with pytest.raises(sources.DataError) as e:
    sources.load(name, split='test', class_names=('no such class',), **options)
  assert e.value.argument == 'split' and "'no such class'" in str(e.value)
  with pytest.raises(sources.DataError) as e:
    sources.load(name, split='train', num_examples=len(train) + 1, **options)
  assert e.value.argument == 'num_examples'
  with pytest.raises(TypeError, match='no_such_option'):
    sources.load(name, split='train', no_such_option=1, **options)


@needs(SHAKESPEARE)
def test_the_shared_shakespeare_roles_match_counting_the_jsonl():
  with tarfile.open(SHAKESPEARE) as tar:
    records = [json.loads(line) for line in
               tar.extractfile('shakespeare_roles/train.jsonl').read().decode().splitlines()]
  counts = {}
  for r in records:
    counts[r['client']] = counts.get(r['client'], 0) + 1
  kept = {c for c, n in counts.items() if n >= 40}
  ds = _load(SHAKESPEARE, clients=True, min_client_examples=40, max_length=32)
  assert set(ds.client_ids.tolist()) == kept and 0 < len(kept) < len(counts)
  assert ds.dropped_clients == len(counts) - len(kept)
  assert len(ds) == sum(counts[c] for c in kept)
  shown = [r for r in records if r['client'] in kept][:64]
  assert ds.client_ids[:64].tolist() == [r['client'] for r in shown]
  ids, mask = _expected([r['text'] for r in shown], 32)
  np.testing.assert_array_equal(ds.features['input_ids'][:64], ids)
  np.testing.assert_array_equal(ds.features['loss_mask'][:64], mask)


def _one_line(error):
  message = str(error)
  assert '\n' not in message and message, message
  return message


@pytest.mark.parametrize('change,argument,words', [
    (lambda f, t: {'path': str(t / 'nowhere')}, 'path', ['does not exist']),
    (lambda f, t: {'path': str(f / 'train.jsonl')}, 'path', ['neither a directory']),
    (lambda f, t: {'split': 'valid'}, 'split', ['no valid.jsonl', "'train.jsonl'"]),
    (lambda f, t: {'text_field': 'speech'}, 'text_field',
     ["no field 'speech'", 'train.jsonl', "['client', 'text']"]),
    (lambda f, t: {'clients': True, 'client_field': 'role'}, 'client_field',
     ["no field 'role'", "['client', 'text']"]),
    (lambda f, t: {'prompt_field': 'text'}, 'response_field', ['both']),
    (lambda f, t: {'max_length': 1}, 'max_length', ['at least 2']),
    (lambda f, t: {'min_client_examples': 4}, 'min_client_examples', ['the most: 3']),
    (lambda f, t: {'checkpoint': ''}, 'checkpoint', ['tokenizer.json']),
    (lambda f, t: {'checkpoint': str(t / 'no_model')}, 'checkpoint', ['config.json']),
])
def test_every_mistake_is_one_line_naming_its_argument(tmp_path, change, argument, words):
  folder = _folder(tmp_path)
  options = dict(split='train', path=str(folder), checkpoint=str(TINY_LLAMA))
  options.update(change(folder, tmp_path))
  with pytest.raises(sources.DataError) as e:
    sources.load('text', **options)
  assert e.value.argument == argument
  message = _one_line(e.value)
  assert all(w in message for w in words), message


def test_a_null_text_a_bad_archive_and_a_bad_file_are_one_line(tmp_path):
  folder = _folder(tmp_path, train=[('a', 'fine'), ('b', None)])
  with pytest.raises(sources.DataError, match="record 1 has None in field 'text'") as e:
    _load(folder)
  assert e.value.argument == 'text_field'
  broken = tmp_path / 'broken.tar.gz'
  broken.write_bytes(b'not an archive at all')
  with pytest.raises(sources.DataError, match='Cannot read archive') as e:
    _load(broken)
  assert e.value.argument == 'path' and _one_line(e.value)
  (folder / 'train.jsonl').write_text('{"client": "a", "text": \n')
  with pytest.raises(sources.DataError, match='Cannot read train.jsonl') as e:
    _load(folder)
  assert e.value.argument == 'path' and _one_line(e.value)


def test_a_tokenizer_that_does_not_fit_the_vocabulary_is_one_line(tmp_path):
  model = tmp_path / 'small_vocab'
  model.mkdir()
  shutil.copy(TINY_LLAMA / 'tokenizer.json', model)
  config = json.loads((TINY_LLAMA / 'config.json').read_text())
  (model / 'config.json').write_text(json.dumps(dict(config, vocab_size=1000)))
  with pytest.raises(sources.DataError) as e:
    sources.load('text', split='train', path=str(_folder(tmp_path)), checkpoint=str(model))
  assert e.value.argument == 'checkpoint' and 'vocab_size is 1000' in _one_line(e.value)


def test_a_hub_dataset_offline_is_one_line_naming_it(tmp_path, monkeypatch):
  import datasets
  monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
  with pytest.raises(sources.DataError) as e:
    sources.load('text', split='train', name='someone/no_such_text',
                 checkpoint=str(TINY_LLAMA))
  message = _one_line(e.value)
  assert e.value.argument == 'name' and "'someone/no_such_text'" in message
  assert 'network' in message and 'data.path' in message


def _text_config(tmp_path, **data):
  config = tiny_config()
  config.data.source, config.data.path = 'text', str(_folder(tmp_path))
  config.data.num_train_examples = config.data.num_test_examples = None
  config.model.checkpoint = str(TINY_LLAMA)
  for key, value in data.items():
    config.data[key] = value
  return config


@pytest.mark.parametrize('data,key', [
    ({'max_length': 1}, 'data.max_length'), ({'min_client_examples': 0},
                                             'data.min_client_examples'),
    ({'text_field': ''}, 'data.text_field'), ({'response_field': 'r'}, 'data.prompt_field'),
    ({'partition': 'natural', 'client_field': ''}, 'data.client_field'),
    ({'path': '/no/such/folder'}, 'data.path'), ({'path': '', 'name': ''}, 'data.path')])
def test_launch_checks_name_the_config_key(tmp_path, data, key):
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(_text_config(tmp_path, **data), needs_weights=False)
  assert _one_line(e.value).startswith(f'--config.{key}=')


def test_launch_checks_the_tokenizer_against_the_model(tmp_path):
  config = _text_config(tmp_path)
  validation.validate(config, needs_weights=False)  # The shared model and data pass.
  config.model.checkpoint = ''
  with pytest.raises(validation.ConfigError, match=r"^--config.model.checkpoint='': "):
    validation.validate(config, needs_weights=False)
  validation.validate(config, needs_weights=False, needs_data=False)  # --mode=masks.


def test_build_maps_load_errors_to_keys_and_records_dropped_clients(tmp_path, capsys):
  config = _text_config(tmp_path, text_field='speech')
  with pytest.raises(validation.ConfigError,
                     match=r"^--config.data.text_field='speech': .*no field 'speech'"):
    build.load_data(config, 'train')
  config = _text_config(tmp_path, partition='natural', min_client_examples=2)
  config.fl.num_clients, config.fl.clients_per_round = 2, 1
  train_set, parts = build.load_partition(config)
  assert "left out the 1 clients with fewer than data.min_client_examples=2" in (
      capsys.readouterr().out)
  described = build.describe_partition(config, train_set, parts)
  assert described['dropped_clients'] == 1
  assert described['args']['data.min_client_examples'] == 2
  assert [c['id'] for c in described['clients']] == ['a', 'c']
  assert [c['size'] for c in described['clients']] == [3, 2]
  config.fl.num_clients = 3  # natural: the kept clients are the run's clients.
  with pytest.raises(errors.UserError, match=r'^--config.fl.num_clients=3: .*holds 2 clients'):
    build.load_partition(config)
  for method in ('iid', 'quantity'):  # Labels are zeros: any label-blind split works.
    config.data.partition, config.data.min_client_size = method, 1
    _, parts = build.load_partition(config)
    assert sorted(np.concatenate(parts).tolist()) == list(range(5)) and len(parts) == 3
