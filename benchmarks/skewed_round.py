r"""What a round computes when clients are uneven: the padded and the packed schedule.

Client sizes come from the Dirichlet splits of real datasets, reproduced with
`fedpeft_jax.data.partition` on synthetic labels of the datasets' class counts
and sizes (images are synthetic uint8, weights random). Both schedules run in
one process on the same cohorts; each prints one JSON line: the examples that
were real, those computed (padding included), their ratio, seconds per round
and the speed-up over the padded schedule.

  python benchmarks/skewed_round.py --split=pcam_dir05 --model=vit_ti4
  python benchmarks/skewed_round.py --mode=many_clients

`--mode=many_clients`: a federation of 1,000 clients of 32 examples, one local
step each; a round of all of them and one of 64, through the same 64 lanes:
clients per second, compilations and XLA's memory analysis of each round.
benchmarks/README.md explains the keys.
"""
from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from fedpeft_jax import configs
from fedpeft_jax import peft
from fedpeft_jax.data import partition
from fedpeft_jax.experiment import build
from fedpeft_jax.federated import schedules
from fedpeft_jax.federated import types
from fedpeft_jax.model import vit
from fedpeft_jax.tasks import image_classification

# name: (training examples, classes, Dirichlet alpha).
SPLITS = {'pcam_dir05': (20_000, 2, 0.5), 'resisc45_dir01': (25_200, 45, 0.1),
          'cifar100_dir01': (50_000, 100, 0.1)}
CLIENT_SIZE_MANY = 32  # --mode=many_clients: examples per client, one local step.

_MODE = flags.DEFINE_enum('mode', 'skewed', ['skewed', 'many_clients'], 'What to measure.')
_SPLIT = flags.DEFINE_enum('split', 'pcam_dir05', list(SPLITS), 'Whose client sizes.')
_MODEL = flags.DEFINE_enum('model', 'vit_test', list(vit.SIZES), 'Backbone size.')
_METHOD = flags.DEFINE_string('method', 'bias', 'PEFT method.')
_SCHEDULES = flags.DEFINE_list('schedules', ['padded', 'packed'],
                               f'fl.schedule values to compare, among {schedules.SCHEDULES}.')
_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 64, 'Clients of the split.', lower_bound=1)
_CLIENTS_PER_ROUND = flags.DEFINE_integer('clients_per_round', 8, 'Cohort size.',
                                          lower_bound=1)
_LANES = flags.DEFINE_integer('lanes', 0, 'fl.client_chunk: clients training at once; 0: '
                              'the cohort (skewed), --baseline (many_clients).', lower_bound=0)
_BATCH = flags.DEFINE_integer('batch', 32, 'Local batch size (skewed).', lower_bound=1)
_EPOCHS = flags.DEFINE_integer('epochs', 1, 'Local epochs (skewed).', lower_bound=1)
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Timed rounds of each schedule.', lower_bound=1)
_STORAGE_SIZE = flags.DEFINE_integer('storage_size', 32, 'Side of the stored images; the '
                                     'round resizes them to the model.', lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'Partition and run seed.')
_MANY = flags.DEFINE_integer('many', 1000, 'many_clients: the federation, all in one round.',
                             lower_bound=1)
_BASELINE = flags.DEFINE_integer('baseline', 64, 'many_clients: the round it is compared with.',
                                 lower_bound=1)
flags.register_validator('schedules', lambda s: bool(s) and set(s) <= set(schedules.SCHEDULES),
                         f'--schedules: a comma-separated list of {schedules.SCHEDULES}')

_compiled: list[str] = []  # The name of every function XLA compiled, in order.


def _count_compilations(event: str, seconds: float, fun_name: str = '', **_):
  if event == '/jax/core/compile/backend_compile_duration':
    _compiled.append(fun_name)


def _significant(x: float, digits: int = 4) -> float:
  return float(f'{x:.{digits}g}')


def split_clients(name: str, num_clients: int, seed: int) -> list[np.ndarray]:
  """The clients' example ids of split `name`, on labels with its classes and size."""
  examples, classes, alpha = SPLITS[name]
  labels = np.arange(examples) % classes
  return partition.partition(labels, method='dirichlet', num_clients=num_clients, seed=seed,
                             alpha=alpha, min_size=10)


class Federation:
  """Model, weights and synthetic data for `client_indices`, built once for every round."""

  def __init__(self, client_indices, num_classes: int, batch: int, epochs: int):
    config = configs.base_config(_METHOD.value)
    config.model.name = _MODEL.value
    config.model.image_size = vit.SIZES[_MODEL.value].image_size
    config.model.dtype = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
    config.data.num_classes = num_classes
    config.fl.num_clients = len(client_indices)
    config.fl.batch_size, config.fl.local_epochs = batch, epochs
    config.seed = _SEED.value
    self.config = config
    self.model = build.build_model(config)
    params = build.init_params(config, self.model, jax.random.key(0))
    self.trainable, self.frozen = peft.split(params, peft.labels(_METHOD.value, params))
    num_images = sum(len(ids) for ids in client_indices)
    image_rng, label_rng = jax.random.split(jax.random.key(1))
    side = _STORAGE_SIZE.value
    self.dataset = {
        'image': jax.random.bits(image_rng, (num_images, side, side, 3), jnp.uint8),
        'label': jax.random.randint(label_rng, (num_images,), 0, num_classes)}
    self.table = types.ClientTable.from_partition(client_indices)



class ScheduledRound:
  """A round of `federation` under one schedule, compiled once, and what its runs did."""

  def __init__(self, federation: Federation, schedule: str, clients_per_round: int,
               lanes: int):
    config = federation.config
    fl = config.fl
    fl.schedule, fl.clients_per_round, fl.client_chunk = schedule, clients_per_round, lanes
    loss_fn = image_classification.make_loss_fn(federation.model, config.model.image_size)
    algorithm = build.build_algorithm(config, loss_fn, federation.table.max_examples, None)
    # A copy: the round donates its state, and every schedule starts from these weights.
    self.state = algorithm.init(jax.tree.map(jnp.copy, federation.trainable),
                                jax.random.key(config.seed))
    self.args = (federation.frozen, federation.dataset, federation.table)
    self.setting = {'schedule': schedule, 'model': _MODEL.value, 'method': _METHOD.value,
                   'clients_per_round': clients_per_round, 'lanes': lanes,
                   'batch': fl.batch_size, 'local_epochs': fl.local_epochs}
    self.compilations = _compiled.count('jit(apply)')
    start = time.perf_counter()
    self.compiled = jax.jit(algorithm.apply, donate_argnums=0).lower(
        self.state, *self.args).compile()
    self.compile_seconds = time.perf_counter() - start
    self.compilations = _compiled.count('jit(apply)') - self.compilations
    self.times, self.real, self.computed = [], 0, 0

  def run(self):
    before = _compiled.count('jit(apply)')
    start = time.perf_counter()
    self.state, metrics = jax.block_until_ready(self.compiled(self.state, *self.args))
    self.times.append(time.perf_counter() - start)
    self.compilations += _compiled.count('jit(apply)') - before
    self.real += int(metrics.examples_trained)
    self.computed += int(metrics.examples_computed)

  def result(self) -> dict:
    seconds = float(np.mean(self.times))
    memory = self.compiled.memory_analysis()
    return {
        **self.setting, 'rounds': len(self.times), 'examples_real': self.real,
        'examples_computed': self.computed,
        'real_share': _significant(self.real / self.computed),
        'seconds_per_round': _significant(seconds),
        'clients_per_second': _significant(self.setting['clients_per_round'] / seconds),
        'compile_seconds': _significant(self.compile_seconds),
        'compilations': self.compilations,
        # What the compiled round holds at its peak: inputs, outputs and temporaries.
        'peak_memory_bytes': int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                 - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
        'temp_memory_bytes': int(memory.temp_size_in_bytes),
        'device': jax.devices()[0].device_kind}


def run_interleaved(rounds: list[ScheduledRound]) -> list[dict]:
  """`--rounds` runs of each, taking turns so that all see the same load on a shared
  machine."""
  for _ in range(_ROUNDS.value):
    for scheduled in rounds:
      scheduled.run()
  return [scheduled.result() for scheduled in rounds]


def skewed() -> list[dict]:
  client_indices = split_clients(_SPLIT.value, _NUM_CLIENTS.value, _SEED.value)
  sizes = [len(ids) for ids in client_indices]
  federation = Federation(client_indices, SPLITS[_SPLIT.value][1], _BATCH.value,
                          _EPOCHS.value)
  cohort = _CLIENTS_PER_ROUND.value
  records = run_interleaved([ScheduledRound(federation, s, cohort, _LANES.value or cohort)
                             for s in _SCHEDULES.value])
  padded = [r['seconds_per_round'] for r in records if r['schedule'] == 'padded']
  for r in records:
    r.update(mode='skewed', split=_SPLIT.value,
             client_sizes=f'{min(sizes)}/{np.mean(sizes):.0f}/{max(sizes)}',
             speedup=_significant(padded[0] / r['seconds_per_round']) if padded else None)
  return records


def many_clients() -> list[dict]:
  """A round of every one of `--many` clients, and one of `--baseline` of them, through
  the same lanes."""
  ids = np.arange(_MANY.value * CLIENT_SIZE_MANY).reshape(_MANY.value, -1)
  federation = Federation(list(ids), 10, batch=CLIENT_SIZE_MANY, epochs=1)
  lanes = _LANES.value or _BASELINE.value
  records = run_interleaved([ScheduledRound(federation, s, clients, lanes)
                             for s in _SCHEDULES.value
                             for clients in (_BASELINE.value, _MANY.value)])
  for baseline, large in zip(records[::2], records[1::2]):
    for r in (baseline, large):
      r.update(mode='many_clients', memory_vs_baseline=_significant(
          r['peak_memory_bytes'] / baseline['peak_memory_bytes']))
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  jax.monitoring.register_event_duration_secs_listener(_count_compilations)
  for record in skewed() if _MODE.value == 'skewed' else many_clients():
    print(json.dumps(record), flush=True)


if __name__ == '__main__':
  app.run(main)
