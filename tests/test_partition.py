"""fedpeft_jax.data.partition: IID and Dirichlet client splits."""
import numpy as np
import pytest

from fedpeft_jax.data import partition


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


@pytest.mark.parametrize('method', ['iid', 'dirichlet'])
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
  with pytest.raises(ValueError, match="'pathological'.*iid.*dirichlet"):
    partition.partition(labels, method='pathological', num_clients=2, seed=0)
