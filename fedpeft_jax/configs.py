"""Defaults shared by every experiment config; each `experiments/*.py` overrides them."""
from __future__ import annotations

import itertools

import ml_collections
from ml_collections import config_dict

from fedpeft_jax import errors
from fedpeft_jax import peft
from fedpeft_jax.data import partition
from fedpeft_jax.experiment import extra_callbacks
from fedpeft_jax.federated import lora_rules

# Each method's default client learning rate, as its PEFT_METHODS entry declares it (the
# paper's configs'): a read-only view for reports and tests.
LEARNING_RATES = {name: peft.PEFT_METHODS.get(name).learning_rate for name in peft.METHODS}


def learning_rate(method: str) -> float:
  """A composed method (e.g. 'bias+lora') takes the smallest rate of its parts
  (`peft.learning_rate`); a registered method without one is a `UserError`.

  Unknown parts are skipped here: validation at launch names them.
  """
  return peft.learning_rate(method)


DP_MODES = ('none', 'client', 'sample')
METHODS_COMPARED = ('full', 'head', 'bias', 'adapter', 'prompt', 'lora')


def grid(axes: dict[str, list]) -> list[dict]:
  """Every combination of the axes' values, the last axis fastest: a sweep's points.

  `grid({'arg': ['head', 'bias'], 'seed': [0, 1]})` ->
  `[{'arg': 'head', 'seed': 0}, {'arg': 'head', 'seed': 1}, {'arg': 'bias', ...}, ...]`.
  """
  return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def paper_sweep(seeds=(0, 1, 2)) -> list[dict]:
  """The paper's grid on one dataset: every method against full fine-tuning, across client
  participation, IID and non-IID (the config's Dirichlet alpha) data, and DP, with seeds."""
  return grid({
      'arg': [f'{method},dp={dp},participation={participation}'
              for method in METHODS_COMPARED for participation in ('0.125', '1.0')
              for dp in DP_MODES],
      'data.partition': ['dirichlet', 'iid'],
      'seed': list(seeds)})


# Clients of mixed LoRA ranks (issue 22): each client draws its rank from these, the factors
# held at the largest; run by the rules made for mixed ranks (FLoRA stacks, FlexLoRA
# truncates, HetLoRA zero-pads with sparsity weights) and by FedIT's plain zero-padded
# average, the baseline they improve on.
MIXED_RANKS = {'peft.lora_client_ranks': '2,4,8,16', 'peft.lora_rank': 16}
MIXED_RANK_RULES = ('fedit', 'flora', 'flexlora', 'hetlora')


def lora_aggregation_points(base: dict, seeds) -> list[dict]:
  """A LoRA aggregation sweep's points: every registered rule at the config's rank, then
  `MIXED_RANK_RULES` with clients of `MIXED_RANKS`, each with every seed, on top of `base`
  (LoRA on the config's clients)."""
  def point(rule, extra, seed):
    return {**base, 'peft.lora_aggregation': rule, **extra, 'seed': seed}
  return ([point(rule, {}, seed) for rule in lora_rules.LORA_RULES.names() for seed in seeds]
          + [point(rule, MIXED_RANKS, seed) for rule in MIXED_RANK_RULES for seed in seeds])


def flat_config(config) -> dict:
  """{'fl.rounds': 10, ...}: every key of a (nested) config, dot-joined, in order."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update({f'{key}.{k}': v for k, v in flat_config(value).items()})
    else:
      flat[key] = value
  return flat


OPTIONS = {'dp': 'none', 'clients': '64', 'participation': '0.125'}


def parse_arg(arg: str, **defaults) -> tuple[str, dict[str, str]]:
  """`'METHOD[,dp=MODE][,clients=N][,participation=F]'` -> (method, options).

  The options span the paper's grid: dp none/client/sample, 16 or 64 clients,
  12.5% or 100% of them per round. Values are checked by
  `validation.validate`, which reports a typo as one line rather than as a
  traceback from inside flag parsing.
  """
  method, *pairs = arg.split(',')
  options = {**OPTIONS, **{k: str(v) for k, v in defaults.items()}}
  for pair in pairs:
    key, _, value = pair.partition('=')
    if key not in OPTIONS:
      raise errors.UserError(f'config argument {arg!r}: unknown option {key!r}; '
                             f'allowed: {", ".join(OPTIONS)}')
    options[key] = value
  return method, options


def base_config(arg: str = 'bias', **option_defaults) -> ml_collections.ConfigDict:
  """Defaults for `arg` (see `parse_arg`), e.g. 'bias+lora,dp=client,clients=16'.

  `option_defaults` are a config file's own defaults for the argument's options.
  """
  method, options = parse_arg(arg, **option_defaults)
  c = ml_collections.ConfigDict()
  c.seed = 0
  _model_and_peft(c, method)
  _data(c)
  _federated(c, arg, options)
  _training_and_privacy(c, method, options['dp'])
  return c


def _model_and_peft(c, method: str) -> None:
  c.model = ml_collections.ConfigDict()
  # A registered model family (fedpeft_jax/model/families/): 'vit', 'llama' (Hugging Face
  # decoders, `checkpoint` their directory or Hub id); it names the task.
  c.model.family = 'vit'
  c.model.name = 'vit_b16'
  c.model.checkpoint = ''  # '' trains from random initialisation.
  # family 'llama' without a checkpoint: the model's Hugging Face config.json values
  # (hidden_size, num_hidden_layers, ...), for --mode=masks with no weights downloaded.
  c.model.hf_config = ml_collections.ConfigDict()
  c.model.image_size = 224
  c.model.dtype = 'bfloat16'  # Compute dtype; parameters stay float32.
  c.model.representation_size = config_dict.placeholder(int)  # pre_logits, off.
  c.model.attention = ''  # '' (XLA) or 'cudnn': fused attention on NVIDIA GPUs.
  c.model.frozen_dtype = ''  # e.g. 'bfloat16': store the frozen backbone so; '': as params.
  # Position embeddings of a checkpoint made at another image size: 'zoom' (the official
  # release's scipy.ndimage.zoom, order 1) or 'bicubic' (timm's resample_abs_pos_embed).
  c.model.posemb_resample = 'zoom'

  c.peft = ml_collections.ConfigDict()
  c.peft.method = method
  # Every registered method's options with its defaults (fedpeft_jax/peft/<method>.py):
  # cache_head_features, adapter_reduction, adapter_shared, prompt_tokens, prompt_deep,
  # lora_rank, lora_alpha, lora_freeze_a (FFA-LoRA), lora_targets ('q_proj,v_proj'), ...
  for key, value in peft.option_defaults().items():
    c.peft[key] = value


def _data(c) -> None:
  c.data = ml_collections.ConfigDict()
  c.data.source = 'tfds'  # 'tfds', 'folder', 'synthetic' or 'text' (data/sources/).
  c.data.name = 'cifar100'  # TFDS name; for source='text' with no path, a Hub dataset.
  c.data.path = ''  # Folder or archive for source='folder' or 'text'.
  c.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None: TFDS default.
  c.data.download = False  # Let TFDS download and prepare a missing dataset.
  c.data.train_split = 'train'
  c.data.test_split = 'test'
  c.data.num_classes = 100
  c.data.storage_size = config_dict.placeholder(int)  # Host-side resize; None: as stored.
  # How many images source='synthetic' makes; of real data, a random subset of that many,
  # the same for every seed (None: the whole split).
  c.data.num_train_examples = config_dict.placeholder(int)
  c.data.num_test_examples = config_dict.placeholder(int)
  # 'iid', 'dirichlet' (label skew), 'shards' (label skew, McMahan et al.), 'quantity'
  # (size skew) or 'natural' (the clients the data names): fedpeft_jax/data/partition/.
  c.data.partition = 'dirichlet'
  # Every registered partition's options with their defaults (`PartitionSpec.options`):
  # alpha 0.1 (Dirichlet concentration: of labels for dirichlet, of sizes for quantity),
  # min_client_size 10 (dirichlet and quantity), shards_per_client 2 (shards), ...
  for key, value in partition.option_defaults().items():
    c.data[key.removeprefix('data.')] = value
  c.data.client_feature = ''  # natural on TFDS data: the feature holding the client id.
  # source='text' (fedpeft_jax/data/sources/text.py; tokenized by model.checkpoint's
  # tokenizer): the field holding each record's text, or for instruction data the prompt
  # and response fields (loss on the response only); the field naming each record's client
  # (natural); tokens a sequence, bos and eos included; clients with fewer training records
  # are left out of every split, as LEAF does (1: none).
  c.data.text_field = 'text'
  c.data.prompt_field = ''
  c.data.response_field = ''
  c.data.client_field = 'client'
  c.data.max_length = 128
  c.data.min_client_examples = 1


def _federated(c, arg: str, options: dict) -> None:
  c.fl = ml_collections.ConfigDict()
  try:
    c.fl.num_clients = int(options['clients'])
    c.fl.clients_per_round = max(1, round(c.fl.num_clients * float(options['participation'])))
  except ValueError:
    raise errors.UserError(f'config argument {arg!r}: clients must be an integer and '
                           'participation a fraction, e.g. clients=16,participation=1.0'
                           ) from None
  c.fl.rounds = 50
  c.fl.local_epochs = 10
  c.fl.batch_size = 64
  c.fl.eval_every = 1
  c.fl.client_chunk = 0  # Clients vmapped at once; 0: all of a round's clients.
  # 'packed': a client's lane takes the next client when it is done, and steps narrow to
  # the clients still training; 'padded': every client of a chunk computes as many steps
  # as its largest. Same result; packed computes (nearly) only real examples.
  c.fl.schedule = 'packed'
  # A registered federated algorithm (fedpeft_jax/federated/algorithms/): 'fedavg',
  # 'fedprox', 'scaffold' (control variates, option II), 'fednova', ...
  c.fl.algorithm = 'fedavg'
  # FedProx: (mu / 2) ||w - w_global||^2 in every local step, under any algorithm; 0: off.
  c.fl.prox_mu = 0.0
  # On the average update (Reddi et al. 2021): 'sgd' (FedAvg), 'momentum' (FedAvgM),
  # 'adam', 'yogi', 'adagrad' (FedAdam, FedYogi, FedAdagrad).
  c.fl.server_optimizer = 'sgd'
  # None: 1.0 for sgd and momentum (sgd at 1.0 is plain FedAvg), 0.01 for the adaptive ones.
  c.fl.server_lr = config_dict.placeholder(float)
  c.fl.server_momentum = 0.9  # momentum.
  c.fl.server_b1 = 0.9  # adam, yogi.
  c.fl.server_b2 = 0.99  # adam, yogi.
  c.fl.server_eps = 1e-3  # adam, yogi, adagrad: the paper's adaptivity tau.
  # 'weighted' by example count, 'uniform', or 'auto': uniform under client DP, else weighted.
  c.fl.aggregation = 'auto'
  c.fl.dropout_prob = 0.0  # Chance that a sampled client fails to report.
  c.fl.shard_clients = True  # Spread each chunk of clients over all devices.
  # Devices each frozen weight is split over (a 'model' mesh axis; clients are spread over the
  # device count / this): for a backbone too large for one device. 1: every device holds it.
  c.fl.model_parallel = 1


def _training_and_privacy(c, method: str, dp_mode: str) -> None:
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = learning_rate(method)
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 1e-4

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256

  c.dp = ml_collections.ConfigDict()
  c.dp.mode = dp_mode  # 'none', 'client' (DP-FedAvg) or 'sample' (local DP-SGD).
  c.dp.clip_norm = 1.0  # Of a client's update (client) or an example's gradient (sample).
  c.dp.noise_multiplier = 1.0  # Noise stddev / clip_norm; ignored if target_epsilon is set.
  c.dp.target_epsilon = config_dict.placeholder(float)  # Calibrate the noise to this.
  c.dp.delta = 1e-5
  c.dp.sampling = 'poisson'  # Client sampling under dp.mode=client: 'poisson' or 'fixed'.
  c.dp.accountant = 'auto'  # 'auto' (PLD where supported, else RDP), 'rdp' or 'pld'.
  c.dp.adaptive_clip = False  # Quantile-based clip norm (Andrew et al. 2021), client mode.
  c.dp.target_quantile = 0.5
  c.dp.clip_lr = 0.2
  c.dp.clipped_count_stddev = config_dict.placeholder(float)  # None: expected clients / 20.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 5  # Rounds between checkpoints; one is always written at the end.
  c.checkpoint.keep = 2
  c.checkpoint.force = False  # Resume even if the workdir was made with another config.

  c.callbacks = ml_collections.ConfigDict()
  # Optional callbacks by name, comma-separated (fedpeft_jax/experiment/extra_callbacks/),
  # e.g. 'early_stop'; their options follow, with their defaults.
  c.callbacks.extra = ''
  for key, value in extra_callbacks.option_defaults().items():
    c.callbacks[key] = value

  c.report = ml_collections.ConfigDict()
  # --mode=report counts the MiB sent until test accuracy first reaches this fraction.
  c.report.target_accuracy = 0.7
  # Text runs (reported in perplexity): the MiB sent until test perplexity first falls to
  # this; None: no target, the report has no MiB-to-target column.
  c.report.target_perplexity = config_dict.placeholder(float)
