"""Causal language modelling: next-token cross-entropy over the predicted tokens, averaged
over tokens (not rows); test loss, perplexity and next-token accuracy over the test split's
tokens.

The data (`sources.Dataset.features`, the `text` source): `input_ids` int32 [N, T] (bos +
tokens + eos, right-padded) and `loss_mask` uint8 [N, T], 1 where the token at t is a target
predicted from position t - 1 (0 for bos, padding and instruction prompts). The logits at
t - 1 are scored against the token at t wherever `loss_mask[:, t]` is 1. Right padding needs
no attention mask: a causal model's predictions of real tokens never see the padding after
them.

`make_generate` continues a prompt with the model (greedy or sampled), for
`launch.py --mode=sample` (`experiment/sample.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedpeft_jax import errors
from fedpeft_jax import peft
from fedpeft_jax.experiment import console
from fedpeft_jax.tasks import TASKS
from fedpeft_jax.tasks.base import ClientData, Task

FEATURES = ('input_ids', 'loss_mask')


def token_losses(model, params, input_ids, loss_mask):
  """(cross-entropy [batch, T - 1] in nats, target weights [batch, T - 1] float32, logits
  [batch, T - 1, vocab]) of predicting token t from the tokens before it."""
  logits = model.apply({'params': params}, input_ids)[:, :-1]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, input_ids[:, 1:])
  weights = loss_mask[:, 1:].astype(jnp.float32)
  return losses * weights, weights, logits


def make_loss_fn(model):
  """Per-row losses [batch] whose mean over the batch's rows with targets equals the mean
  token loss of the batch: row i gives sum_t(loss_it) * rows / tokens, `rows` the rows
  with at least one target, `tokens` all targets of the batch.

  The round averages per-example losses over its real rows (`client.make_local_training`):
  that mean is then the token average, so a long sequence weighs by its tokens. A padding
  row (all zeros: no targets) gives 0; a real row without targets counts as padding. Under
  sample-level DP each row is its own batch: its loss is its mean token loss."""
  def loss_fn(trainable, frozen, batch, rng):
    del rng  # No augmentation.
    losses, weights, _ = token_losses(model, peft.merge(trainable, frozen),
                                      batch['input_ids'], batch['loss_mask'])
    rows = jnp.sum(jnp.any(weights > 0, axis=-1))
    return losses.sum(-1) * rows / jnp.maximum(weights.sum(), 1.0)
  return loss_fn


def _features(dataset, what: str) -> dict:
  features = getattr(dataset, 'features', None)
  if not features or any(k not in features for k in FEATURES):
    raise errors.UserError(f'causal_lm needs token data: the {what} split has no features '
                           f'{FEATURES}: load text with --config.data.source=text')
  return {'input_ids': np.asarray(features['input_ids'], np.int32),
          'loss_mask': np.asarray(features['loss_mask'], np.uint8)}


def client_data(config, model, frozen, train_set) -> ClientData:
  """The training split's `input_ids` and `loss_mask`; the loss of `make_loss_fn`."""
  del config, frozen
  return ClientData(_features(train_set, 'training'), make_loss_fn(model))


def make_evaluate(model, batch_size: int):
  """A jitted `sums(trainable, frozen, input_ids, loss_mask)` -> per-batch (token loss
  sum, targets, correct next-token predictions), each [batches]: the split scanned in
  batches of `batch_size` on device (it must hold whole batches)."""
  @jax.jit
  def sums(trainable, frozen, input_ids, loss_mask):
    params = peft.merge(trainable, frozen)

    def one(batch):
      losses, weights, logits = token_losses(model, params, *batch)
      hits = (jnp.argmax(logits, -1) == batch[0][:, 1:]) * weights
      return losses.sum(), weights.sum(), hits.sum()

    shape = (-1, batch_size, input_ids.shape[-1])
    return jax.lax.map(one, (input_ids.reshape(shape), loss_mask.reshape(shape)))
  return sums


def pad(features: dict, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """`input_ids` and `loss_mask` padded with all-zero rows (no targets) to whole batches."""
  extra = -len(features['input_ids']) % batch_size
  return tuple(np.concatenate([features[k], np.zeros((extra,) + features[k].shape[1:],
                                                     features[k].dtype)]) for k in FEATURES)


def make_test_evaluation(config, model, frozen, test_set, place, trainable):
  """`evaluate(trainable) -> {'test_perplexity', 'test_loss', 'test_accuracy'}` over every
  target token of the test split: loss the mean token cross-entropy (nats), perplexity
  exp(loss), accuracy the share of targets that are the argmax of their logits. Compiled
  now, once, for trees shaped like `trainable`; the sums are added on the host in float64."""
  batch_size = config.eval.batch_size
  input_ids, loss_mask = place(pad(_features(test_set, 'test'), batch_size))
  sums = make_evaluate(model, batch_size)
  with console.phase('compiling evaluation'):
    compiled = sums.lower(trainable, frozen, input_ids, loss_mask).compile()

  built = frozen

  def evaluate(trainable, frozen=None):  # frozen: a served backbone (tasks.base.Task).
    frozen = built if frozen is None else frozen
    loss, tokens, hits = (np.asarray(s, np.float64).sum()
                          for s in compiled(trainable, frozen, input_ids, loss_mask))
    mean = loss / max(tokens, 1.0)
    return {'test_perplexity': float(np.exp(mean)), 'test_loss': float(mean),
            'test_accuracy': float(hits / max(tokens, 1.0))}
  return evaluate


def make_generate(model, stop_ids=()):
  """A jitted `generate(params, tokens, start, stop, temperature, rng) -> (tokens, end)`
  continuing a prompt in a fixed token buffer, compiled once per buffer length (any
  prompt, stop, temperature and key reuse it: no recompiling per token or per prompt).

  `params` the model's whole tree (`peft.merge(trainable, frozen)`); `tokens` int [length]
  (the buffer): the prompt in tokens[:start] (bos first, as the text source
  writes it), anything after it (it is overwritten). Step t (start <= t < stop, `stop` <=
  length) runs the model over the whole buffer and writes at t the argmax of the logits at
  t - 1 (temperature 0), or a draw from softmax(logits / temperature) with key
  `fold_in(rng, t)`; it ends early after writing one of `stop_ids` (eos), which is kept.
  Returns the buffer and `end`, the index after the last written token: the continuation
  is tokens[start:end]. Causal attention makes the buffer's unwritten tail invisible to
  the logits at t - 1, so no attention mask is needed.

  No KV cache: each step is one full forward pass over `length` tokens (O(length) passes
  of O(length^2) attention), the price of leaving the model untouched; soft-prompt
  methods' prefixes (`model/llama.py`'s tokens hook) work as in training.
  """
  stops = jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32)

  @jax.jit
  def generate(params, tokens, start, stop, temperature, rng):
    def step(carry):
      t, tokens, _ = carry
      logits = model.apply({'params': params}, tokens[None])[0]
      logits = jax.lax.dynamic_index_in_dim(logits, t - 1, keepdims=False)
      drawn = jax.random.categorical(jax.random.fold_in(rng, t),
                                     logits / jnp.maximum(temperature, 1e-6))
      token = jnp.where(temperature > 0, drawn, jnp.argmax(logits)).astype(jnp.int32)
      return t + 1, tokens.at[t].set(token), jnp.any(token == stops)

    running = lambda carry: (carry[0] < stop) & ~carry[2]
    end, tokens, _ = jax.lax.while_loop(
        running, step, (jnp.asarray(start, jnp.int32), jnp.asarray(tokens, jnp.int32),
                        jnp.asarray(False)))
    return tokens, end
  return generate


TASKS.register('causal_lm', Task(
    client_data=client_data, make_evaluate=make_test_evaluation,
    metrics=('test_perplexity', 'test_loss', 'test_accuracy'),
    summary='next-token cross-entropy over predicted tokens; test perplexity, loss and '
            'next-token accuracy'))
