"""Config -> everything a run needs: model, trainable/frozen trees, data, clients, algorithm.

Each piece is a public function so that benchmarks and notebooks build exactly
what training builds; `build` puts them together. This is the one place that
maps config keys onto library arguments, so library errors about an argument
are reported against its `--config.` key here (`validation.config_keys`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedpeft_jax import configs
from fedpeft_jax import peft
from fedpeft_jax import validation
from fedpeft_jax.data import partition as partition_lib
from fedpeft_jax.data import sources
from fedpeft_jax.experiment import console
from fedpeft_jax.federated import aggregators
from fedpeft_jax.federated import algorithms
from fedpeft_jax.federated import chunking
from fedpeft_jax.federated import client as client_lib
from fedpeft_jax.federated import lora_rules
from fedpeft_jax.federated.lora_rules import hetlora
from fedpeft_jax.federated import round as round_lib
from fedpeft_jax.federated import server_optimizers
from fedpeft_jax.federated import types as fl_types
from fedpeft_jax.federated.algorithms import fedprox
from fedpeft_jax.model import families
from fedpeft_jax.privacy import accounting
from fedpeft_jax.privacy.ledger import PrivacyLedger
from fedpeft_jax import tasks

PyTree = Any


def peft_options(config) -> dict:
  """Every registered PEFT method's options (`peft.option_defaults`), from `--config.peft.`."""
  return {key: config.peft[key] for key in peft.option_defaults()}


def model_family(config) -> families.ModelFamily:
  """The registered family `model.family` names (`families.MODEL_FAMILIES`)."""
  with validation.config_keys(config, family='model.family'):
    return families.MODEL_FAMILIES.get(config.model.family)


def task(config) -> tasks.Task:
  """The task the model family serves (`tasks.TASKS`)."""
  return tasks.TASKS.get(model_family(config).task)


def build_model(config, method: str | None = None):
  """The model of `config.model` with the additions of `method` (default `peft.method`)."""
  return model_family(config).build(config, method or config.peft.method, peft_options(config))


def abstract_params(config, model):
  return jax.eval_shape(model.init, jax.random.key(0),
                        *model_family(config).dummy_input(config))['params']


def check_pretrained(config, model) -> None:
  """The checkpoint file opens and matches the model: read from its headers, no weights."""
  if config.model.checkpoint:
    with validation.config_keys(config, path='model.checkpoint'):
      model_family(config).check_pretrained(config, abstract_params(config, model))


def init_params(config, model, rng, mesh: jax.sharding.Mesh | None = None):
  """Fresh parameters, with the pretrained checkpoint's weights (numpy) where it has them.

  With a `mesh` that has a 'model' axis (`client_mesh`, fl.model_parallel > 1) the fresh
  parameters are made on it, the frozen ones already split (`frozen_shardings`): no device
  ever holds the whole backbone. The values do not depend on the placement.
  """
  family = model_family(config)
  init = lambda rng: model.init(rng, *family.dummy_input(config))['params']
  shardings = frozen_shardings(config, jax.eval_shape(init, rng), mesh)
  params = jax.jit(init, out_shardings=shardings)(rng)
  if config.model.checkpoint:
    with validation.config_keys(config, path='model.checkpoint',
                                posemb_resample='model.posemb_resample'):
      params = family.load_pretrained(config, params)
  return params


def load_data(config, split: str, class_names=None) -> sources.Dataset:
  """One split; every split but the training one takes `class_names`, the training
  split's, so that it is labelled by class name (`sources.load`)."""
  d = config.data
  with validation.config_keys(config, source='data.source'):
    source = sources.SOURCES.get(d.source)
  clients = partition_spec(config).needs_client_ids  # Each example's client id (natural).
  is_train = split == d.train_split
  num_examples = d.num_train_examples if is_train else d.num_test_examples
  # Made images (synthetic) are made at the model's size unless told otherwise.
  image_size = d.storage_size or (config.model.image_size if source.makes_images else None)
  keys = dict(source.keys, source='data.source', num_classes='data.num_classes',
              image_size='data.storage_size',
              split='data.train_split' if is_train else 'data.test_split',
              num_examples='data.num_train_examples' if is_train else 'data.num_test_examples',
              clients='data.partition')
  with validation.config_keys(config, **keys), console.phase(f'loading {split!r} data'):
    ds = sources.load(
        d.source, split=split, image_size=image_size, num_classes=d.num_classes,
        num_examples=num_examples, seed=config.seed, clients=clients,
        class_names=class_names, **source.options(config))
  # Clients the source left out (text: LEAF's rule). Under DP not printed: a count of small
  # clients is data that epsilon does not cover.
  if ds.dropped_clients and config.dp.mode == 'none':
    console.say(f'{split!r} data: left out the {ds.dropped_clients} clients with fewer than '
                f'data.min_client_examples={d.min_client_examples} training examples')
  return ds


def partition_spec(config) -> partition_lib.PartitionSpec:
  """The registered partition `data.partition` names (`partition_lib.PARTITIONS`)."""
  with validation.config_keys(config, method='data.partition'):
    return partition_lib.PARTITIONS.get(config.data.partition)


def load_partition(config) -> tuple[sources.Dataset, list[np.ndarray]]:
  """The training split and one sorted index array per client, split by `data.partition`
  with its own options read from the config keys its entry declares; a partition's error
  about one of them, or about num_clients, names the `--config.` key."""
  d = config.data
  spec = partition_spec(config)
  train_set = load_data(config, d.train_split)
  keys = {argument: option.key for argument, option in spec.options.items()}
  with validation.config_keys(config, num_clients='fl.num_clients', **keys):
    client_indices = partition_lib.partition(
        train_set.labels, method=d.partition, num_clients=config.fl.num_clients,
        seed=config.seed, client_ids=train_set.client_ids, **spec.read_options(config))
  return train_set, client_indices


def describe_partition(config, train_set: sources.Dataset,
                       client_indices: list[np.ndarray]) -> dict:
  """What `partition.json` records: the method, the config keys it depends on, the class
  names, and each client's size and label histogram (and, for natural, its id in the data);
  where the source left small clients out (text's data.min_client_examples), how many
  (`dropped_clients`).

  Under DP (`dp.mode` 'client' or 'sample') the per-client part is left out and only
  `num_clients` is recorded: sizes, histograms and ids are computed from the clients' data
  without noise, outside what epsilon covers.
  """
  method, spec = config.data.partition, partition_spec(config)
  flat = configs.flat_config(config)
  described = {'method': method, 'args': {key: flat[key] for key in spec.recorded_keys()},
               'class_names': list(train_set.class_names)}
  if config.dp.mode != 'none':
    return {**described, 'num_clients': len(client_indices)}
  if train_set.dropped_clients is not None:  # The source left small clients out (text).
    described['args']['data.min_client_examples'] = flat['data.min_client_examples']
    described['dropped_clients'] = train_set.dropped_clients
  histograms = partition_lib.label_histograms(train_set.labels, client_indices,
                                              train_set.num_classes)
  clients = [{'size': len(ids), 'label_histogram': counts.tolist()}
             for ids, counts in zip(client_indices, histograms)]
  if spec.needs_client_ids:  # Client k holds the k-th of the data's sorted client ids.
    for client, name in zip(clients, partition_lib.client_names(train_set.client_ids).tolist()):
      client['id'] = name
  return {**described, 'clients': clients}


def privacy_spec(config, client_sizes=(), ledger: PrivacyLedger | None = None
                 ) -> accounting.PrivacySpec | None:
  """The run's privacy mechanism; its noise calibrated if a target epsilon is set.

  A resumed run passes its `ledger` (the rounds it ran and the noise they used,
  `PrivacyLedger.calibrate`): with `fl.rounds` unchanged the noise stays exactly as it
  was; grown under a target epsilon, only the remaining rounds' noise is calibrated, so
  the whole ledger meets the target (and, with adaptive clipping, must leave the updates
  a share of it: a ConfigError naming fl.rounds otherwise).

  Raises ConfigError naming `dp.delta` unless it is below one over the clients (client
  level) or over all `client_sizes` together (sample level): `accounting.check_delta`.
  """
  dp, fl = config.dp, config.fl
  if dp.mode == 'none':
    return None
  spec = accounting.PrivacySpec(
      mode=dp.mode, noise_multiplier=dp.noise_multiplier, delta=dp.delta, rounds=fl.rounds,
      accountant=dp.accountant, sampling=dp.sampling, num_clients=fl.num_clients,
      clients_per_round=fl.clients_per_round,
      clipped_count_stddev=validation.clipped_count_stddev(config) if dp.adaptive_clip else 0.0,
      client_sizes=tuple(client_sizes), batch_size=fl.batch_size, local_epochs=fl.local_epochs)
  with validation.config_keys(config, delta='dp.delta', target_epsilon='dp.target_epsilon'):
    accounting.check_delta(spec)
    if dp.target_epsilon is None:
      return spec
    ledger = PrivacyLedger() if ledger is None else ledger
    z = ledger.calibrate(spec, dp.target_epsilon)
    if ledger.grown(spec):
      validation.check_remaining_adaptive_noise(config, spec, ledger.records,
                                                ledger.calibrated_for_rounds, z)
  return dataclasses.replace(spec, noise_multiplier=z)


def client_mesh(config) -> jax.sharding.Mesh | None:
  """The devices the round runs on: with `fl.model_parallel` = 1, all devices (of all
  hosts) along one 'clients' axis, if there is more than one; with m > 1 a ('clients',
  'model') mesh of devices / m x m, each row of m devices holding one copy of the frozen
  backbone split over them (`shard_frozen_on`) and training its share of the clients
  (with `fl.shard_clients=False`: one row of this host's first m devices)."""
  fl = config.fl
  if fl.model_parallel > 1:
    devices = jax.devices() if fl.shard_clients else jax.local_devices()[:fl.model_parallel]
    return jax.sharding.Mesh(np.array(devices).reshape(-1, fl.model_parallel),
                             ('clients', 'model'))
  if not fl.shard_clients or jax.device_count() == 1:
    return None
  return jax.sharding.Mesh(np.array(jax.devices()), ('clients',))


def replicate_on(mesh: jax.sharding.Mesh | None) -> Callable[[PyTree], PyTree]:
  """A function placing a pytree whole on every device of `mesh` (of every host), or on
  the default device without one. Each host passes the same values: its own copy."""
  if mesh is None:
    return jax.device_put
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def place(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(place(jax.random.key_data(x)))
    return jax.make_array_from_process_local_data(replicated, np.asarray(x))

  return lambda tree: jax.tree.map(place, tree)


def model_axis_spec(shape: tuple[int, ...], model_parallel: int) -> jax.sharding.PartitionSpec:
  """Where a frozen weight of `shape` is split over a 'model' mesh axis of `model_parallel`
  devices: along its largest dimension that they divide (of equal ones the last, a
  kernel's output features), for arrays of two or more dimensions; PartitionSpec() (whole
  on every device) for vectors, scalars and arrays no dimension of which they divide.

  A rule on shapes alone, so it serves every model family: XLA's partitioner adds the
  collectives each split needs, so the result is the unsplit model's (to float rounding).
  """
  divisible = [i for i, n in enumerate(shape) if n >= model_parallel and n % model_parallel == 0]
  if len(shape) < 2 or not divisible:
    return jax.sharding.PartitionSpec()
  axis = max(divisible, key=lambda i: (shape[i], i))
  return jax.sharding.PartitionSpec(*(None,) * axis, 'model')


def frozen_shardings(config, params, mesh: jax.sharding.Mesh | None):
  """Each parameter's NamedSharding on `mesh` (`params` may be shapes alone): the ones
  `peft.method` freezes split over its 'model' axis (`model_axis_spec`), the trainable
  ones whole on every device. None for a mesh without a 'model' axis, or none."""
  if mesh is None or 'model' not in mesh.axis_names:
    return None
  labels = peft.labels(config.peft.method, params, **peft_options(config))
  return jax.tree.map(
      lambda label, x: jax.sharding.NamedSharding(mesh, model_axis_spec(
          x.shape, mesh.shape['model']) if label == 'frozen' else jax.sharding.PartitionSpec()),
      labels, params)


def shard_frozen_on(mesh: jax.sharding.Mesh | None) -> Callable[[PyTree], PyTree]:
  """A function placing the frozen tree on `mesh`: each weight split over its 'model'
  axis by `model_axis_spec` and whole along 'clients'; `replicate_on(mesh)` for a mesh
  without a 'model' axis, or none. Each host passes the same whole values and keeps the
  pieces its devices hold."""
  if mesh is None or 'model' not in mesh.axis_names:
    return replicate_on(mesh)

  def place(x):
    sharding = jax.sharding.NamedSharding(mesh, model_axis_spec(x.shape, mesh.shape['model']))
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x  # Made in place (`init_params`).
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return lambda tree: jax.tree.map(place, tree)


def aggregator_name(config) -> str:
  """The registered aggregator a config asks for: 'dp_fedavg' under client DP, else
  `fl.aggregation` ('auto' weights clients by example count)."""
  return 'dp_fedavg' if config.dp.mode == 'client' else validation.aggregation(config)


def build_aggregator(config, privacy: accounting.PrivacySpec | None) -> aggregators.Aggregator:
  spec = aggregators.AGGREGATORS.get(aggregator_name(config))
  with validation.config_keys(config, clipped_count_stddev='dp.clipped_count_stddev'):
    return spec.make(**spec.arguments(config, privacy))


def lora_rule(config) -> str:
  """The LoRA aggregation rule a config asks for: `peft.lora_aggregation`, 'ffa' under
  its older name `peft.lora_freeze_a`."""
  return 'ffa' if config.peft.lora_freeze_a else config.peft.lora_aggregation


def lora_rule_spec(config, lay: lora_rules.Layout) -> lora_rules.LoraRuleSpec:
  """The registered spec of the run's rule (`lora_rule`), with HetLoRA's rank self-pruning
  when peft.lora_prune_strength > 0 (validation allows it with 'hetlora' only)."""
  name = lora_rule(config)
  with validation.config_keys(config, rule='peft.lora_aggregation'):
    spec = lora_rules.LORA_RULES.get(name)
  if config.peft.lora_prune_strength:
    spec = hetlora.self_pruning(spec, config.peft.lora_prune_strength,
                                config.peft.lora_prune_decay, lay)
  return spec


def lora_layout(config, trainable, frozen) -> lora_rules.Layout | None:
  """The LoRA `Layout` the rule aggregates on (scale alpha / rank, each client's rank from
  `peft.lora_client_ranks`), when `peft.method` has LoRA and `fl.algorithm` is one a rule
  is built on (`lora_rules.BASE_ALGORITHMS`); None otherwise (FedAvg's hooks as they are)."""
  p = config.peft
  if ('lora' not in peft.parse_method(p.method) or
      config.fl.algorithm not in lora_rules.BASE_ALGORITHMS):
    return None
  with validation.config_keys(config, ranks='peft.lora_client_ranks'):
    ranks = lora_rules.client_ranks(p.lora_client_ranks, p.lora_rank, config.fl.num_clients,
                                    config.seed)
  return lora_rules.layout(trainable, frozen, p.lora_alpha / p.lora_rank, ranks)


def build_federated_algorithm(config, lora: lora_rules.Layout | None = None
                              ) -> algorithms.Algorithm:
  """`fl.algorithm` from the registry, or, given the run's LoRA `lora` layout, the rule
  `peft.lora_aggregation` on FedAvg's round; with FedProx's proximal term when fl.prox_mu
  > 0."""
  if lora is not None:
    name, spec = lora_rule(config), lora_rule_spec(config, lora)
    with validation.config_keys(config, rule='peft.lora_aggregation'):
      lora_rules.check_layout(name, spec, lora)
    algorithm = lora_rules.algorithm(lora, spec.rule,
                                     measure_error=config.peft.lora_aggregation_error)
  else:
    with validation.config_keys(config, name='fl.algorithm'):
      spec = algorithms.ALGORITHMS.get(config.fl.algorithm)
    algorithm = spec.make(**spec.arguments(config))
  with validation.config_keys(config, prox_mu='fl.prox_mu'):
    return fedprox.with_proximal_term(algorithm, config.fl.prox_mu)


def build_algorithm(config, loss_fn, max_examples: int, privacy: accounting.PrivacySpec | None,
                    client_chunk: int | None = None, lora: lora_rules.Layout | None = None
                    ) -> round_lib.FederatedRound:
  """The run's federated round on the task's `loss_fn`: local training, cohort,
  algorithm, aggregator and server optimizer, each from its config keys; `lora`: the
  run's LoRA layout (`lora_layout`), for its aggregation rule."""
  fl, o, dp = config.fl, config.optim, config.dp
  sample_dp = (client_lib.SampleDP(dp.clip_norm, privacy.noise_multiplier)
               if dp.mode == 'sample' else None)
  with validation.config_keys(config, client_chunk='fl.client_chunk', schedule='fl.schedule'):
    return round_lib.make_round(
        loss_fn,
        client_lib.sgd(o.lr, o.momentum, o.weight_decay, o.nesterov),
        client_lib.LocalSpec(fl.local_epochs, fl.batch_size, max_examples, sample_dp),
        round_lib.Cohort(fl.clients_per_round, fl.num_clients,
                         dp.sampling if dp.mode == 'client' else 'fixed', fl.dropout_prob),
        algorithm=build_federated_algorithm(config, lora),
        aggregator=build_aggregator(config, privacy),
        server_optimizer=server_optimizer(config),
        execution=round_lib.Execution(fl.schedule, client_chunk or fl.client_chunk or None,
                                      client_mesh(config)))


def server_optimizer(config) -> optax.GradientTransformation:
  fl = config.fl
  with validation.config_keys(config, name='fl.server_optimizer'):
    return server_optimizers.server_optimizer(
        fl.server_optimizer, fl.server_lr, momentum=fl.server_momentum, b1=fl.server_b1,
        b2=fl.server_b2, eps=fl.server_eps)


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
  devices = mesh.shape['clients'] if mesh is not None else 1  # The devices clients span.
  analysis = jax.jit(build(devices).apply).lower(state, *args).compile().memory_analysis()
  per_client = analysis.temp_size_in_bytes / devices
  capacity = (config.fl.num_clients if config.dp.mode == 'client' and
              config.dp.sampling == 'poisson' else config.fl.clients_per_round)
  available = 0.8 * (stats['bytes_limit'] - analysis.argument_size_in_bytes)
  with validation.config_keys(config, client_chunk='fl.client_chunk'):
    chunk = chunking.chunk_for_memory(capacity, int(per_client), int(available * devices),
                                    devices)
  console.say(f'fl.client_chunk=0: {chunk} clients at once ({per_client / 2**30:.2f} GiB '
              f'each, {available / 2**30:.1f} GiB free)')
  return chunk


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built from its config; the loop sees only `state` and `round`."""
  config: ml_collections.ConfigDict
  model: Any  # The model family's flax module.
  algorithm: round_lib.FederatedRound
  state: fl_types.ServerState  # The initial server state (before any resume).
  frozen: PyTree  # The only copy of the backbone.
  dataset: dict  # Every client's examples, on device; clients index into it.
  table: fl_types.ClientTable
  client_sizes: list[int]
  num_trainable: int
  privacy: accounting.PrivacySpec | None
  # Global trainable parameters -> the task's test metrics, e.g. {'test_accuracy': 0.71}.
  evaluate: Callable[[PyTree], dict]
  partition: dict  # What partition.json records (`describe_partition`).
  loss_fn: Callable = None  # The task's per-example loss the round trains on.
  # state -> (trainable, frozen) of the global model as evaluated, when the algorithm
  # changes the frozen weights (`FederatedRound.serve`; a LoRA rule that merges); None:
  # (state.trainable, the frozen tree as built).
  served: Callable | None = None
  # (client ids, round, state after it) -> (bytes down, bytes up) per client, when they
  # differ by client (a LoRA rule: each client's rank); None: the trainable tree each way.
  client_bytes: Callable | None = None
  # state -> {kernel path 'a/b/kernel': float32 numpy delta}: what the served model adds to
  # the adapted kernels beyond trainable.npz, when a LoRA rule merges updates into them
  # (`merged_deltas`; written as merged.npz at the run's end); None: nothing.
  merged: Callable | None = None

  def compile_round(self, state: fl_types.ServerState):
    """The round as one compiled function of the server state, compiled now, not in round 1."""
    args = (self.frozen, self.dataset, self.table)
    with console.phase('compiling the round'):
      compiled = jax.jit(self.algorithm.apply, donate_argnums=0).lower(state, *args).compile()
    return lambda s: compiled(s, *args)


def build(config, ledger: PrivacyLedger | None = None) -> Experiment:
  """Builds a run's experiment from its (validated) config: data, model, algorithm.

  `ledger`: a resumed DP run's privacy ledger (`callbacks.restore_ledger`), so the noise
  of the remaining rounds is what the ledger allows.
  """
  init_rng, run_rng = jax.random.split(jax.random.key(config.seed))
  privacy = None
  if config.dp.mode == 'client':  # Needs no data: a noise it cannot use fails before loading.
    privacy = privacy_spec(config, ledger=ledger)
  train_set, client_indices = load_partition(config)
  test_set = load_data(config, config.data.test_split, class_names=train_set.class_names)
  client_sizes = [len(ids) for ids in client_indices]
  partition = describe_partition(config, train_set, client_indices)
  if config.dp.mode == 'sample':  # Its guarantee depends on every client's size.
    privacy = privacy_spec(config, client_sizes, ledger)
  table = fl_types.ClientTable.from_partition(client_indices)

  model = build_model(config)
  mesh = client_mesh(config)
  with console.phase('initialising the model' + (
      f' from {config.model.checkpoint}' if config.model.checkpoint else '')):
    params = init_params(config, model, init_rng, mesh)
  trainable, frozen = peft.split(params, peft.labels(config.peft.method, params,
                                                    **peft_options(config)))
  del params  # The frozen tree is the only copy of the backbone.
  num_trainable = peft.count(trainable)
  # Under DP the client sizes are not printed: they are data that epsilon does not cover.
  sizes = ('' if config.dp.mode != 'none' else
           f' of {min(client_sizes)}..{table.max_examples} examples')
  console.say(f'{config.peft.method}: {num_trainable:,} trainable of '
              f'{num_trainable + peft.count(frozen):,} parameters; {table.num_clients} '
              f'clients{sizes}')
  if config.fl.algorithm == 'scaffold':  # The one per-client state: say what it costs.
    table_bytes = table.num_clients * sum(x.nbytes for x in jax.tree.leaves(trainable))
    console.say(f'SCAFFOLD keeps a control variate per client: {table.num_clients} x '
                f'{num_trainable:,} parameters, {table_bytes / 2**20:,.1f} MiB')

  if config.model.frozen_dtype:  # Halves backbone memory and traffic to the MXU/tensor cores.
    frozen = jax.tree.map(lambda x: x.astype(config.model.frozen_dtype), frozen)
  the_task = task(config)
  data = the_task.client_data(config, model, frozen, train_set)
  lora = lora_layout(config, trainable, frozen)
  build_for = lambda chunk: build_algorithm(config, data.loss_fn, table.max_examples, privacy,
                                            chunk, lora)
  algorithm = build_for(None)
  # Everything on every device of the mesh (all hosts'), so the compiled round and
  # evaluation see the same placement in every round and on every host.
  # The frozen backbone split over the mesh's 'model' axis when fl.model_parallel > 1.
  place = replicate_on(mesh)
  frozen = shard_frozen_on(mesh)(frozen)
  dataset, table = place((data.dataset, table))
  state = place(algorithm.init(trainable, run_rng))
  chunk = auto_client_chunk(config, build_for, state, (frozen, dataset, table))
  if chunk:
    algorithm = build_for(chunk)
  evaluate = the_task.make_evaluate(config, model, frozen, test_set, place, state.trainable)
  served, client_bytes, merged = None, None, None
  if lora is not None:
    partition, served, client_bytes, merged = _lora_parts(
        config, lora, algorithm, state, frozen, partition, num_trainable)
  return Experiment(config, model, algorithm, state, frozen, dataset, table, client_sizes,
                    num_trainable, privacy, evaluate, partition, data.loss_fn, served,
                    client_bytes, merged)


def merged_deltas(lay: lora_rules.Layout, frozen, served_frozen) -> dict:
  """{'/'-joined kernel path: served kernel − kernel, float32 [in, out...]} of every
  adapted map whose kernel is frozen: what a merging rule (fedex, flora, flexlora) folded
  into the backbone, in trainable.npz's flat layout. Folding it back, kernel + delta in
  float32 cast to the kernel's dtype, gives the served kernel (to float32 rounding)."""
  get = lora_rules.base.get
  return {'/'.join(site.kernel): get(served_frozen, site.kernel).astype(jnp.float32)
          - get(frozen, site.kernel).astype(jnp.float32)
          for site in lay.sites if site.kernel in lay.frozen_kernels}


def _lora_parts(config, lora: lora_rules.Layout, algorithm, state, frozen, partition,
                num_trainable: int):
  """A LoRA rule's run: partition.json with each client's rank, the served model (jitted,
  placed as the round's trees, so evaluation's compiled function takes it), each client's
  traffic and, for a rule that merges into the kernels, its `merged_deltas` of a state;
  says what the rule keeps on the server."""
  name = lora_rule(config)
  if lora.ranks is not None:
    partition = {**partition, 'lora_client_ranks': lora.ranks.tolist()}
  kept = sum(x.nbytes for x in jax.tree.leaves(state.algorithm_state))
  ranks = ('' if lora.ranks is None else
           f', client ranks {sorted(set(lora.ranks.tolist()))} (peft.lora_client_ranks)')
  pruning = ('' if not config.peft.lora_prune_strength else
             f', rank self-pruning (peft.lora_prune_strength {config.peft.lora_prune_strength}'
             f', peft.lora_prune_decay {config.peft.lora_prune_decay})')
  console.say(f'peft.lora_aggregation={name}: {len(lora.sites)} adapted maps{ranks}{pruning}'
              + (f'; the server keeps {kept / 2**20:,.1f} MiB' if kept else ''))
  served, merged = None, None
  if algorithm.serve is not None:
    shardings = jax.tree.map(lambda x: x.sharding, (state.trainable, frozen))
    serve = jax.jit(algorithm.serve, out_shardings=shardings)
    served = lambda s: serve(s, frozen)
  spec = lora_rule_spec(config, lora)
  if spec.folds and algorithm.serve is not None:
    # Whole on every device (as the trainable tree is), so every process can read it.
    replicated = jax.tree.leaves(state.trainable)[0].sharding
    deltas = jax.jit(lambda s, f: merged_deltas(lora, f, algorithm.serve(s, f)[1]),
                     out_shardings=replicated)
    merged = lambda s: {k: np.asarray(v) for k, v in deltas(s, frozen).items()}
  other = num_trainable - lora_rules.base.factor_floats(lora, lora.rank)
  client_bytes = lora_rules.client_bytes(spec, lora, other, config.fl.num_clients)
  return partition, served, client_bytes, merged
