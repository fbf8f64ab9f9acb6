"""A seconds-long run on synthetic images with the test-size ViT: smoke tests and demos.

  python launch.py --config=experiments/synthetic_tiny.py:bias --workdir=/tmp/tiny
  python launch.py --config=experiments/synthetic_tiny.py --mode=sweep --workdir=/tmp/sweep
"""
from fedpeft_jax import configs


def get_config(arg: str = 'bias'):
  c = configs.base_config(arg, clients=8, participation=0.5)
  c.model.name = 'vit_test'
  c.model.image_size = 16
  c.model.dtype = 'float32'
  c.data.source = 'synthetic'
  c.data.num_classes = 4
  c.data.num_train_examples = 256
  c.data.num_test_examples = 64
  c.data.partition = 'iid'
  c.fl.rounds = 3
  c.fl.local_epochs = 1
  c.fl.batch_size = 16
  c.eval.batch_size = 32
  return c


def get_sweep():
  """2 methods x 2 seeds, in seconds: `--mode=sweep` smoke tests and demos."""
  return configs.grid({'arg': ['head', 'bias'], 'seed': [0, 1]})
