"""fedpeft_jax.data.partition: IID, Dirichlet, shards, quantity and natural client splits,
and the contract every registered partition keeps."""
import numpy as np
import pytest

from fedpeft_jax import configs, errors, validation
from fedpeft_jax.data import partition
from fedpeft_jax.data.partition import PARTITIONS
from tests.conftest import tiny_config


def _labels(n=2000, num_classes=10, seed=0):
  return np.random.default_rng(seed).integers(0, num_classes, n)


def _assert_disjoint_cover(parts, n):
  assert all(p.dtype == np.int64 for p in parts)
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def test_iid():
  parts = partition.iid(_labels(), num_clients=7, seed=0)
  assert len(parts) == 7
  _assert_disjoint_cover(parts, 2000)
  assert {len(p) for p in parts} == {285, 286}


@pytest.mark.parametrize('alpha', [0.1, 1.0, 100.0])
def test_dirichlet_cover_and_min_size(alpha):
  parts = partition.dirichlet(_labels(), num_clients=10, alpha=alpha, seed=0,
                              min_size=20)
  assert len(parts) == 10
  _assert_disjoint_cover(parts, 2000)
  assert min(len(p) for p in parts) >= 20


# Client ids of the natural split: 7 clients of uneven sizes.
_NATURAL_IDS = np.random.default_rng(1).choice([f'user{i}' for i in range(7)], 2000,
                                                p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])


@pytest.mark.parametrize('method', ['iid', 'dirichlet', 'shards', 'quantity', 'natural'])
def test_every_partition_covers_the_data_disjointly(method):
  parts = partition.partition(_labels(), method=method, num_clients=7, seed=0,
                              client_ids=_NATURAL_IDS)
  assert len(parts) == 7
  _assert_disjoint_cover(parts, 2000)
  assert all(np.array_equal(p, np.sort(p)) for p in parts)


@pytest.mark.parametrize('method', ['iid', 'dirichlet', 'shards', 'quantity'])
def test_partition_deterministic_by_seed(method):
  run = lambda seed: partition.partition(_labels(), method=method,
                                         num_clients=5, seed=seed)
  for a, b in zip(run(3), run(3)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(run(3), run(4)))


def _mean_label_entropy(labels, parts):
  entropies = []
  for p in parts:
    freq = np.bincount(labels[p], minlength=10) / len(p)
    freq = freq[freq > 0]
    entropies.append(-(freq * np.log(freq)).sum())
  return np.mean(entropies)


def test_small_alpha_is_skewed():
  labels = _labels()
  split = lambda **kw: partition.partition(labels, num_clients=10, seed=0, **kw)
  iid = _mean_label_entropy(labels, split(method='iid'))
  skewed = _mean_label_entropy(labels, split(method='dirichlet', alpha=0.1))
  mild = _mean_label_entropy(labels, split(method='dirichlet', alpha=100.0))
  assert iid > np.log(10) - 0.05  # Near uniform.
  assert skewed < iid - 0.5
  assert skewed < mild


def test_partition_errors():
  labels = _labels(n=100)
  with pytest.raises(ValueError, match='min_size=20'):
    partition.dirichlet(labels, num_clients=10, alpha=0.5, seed=0, min_size=20)
  # Feasible in count, but tiny alpha almost never gives every client 9.
  with pytest.raises(ValueError, match='alpha=0.001'):
    partition.dirichlet(labels, num_clients=10, alpha=0.001, seed=0, min_size=9)
  with pytest.raises(ValueError, match='alpha must be > 0, got 0'):
    partition.dirichlet(labels, num_clients=2, alpha=0, seed=0)
  with pytest.raises(ValueError, match='num_clients must be >= 1, got 0'):
    partition.iid(labels, num_clients=0, seed=0)
  with pytest.raises(errors.UserError,
                     match="'pathological'.*dirichlet.*iid.*natural.*quantity.*shards") as e:
    partition.partition(labels, method='pathological', num_clients=2, seed=0)
  assert e.value.argument == 'method'
  with pytest.raises(TypeError, match=r"no registered partition takes \['shard_per_client'\]"):
    partition.partition(labels, method='shards', num_clients=2, seed=0, shard_per_client=3)


# Shards (McMahan et al. 2017).


def test_shards_of_a_hand_computed_example():
  # Sorted by label, 8 examples cut into 2 clients x 2 shards = 4 shards of 2: each shard
  # is one label's pair of examples, so each client holds exactly two whole labels.
  labels = np.array([1, 0, 3, 2, 1, 0, 3, 2])
  pairs = [{1, 5}, {0, 4}, {3, 7}, {2, 6}]  # The examples of labels 0, 1, 2, 3.
  seen = set()
  for seed in range(20):
    parts = partition.shards(labels, num_clients=2, seed=seed, shards_per_client=2)
    _assert_disjoint_cover(parts, 8)
    for part in parts:
      held = [i for i, pair in enumerate(pairs) if pair <= set(part.tolist())]
      assert len(held) == 2 and set(part.tolist()) == pairs[held[0]] | pairs[held[1]]
      seen.add(tuple(held))
  assert len(seen) == 6  # Every pair of labels is dealt to some client with some seed.


@pytest.mark.parametrize('shards_per_client,shard_size', [(2, 15), (3, 10), (1, 30)])
def test_shards_each_client_holds_shards_per_client_label_runs(shards_per_client, shard_size):
  # 10 classes x 60 examples, 20 clients: 20 * shards_per_client shards of shard_size
  # examples, each inside one class, so every client holds shards_per_client whole shards.
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 60))
  parts = partition.shards(labels, num_clients=20, seed=3,
                           shards_per_client=shards_per_client)
  _assert_disjoint_cover(parts, 600)
  for part in parts:
    counts = np.bincount(labels[part], minlength=10)
    assert len(part) == shards_per_client * shard_size
    assert all(c % shard_size == 0 for c in counts)
    assert 1 <= np.count_nonzero(counts) <= shards_per_client
  # Different clients get different classes: not every client the same one or two.
  assert len({tuple(np.unique(labels[p])) for p in parts}) > 5


def test_shards_errors_name_the_numbers():
  labels = _labels(n=8)
  with pytest.raises(errors.UserError,
                     match=r'num_clients=3 x shards_per_client=3 = 9 shards, more than the 8 '
                           'examples') as e:
    partition.shards(labels, num_clients=3, seed=0, shards_per_client=3)
  assert e.value.argument == 'shards_per_client'
  with pytest.raises(errors.UserError, match='shards_per_client must be >= 1, got 0') as e:
    partition.shards(labels, num_clients=2, seed=0, shards_per_client=0)
  assert e.value.argument == 'shards_per_client'


# Quantity skew.


@pytest.mark.parametrize('alpha', [0.5, 100.0])
def test_quantity_sizes_are_min_size_plus_dirichlet_shares_of_the_rest(alpha):
  # Shares of Dir(alpha) over K clients have mean 1/K and variance
  # (1/K)(1 - 1/K) / (K alpha + 1): 0.015 for alpha 0.5, 0.0000899 for alpha 100 (K=10).
  labels = _labels(n=5000)
  shares = []
  for seed in range(300):
    sizes = np.array([len(p) for p in partition.quantity(labels, num_clients=10,
                                                         alpha=alpha, seed=seed,
                                                         min_size=100)])
    assert sizes.sum() == 5000 and sizes.min() >= 100
    shares.append((sizes - 100) / 4000)
  shares = np.concatenate(shares)
  assert shares.std() == pytest.approx(np.sqrt(0.1 * 0.9 / (10 * alpha + 1)), rel=0.1)


def test_quantity_labels_follow_the_global_mix():
  labels = _labels(n=20000)
  parts = partition.quantity(labels, num_clients=5, alpha=1.0, seed=0, min_size=1000)
  _assert_disjoint_cover(parts, 20000)
  overall = np.bincount(labels, minlength=10) / 20000
  for part in parts:
    # >= 1000 examples: a class frequency's std is at most sqrt(0.1 * 0.9 / 1000) = 0.0095.
    assert len(part) >= 1000
    np.testing.assert_allclose(np.bincount(labels[part], minlength=10) / len(part), overall,
                               atol=0.045)


def test_quantity_errors():
  with pytest.raises(errors.UserError, match='min_size=30 of 100 examples') as e:
    partition.quantity(_labels(n=100), num_clients=4, alpha=1.0, seed=0, min_size=30)
  assert e.value.argument == 'min_size'
  with pytest.raises(errors.UserError, match='alpha must be > 0') as e:
    partition.quantity(_labels(n=100), num_clients=4, alpha=0.0, seed=0)
  assert e.value.argument == 'alpha'


# Natural clients.


def test_natural_clients_follow_the_sorted_ids():
  parts = partition.natural(np.array(['bob', 'alice', 'bob', 'carol', 'alice']), 3)
  assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]
  parts = partition.natural(np.array([10, 2, 10, 7]), 3)  # Numbers sort as numbers.
  assert [p.tolist() for p in parts] == [[1], [3], [0, 2]]
  assert partition.client_names(np.array([10, 2, 10, 7])).tolist() == [2, 7, 10]


def test_natural_needs_num_clients_to_match_the_data():
  ids = np.array(['bob', 'alice', 'bob', 'carol'])
  with pytest.raises(errors.UserError,
                     match=r'the data holds 3 clients \(alice, bob, carol\), not '
                           r'num_clients=4; set num_clients=3') as e:
    partition.natural(ids, 4)
  assert e.value.argument == 'num_clients'
  with pytest.raises(errors.UserError, match='needs client_ids'):
    partition.partition(_labels(n=4), method='natural', num_clients=3, seed=0)
  with pytest.raises(errors.UserError, match='4 client_ids for 5 labels'):
    partition.partition(_labels(n=5), method='natural', num_clients=3, seed=0,
                        client_ids=ids)


def test_label_histograms():
  labels = np.array([0, 2, 2, 1, 0, 2])
  histograms = partition.label_histograms(labels, [np.array([0, 1, 2]), np.array([3, 4, 5])],
                                          num_classes=4)
  assert histograms.tolist() == [[1, 0, 2, 0], [1, 1, 1, 0]]


# The contract every registered partition keeps (cf. optax's transform_test): on 240
# examples of 4 classes, or for partitions that split by the data's client ids, 6 named
# clients of uneven sizes.
_CONTRACT_LABELS = np.random.default_rng(5).permutation(np.repeat(np.arange(4), 60))
_CONTRACT_IDS = np.random.default_rng(6).choice(['ann', 'ben', 'cy', 'dee', 'eve', 'flo'],
                                                240, p=[0.3, 0.25, 0.15, 0.1, 0.1, 0.1])


def _contract_split(name, seed, client_ids=_CONTRACT_IDS):
  spec = PARTITIONS.get(name)
  options = {argument: option.default for argument, option in spec.options.items()}
  num_clients = len(np.unique(_CONTRACT_IDS)) if spec.needs_client_ids else 4
  return partition.partition(_CONTRACT_LABELS, method=name, num_clients=num_clients,
                             seed=seed, client_ids=client_ids, **options), options


@pytest.mark.parametrize('name', PARTITIONS.names())
def test_every_partition_keeps_the_contract(name):
  spec = PARTITIONS.get(name)
  parts, options = _contract_split(name, seed=0)
  assert all(p.ndim == 1 and p.dtype == np.int64 and np.array_equal(p, np.sort(p))
             for p in parts)
  held = np.concatenate(parts)
  assert len(held) == len(np.unique(held))  # Disjoint: every example at most once.
  if spec.needs_client_ids:
    # Every example of a kept client, and a client of the data on one client only.
    kept = np.isin(_CONTRACT_IDS, np.unique(_CONTRACT_IDS[held]))
    np.testing.assert_array_equal(np.sort(held), np.flatnonzero(kept))
    assert len({c for p in parts for c in np.unique(_CONTRACT_IDS[p])}) == sum(
        len(np.unique(_CONTRACT_IDS[p])) for p in parts)
    assert len(parts) == len(np.unique(_CONTRACT_IDS))  # natural keeps every named client.
    with pytest.raises(errors.UserError, match='needs client_ids') as e:
      _contract_split(name, seed=0, client_ids=None)
    assert e.value.argument == 'client_ids'
  else:
    np.testing.assert_array_equal(np.sort(held), np.arange(240))  # Every example, once.
    assert len(parts) == 4  # As many clients as asked for.
    # The data's client ids, when it has them, change nothing.
    assert all(np.array_equal(a, b)
               for a, b in zip(parts, _contract_split(name, seed=0, client_ids=None)[0]))
  floor, keys = spec.client_floor(options)
  assert min(len(p) for p in parts) >= floor >= 0
  assert set(keys) <= {option.key for option in spec.options.values()}
  # The same split for the same seed; another for another seed, where seeded.
  again = _contract_split(name, seed=0)[0]
  other = _contract_split(name, seed=1)[0]
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))
  assert spec.seeded == any(not np.array_equal(a, b) for a, b in zip(parts, other))
  # partition.json's args: 'seed' where seeded, then keys every config holds.
  flat = configs.flat_config(configs.base_config())
  assert (spec.recorded_keys()[:1] == ('seed',)) == spec.seeded
  assert all(key in flat for key in spec.recorded_keys())


@pytest.mark.parametrize('name', PARTITIONS.names())
def test_every_partition_option_is_in_the_config_at_its_declared_default(name):
  """The config's defaults are the entries' declarations; a default passes its own check,
  and every partition that reads a key declares it alike."""
  flat = configs.flat_config(configs.base_config())
  for option in PARTITIONS.get(name).options.values():
    assert option.key.startswith('data.')
    assert flat[option.key] == option.default and type(flat[option.key]) is type(
        option.default)
    assert option.check(option.default) is None
    for _, other in PARTITIONS.items():
      assert all(o == option for o in other.options.values() if o.key == option.key)
  # What partition.json recorded before the registry, for the partitions of then.
  before = {'iid': ('seed',), 'dirichlet': ('seed', 'data.alpha', 'data.min_client_size'),
            'shards': ('seed', 'data.shards_per_client'),
            'quantity': ('seed', 'data.alpha', 'data.min_client_size'), 'natural': ()}
  if name in before:
    assert PARTITIONS.get(name).recorded_keys() == before[name]


def test_the_config_holds_the_partition_defaults_it_held_before_the_registry():
  flat, declared = configs.flat_config(configs.base_config()), partition.option_defaults()
  for key, default in {'data.alpha': 0.1, 'data.min_client_size': 10,
                       'data.shards_per_client': 2}.items():
    assert flat[key] == declared[key] == default


@pytest.mark.parametrize('name', PARTITIONS.names())
def test_the_sample_level_delta_floor_is_the_declared_minimum_client_size(name):
  """Without data.num_train_examples, delta must be below one over fl.num_clients times
  the fewest examples the partition gives a client (none known: any delta below 1)."""
  config = tiny_config('bias,dp=sample')
  config.data.source, config.data.num_train_examples = 'folder', None  # Names clients.
  config.data.partition = name
  spec = PARTITIONS.get(name)
  floor = config.fl.num_clients * spec.client_floor(spec.read_options(config))[0]
  expected = {'iid': 0, 'dirichlet': 8 * 10, 'quantity': 8 * 10, 'shards': 8 * 2,
              'natural': 8 * 1}
  if name in expected:
    assert floor == expected[name]
  if floor == 0:
    config.dp.delta = 0.99
    validation.validate(config, needs_data=False)
    return
  config.dp.delta = 1.0 / floor
  with pytest.raises(validation.ConfigError, match=rf'must be below 1/{floor} .*at least'):
    validation.validate(config, needs_data=False)
  config.dp.delta = 0.99 / floor
  validation.validate(config, needs_data=False)
