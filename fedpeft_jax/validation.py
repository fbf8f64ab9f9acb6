"""Checks every config value at launch, before any data or weights are loaded.

Each problem is one `ConfigError` naming the key, the value and what is
allowed, so a typo costs seconds instead of an hour of a preemptible TPU.
"""
from __future__ import annotations

import contextlib
import math

import jax

from fedpeft_jax import configs, errors, peft
from fedpeft_jax.data import partition, sources
from fedpeft_jax.experiment import extra_callbacks
from fedpeft_jax.federated import algorithms
from fedpeft_jax.federated import lora_rules
from fedpeft_jax.federated.aggregators.dp_fedavg import clipped_count_stddev
from fedpeft_jax.federated import sampling
from fedpeft_jax.federated import schedules
from fedpeft_jax.federated import server_optimizers
from fedpeft_jax.model import families
from fedpeft_jax.privacy import accounting
from fedpeft_jax.privacy import mechanisms

DTYPES = ('float32', 'bfloat16', 'float16')
AGGREGATIONS = ('auto', 'weighted', 'uniform')


class ConfigError(errors.UserError):
  def __init__(self, key: str, value, allowed: str):
    if hasattr(value, 'to_dict'):  # A nested ConfigDict (model.hf_config): one line.
      value = value.to_dict()
    super().__init__(f'--config.{key}={value!r}: {allowed}')


@contextlib.contextmanager
def config_keys(config, **keys: str):
  """Reports a library `UserError` about argument `a` as one about `--config.{keys[a]}`.

  Library modules name their own arguments; this is where they meet the keys
  a user typed, e.g. `with config_keys(config, path='data.path'): sources.load(...)`.
  """
  try:
    yield
  except ConfigError:
    raise
  except errors.UserError as e:
    if e.argument not in keys:
      raise
    raise ConfigError(keys[e.argument], _get(config, keys[e.argument]), str(e)) from None


def aggregation(config) -> str:
  """'auto' weights clients by example count, except under client DP (uniform)."""
  if config.fl.aggregation != 'auto':
    return config.fl.aggregation
  return 'uniform' if config.dp.mode == 'client' else 'weighted'


def _check_algorithm(config) -> None:
  """The registered algorithm's own check and the DP modes it supports (SCAFFOLD's
  variates and FedNova's step counts are per-client releases that client-level DP does
  not clip, noise or account)."""
  spec = algorithms.ALGORITHMS.get(config.fl.algorithm)
  problem = spec.check(config)
  if problem:
    _check(False, problem[0], _get(config, problem[0]), problem[1])
  supported = ', '.join(repr(m) for m in spec.dp_modes)
  if config.dp.mode not in configs.DP_MODES:
    return  # Named by the dp section's own check.
  _check(config.dp.mode in spec.dp_modes, 'fl.algorithm', config.fl.algorithm,
         f'supports dp.mode {supported} only (not {config.dp.mode!r}): change dp.mode, or use '
         "fl.algorithm='fedavg'")


def _check_extra_callbacks(config) -> None:
  """`callbacks.extra` names registered callbacks, once each; each one's own check."""
  names = extra_callbacks.names(config.callbacks.extra)
  for name in names:
    if name not in extra_callbacks.CALLBACKS:
      with config_keys(config, extra='callbacks.extra'):
        extra_callbacks.CALLBACKS.get(name)
  _check(len(set(names)) == len(names), 'callbacks.extra', config.callbacks.extra,
         'names a callback twice')
  for name in names:
    spec = extra_callbacks.CALLBACKS.get(name)
    problem = spec.check({key: config.callbacks[key] for key in spec.options})
    if problem:
      key = f'callbacks.{problem[0]}'
      _check(False, key, _get(config, key), problem[1])


def _check(ok: bool, key: str, value, allowed: str):
  if not ok:
    raise ConfigError(key, value, allowed)


def _positive(config, *keys):
  for key in keys:
    value = _get(config, key)
    _check(isinstance(value, (int, float)) and value > 0, key, value, 'must be > 0')


def _get(config, key: str):
  for part in key.split('.'):
    config = config[part]
  return config


def _one_of(config, key: str, allowed):
  value = _get(config, key)
  _check(value in allowed, key, value, f'must be one of {", ".join(map(str, allowed))}')


def validate(config, *, needs_weights: bool = True, needs_data: bool = True,
             method_list: bool = False) -> None:
  """Raises ConfigError for the first invalid value.

  `--mode=masks` needs neither weights nor data, so their paths are not checked, and
  compares methods: with `method_list`, `peft.method` may be a comma list of them.
  """
  _one_of(config, 'model.family', families.MODEL_FAMILIES.names())
  family = families.MODEL_FAMILIES.get(config.model.family)
  _one_of(config, 'model.dtype', DTYPES)
  _one_of(config, 'model.frozen_dtype', ('',) + DTYPES)
  _one_of(config, 'model.attention', ('', 'xla', 'cudnn'))
  for problem in family.checks(config, needs_weights):  # The family's own keys and files.
    _check(False, problem[0], _get(config, problem[0]), problem[1])
  size = family.dimensions(config)
  if config.model.representation_size is not None:
    _positive(config, 'model.representation_size')

  methods = config.peft.method.split(',') if method_list else [config.peft.method]
  parts = set()
  for method in methods:
    try:
      parts.update(peft.parse_method(method))
    except errors.UserError:
      part = f'{method!r} of the comma list ' if len(methods) > 1 else ''
      hint = '; a comma list compares methods in --mode=masks' if ',' in method else ''
      raise ConfigError('peft.method', config.peft.method,
                        f"{part}must be one of {', '.join(peft.METHODS)} or a '+' "
                        f"composition such as 'bias+lora'{hint}") from None
  # Each method's own checks of its options (`PeftMethod.check`).
  problem = peft.check('+'.join(sorted(parts)), config.peft, size)
  if problem is not None:
    raise ConfigError(f'peft.{problem[0]}', config.peft[problem[0]], problem[1])
  _check(not config.peft.lora_freeze_a or 'lora' in parts, 'peft.lora_freeze_a',
         config.peft.lora_freeze_a, "freezes LoRA's A matrices: it needs 'lora' in peft.method")
  _validate_lora_rule(config, parts)

  _validate_data(config, needs_data)
  _validate_federation(config)
  _validate_model_parallel(config, needs_weights)
  _validate_privacy(config)
  _positive(config, 'checkpoint.every', 'checkpoint.keep', 'eval.batch_size')


def _validate_lora_rule(config, parts) -> None:
  """peft.lora_aggregation (a registered rule; lora_freeze_a is 'ffa') and
  peft.lora_client_ranks, HetLoRA's self-pruning (peft.lora_prune_strength >= 0, only with
  'hetlora'; peft.lora_prune_decay in (0, 1)), and what they need of the rest: LoRA in
  peft.method, FedAvg's round (fedavg, fedprox) unless the rule's server step is FedAvg's
  own, the plain server step for the rules that set factors, and a server step that is a
  noised sum under client DP."""
  p, fl = config.peft, config.fl
  _one_of(config, 'peft.lora_aggregation', lora_rules.LORA_RULES.names())
  _check(not p.lora_freeze_a or p.lora_aggregation in ('fedit', 'ffa'), 'peft.lora_freeze_a',
         p.lora_freeze_a, "is FFA-LoRA, peft.lora_aggregation='ffa' (its older name): it "
         f'does not go with peft.lora_aggregation={p.lora_aggregation!r}')
  _check(isinstance(p.lora_client_ranks, str), 'peft.lora_client_ranks', p.lora_client_ranks,
         "must be a string: '' (every client at peft.lora_rank), a comma list such as "
         f"'2,4,8' or one of {', '.join(lora_rules.RANK_DISTRIBUTIONS)}")
  name = 'ffa' if p.lora_freeze_a else p.lora_aggregation
  _check(isinstance(p.lora_prune_strength, (int, float)) and
         math.isfinite(p.lora_prune_strength) and p.lora_prune_strength >= 0,
         'peft.lora_prune_strength', p.lora_prune_strength,
         "must be >= 0 and finite (0: HetLoRA's ranks stay fixed)")
  _check(isinstance(p.lora_prune_decay, (int, float)) and 0 < p.lora_prune_decay < 1,
         'peft.lora_prune_decay', p.lora_prune_decay,
         'must be in (0, 1): a pruning client keeps max(1, floor(decay x rank)) ranks')
  _check(not p.lora_prune_strength or name == 'hetlora', 'peft.lora_prune_strength',
         p.lora_prune_strength, "is HetLoRA's rank self-pruning: it needs "
         f"peft.lora_aggregation='hetlora' (not {name!r}), or set it to 0")
  hetero = bool(p.lora_client_ranks.strip())
  if name == 'fedit' and not hetero:
    return
  key, value = (('peft.lora_client_ranks', p.lora_client_ranks) if name == 'fedit' else
                ('peft.lora_aggregation', name))
  _check('lora' in parts, key, value, "needs 'lora' in peft.method")
  with config_keys(config, ranks='peft.lora_client_ranks'):
    lora_rules.client_ranks(p.lora_client_ranks, p.lora_rank, 1, 0)
  spec = lora_rules.LORA_RULES.get(name)
  _check(fl.algorithm in lora_rules.BASE_ALGORITHMS or (spec.any_algorithm and not hetero),
         'fl.algorithm', fl.algorithm,
         f'{key}={value!r} runs on FedAvg\'s round: use fl.algorithm \'fedavg\' (or '
         '\'fedprox\', which adds its proximal term)')
  if spec.plain_server_step:
    _check(fl.server_optimizer == 'sgd' and fl.server_lr in (None, 1.0),
           'fl.server_optimizer', fl.server_optimizer,
           f'peft.lora_aggregation={name!r} sets the global factors by the plain FedAvg step: '
           "use fl.server_optimizer='sgd' with fl.server_lr unset (1.0)")
  if config.dp.mode == 'client' and spec.client_dp:
    raise ConfigError('peft.lora_aggregation', name,
                      f"is refused under dp.mode='client': {spec.client_dp}; fedit, ffa and "
                      'fedsb aggregate a noised sum')


def _validate_data(config, needs_data: bool):
  d = config.data
  _one_of(config, 'data.source', sources.SOURCES.names())
  source = sources.SOURCES.get(d.source)
  _one_of(config, 'data.partition', partition.PARTITIONS.names())
  chosen = partition.PARTITIONS.get(d.partition)
  _check(d.num_classes >= 2, 'data.num_classes', d.num_classes, 'must be >= 2')
  # Every registered partition's options (`PartitionSpec.options`), whichever is chosen:
  # the config holds them all, and a sweep over data.partition reads each.
  for _, spec in partition.PARTITIONS.items():
    for option in spec.options.values():
      value = _get(config, option.key)
      problem = option.check(value)
      _check(problem is None, option.key, value, problem)
  per_client = ', or '.join(s.clients for _, s in sources.SOURCES.items() if s.clients)
  _check(not chosen.needs_client_ids or source.clients, 'data.partition', d.partition,
         f"needs data that names each example's client: {per_client}; {d.source} data has "
         'no clients')
  problem = chosen.check(config)  # The chosen partition's rules spanning other keys.
  if problem:
    key, allowed = problem
    raise ConfigError(key, _get(config, key), allowed)
  if d.storage_size is not None:
    _positive(config, 'data.storage_size')
  for key in ('data.num_train_examples', 'data.num_test_examples'):
    if _get(config, key) is not None:
      _positive(config, key)
  problem = source.check(config, needs_data)  # The keys the source reads, e.g. data.path.
  if problem:
    key, allowed = problem
    raise ConfigError(key, _get(config, key), allowed)


def _validate_federation(config):
  fl = config.fl
  _positive(config, 'fl.num_clients', 'fl.clients_per_round', 'fl.rounds', 'fl.local_epochs',
            'fl.batch_size', 'fl.eval_every', 'optim.lr')
  _check(fl.clients_per_round <= fl.num_clients, 'fl.clients_per_round',
         fl.clients_per_round, f'must be <= fl.num_clients ({fl.num_clients})')
  _check(fl.client_chunk >= 0, 'fl.client_chunk', fl.client_chunk,
         'must be >= 0 (0: all clients of a round at once)')
  _check(0 <= fl.dropout_prob < 1, 'fl.dropout_prob', fl.dropout_prob, 'must be in [0, 1)')
  _one_of(config, 'fl.schedule', schedules.SCHEDULES)
  _one_of(config, 'fl.aggregation', AGGREGATIONS)
  _one_of(config, 'fl.algorithm', algorithms.ALGORITHMS.names())
  _check(fl.prox_mu >= 0, 'fl.prox_mu', fl.prox_mu, 'must be >= 0 (0: no proximal term)')
  _one_of(config, 'fl.server_optimizer', server_optimizers.SERVER_OPTIMIZERS)
  if fl.server_lr is not None:
    _positive(config, 'fl.server_lr')
  for key in ('fl.server_momentum', 'fl.server_b1', 'fl.server_b2'):
    _check(0 <= _get(config, key) < 1, key, _get(config, key), 'must be in [0, 1)')
  _positive(config, 'fl.server_eps')
  _check_algorithm(config)
  _check_extra_callbacks(config)
  _check(0 <= config.optim.momentum < 1, 'optim.momentum', config.optim.momentum,
         'must be in [0, 1)')
  _check(config.optim.weight_decay >= 0, 'optim.weight_decay', config.optim.weight_decay,
         'must be >= 0')


def _validate_model_parallel(config, needs_devices: bool):
  """fl.model_parallel: an int >= 1 that divides the devices (checked only for a run that
  trains: `--mode=masks` and `--mode=privacy` use no devices)."""
  value = config.fl.model_parallel
  _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
         'fl.model_parallel', value,
         'must be an int >= 1 (1: every device holds the whole frozen backbone)')
  if not needs_devices or value == 1:
    return
  devices = jax.device_count()
  _check(devices % value == 0, 'fl.model_parallel', value,
         f'must divide the device count, {devices} (each frozen weight is split over '
         f'that many devices, the clients over {devices} / that)')
  _check(config.fl.shard_clients or value <= jax.local_device_count(), 'fl.model_parallel',
         value, f'with fl.shard_clients=False the frozen weights are split over this host\'s '
         f'{jax.local_device_count()} devices alone: use at most that many')


def _positive_finite(config, *keys, allowed: str = 'must be > 0 and finite'):
  for key in keys:
    value = _get(config, key)
    _check(isinstance(value, (int, float)) and 0 < value < math.inf, key, value, allowed)


def _validate_privacy(config):
  """Every dp.* number the run uses is a finite value in its range: 0, a negative, NaN or inf
  would otherwise surface as a traceback in calibration or after rounds have run."""
  dp = config.dp
  _one_of(config, 'dp.mode', configs.DP_MODES)
  if dp.mode == 'none':
    return
  _positive_finite(config, 'dp.clip_norm')
  _check(isinstance(dp.noise_multiplier, (int, float)) and 0 <= dp.noise_multiplier < math.inf,
         'dp.noise_multiplier', dp.noise_multiplier, 'must be >= 0 and finite (0: no noise)')
  _check(isinstance(dp.delta, (int, float)) and 0 < dp.delta < 1, 'dp.delta', dp.delta,
         'must be in (0, 1)')
  _one_of(config, 'dp.accountant', accounting.ACCOUNTANTS)
  if dp.target_epsilon is not None:
    _positive_finite(config, 'dp.target_epsilon')
  if dp.mode == 'client':
    _one_of(config, 'dp.sampling', sampling.SAMPLINGS)
    _check(aggregation(config) == 'uniform', 'fl.aggregation', config.fl.aggregation,
           "must be 'uniform' or 'auto' with dp.mode='client': weighting by example count "
           'lets one client move the average by more than its clip norm')
    _explain('dp.delta', dp.delta, accounting.check_delta, _client_spec(config))
    if dp.adaptive_clip:
      _check(isinstance(dp.target_quantile, (int, float)) and 0 < dp.target_quantile < 1,
             'dp.target_quantile', dp.target_quantile, 'must be in (0, 1)')
      _positive_finite(config, 'dp.clip_lr')
      if dp.clipped_count_stddev is not None:
        _positive_finite(config, 'dp.clipped_count_stddev', allowed=(
            'must be > 0 and finite: the stddev of the noise on the count of unclipped '
            'clients (None: fl.clients_per_round / 20)'))
  else:
    _check(not dp.adaptive_clip, 'dp.adaptive_clip', dp.adaptive_clip,
           "adaptive clipping is for dp.mode='client' only")
    _validate_sample_delta(config)
  _explain('dp.accountant', dp.accountant, accounting.accountant_name, accounting.PrivacySpec(
      mode=dp.mode, noise_multiplier=dp.noise_multiplier, delta=dp.delta, rounds=1,
      accountant=dp.accountant, sampling=dp.sampling))
  if dp.mode == 'client' and dp.adaptive_clip:
    _validate_adaptive_noise(config)


def _validate_sample_delta(config):
  """At sample level an individual is a training example: delta must be below one over all
  clients' examples together (`accounting.check_delta`, once the data is loaded). What is
  known now: data.num_train_examples, and fl.num_clients times the fewest examples the
  partition gives every client (`PartitionSpec.min_client_size`, e.g. Dirichlet's and
  quantity's data.min_client_size)."""
  d, fl = config.data, config.fl
  known = []
  if d.num_train_examples is not None:  # Every partition method places every example.
    known.append((d.num_train_examples, '', 'data.num_train_examples'))
  spec = partition.PARTITIONS.get(d.partition)
  floor, keys = spec.client_floor(spec.read_options(config))
  if floor > 0:
    known.append((fl.num_clients * floor, 'at least ', f'fl.num_clients x {floor}' + (
        f' by {", ".join(keys)}' if keys else f' under data.partition={d.partition!r}')))
  if not known:
    return
  total, at_least, source = max(known)
  _check(config.dp.delta * total < 1, 'dp.delta', config.dp.delta,
         f'must be below 1/{total} = {1 / total:.3g}: under dp.mode=\'sample\' an individual '
         f'is a training example, and the clients hold {at_least}{total} ({source}); at '
         'delta >= 1/n, publishing one example drawn at random meets the guarantee; lower '
         'dp.delta')


def _client_spec(config) -> accounting.PrivacySpec:
  dp, fl = config.dp, config.fl
  return accounting.PrivacySpec(
      mode='client', noise_multiplier=dp.noise_multiplier, delta=dp.delta, rounds=fl.rounds,
      accountant=dp.accountant, sampling=dp.sampling, num_clients=fl.num_clients,
      clients_per_round=fl.clients_per_round)


def _validate_adaptive_noise(config):
  """The clip count's noise must leave the update a share of the noise multiplier,
  the configured one or the one calibrated to dp.target_epsilon: at client level
  calibration needs no data, so an impossible split fails here, not in training.
  A resume that grows fl.rounds calibrates the remaining rounds instead, once the
  checkpoint's ledger is read: `check_remaining_adaptive_noise`."""
  dp = config.dp
  noise_multiplier, source = dp.noise_multiplier, 'set by dp.noise_multiplier'
  if dp.target_epsilon is not None:
    noise_multiplier = _explain('dp.target_epsilon', dp.target_epsilon,
                                accounting.calibrate_noise, _client_spec(config),
                                dp.target_epsilon)
    source = f'calibrated to dp.target_epsilon={dp.target_epsilon}'
  if noise_multiplier > 0:
    stddev = clipped_count_stddev(config)
    try:
      mechanisms.adaptive_delta_noise_multiplier(noise_multiplier, stddev)
    except errors.UserError as e:
      raise ConfigError('dp.clipped_count_stddev', stddev,
                        f'{e}; noise_multiplier is {source}') from None


def _adaptive_split_ok(config, noise_multiplier: float) -> bool:
  try:
    mechanisms.adaptive_delta_noise_multiplier(noise_multiplier, clipped_count_stddev(config))
  except errors.UserError:
    return False
  return True


def check_remaining_adaptive_noise(config, spec: accounting.PrivacySpec, ledger,
                                   calibrated_for_rounds: int | None,
                                   noise_multiplier: float) -> None:
  """A resume under dp.target_epsilon that grows fl.rounds calibrates the remaining rounds
  (`accounting.calibrate_remaining`) to `noise_multiplier`, more than the checkpoint's run
  used: raises ConfigError (naming fl.rounds and dp.clipped_count_stddev) if adaptive
  clipping's count noise leaves the updates no share of it, with the largest fl.rounds that
  still works (a bisection over calibrations: on this error path only)."""
  dp = config.dp
  if not (dp.mode == 'client' and dp.adaptive_clip) or _adaptive_split_ok(config,
                                                                          noise_multiplier):
    return
  done = len(ledger)
  works = max(calibrated_for_rounds or done, done)  # The checkpoint's own noise worked.
  fails = config.fl.rounds
  while fails - works > 1:
    middle = (works + fails) // 2
    try:
      ok = _adaptive_split_ok(config, accounting.calibrate_remaining(
          ledger, spec, dp.target_epsilon, middle - done))
    except errors.UserError:  # The target cannot be reached over that many rounds.
      ok = False
    works, fails = (middle, fails) if ok else (works, middle)
  stddev, left = clipped_count_stddev(config), config.fl.rounds - done
  raise ConfigError(
      'fl.rounds', config.fl.rounds,
      f'under dp.target_epsilon={dp.target_epsilon}, the {left} round{"s" * (left != 1)} left '
      f"after the checkpoint's {done} need{'s' * (left == 1)} noise multiplier "
      f"{noise_multiplier:.4g}, and adaptive clipping's count noise "
      f'dp.clipped_count_stddev={stddev:g} must exceed half of it ({noise_multiplier / 2:.4g}) '
      'to leave the updates any: '
      + (f'keep fl.rounds at {done}' if works == done else f'grow fl.rounds to at most {works}')
      + f', or start a new --workdir with --config.dp.clipped_count_stddev above '
      f'{noise_multiplier / 2:.4g}')


def _explain(key: str, value, check, *args):
  """Runs a library check early, reporting its error against the config key."""
  try:
    return check(*args)
  except errors.UserError as e:
    raise ConfigError(key, value, str(e)) from None
