"""The experiment loop: build model and data from a config, run rounds, log metrics."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from fedpeft_jax import peft
from fedpeft_jax import resume
from fedpeft_jax import validation
from fedpeft_jax.data import partition as partition_lib
from fedpeft_jax.data import preprocess
from fedpeft_jax.data import sources
from fedpeft_jax.federated import aggregators
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import fedavg
from fedpeft_jax.model import checkpoint as checkpoint_lib
from fedpeft_jax.model import vit
from fedpeft_jax.privacy import accounting

BYTES_PER_PARAM = 4  # Trainable parameters travel as float32.


def build_model(config, method: str | None = None) -> vit.VisionTransformer:
  p = config.peft
  modules = peft.modules_for(
      method or p.method, adapter_reduction=p.adapter_reduction,
      adapter_shared=p.adapter_shared, prompt_tokens=p.prompt_tokens,
      prompt_deep=p.prompt_deep, lora_rank=p.lora_rank, lora_alpha=p.lora_alpha)
  return vit.VisionTransformer(
      vit.SIZES[config.model.name], config.data.num_classes, modules,
      representation_size=config.model.representation_size,
      dtype=jnp.dtype(config.model.dtype), attention=config.model.attention or None)


def _dummy_images(config):
  return jnp.zeros((1, config.model.image_size, config.model.image_size, 3), jnp.float32)


def abstract_params(config, model):
  return jax.eval_shape(model.init, jax.random.key(0), _dummy_images(config))['params']


def init_params(config, model, rng):
  params = jax.jit(model.init)(rng, _dummy_images(config))['params']
  if config.model.checkpoint:
    params = checkpoint_lib.load_pretrained(config.model.checkpoint, params)
  return params


def mask_report(config) -> dict:
  """Trainable counts and bytes per transfer of every method on the configured model."""
  report = {}
  for method in peft.METHODS:
    params = abstract_params(config, build_model(config, method))
    trainable, _ = peft.split(params, peft.labels(method, params))
    n = peft.count(trainable)
    report[method] = {'trainable': n, 'total': peft.count(params),
                      'bytes_per_transfer': n * BYTES_PER_PARAM,
                      'trainable_paths': peft.paths(trainable)}
  return report


def write_mask_report(config, workdir: str) -> dict:
  report = mask_report(config)
  print(f"{'method':<10}{'trainable':>14}{'% of total':>12}{'bytes/transfer':>18}")
  for method, r in report.items():
    print(f"{method:<10}{r['trainable']:>14,}{100 * r['trainable'] / r['total']:>11.3f}%"
          f"{r['bytes_per_transfer']:>18,}")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'masks.json'), 'w') as f:
    json.dump(report, f, indent=1)
  return report


def load_data(config, split: str) -> sources.Dataset:
  d = config.data
  synthetic = d.source == 'synthetic'
  num_examples = d.num_train_examples if split == d.train_split else d.num_test_examples
  # Synthetic images are made at the model's size unless told otherwise.
  image_size = d.storage_size or (config.model.image_size if synthetic else None)
  return sources.load(
      d.source, name=d.name, path=d.path, split=split, image_size=image_size,
      data_dir=d.data_dir, download=d.download, num_classes=d.num_classes,
      num_examples=num_examples if synthetic else None, seed=config.seed)


def make_loss_fn(model, image_size: int):
  def loss_fn(trainable, frozen, batch, rng):
    images = preprocess.train_images(rng, batch['image'], image_size)
    logits = model.apply({'params': peft.merge(trainable, frozen)}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  return loss_fn


def head_features(model, frozen, images: np.ndarray, image_size: int, batch_size: int):
  """The frozen backbone's output for every example, computed once.

  Head tuning never changes the backbone, so caching its features turns each
  local step into a linear layer. The cost: no per-step augmentation.
  """
  featurize = jax.jit(lambda x: model.clone(features_only=True).apply(
      {'params': frozen}, preprocess.eval_images(x, image_size)))
  return jnp.concatenate([featurize(images[i:i + batch_size])
                          for i in range(0, len(images), batch_size)])


def head_loss_fn(trainable, frozen, batch, rng):
  """The classifier head on cached features (see `head_features`)."""
  head = trainable['head']
  logits = batch['feature'] @ head['kernel'] + head['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])


def make_evaluate(model, image_size: int, batch_size: int):
  """A jitted `evaluate(trainable, frozen, images, labels) -> accuracy`.

  The test set is padded to whole batches on the host once and scanned on
  device, so evaluation compiles once and never leaves the accelerator.
  """
  @jax.jit
  def evaluate(trainable, frozen, images, labels):
    params = peft.merge(trainable, frozen)

    def correct(batch):
      x, y = batch
      logits = model.apply({'params': params}, preprocess.eval_images(x, image_size))
      return jnp.sum((jnp.argmax(logits, -1) == y) & (y >= 0))

    hits = jax.lax.map(correct, (images.reshape((-1, batch_size) + images.shape[1:]),
                                 labels.reshape(-1, batch_size)))
    return hits.sum() / jnp.sum(labels >= 0)

  def pad(dataset: sources.Dataset):
    """Pads to whole batches; padded labels are -1 and never count."""
    extra = -len(dataset) % batch_size
    images = np.concatenate([dataset.images, np.zeros((extra,) + dataset.images.shape[1:],
                                                      np.uint8)])
    labels = np.concatenate([dataset.labels, -np.ones(extra, np.int32)])
    return jnp.asarray(images), jnp.asarray(labels)

  return evaluate, pad


def tree_sha256(tree) -> str:
  digest = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(tree, sep='/').items()):
    digest.update(path.encode())
    digest.update(np.asarray(leaf).tobytes())
  return digest.hexdigest()


def privacy_spec(config, client_sizes=()) -> accounting.PrivacySpec | None:
  """The run's privacy mechanism, its noise calibrated if a target epsilon is set."""
  dp, fl = config.dp, config.fl
  if dp.mode == 'none':
    return None
  spec = accounting.PrivacySpec(
      mode=dp.mode, noise_multiplier=dp.noise_multiplier, delta=dp.delta, rounds=fl.rounds,
      accountant=dp.accountant, sampling=dp.sampling, num_clients=fl.num_clients,
      clients_per_round=fl.clients_per_round, client_sizes=tuple(client_sizes),
      batch_size=fl.batch_size, local_epochs=fl.local_epochs)
  if dp.target_epsilon is not None:
    spec = dataclasses.replace(
        spec, noise_multiplier=accounting.calibrate_noise(spec, dp.target_epsilon))
  return spec


def privacy_report(spec: accounting.PrivacySpec) -> dict:
  return {'epsilon': accounting.epsilon(spec), 'delta': spec.delta,
          'noise_multiplier': spec.noise_multiplier, 'sampling_rate': spec.sampling_rate,
          'rounds': spec.rounds,
          'accountant': accounting.accountant_name(spec), 'mode': spec.mode,
          'sampling': spec.sampling if spec.mode == 'client' else 'without_replacement'}


def client_mesh(config) -> jax.sharding.Mesh | None:
  """All devices (of all hosts) along one 'clients' axis, if there is more than one."""
  if not config.fl.shard_clients or jax.device_count() == 1:
    return None
  return jax.sharding.Mesh(np.array(jax.devices()), ('clients',))


def build_algorithm(config, model, max_examples: int, privacy: accounting.PrivacySpec | None,
                    loss_fn=None, client_chunk: int | None = None) -> fedavg.FederatedAlgorithm:
  fl, o, dp = config.fl, config.optim, config.dp
  aggregator = aggregators.weighted_mean(by_examples=fl.aggregation == 'weighted')
  sample_dp, sampling = None, 'fixed'
  if dp.mode == 'client':
    sampling = dp.sampling
    aggregator = aggregators.dp_fedavg(
        clip_norm=dp.clip_norm, noise_multiplier=privacy.noise_multiplier,
        expected_clients=fl.clients_per_round, adaptive=dp.adaptive_clip,
        target_quantile=dp.target_quantile, clip_learning_rate=dp.clip_lr,
        clipped_count_stddev=validation.clipped_count_stddev(config))
  elif dp.mode == 'sample':
    sample_dp = client_lib.SampleDP(dp.clip_norm, privacy.noise_multiplier)
  return fedavg.fedavg(
      loss_fn or make_loss_fn(model, config.model.image_size),
      client_lib.sgd(o.lr, o.momentum, o.weight_decay, o.nesterov),
      num_epochs=fl.local_epochs, batch_size=fl.batch_size, max_examples=max_examples,
      clients_per_round=fl.clients_per_round, num_clients=fl.num_clients,
      client_chunk=client_chunk or fl.client_chunk or None, sampling=sampling,
      dropout_prob=fl.dropout_prob, aggregator=aggregator, server_optimizer=optax.sgd(fl.server_lr), sample_dp=sample_dp,
      mesh=client_mesh(config))


def load_partition(config) -> tuple[sources.Dataset, list[np.ndarray]]:
  train_set = load_data(config, config.data.train_split)
  client_indices = partition_lib.partition(
      train_set.labels, method=config.data.partition, num_clients=config.fl.num_clients,
      seed=config.seed, alpha=config.data.alpha, min_size=config.data.min_client_size)
  return train_set, client_indices


def write_privacy_report(config, workdir: str) -> dict:
  """What epsilon the configured run will deliver, without training."""
  sizes = ()
  if config.dp.mode == 'sample':  # The guarantee depends on every client's size.
    sizes = [len(ids) for ids in load_partition(config)[1]]
  spec = privacy_spec(config, sizes)
  if spec is None:
    raise validation.ConfigError('dp.mode', config.dp.mode,
                                 "--mode=privacy needs dp.mode='client' or 'sample'")
  report = privacy_report(spec)
  for key, value in report.items():
    print(f'{key:>17}: {value}')
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'privacy.json'), 'w') as f:
    json.dump(report, f, indent=1)
  return report


class TrainingError(RuntimeError):
  """The run cannot go on; the last good checkpoint is intact."""


def auto_client_chunk(config, build, state, args) -> int | None:
  """fl.client_chunk=0 on an accelerator: as many clients at once as memory allows.

  Compiles the round with one client in flight and reads XLA's memory analysis:
  its temporaries bound one client's activations, gradients and optimizer state.
  Hosts without memory statistics (CPUs) run every client at once.
  """
  stats = jax.local_devices()[0].memory_stats()
  if config.fl.client_chunk or not stats or 'bytes_limit' not in stats:
    return None
  mesh = client_mesh(config)
  devices = mesh.size if mesh is not None else 1
  analysis = jax.jit(build(devices).apply).lower(state, *args).compile().memory_analysis()
  per_client = analysis.temp_size_in_bytes / devices
  capacity = (config.fl.num_clients if config.dp.mode == 'client' and
              config.dp.sampling == 'poisson' else config.fl.clients_per_round)
  available = 0.8 * (stats['bytes_limit'] - analysis.argument_size_in_bytes)
  chunk = fedavg.chunk_for_memory(capacity, int(per_client), int(available * devices),
                                  devices)
  logging.info('fl.client_chunk=0: %d clients at once (%.2f GiB each, %.1f GiB free)',
               chunk, per_client / 2**30, available / 2**30)
  return chunk


def train(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) `config.fl.rounds` rounds; returns the evaluated rounds' metrics."""
  os.makedirs(workdir, exist_ok=True)
  init_rng, run_rng = jax.random.split(jax.random.key(config.seed))

  train_set, client_indices = load_partition(config)
  test_set = load_data(config, config.data.test_split)
  privacy = privacy_spec(config, [len(ids) for ids in client_indices])
  table = fedavg.ClientTable.from_partition(client_indices)
  dataset = {'image': jnp.asarray(train_set.images), 'label': jnp.asarray(train_set.labels)}

  model = build_model(config)
  params = init_params(config, model, init_rng)
  trainable, frozen = peft.split(params, peft.labels(config.peft.method, params))
  del params  # The frozen tree is the only copy of the backbone.
  num_trainable = peft.count(trainable)
  logging.info('%s: %d trainable of %d parameters, %d clients, max %d examples each',
               config.peft.method, num_trainable, num_trainable + peft.count(frozen),
               table.num_clients, table.max_examples)

  if config.model.frozen_dtype:  # Halves backbone memory and traffic to the MXU/tensor cores.
    frozen = jax.tree.map(lambda x: x.astype(config.model.frozen_dtype), frozen)
  loss_fn = None
  if config.peft.method == 'head' and config.peft.cache_head_features:
    dataset = {'feature': head_features(model, frozen, train_set.images,
                                        config.model.image_size, config.eval.batch_size),
               'label': dataset['label']}
    loss_fn = head_loss_fn
  build = lambda chunk: build_algorithm(config, model, table.max_examples, privacy, loss_fn,
                                       chunk)
  algorithm = build(None)
  state = algorithm.init(trainable, run_rng)
  chunk = auto_client_chunk(config, build, state, (frozen, dataset, table))
  if chunk:
    algorithm = build(chunk)
  round_fn = jax.jit(algorithm.apply, donate_argnums=0)
  evaluate, pad = make_evaluate(model, config.model.image_size, config.eval.batch_size)
  test_images, test_labels = pad(test_set)

  history, bytes_cumulative, wall_offset = [], 0, 0.0
  checkpointer = resume.RunCheckpointer(workdir, config.checkpoint.keep)
  restored = checkpointer.restore(state, config, config.checkpoint.force)
  if restored is not None:
    state, meta = restored
    history, bytes_cumulative, wall_offset = (meta['history'], meta['bytes_cumulative'],
                                              meta['wall_s'])
    print(f'resuming from round {int(state.round)} of {workdir}', flush=True)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  # Rounds logged after the last checkpoint are run again: drop their lines.
  with open(metrics_path, 'w') as log:
    log.writelines(json.dumps(r) + '\n' for r in history)

  def save():
    checkpointer.save(state, {'history': history, 'bytes_cumulative': bytes_cumulative,
                              'wall_s': wall_offset + time.time() - start}, config)

  start, first_round = time.time(), int(state.round) + 1
  with open(metrics_path, 'a') as log:
    for round_index in range(first_round, config.fl.rounds + 1):
      state, metrics = round_fn(state, frozen, dataset, table)
      if int(metrics.num_reported) == 0:
        if int(metrics.num_nonfinite):
          raise TrainingError(
              f'round {round_index}: every reporting client ({int(metrics.num_nonfinite)}) '
              'sent a NaN or Inf update; the last good checkpoint in '
              f'{workdir}/checkpoints is intact. Lower --config.optim.lr or check the data')
        print(f'round {round_index}: no sampled client reported '
              f'({int(metrics.num_sampled)} sampled); the model is unchanged', flush=True)
      # The model goes down to every sampled client; updates come up from those reporting.
      bytes_down = BYTES_PER_PARAM * num_trainable * int(metrics.num_sampled)
      bytes_up = BYTES_PER_PARAM * num_trainable * int(metrics.num_reported)
      bytes_cumulative += bytes_up + bytes_down
      last = round_index == config.fl.rounds
      status = 'acc    -  '  # Accuracy and epsilon are computed on evaluated rounds only.
      if round_index % config.fl.eval_every == 0 or last:
        accuracy = float(evaluate(state.trainable, frozen, test_images, test_labels))
        record = {
            'round': round_index, 'test_accuracy': accuracy,
            'train_loss': float(metrics.train_loss),
            'clients': [int(c) for c in metrics.clients if c >= 0],
            'clients_reported': int(metrics.num_reported),
            'clients_nonfinite': int(metrics.num_nonfinite),
            'bytes_up': bytes_up, 'bytes_down': bytes_down,
            'bytes_cumulative': bytes_cumulative, 'trainable_params': num_trainable,
            'trainable_sha256': tree_sha256(state.trainable),
            'wall_s': wall_offset + time.time() - start}
        status = f'acc {accuracy:.4f}'
        if privacy is not None:
          record.update(epsilon=accounting.epsilon(privacy, round_index),
                        noise_multiplier=privacy.noise_multiplier,
                        clip_norm=float(metrics.aggregator.get('clip_norm',
                                                               config.dp.clip_norm)))
          if 'clipped_fraction' in metrics.aggregator:
            record['clipped_fraction'] = float(metrics.aggregator['clipped_fraction'])
          status += f'  eps {record["epsilon"]:.3g}'
        log.write(json.dumps(record) + '\n')
        log.flush()
        history.append(record)
      rate = (time.time() - start) / (round_index - first_round + 1)
      print(f'round {round_index:4d}/{config.fl.rounds}  {status}  '
            f'loss {float(metrics.train_loss):.4f}  sent {bytes_cumulative / 2**20:.2f} MB  '
            f'eta {rate * (config.fl.rounds - round_index):.0f}s', flush=True)
      if round_index % config.checkpoint.every == 0 or last:
        save()
  resume.export_trainable(os.path.join(workdir, 'trainable.npz'), state.trainable)
  return history
