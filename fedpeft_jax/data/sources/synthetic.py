"""`synthetic`: learnable noise images for tests and benchmarks, needing no files.

`num_classes` class templates plus noise, `num_examples` of them; class k is named str(k).
Reads no config key of its own: data.num_train_examples and data.num_test_examples, which
it requires, say how many images it makes, data.num_classes how many classes.
"""
from __future__ import annotations

import zlib

import numpy as np

from fedpeft_jax.data.sources import SOURCES
from fedpeft_jax.data.sources.base import (DataError, Dataset, Request, SourceSpec,
                                           label_map, relabel)


def load(request: Request) -> Dataset:
  """`request.num_examples` images [N, image_size, image_size, 3] of `request.num_classes`
  classes, labels a permutation of arange(N) % num_classes.

  Templates depend on `request.seed` only, so every split shares the same classes; the
  noise and labels also depend on the split, so splits differ. Labels number
  `request.class_names` (the training split's; None: str(0)..), see `label_map`. Raises
  DataError naming `clients` (synthetic data has none) or a size that is None or < 1.
  """
  if request.clients:
    raise DataError('Synthetic data has no clients; per-client data is a folder laid out '
                    '<split>/<client>/<class>/*.jpg or a TFDS dataset with a client '
                    'feature.', argument='clients')
  num_classes, image_size, num_examples = (request.num_classes, request.image_size,
                                           request.num_examples)
  for arg, value in (('num_classes', num_classes), ('image_size', image_size),
                     ('num_examples', num_examples)):
    if value is None or value < 1:
      raise DataError(f'The synthetic source needs a positive {arg}; got {value}.',
                      argument=arg)
  shape = (image_size, image_size, 3)
  templates = np.random.default_rng(request.seed).uniform(
      0, 255, (num_classes,) + shape).astype(np.float32)
  # crc32, unlike hash(), is the same in every process.
  rng = np.random.default_rng([request.seed, zlib.crc32(request.split.encode())])
  labels = rng.permutation(np.arange(num_examples) % num_classes)
  noise = 48 * rng.standard_normal((num_examples,) + shape, np.float32)
  images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
  own_names = tuple(str(i) for i in range(num_classes))
  class_names = label_map(own_names, request.class_names,
                          f'synthetic data split {request.split!r}', 'class name',
                          'give every split the same num_classes')
  return Dataset(images, relabel(own_names, class_names)[labels], class_names)


def _check(config, needs_data: bool):
  del needs_data  # Nothing to open.
  for key in ('num_train_examples', 'num_test_examples'):
    if config.data[key] is None:
      return f'data.{key}', "is how many images source='synthetic' makes: set it, e.g. 2048"
  return None


SOURCES.register('synthetic', SourceSpec(
    load=load, summary='learnable random images: class templates plus noise', check=_check,
    makes_images=True))
