"""The paper's CIFAR-100 run: ViT-B/16 (ImageNet-21k), 64 clients, Dirichlet(0.1).

  python launch.py --config=experiments/cifar100_vit_b16.py:bias --workdir=/tmp/c100
"""
from fedpeft_jax import configs


def get_config(arg: str = 'bias'):
  """`arg`: METHOD[,dp=none|client|sample][,clients=N][,participation=F]."""
  c = configs.base_config(arg)
  c.model.checkpoint = 'ViT-B_16.npz'  # ImageNet-21k weights from the ViT release.
  c.data.name = 'cifar100'
  c.data.num_classes = 100
  c.data.alpha = 0.1
  return c


def get_sweep():
  """The paper's grid: `launch.py --mode=sweep --config=THIS_FILE --workdir=ROOT`."""
  return configs.paper_sweep()
