"""Contracts of the model-family and task registries, passed by every entry by being
registered: a family builds, initialises from its dummy input and names a registered
task; a task's client data feed the round's loss (finite on the all-zeros rows padding
reads) and its evaluation returns the metrics it declares."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeft_jax import peft
from fedpeft_jax.data import sources
from fedpeft_jax.experiment import build
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.model import families
from fedpeft_jax import tasks
from tests.conftest import SHARED, tiny_config

TINY_LLAMA = SHARED / 'backbones' / 'tiny_llama_en'
SHAKESPEARE = SHARED / 'data' / 'shakespeare_roles.tar.gz'


def tiny_llama_config():
  """The shared 1M-parameter decoder with LoRA on a few Shakespeare speeches (text source)."""
  for path in (TINY_LLAMA / 'model.safetensors', SHAKESPEARE):
    if not path.exists():
      pytest.skip(f'{path} (../shared) is not here')
  if 'text' not in sources.SOURCES:
    pytest.skip('the text source is not registered')
  config = tiny_config('lora')
  config.model.family, config.model.checkpoint = 'llama', str(TINY_LLAMA)
  config.data.source, config.data.path = 'text', str(SHAKESPEARE)
  config.data.partition, config.data.max_length = 'iid', 24
  config.data.num_train_examples = config.data.num_test_examples = 8
  config.eval.batch_size = 4
  return config


# A tiny config of each family; a new family adds its own here (the test names it).
TINY = {'vit': lambda: tiny_config('bias'), 'llama': tiny_llama_config}


@pytest.mark.parametrize('name', families.MODEL_FAMILIES.names())
def test_every_model_family_builds_initialises_and_names_a_task(name):
  assert name in TINY, f'add a tiny config of model family {name!r} to TINY in this file'
  config = TINY[name]()
  config.model.family = name
  family = families.MODEL_FAMILIES.get(name)
  assert family.task in tasks.TASKS, family.task
  assert list(family.checks(config, True)) == []
  model = build.build_model(config)
  abstract = build.abstract_params(config, model)
  params = build.init_params(config, model, jax.random.key(0))
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  jax.tree.map(lambda a, p: (a.shape, a.dtype) == (p.shape, p.dtype) or pytest.fail(str(a)),
               abstract, params)
  trainable, frozen = peft.split(params, peft.labels(config.peft.method, params,
                                                     **build.peft_options(config)))
  assert peft.count(trainable) > 0 and peft.count(frozen) > 0


@pytest.mark.parametrize('name', tasks.TASKS.names())
def test_every_task_feeds_the_round_and_reports_its_metrics(name):
  config = next(make() for family, make in TINY.items()
                if families.MODEL_FAMILIES.get(family).task == name)
  model = build.build_model(config)
  params = build.init_params(config, model, jax.random.key(0))
  trainable, frozen = peft.split(params, peft.labels(config.peft.method, params,
                                                     **build.peft_options(config)))
  train_set = build.load_data(config, config.data.train_split)
  task = tasks.TASKS.get(name)
  data = task.client_data(config, model, frozen, train_set)
  assert all(len(x) == len(train_set) for x in jax.tree.leaves(data.dataset))
  # A batch of 2 real rows and 2 padding rows, as the round gathers it.
  ids = jnp.asarray([0, 1, client_lib.PADDING_ID, client_lib.PADDING_ID])
  batch = client_lib.gather_batch(jax.device_put(data.dataset), ids)
  losses = jax.jit(data.loss_fn)(trainable, frozen, batch, jax.random.key(1))
  assert losses.shape == (4,) and bool(jnp.all(jnp.isfinite(losses)))
  grads = jax.grad(lambda t: jnp.where(jnp.arange(4) < 2, data.loss_fn(
      t, frozen, batch, jax.random.key(1)), 0).sum())(trainable)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  test_set = build.load_data(config, config.data.test_split, class_names=train_set.class_names)
  evaluate = task.make_evaluate(config, model, frozen, test_set, jax.device_put, trainable)
  metrics = evaluate(trainable)
  assert tuple(metrics) == task.metrics and all(np.isfinite(v) for v in metrics.values())
  assert isinstance(train_set, sources.Dataset)
