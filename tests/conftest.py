"""Shared fixtures: paths to ../shared, the tiny synthetic config, a linear federated
problem small enough to check by hand, and the CLI launcher for tests of launch.py."""
import importlib.util
import inspect
import os
import pathlib
import subprocess
import sys
import tempfile

# The tests compile the same small rounds again and again, in this process and in the
# launches they spawn (which inherit the environment): a persistent XLA cache compiles each
# once. Set before jax is imported.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'fedpeft_jax_tests_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# Compiling, not computing, is most of the suite's time: XLA's cheaper optimisation passes
# compile the tests' small models faster. Every run of a test, and every process it starts,
# uses the same setting, so results compared bit for bit still are.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from typing import NamedTuple

from fedpeft_jax.federated import algorithms
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import round as round_lib
from fedpeft_jax.federated.algorithms import fedprox
from fedpeft_jax.federated.algorithms import scaffold as scaffold_lib


REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
TI4_CHECKPOINT = SHARED / 'backbones' / 'vit_ti4_cifar10.npz'
PCAM = SHARED / 'data' / 'pcam32_jpeg.tar.gz'
CIFAR10 = SHARED / 'data' / 'cifar10_jpeg.tar.gz'
TINY = 'experiments/synthetic_tiny.py:bias'


@pytest.fixture
def optimized_xla():
  """Full XLA optimisation for a test that computes more than it compiles (see above)."""
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', True)


# The same for a launch a test starts.
OPTIMIZED_XLA_ENV = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='0')


def needs(path: pathlib.Path):
  return pytest.mark.skipif(not path.exists(), reason=f'{path} (../shared) is not here')


def tiny_config(arg: str = 'bias'):
  """experiments/synthetic_tiny.py: a synthetic-data run with the test-size ViT."""
  spec = importlib.util.spec_from_file_location('synthetic_tiny',
                                                REPO / 'experiments' / 'synthetic_tiny.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def launch(workdir, *flags, config: str = TINY, wait: bool = True, cwd=REPO):
  """`python launch.py --config=CONFIG --workdir=WORKDIR FLAGS...`, run from `cwd`."""
  command = [sys.executable, str(REPO / 'launch.py'), f'--config={config}',
             f'--workdir={workdir}', *flags]
  if wait:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)
  return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


LINEAR_DIM, LINEAR_CLASSES = 6, 3


def linear_loss_fn(trainable, frozen, batch, rng):
  """A linear model on frozen random features, with augmentation noise from rng."""
  x = batch['x'] @ frozen['proj'] + 0.01 * jax.random.normal(
      rng, batch['x'].shape[:1] + (LINEAR_DIM,))
  logits = x @ trainable['w'] + trainable['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])


def linear_problem(sizes=(5, 17, 9, 30, 12, 3)):
  """(dataset, client example ids, trainable, frozen) of uneven clients."""
  rng = np.random.default_rng(0)
  n = sum(sizes)
  dataset = {'x': jnp.asarray(rng.normal(size=(n, LINEAR_DIM)), jnp.float32),
             'y': jnp.asarray(rng.integers(0, LINEAR_CLASSES, n), jnp.int32)}
  bounds = np.cumsum((0,) + sizes)
  parts = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
  trainable = {'w': jnp.asarray(rng.normal(size=(LINEAR_DIM, LINEAR_CLASSES)),
                                jnp.float32) * 0.1,
               'b': jnp.zeros(LINEAR_CLASSES)}
  frozen = {'proj': jnp.asarray(rng.normal(size=(LINEAR_DIM, LINEAR_DIM)), jnp.float32)}
  return dataset, parts, trainable, frozen


class Scaffold(NamedTuple):
  local_learning_rate: float


def fedavg_round(loss_fn, client_optimizer, *, num_epochs, batch_size, max_examples,
                 clients_per_round, num_clients, client_chunk=None, sampling='fixed',
                 dropout_prob=0.0, aggregator=None, server_optimizer=None, sample_dp=None,
                 mesh=None, schedule='packed', prox_mu=0.0, scaffold=None, algorithm=None):
  """`round.make_round` in the tests' flat keywords: FedAvg, or SCAFFOLD with `scaffold`,
  or any `algorithm`, with FedProx's term when `prox_mu` > 0."""
  if algorithm is None:
    algorithm = (algorithms.Algorithm() if scaffold is None
                 else scaffold_lib.scaffold(scaffold.local_learning_rate))
  return round_lib.make_round(
      loss_fn, client_optimizer,
      client_lib.LocalSpec(num_epochs, batch_size, max_examples, sample_dp),
      round_lib.Cohort(clients_per_round, num_clients, sampling, dropout_prob),
      algorithm=fedprox.with_proximal_term(algorithm, prox_mu), aggregator=aggregator,
      server_optimizer=server_optimizer,
      execution=round_lib.Execution(schedule, client_chunk, mesh))


# Tests that launch `launch.py` (or a benchmark, or another process) are the CLI group,
# marked `cli`: `pytest -m cli tests` runs them alone, `pytest -m 'not cli' tests` the unit
# tests in a few minutes. Whole files of them, and any test that starts a process:
CLI_MODULES = ('test_launch', 'test_sweep', 'test_multihost', 'test_benchmark')
LONG_MODULES = ('test_round_reference',)


def _starts_a_process(item) -> bool:
  if item.module.__name__.rsplit('.', 1)[-1] in CLI_MODULES:
    return True
  try:
    source = inspect.getsource(item.function)
  except (OSError, TypeError, AttributeError):
    return False
  return any(call in source for call in ('launch(', 'subprocess.', 'launch_', '_launch('))


def pytest_configure(config):
  config.addinivalue_line('markers', 'cli: starts launch.py or another process (the CLI group)')


def pytest_collection_modifyitems(config, items):
  for item in items:
    if _starts_a_process(item):
      item.add_marker(pytest.mark.cli)
  # The CLI group and the pinned rounds first: they are the longest, and started first
  # they finish while the other worker runs the many short unit tests (the same order on
  # every worker).
  items.sort(key=lambda item: item.get_closest_marker('cli') is None and
             item.module.__name__.rsplit('.', 1)[-1] not in LONG_MODULES)
