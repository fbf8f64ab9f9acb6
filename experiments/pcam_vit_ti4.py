"""Offline FedPEFT on this machine: the shared PCam subset and ViT-Ti/4 backbone, 32 px.

  python launch.py --config=experiments/pcam_vit_ti4.py:bias --workdir=/tmp/pcam_bias

The data and backbone are read from `shared/` beside the checkout, found from this
file's own location, so the command works from any working directory.
"""
import pathlib

from fedpeft_jax import configs

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


def get_sweep():
  """Every method against full fine-tuning, 3 seeds: the README's testbed study."""
  return configs.grid({'arg': list(configs.METHODS_COMPARED), 'seed': [0, 1, 2]})
