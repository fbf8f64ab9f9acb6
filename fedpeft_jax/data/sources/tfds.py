"""`tfds`: prepared TensorFlow Datasets data, read without TensorFlow through
array_record (tfrecord needs TensorFlow); downloaded only when asked to. With `clients`,
each example's client id is the feature named by `client_feature`.

Labels number the 'label' ClassLabel feature's names. Reads config keys data.name,
data.data_dir, data.download and data.client_feature.
"""
from __future__ import annotations

import numpy as np
import PIL.Image

from fedpeft_jax import errors
from fedpeft_jax.data.partition import PARTITIONS
from fedpeft_jax.data.sources import SOURCES
from fedpeft_jax.data.sources.base import (DataError, Dataset, Request, SourceSpec, finish,
                                           label_map, progress, relabel, stack,
                                           to_rgb_array)


def load(request: Request, *, name: str = '', data_dir: str | None = None,
         download: bool = False, client_feature: str = '') -> Dataset:
  """Reads `request.split` (a TFDS split string, e.g. 'train[:50%]') of TFDS dataset
  `name` from `data_dir` (None: TFDS's default); prepares it first only with `download`.

  Implicit downloads hang for minutes on machines without internet, so an unprepared
  dataset is a DataError (argument 'data_dir') unless `download` is set. Raises DataError
  naming `name` (unknown; no ClassLabel 'label'), the split (bad; label names other than
  `request.class_names`) or `client_feature` (missing, with `request.clients`).
  """
  builder, root = _prepared_builder(name, data_dir, download)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  features = builder.info.features
  if not {'image', 'label'} <= set(features.keys()):
    raise DataError(f'TFDS dataset {name!r} has features {list(features)}; '
                    "only datasets with 'image' and 'label' are supported.")
  if not isinstance(features['label'], tfds.features.ClassLabel):
    # Without a ClassLabel's names no split can be labelled by class name.
    raise DataError(f"TFDS dataset {name!r} has a 'label' feature of type "
                    f"{type(features['label']).__name__}, not ClassLabel, so its classes "
                    'have no names; only datasets with a ClassLabel label are supported.',
                    argument='name')
  own_names = tuple(features['label'].names)
  split = request.split
  class_names = label_map(own_names, request.class_names, f'TFDS {name!r} split {split!r}',
                          'label name', 'load every split from the same dataset')
  if request.clients:
    check_client_feature(name, client_feature, features)
  feature = client_feature if request.clients else None  # None: client ids are not read.
  images, labels, client_ids = [], [], []
  for example in progress(_examples(builder, name, split, root), f'decoding {name} {split!r}',
                          total=builder.info.splits[split].num_examples):
    image = example['image']
    if image.shape[-1] == 1:  # Grayscale, e.g. MNIST.
      image = image[..., 0]
    images.append(to_rgb_array(PIL.Image.fromarray(image), request.image_size))
    labels.append(example['label'])
    if feature is not None:
      client_ids.append(_plain(example[feature]))
  if not images:
    raise DataError(f'Split {split!r} of TFDS dataset {name!r} is empty.')
  ds = Dataset(stack(images, [f'example {i}' for i in range(len(images))],
                     f'TFDS {name!r} split {split!r}'),
               relabel(own_names, class_names)[np.asarray(labels, np.int64)], class_names,
               np.asarray(client_ids) if feature is not None else None)
  return finish(ds, request, f'tfds data {name!r} split {split!r}')


def _prepared_builder(name: str, data_dir: str | None, download: bool):
  """The builder of prepared data `name` (preparing it with `download`) and the data_dir
  it looked in."""
  if not name:
    raise DataError("The tfds source needs `name`, e.g. 'cifar100'.", argument='name')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f'Unknown TFDS dataset {name!r} (no such builder, nor '
                    f'prepared data under data_dir {data_dir!r}); check '
                    '`name` against tfds.list_builders().', argument='name') from e
  root = data_dir or tfds.core.constants.get_default_data_dir()
  if not builder.is_prepared():
    if not download:
      raise DataError(
          f'TFDS dataset {name!r} is not prepared in data_dir {root!r} '
          f'(looked for {builder.data_dir}). Either run `tfds build {name} '
          f'--data_dir={root} --file_format=array_record` on a machine with '
          'internet and copy the result here, set `download=True`, or point '
          '`data_dir` at prepared data.', argument='data_dir')
    # array_record, unlike the default tfrecord, is readable without TF.
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare()
  return builder, root


def _examples(builder, name: str, split: str, root: str):
  """The split's examples as numpy dicts: by random access when stored so (array_record),
  else through TensorFlow, which must be installed then."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  formats = builder.info.available_file_formats()
  if formats & tfds.core.file_adapters.FileFormat.with_random_access():
    try:
      source = builder.as_data_source(split=split)
    except ValueError as e:  # A bad split string.
      raise DataError(f'Bad split {split!r} for TFDS dataset {name!r} ({e}); '
                      f'its splits are {sorted(builder.info.splits)}.') from e
    examples = (source.__getitems__(range(i, min(i + 1024, len(source))))
                for i in range(0, len(source), 1024))
    return (e for chunk in examples for e in chunk)
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise DataError(
        f'TFDS dataset {name!r} in {builder.data_dir} is stored as '
        f'{sorted(f.value for f in formats)}, which needs TensorFlow to read: '
        'pip install tensorflow-cpu, or rebuild it with `tfds build '
        f'{name} --data_dir={root} --file_format=array_record`.') from e
  return tfds.as_numpy(builder.as_dataset(split=split))


def check_client_feature(name: str, client_feature: str, features) -> None:
  """`client_feature` is a feature of TFDS dataset `name`, whose `features` are given."""
  if not client_feature:
    raise DataError(f'Per-client TFDS data needs client_feature, the feature of {name!r} '
                    f'that holds each example\'s client id; its features are '
                    f'{list(features)}.', argument='client_feature')
  if client_feature not in features:
    raise DataError(f'TFDS dataset {name!r} has no feature {client_feature!r}; its '
                    f'features are {list(features)}.', argument='client_feature')


def _plain(value):
  """A client id as a str or an int: TFDS gives text as bytes and numbers as numpy."""
  value = np.asarray(value).item()
  return value.decode() if isinstance(value, bytes) else value


def _check(config, needs_data: bool):
  """data.name names a TFDS builder, and under a partition by the data's clients (natural)
  data.client_feature one of its features; only `needs_data` (importing TFDS is slow)."""
  d = config.data
  if not needs_data:
    return None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    tfds.builder_cls(d.name)
  except Exception:  # tfds raises several types for unknown names.  pylint: disable=broad-except
    return 'data.name', ('is not a TFDS dataset name (e.g. cifar100, resisc45, '
                         'patch_camelyon; see tfds.list_builders())')
  if PARTITIONS.get(d.partition).needs_client_ids:  # The dataset's description, not its data.
    features = tfds.builder(d.name, data_dir=d.data_dir).info.features
    try:
      check_client_feature(d.name, d.client_feature, features)
    except errors.UserError as e:
      return 'data.client_feature', str(e)
  return None


SOURCES.register('tfds', SourceSpec(
    load=load, summary='prepared TensorFlow Datasets data (array_record)',
    keys={'name': 'data.name', 'data_dir': 'data.data_dir', 'download': 'data.download',
          'client_feature': 'data.client_feature'},
    check=_check, clients="source='tfds' with data.client_feature"))
