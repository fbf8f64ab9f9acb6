import pathlib

import pytest

from fedpeft_jax import configs

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
TI4_CHECKPOINT = SHARED / 'backbones' / 'vit_ti4_cifar10.npz'
PCAM = SHARED / 'data' / 'pcam32_jpeg.tar.gz'
CIFAR10 = SHARED / 'data' / 'cifar10_jpeg.tar.gz'


def needs(path: pathlib.Path):
  return pytest.mark.skipif(not path.exists(), reason=f'{path} (../shared) is not here')


def tiny_config(method: str = 'bias'):
  """A synthetic-data run with the test-size ViT: seconds on a CPU."""
  c = configs.base_config(method)
  c.model.name = 'vit_test'
  c.model.image_size = 16
  c.model.dtype = 'float32'
  c.data.source = 'synthetic'
  c.data.num_classes = 4
  c.data.num_train_examples = 256
  c.data.num_test_examples = 64
  c.data.partition = 'iid'
  c.fl.num_clients = 8
  c.fl.clients_per_round = 4
  c.fl.rounds = 3
  c.fl.local_epochs = 1
  c.fl.batch_size = 16
  c.eval.batch_size = 32
  return c
