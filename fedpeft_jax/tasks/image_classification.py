"""Image classification: softmax cross-entropy with on-device augmentation while
training, top-1 accuracy on the test split; head tuning on cached backbone features."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedpeft_jax import peft
from fedpeft_jax.data import preprocess
from fedpeft_jax.experiment import console
from fedpeft_jax.tasks import TASKS
from fedpeft_jax.tasks.base import ClientData, Task


def make_loss_fn(model, image_size: int):
  """Per-example cross-entropy of `model` on augmented images (`preprocess.train_images`)."""
  def loss_fn(trainable, frozen, batch, rng):
    images = preprocess.train_images(rng, batch['image'], image_size)
    logits = model.apply({'params': peft.merge(trainable, frozen)}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  return loss_fn


def head_features(model, frozen, images: np.ndarray, image_size: int, batch_size: int):
  """The frozen backbone's output for every example, computed once: [N, hidden].

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


def client_data(config, model, frozen, train_set) -> ClientData:
  """Images and labels; under `head` with `peft.cache_head_features`, the backbone's
  features instead of images."""
  if config.peft.method == 'head' and config.peft.cache_head_features:
    with console.phase(f'computing head features of {len(train_set):,} images'):
      features = jax.block_until_ready(head_features(
          model, frozen, train_set.images, config.model.image_size, config.eval.batch_size))
    return ClientData({'feature': features, 'label': train_set.labels}, head_loss_fn)
  return ClientData({'image': train_set.images, 'label': train_set.labels},
                    make_loss_fn(model, config.model.image_size))


def make_evaluate(model, image_size: int, batch_size: int):
  """A jitted `evaluate(trainable, frozen, images, labels) -> accuracy` and its `pad`.

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

  def pad(dataset):
    """Pads to whole batches; padded labels are -1 and never count."""
    extra = -len(dataset) % batch_size
    images = np.concatenate([dataset.images, np.zeros((extra,) + dataset.images.shape[1:],
                                                      np.uint8)])
    labels = np.concatenate([dataset.labels, -np.ones(extra, np.int32)])
    return jnp.asarray(images), jnp.asarray(labels)

  return evaluate, pad


def make_test_evaluation(config, model, frozen, test_set, place, trainable):
  """`evaluate(trainable, frozen=None) -> {'test_accuracy': top-1 accuracy}`, compiled now
  for trees shaped (and placed) like `trainable` and `frozen`; `frozen` None: the one
  given here."""
  evaluate_fn, pad = make_evaluate(model, config.model.image_size, config.eval.batch_size)
  images, labels = place(pad(test_set))
  with console.phase('compiling evaluation'):
    compiled = evaluate_fn.lower(trainable, frozen, images, labels).compile()
  built = frozen

  def evaluate(trainable, frozen=None):
    frozen = built if frozen is None else frozen
    return {'test_accuracy': float(compiled(trainable, frozen, images, labels))}
  return evaluate


TASKS.register('image_classification', Task(
    client_data=client_data, make_evaluate=make_test_evaluation, metrics=('test_accuracy',),
    summary='cross-entropy with augmentation; top-1 test accuracy'))
