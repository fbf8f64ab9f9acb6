"""Every config value is checked at launch; library errors reach the user as config keys."""
import re

import PIL.Image
import ml_collections
import pytest

from fedpeft_jax import configs, validation
from fedpeft_jax.data import sources
from fedpeft_jax.experiment import build
from fedpeft_jax.federated import algorithms
from tests.conftest import REPO, launch, tiny_config
from tests.test_launch import _one_error_line


@pytest.mark.parametrize('key,value,needle', [
    ('fl.clients_per_round', 9, 'must be <= fl.num_clients (8)'),
    ('data.alpha', 0.0, 'must be > 0'),
    ('data.alpha', -1.0, 'must be > 0'),
    ('fl.rounds', 0, 'must be > 0'),
    ('fl.local_epochs', -1, 'must be > 0'),
    ('fl.batch_size', 0, 'must be > 0'),
    ('optim.lr', 0.0, 'must be > 0'),
    ('peft.method', 'bitfit', 'must be one of full, head, bias'),
    ('data.source', 'hub', 'must be one of folder, synthetic, text, tfds'),
    ('model.name', 'vit_h14', 'must be one of vit_b16'),
    ('model.image_size', 18, 'must be divisible by the patch size 4'),
    ('model.checkpoint', '/nonexistent/ViT-B_16.npz', 'does not exist'),
    ('model.posemb_resample', 'bilinear', 'must be one of zoom, bicubic'),
    ('data.partition', 'pathological', 'must be one of dirichlet, iid, natural, quantity, shards'),
    ('data.shards_per_client', 0, 'must be >= 1'),
    ('fl.dropout_prob', 1.0, 'must be in [0, 1)'),
    ('fl.schedule', 'fast', 'must be one of packed, padded'),
    ('fl.prox_mu', -0.01, 'must be >= 0'),
    ('fl.algorithm', 'fedova', 'must be one of fedavg, fednova, fedprox, scaffold'),
    ('fl.server_optimizer', 'adamw', 'must be one of adagrad, adam, momentum, sgd, yogi'),
    ('fl.server_lr', 0.0, 'must be > 0'),
    ('fl.server_b2', 1.0, 'must be in [0, 1)'),
    ('fl.server_eps', 0.0, 'must be > 0'),
    ('peft.lora_freeze_a', True, "needs 'lora' in peft.method"),
    ('data.num_train_examples', None, "is how many images source='synthetic' makes"),
    ('data.num_test_examples', 0, 'must be > 0'),
])
def test_every_bad_value_is_named_with_what_is_allowed(key, value, needle):
  config = tiny_config()
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(config)
  assert str(e.value).startswith(f'--config.{key}={value!r}: ')
  assert needle in str(e.value)


@pytest.mark.parametrize('name', [n for n, spec in algorithms.ALGORITHMS.items()
                                  if 'client' not in spec.dp_modes])
def test_an_algorithm_under_a_dp_mode_it_does_not_support_is_refused_with_the_way_out(name):
  """SCAFFOLD's variates and FedNova's step counts are per-client releases that
  client-level DP does not clip, noise or account: each declares so, validation refuses."""
  config = tiny_config('bias,dp=client')
  config.fl.algorithm = name
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(config)
  assert str(e.value).startswith(f"--config.fl.algorithm={name!r}: ")
  assert "supports dp.mode 'none', 'sample' only (not 'client')" in str(e.value)
  assert "or use fl.algorithm='fedavg'" in str(e.value)
  config.dp.mode = 'sample'
  validation.validate(config)


def test_fedprox_without_a_proximal_term_is_refused():
  config = tiny_config()
  config.fl.algorithm = 'fedprox'
  with pytest.raises(validation.ConfigError, match=r"^--config.fl.prox_mu=0.0: "
                     r"fl.algorithm=fedprox needs fl.prox_mu > 0"):
    validation.validate(config)
  config.fl.prox_mu = 0.01
  validation.validate(config)


def test_a_subset_larger_than_the_split_names_its_config_key(tmp_path):
  (tmp_path / 'train' / 'cat').mkdir(parents=True)
  PIL.Image.new('RGB', (8, 8)).save(tmp_path / 'train' / 'cat' / '0.jpg')
  config = tiny_config()
  config.data.source, config.data.path, config.data.num_classes = 'folder', str(tmp_path), 1
  with pytest.raises(validation.ConfigError) as e:
    build.load_data(config, 'train')
  assert str(e.value).startswith('--config.data.num_train_examples=256: ')
  assert 'has 1 examples' in str(e.value)
  config.data.num_train_examples = None  # The whole split.
  assert len(build.load_data(config, 'train')) == 1


def test_unknown_tfds_name_and_missing_folder_are_caught_before_loading():
  config = tiny_config()
  config.data.source = 'tfds'
  config.data.name = 'cifar1000'
  with pytest.raises(validation.ConfigError, match='not a TFDS dataset name'):
    validation.validate(config)
  config.data.source, config.data.path = 'folder', '/nonexistent/data'
  with pytest.raises(validation.ConfigError, match='data.path'):
    validation.validate(config)


def test_a_library_error_about_an_argument_is_reported_against_its_config_key(tmp_path):
  config = tiny_config()
  config.data.source, config.data.path = 'folder', str(tmp_path / 'missing.tar.gz')
  with pytest.raises(validation.ConfigError) as e:
    build.load_data(config, 'train')
  message = str(e.value)
  assert message.startswith(f"--config.data.path='{tmp_path / 'missing.tar.gz'}': ")
  assert str(tmp_path) in message and 'working directory' in message
  # The library itself names its own argument, not a config key.
  with pytest.raises(sources.DataError) as raw:
    sources.load('folder', path=str(tmp_path / 'missing.tar.gz'), split='train')
  assert raw.value.argument == 'path' and '--config' not in str(raw.value)


def test_partitions_the_loaded_data_cannot_have_name_their_config_keys(tmp_path):
  config = tiny_config()  # 256 synthetic training examples, 8 clients.
  config.data.partition, config.data.shards_per_client = 'shards', 40
  with pytest.raises(validation.ConfigError) as e:
    build.load_partition(config)
  assert str(e.value) == (
      '--config.data.shards_per_client=40: num_clients=8 x shards_per_client=40 = 320 '
      'shards, more than the 256 examples; lower shards_per_client or num_clients.')
  config.data.partition, config.data.min_client_size = 'quantity', 33
  with pytest.raises(validation.ConfigError,
                     match=r'^--config.data.min_client_size=33: .*min_size=33 of 256 examples'):
    build.load_partition(config)

  for client in ('alice', 'bob'):  # <split>/<client>/<class>/*.jpg, the test split as well.
    for split in ('train', 'test'):
      (tmp_path / split / client / 'cat').mkdir(parents=True)
      PIL.Image.new('RGB', (16, 16)).save(tmp_path / split / client / 'cat' / '0.jpg')
  config.data.source, config.data.path, config.data.partition = 'folder', str(tmp_path), 'natural'
  config.data.num_classes, config.data.num_train_examples = 1, None
  with pytest.raises(validation.ConfigError) as e:
    build.load_partition(config)
  assert str(e.value) == ('--config.fl.num_clients=8: the data holds 2 clients (alice, bob), '
                          'not num_clients=8; set num_clients=2.')
  config.fl.num_clients = 2
  train_set, parts = build.load_partition(config)
  assert train_set.client_ids.tolist() == ['alice', 'bob']
  assert [p.tolist() for p in parts] == [[0], [1]]

  flat = tmp_path / 'flat'
  (flat / 'train' / 'cat').mkdir(parents=True)
  PIL.Image.new('RGB', (16, 16)).save(flat / 'train' / 'cat' / '0.jpg')
  config.data.path = str(flat)
  with pytest.raises(validation.ConfigError,
                     match=r"^--config.data.partition='natural': No .*/train/<client>/<class>/"):
    build.load_partition(config)


def test_too_many_shards_is_one_line_exit_2_from_the_command_line(tmp_path):
  result = launch(tmp_path, '--config.data.partition=shards',
                  '--config.data.shards_per_client=40')
  _one_error_line(result, 'error: --config.data.shards_per_client=40: num_clients=8 x '
                  'shards_per_client=40 = 320 shards, more than the 256 examples')
  assert not (tmp_path / 'metrics.jsonl').exists()


def test_an_error_about_an_unmapped_argument_passes_through_unchanged():
  config = tiny_config()
  with pytest.raises(sources.DataError, match='Unknown data source'):
    with validation.config_keys(config, path='data.path'):
      sources.load('nowhere', split='train')


def test_every_config_key_an_error_message_names_exists():
  config = configs.base_config()
  keys = set(configs.flat_config(config))
  # A key whose value is itself a dict of values (model.hf_config) names an empty section.
  keys |= {f'{section}.{name}' for section, values in config.items()
           if isinstance(values, ml_collections.ConfigDict)
           for name, value in values.items() if isinstance(value, ml_collections.ConfigDict)}
  named = set()
  for path in list((REPO / 'fedpeft_jax').rglob('*.py')) + [REPO / 'launch.py']:
    named |= {(path.name, key) for key in
              re.findall(r'--config\.([a-z_]+\.[a-z_]+)', path.read_text())}
  assert len(named) >= 3, named  # The scan finds the messages it checks.
  assert not {(f, k) for f, k in named if k not in keys}


@pytest.mark.parametrize('dp,aggregation,ok', [
    ('client', 'auto', True), ('client', 'uniform', True), ('client', 'weighted', False),
    ('none', 'auto', True), ('none', 'weighted', True)])
def test_dp_mode_client_alone_aggregates_uniformly_and_refuses_explicit_weights(
    dp, aggregation, ok):
  config = tiny_config(f'bias,dp={dp}')
  config.fl.aggregation = aggregation
  if ok:
    validation.validate(config)
    assert validation.aggregation(config) == (
        'uniform' if dp == 'client' or aggregation == 'uniform' else 'weighted')
  else:
    with pytest.raises(validation.ConfigError, match="fl.aggregation='weighted'"):
      validation.validate(config)
