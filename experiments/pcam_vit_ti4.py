"""Offline FedPEFT on this machine: the shared PCam subset and ViT-Ti/4 backbone, 32 px.

  python launch.py --config=experiments/pcam_vit_ti4.py:bias --workdir=/tmp/pcam_bias

The data and backbone are read from `shared/` beside the checkout, found from this
file's own location, so the command works from any working directory.
"""
import pathlib

from fedpeft_jax import configs, errors

SHARED = pathlib.Path(__file__).resolve().parents[2] / 'shared'


def get_config(arg: str = 'bias'):
  """`arg`: METHOD[,dp=none|client|sample][,clients=N][,participation=F]."""
  c = configs.base_config(arg)
  c.model.name = 'vit_ti4'
  c.model.checkpoint = str(SHARED / 'backbones' / 'vit_ti4_cifar10.npz')
  c.model.image_size = 32
  c.model.dtype = 'float32'  # CPUs run bfloat16 matmuls slower than float32.
  c.data.source = 'folder'
  c.data.path = str(SHARED / 'data' / 'pcam32_jpeg.tar.gz')
  c.data.num_classes = 2
  c.data.partition = 'iid'
  c.fl.rounds = 10
  c.fl.local_epochs = 1
  c.fl.batch_size = 32
  c.fl.eval_every = 5
  return c


# Client drift made visible: label skew and several local epochs. On subsets (2,048
# training images: 64 clients of 2..174; 1,500 test images) so that 21 runs of 5 rounds,
# each evaluated, fit in about 90 minutes of two CPU cores.
NON_IID = {'data.partition': 'dirichlet', 'data.alpha': 0.5, 'fl.local_epochs': 5,
           'data.num_train_examples': 2048, 'data.min_client_size': 2,
           'data.num_test_examples': 1500, 'fl.rounds': 5, 'fl.eval_every': 1}
# The LoRA rules' comparison on the same Dirichlet(0.5) clients, made lighter: NON_IID
# (5 local epochs, 5 rounds, 1,500 test images) measured 7.5 minutes a point on two CPU
# cores, 4.5 hours for its 36 points; 2 local epochs, 4 rounds and 500 test images
# bring a point to about 2.5 minutes.
LORA_AGGREGATION = {**NON_IID, 'fl.local_epochs': 2, 'fl.rounds': 4,
                    'data.num_test_examples': 500}
ALGORITHMS = {  # Name -> the keys that select it, on top of FedAvg.
    'fedavg': {},
    'fedavgm': {'fl.server_optimizer': 'momentum'},
    'fedadam': {'fl.server_optimizer': 'adam'},
    'fedprox': {'fl.prox_mu': 0.01},
    'scaffold': {'fl.algorithm': 'scaffold'},
}


def get_sweep(arg: str = 'methods'):
  """'methods': every method against full fine-tuning, 3 seeds (the README's testbed study).
  'algorithms': FedAvg, FedAvgM, FedAdam, FedProx and SCAFFOLD for bias, and LoRA averaged
  as it is (FedIT) against FFA-LoRA, on Dirichlet(0.5) clients with 5 local epochs, 3 seeds
  (`NON_IID`). 'lora_aggregation': every LoRA aggregation rule (`peft.lora_aggregation`) at
  rank 8, and the mixed-rank rules with clients of ranks 2/4/8/16, 3 seeds, on the same
  clients (`LORA_AGGREGATION`: 2 local epochs, 4 rounds): 36 runs
  (`configs.lora_aggregation_points`)."""
  seeds = [0, 1, 2]
  if arg == 'methods':
    return configs.grid({'arg': list(configs.METHODS_COMPARED), 'seed': seeds})
  if arg == 'algorithms':
    bias = [{'arg': 'bias', **NON_IID, **keys, 'seed': seed}
            for keys in ALGORITHMS.values() for seed in seeds]
    lora = [{'arg': 'lora', **NON_IID, 'peft.lora_freeze_a': freeze, 'seed': seed}
            for freeze in (False, True) for seed in seeds]
    return bias + lora
  if arg == 'lora_aggregation':
    return configs.lora_aggregation_points({'arg': 'lora', **LORA_AGGREGATION}, seeds)
  raise errors.UserError(f"--config=experiments/pcam_vit_ti4.py:{arg}: this file's sweeps are "
                         "'methods', 'algorithms' and 'lora_aggregation'")
