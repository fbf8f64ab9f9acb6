"""The paper's PCam run: ViT-B/16 (ImageNet-21k), 64 clients, Dirichlet(0.5).

The paper trains on 20,000 PCam training images.
"""
from fedpeft_jax import configs


def get_config(arg: str = 'bias'):
  """`arg`: METHOD[,dp=none|client|sample][,clients=N][,participation=F]."""
  c = configs.base_config(arg)
  c.model.checkpoint = 'ViT-B_16.npz'
  c.data.name = 'patch_camelyon'
  c.data.num_classes = 2
  c.data.train_split = 'train[:20000]'
  c.data.alpha = 0.5
  return c


def get_sweep():
  """The paper's grid: `launch.py --mode=sweep --config=THIS_FILE --workdir=ROOT`."""
  return configs.paper_sweep()
