"""The paper's Resisc45 run: ViT-B/16 (ImageNet-21k), 64 clients, Dirichlet(0.1).

TFDS has Resisc45 as a single 31,500-image `train` split: 80% train, 20% test.
"""
from fedpeft_jax import configs


def get_config(arg: str = 'bias'):
  """`arg`: METHOD[,dp=none|client|sample][,clients=N][,participation=F]."""
  c = configs.base_config(arg)
  c.model.checkpoint = 'ViT-B_16.npz'
  c.data.name = 'resisc45'
  c.data.num_classes = 45
  c.data.train_split = 'train[:80%]'
  c.data.test_split = 'train[80%:]'
  c.data.storage_size = 224  # Stored at 256 px; kept on device at the model's size.
  c.data.alpha = 0.1
  return c


def get_sweep():
  """The paper's grid: `launch.py --mode=sweep --config=THIS_FILE --workdir=ROOT`."""
  return configs.paper_sweep()
