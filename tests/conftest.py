import importlib.util
import pathlib

import pytest


REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
TI4_CHECKPOINT = SHARED / 'backbones' / 'vit_ti4_cifar10.npz'
PCAM = SHARED / 'data' / 'pcam32_jpeg.tar.gz'
CIFAR10 = SHARED / 'data' / 'cifar10_jpeg.tar.gz'


def needs(path: pathlib.Path):
  return pytest.mark.skipif(not path.exists(), reason=f'{path} (../shared) is not here')


def tiny_config(arg: str = 'bias'):
  """experiments/synthetic_tiny.py: a synthetic-data run with the test-size ViT."""
  spec = importlib.util.spec_from_file_location('synthetic_tiny',
                                                REPO / 'experiments' / 'synthetic_tiny.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
