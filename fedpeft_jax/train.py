"""The experiment loop: build model and data from a config, run rounds, log metrics."""
from __future__ import annotations

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
from fedpeft_jax.data import partition as partition_lib
from fedpeft_jax.data import preprocess
from fedpeft_jax.data import sources
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import fedavg
from fedpeft_jax.model import checkpoint as checkpoint_lib
from fedpeft_jax.model import vit

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
      dtype=jnp.dtype(config.model.dtype))


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


def build_algorithm(config, model, max_examples: int) -> fedavg.FederatedAlgorithm:
  fl, o = config.fl, config.optim
  return fedavg.fedavg(
      make_loss_fn(model, config.model.image_size),
      client_lib.sgd(o.lr, o.momentum, o.weight_decay, o.nesterov),
      num_epochs=fl.local_epochs, batch_size=fl.batch_size, max_examples=max_examples,
      clients_per_round=fl.clients_per_round, num_clients=fl.num_clients,
      client_chunk=fl.client_chunk or None, server_optimizer=optax.sgd(fl.server_lr))


def train(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs `config.fl.rounds` rounds; returns the evaluated rounds' metrics."""
  os.makedirs(workdir, exist_ok=True)
  seed_rng = jax.random.key(config.seed)
  init_rng, run_rng = jax.random.split(seed_rng)

  train_set = load_data(config, config.data.train_split)
  test_set = load_data(config, config.data.test_split)
  client_indices = partition_lib.partition(
      train_set.labels, method=config.data.partition, num_clients=config.fl.num_clients,
      seed=config.seed, alpha=config.data.alpha, min_size=config.data.min_client_size)
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

  algorithm = build_algorithm(config, model, table.max_examples)
  round_fn = jax.jit(algorithm.apply, donate_argnums=0)
  evaluate, pad = make_evaluate(model, config.model.image_size, config.eval.batch_size)
  test_images, test_labels = pad(test_set)

  state = algorithm.init(trainable, run_rng)
  bytes_per_round = 2 * BYTES_PER_PARAM * num_trainable * config.fl.clients_per_round
  history, start = [], time.time()
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as log:
    for round_index in range(1, config.fl.rounds + 1):
      state, metrics = round_fn(state, frozen, dataset, table)
      if round_index % config.fl.eval_every and round_index != config.fl.rounds:
        continue
      accuracy = float(evaluate(state.trainable, frozen, test_images, test_labels))
      elapsed = time.time() - start
      record = {
          'round': round_index, 'test_accuracy': accuracy,
          'train_loss': float(metrics.train_loss),
          'clients': [int(c) for c in metrics.clients],
          'bytes_up': bytes_per_round // 2, 'bytes_down': bytes_per_round // 2,
          'bytes_cumulative': bytes_per_round * round_index,
          'trainable_params': num_trainable,
          'trainable_sha256': tree_sha256(state.trainable), 'wall_s': elapsed}
      log.write(json.dumps(record) + '\n')
      log.flush()
      history.append(record)
      eta = elapsed / round_index * (config.fl.rounds - round_index)
      print(f'round {round_index:4d}/{config.fl.rounds}  acc {accuracy:.4f}  '
            f'loss {record["train_loss"]:.4f}  sent {record["bytes_cumulative"] / 2**20:.2f} MB'
            f'  eta {eta:.0f}s', flush=True)
  return history
