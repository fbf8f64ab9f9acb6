r"""Training throughput of a federated round: clients vmapped vs. looped in Python.

A simulation's speed is bounded by how many images per second a round's
clients train. This compares the library's round (`round.make_round`, clients
vmapped in one jitted function) with what a sequential simulator does (one
jitted client update called per client, deltas averaged after), on synthetic
uint8 images and randomly initialised weights: no data or checkpoint needed.

  python benchmarks/client_throughput.py
  python benchmarks/client_throughput.py --model=vit_b16 --image_size=224 \
      --clients=8 --batch=32 --steps=4 --method=bias,adapter,prompt,lora,full

Prints one JSON line per (method, impl); benchmarks/README.md explains the keys.
Peak memory is a high-water mark of the whole process, so with more than one
(method, impl) each is measured in a child process of its own.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from fedpeft_jax import configs
from fedpeft_jax import peft
from fedpeft_jax.experiment import build
from fedpeft_jax.tasks import image_classification
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import round as round_lib
from fedpeft_jax.federated import types
from fedpeft_jax.model import vit

IMPLS = ('vmap', 'loop', 'cached_head')

_MODEL = flags.DEFINE_enum('model', 'vit_test', list(vit.SIZES), 'Backbone size.')
_METHOD = flags.DEFINE_list(
    'method', ['bias'], "PEFT method(s) to sweep, e.g. 'bias,lora,full' or 'bias+lora'.")
_IMPL = flags.DEFINE_list('impl', ['vmap', 'loop'],
                          f'Round implementation(s) among {IMPLS}; cached_head runs for '
                          'method head only.')
_CLIENTS = flags.DEFINE_integer('clients', 8, 'Clients per round.', lower_bound=1)
_BATCH = flags.DEFINE_integer('batch', 16, 'Local batch size.', lower_bound=1)
_STEPS = flags.DEFINE_integer('steps', 4, 'Local steps per client and round.',
                              lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', None, "Input side in pixels; default: the model's native size.")
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16'],
                           'Compute dtype; default: bfloat16 on GPU/TPU, float32 on CPU.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Timed rounds after the warm-up round.',
                               lower_bound=1)
_ATTENTION = flags.DEFINE_enum('attention', '', ['', 'xla', 'cudnn'],
                               "model.attention: '' (XLA) or 'cudnn' (fused, padded).")
_FROZEN_DTYPE = flags.DEFINE_string('frozen_dtype', '',
                                    "model.frozen_dtype, e.g. 'bfloat16'; '': float32.")
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 100, 'Classifier outputs.',
                                    lower_bound=1)
_PEAK_FLOPS = flags.DEFINE_float(
    'peak_flops', None, 'FLOP/s that mfu is relative to; default: measured with a '
    'square matmul in --dtype.')
flags.register_validator('impl', lambda impls: bool(impls) and set(impls) <= set(IMPLS),
                         f'--impl: a comma-separated list of {IMPLS}')


def _significant(x: float, digits: int = 4) -> float:
  return float(f'{x:.{digits}g}')


def _flops(lowered) -> float | None:
  """XLA's flop count; `cost_analysis()` is a dict or a list of dicts by JAX version."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return (cost or {}).get('flops') or None


def measure_peak_flops(dtype) -> float:
  """Best FLOP/s of a square matmul in `dtype`: what the device really sustains."""
  n, reps = (1024, 10) if jax.default_backend() == 'cpu' else (4096, 100)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, a).block_until_ready()
  best = float('inf')
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(reps):
      out = matmul(a, a)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / reps)
  return 2 * n**3 / best


def peak_memory() -> tuple[int, str]:
  """The device allocator's high-water mark, else (CPU) the process's peak RSS."""
  stats = jax.devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'host_rss'


def time_rounds(run_round, carry, rounds: int) -> tuple[float, list[float]]:
  """Seconds of the warm-up round (compilation included) and of each timed round."""
  times = []
  for _ in range(rounds + 1):
    start = time.perf_counter()
    carry = jax.block_until_ready(run_round(carry))
    times.append(time.perf_counter() - start)
  return times[0], times[1:]


def vmap_round(loss_fn, optimizer, trainable, frozen, dataset, table, batch, rng):
  """The library's round: all clients vmapped in one jitted call."""
  clients = table.num_clients
  algorithm = round_lib.make_round(loss_fn, optimizer,
                                  client_lib.LocalSpec(1, batch, table.max_examples),
                                  round_lib.Cohort(clients, clients))
  round_fn = jax.jit(algorithm.apply, donate_argnums=0)
  run_round = lambda state: round_fn(state, frozen, dataset, table)[0]
  return run_round, algorithm.init(trainable, rng)


def loop_round(loss_fn, optimizer, trainable, frozen, dataset, table, batch, rng):
  """A sequential simulator's round: one jitted client update called per client."""
  clients = table.num_clients
  update = jax.jit(client_lib.make_client_update(
      loss_fn, optimizer, num_epochs=1, batch_size=batch, max_examples=table.max_examples))
  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
  # Equal client sizes: the example-weighted mean of FedAvg is the plain mean.
  apply_mean = jax.jit(lambda params, total: jax.tree.map(
      lambda p, d: p + d / clients, params, total))
  client_ids, client_counts = list(table.example_ids), list(table.num_examples)

  def run_round(carry):
    params, rng = carry
    rng, round_rng = jax.random.split(rng)
    total = None
    for ids, count, client_rng in zip(client_ids, client_counts,
                                      jax.random.split(round_rng, clients)):
      delta = update(params, frozen, dataset, ids, count, client_rng).delta
      total = delta if total is None else add(total, delta)
    return apply_mean(params, total), rng

  return run_round, (trainable, rng)


def measure(method: str, impl: str, peak_flops: float | None) -> dict:
  """Times `--rounds` rounds of `method` run by `impl`; returns the JSON record."""
  clients, batch, steps = _CLIENTS.value, _BATCH.value, _STEPS.value
  image_size = _IMAGE_SIZE.value or vit.SIZES[_MODEL.value].image_size
  dtype = _DTYPE.value or ('float32' if jax.default_backend() == 'cpu' else 'bfloat16')
  config = configs.base_config(method)
  config.model.name = _MODEL.value
  config.model.image_size = image_size
  config.model.dtype = dtype
  config.data.num_classes = _NUM_CLASSES.value
  config.model.attention = _ATTENTION.value

  model = build.build_model(config)
  params = build.init_params(config, model, jax.random.key(0))
  trainable, frozen = peft.split(params, peft.labels(method, params))
  del params  # The frozen tree is the only copy of the backbone, as in training.
  if _FROZEN_DTYPE.value:
    frozen = jax.tree.map(lambda x: x.astype(_FROZEN_DTYPE.value), frozen)
  image_rng, label_rng, run_rng = jax.random.split(jax.random.key(1), 3)
  per_client = steps * batch  # One local epoch of exactly `steps` steps.
  num_images = clients * per_client
  dataset = {
      'image': jax.random.bits(image_rng, (num_images, image_size, image_size, 3),
                               jnp.uint8),
      'label': jax.random.randint(label_rng, (num_images,), 0, _NUM_CLASSES.value)}
  table = types.ClientTable.from_partition(np.split(np.arange(num_images), clients))
  loss_fn = image_classification.make_loss_fn(model, image_size)
  feature_seconds = None
  if impl == 'cached_head':  # Training's default for method=head: the backbone runs once.
    start = time.perf_counter()
    features = jax.block_until_ready(image_classification.head_features(
        model, frozen, dataset['image'], image_size, batch_size=256))
    feature_seconds = time.perf_counter() - start
    dataset, loss_fn = {'feature': features, 'label': dataset['label']}, image_classification.head_loss_fn
  o = config.optim
  optimizer = client_lib.sgd(o.lr, o.momentum, o.weight_decay, o.nesterov)

  # XLA counts a loop body once whatever its trip count, so the flops of the
  # round (a scan over steps) are those of one step: count one step, multiply.
  one_step = client_lib.make_client_update(loss_fn, optimizer, num_epochs=1,
                                           batch_size=batch, max_examples=batch)
  step_flops = _flops(jax.jit(one_step).lower(
      trainable, frozen, dataset, table.example_ids[0, :batch], jnp.int32(batch), run_rng))

  make_round = loop_round if impl == 'loop' else vmap_round
  run_round, carry = make_round(loss_fn, optimizer, trainable, frozen, dataset, table,
                                batch, run_rng)
  compile_seconds, times = time_rounds(run_round, carry, _ROUNDS.value)
  memory, memory_source = peak_memory()  # Before the matmul can add to it.
  peak_flops = peak_flops or measure_peak_flops(jnp.dtype(dtype))
  seconds = statistics.median(times)
  record = {
      'model': _MODEL.value, 'method': method, 'impl': impl, 'clients': clients,
      'batch': batch, 'local_steps': steps, 'image_size': image_size, 'dtype': dtype,
      'images_per_second': _significant(num_images / seconds),
      'mfu': None, 'flops_per_round': None,
      'peak_flops_per_second': _significant(peak_flops),
      'peak_memory_bytes': memory, 'memory_source': memory_source,
      'compile_seconds': _significant(compile_seconds),
      'seconds_per_round': _significant(seconds),
      'seconds_per_round_mean': _significant(statistics.mean(times)),
      'device': jax.devices()[0].device_kind}
  if feature_seconds is not None:
    record['feature_seconds'] = _significant(feature_seconds)
  if step_flops:
    flops = step_flops * steps * clients
    record.update(flops_per_round=_significant(flops),
                  mfu=_significant(flops / seconds / peak_flops))
  else:
    record['note'] = 'mfu unknown: XLA cost analysis reported no flops for a local step'
  return record


def run_isolated(runs: list[tuple[str, str]]):
  """Measures each run in a child process; all use the first one's peak FLOP/s."""
  peak_flops, failed = _PEAK_FLOPS.value, []
  for method, impl in runs:
    args = [f'--method={method}', f'--impl={impl}']
    if peak_flops:
      args.append(f'--peak_flops={peak_flops!r}')
    child = subprocess.run([sys.executable, __file__, *sys.argv[1:], *args],
                           stdout=subprocess.PIPE, text=True, check=False)
    for line in child.stdout.splitlines():
      print(line, flush=True)
      if line.startswith('{'):
        peak_flops = peak_flops or json.loads(line)['peak_flops_per_second']
    if child.returncode:
      failed.append(f'{method}/{impl} (exit status {child.returncode})')
  if failed:
    sys.exit(f'failed: {", ".join(failed)}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    for method in _METHOD.value:
      peft.parse_method(method)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  runs = [(method, impl) for method in _METHOD.value for impl in _IMPL.value
          if impl != 'cached_head' or method == 'head']
  if len(runs) > 1:
    run_isolated(runs)
  else:
    print(json.dumps(measure(*runs[0], _PEAK_FLOPS.value)), flush=True)


if __name__ == '__main__':
  app.run(main)
