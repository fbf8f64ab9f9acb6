"""fedpeft_jax.data.sources: folder, archive, TFDS and synthetic images, and their errors."""
import collections
import functools
import io
import pathlib
import tarfile
import time
from typing import Callable, NamedTuple

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from fedpeft_jax import configs, validation
from fedpeft_jax.data import sources
from fedpeft_jax.experiment import build
from tests.conftest import PCAM, tiny_config



def _jpeg(color, size=8) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.new('RGB', (size, size), color).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


# Distinct colors per class, so labels can be checked against pixels.
COLORS = {'cat': (200, 30, 30), 'ant': (30, 200, 30), 'bee': (30, 30, 200)}


def _make_tree(root: pathlib.Path, splits=('train', 'test'), size=8):
  for split in splits:
    for name, color in COLORS.items():
      (root / split / name).mkdir(parents=True)
      for i in range(3):
        (root / split / name / f'{i}.jpg').write_bytes(_jpeg(color, size))
  return root


def _assert_colors_match_labels(ds):
  for image, label in zip(ds.images, ds.labels):
    expected = COLORS[ds.class_names[label]]
    np.testing.assert_allclose(image.mean(axis=(0, 1)), expected, atol=8)


# Folder source: the real PCam archive.


@pytest.fixture(scope='module')
def pcam_test():
  if not PCAM.exists():
    pytest.skip(f'{PCAM} not found (shared data lives next to the checkout).')
  return sources.load('folder', path=str(PCAM), split='test')


def test_pcam_archive(pcam_test):
  ds = pcam_test
  assert ds.images.shape == (3000, 32, 32, 3)
  assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
  assert ds.class_names == ('0', '1') and ds.num_classes == 2 and len(ds) == 3000
  assert set(ds.labels.tolist()) == {0, 1}
  # Real images, not blank decodes.
  assert ds.images.std() > 10


def test_a_subset_of_real_data_is_random_rows_of_the_split(pcam_test):
  subset = sources.load('folder', path=str(PCAM), split='test', num_examples=500, seed=3)
  assert len(subset) == 500 and subset.class_names == pcam_test.class_names
  # Each subset example is a row of the whole split (PCam repeats a few patches), image and
  # label together.
  rows = collections.defaultdict(set)
  for image, label in zip(pcam_test.images, pcam_test.labels):
    rows[image.tobytes()].add(int(label))
  assert all(int(label) in rows[image.tobytes()]
             for image, label in zip(subset.images, subset.labels))
  # Drawn from the whole split, not its first (class-sorted) rows.
  assert 150 < np.bincount(subset.labels)[0] < 350


def test_a_subset_keeps_each_example_with_its_client_and_label_whatever_the_seed(tmp_path):
  whole = sources.load('folder', path=str(_make_client_tree(tmp_path)), split='train',
                       clients=True)
  subset = sources.load('folder', path=str(tmp_path), split='train', clients=True,
                        num_examples=6)
  kept = {(client, label) for client, label in zip(subset.client_ids, subset.labels)}
  assert len(subset) == 6 and kept <= set(zip(whole.client_ids, whole.labels))
  _assert_colors_match_labels(subset)
  other_seed = sources.load('folder', path=str(tmp_path), split='train', clients=True,
                            num_examples=6, seed=5)  # The data does not change with the seed.
  np.testing.assert_array_equal(other_seed.client_ids, subset.client_ids)
  np.testing.assert_array_equal(other_seed.labels, subset.labels)
  # Only the subset is decoded, and it is exactly the rows the whole split's subset takes.
  rows = sources.base.subset(whole, 6, 'whole')
  np.testing.assert_array_equal(subset.images, rows.images)
  np.testing.assert_array_equal(subset.client_ids, rows.client_ids)
  with pytest.raises(sources.DataError) as e:
    sources.load('folder', path=str(tmp_path), split='train', clients=True, num_examples=11)
  assert e.value.argument == 'num_examples'
  assert 'has 10 examples' in str(e.value) and 'ask for 1..10, or None' in str(e.value)


def test_pcam_missing_split_lists_existing(pcam_test):
  del pcam_test  # Skips together with it when the archive is absent.
  with pytest.raises(sources.DataError, match=r"'validation'.*test.*train.*valid"):
    sources.load('folder', path=str(PCAM), split='validation')


# Folder source: small trees made here.


def test_directory_labels_follow_sorted_class_names(tmp_path):
  ds = sources.load('folder', path=str(_make_tree(tmp_path)), split='test')
  assert ds.class_names == ('ant', 'bee', 'cat')
  assert ds.images.shape == (9, 8, 8, 3)
  assert np.bincount(ds.labels).tolist() == [3, 3, 3]
  _assert_colors_match_labels(ds)


def test_archive_with_top_level_directory(tmp_path):
  tree = _make_tree(tmp_path / 'tree')
  archive = tmp_path / 'data.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(tree, arcname='wrapper')
  ds = sources.load('folder', path=str(archive), split='train', num_classes=3)
  assert ds.class_names == ('ant', 'bee', 'cat') and len(ds) == 9
  _assert_colors_match_labels(ds)


def test_resize_to_image_size(tmp_path):
  root = _make_tree(tmp_path)
  (root / 'test' / 'ant' / 'big.png').write_bytes(_jpeg(COLORS['ant'], size=20))
  with pytest.raises(sources.DataError, match='image_size'):
    sources.load('folder', path=str(root), split='test')
  ds = sources.load('folder', path=str(root), split='test', image_size=16)
  assert ds.images.shape == (10, 16, 16, 3)
  _assert_colors_match_labels(ds)


def test_corrupt_image_named(tmp_path):
  root = _make_tree(tmp_path)
  (root / 'test' / 'bee' / 'broken.jpg').write_bytes(_jpeg((1, 2, 3))[:200])
  with pytest.raises(sources.DataError, match='bee/broken.jpg'):
    sources.load('folder', path=str(root), split='test')


def test_corrupt_image_in_archive_named(tmp_path):
  archive = tmp_path / 'data.tar'
  with tarfile.open(archive, 'w') as tar:
    for name, data in (('ok.jpg', _jpeg((9, 9, 9))), ('junk.jpg', b'not a jpeg')):
      info = tarfile.TarInfo(f'train/a/{name}')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  with pytest.raises(sources.DataError, match='train/a/junk.jpg'):
    sources.load('folder', path=str(archive), split='train')


def test_folder_errors(tmp_path):
  root = _make_tree(tmp_path / 'tree', splits=('train',))
  with pytest.raises(sources.DataError, match=r"'val'.*\['train'\]"):
    sources.load('folder', path=str(root), split='val')
  with pytest.raises(sources.DataError, match='num_classes=5'):
    sources.load('folder', path=str(root), split='train', num_classes=5)
  missing = tmp_path / 'nowhere.tar.gz'
  with pytest.raises(sources.DataError, match='nowhere.tar.gz.*does not exist'):
    sources.load('folder', path=str(missing), split='train')
  (root / 'empty' / 'a').mkdir(parents=True)
  with pytest.raises(sources.DataError, match='No .*images'):
    sources.load('folder', path=str(root), split='empty')


def test_unknown_source():
  with pytest.raises(sources.DataError, match="'hf'.*folder.*synthetic.*tfds") as e:
    sources.load('hf', split='train')
  assert e.value.argument == 'source'


# Synthetic source.


def test_synthetic_deterministic_and_learnable():
  make = lambda split, seed=0: sources.load(
      'synthetic', split=split, num_classes=4, num_examples=200, image_size=8,
      seed=seed)
  train, again, test = make('train'), make('train'), make('test')
  np.testing.assert_array_equal(train.images, again.images)
  np.testing.assert_array_equal(train.labels, again.labels)
  assert train.images.dtype == np.uint8 and train.images.shape == (200, 8, 8, 3)
  assert not np.array_equal(train.images, test.images)
  assert not np.array_equal(train.images, make('train', seed=1).images)
  assert np.bincount(train.labels).tolist() == [50] * 4
  # Class means differ, and a nearest-mean classifier fit on train transfers
  # to test: templates are shared across splits.
  flat = lambda ds: ds.images.reshape(len(ds), -1).astype(np.float32)
  means = np.stack([flat(train)[train.labels == c].mean(0) for c in range(4)])
  assert min(np.linalg.norm(means[i] - means[j])
             for i in range(4) for j in range(i)) > 500
  dist = ((flat(test)[:, None] - means[None]) ** 2).sum(-1)
  assert (dist.argmin(1) == test.labels).mean() > 0.95


def test_synthetic_needs_sizes():
  with pytest.raises(sources.DataError, match='num_examples'):
    sources.load('synthetic', split='train', num_classes=2, image_size=8)


# TFDS source.


def test_tfds_not_prepared_fails_fast(tmp_path):
  start = time.monotonic()
  with pytest.raises(sources.DataError) as error:
    sources.load('tfds', name='mnist', split='train', data_dir=str(tmp_path))
  assert time.monotonic() - start < 20
  message = str(error.value)
  assert 'mnist' in message and str(tmp_path) in message
  assert 'tfds build' in message and 'download' in message


class FedpeftTinyImages(tfds.core.GeneratorBasedBuilder):
  """20 constant 8x8 gray images, value = 10 * index, label = index parity."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    # Not dataset_info_from_configs: that reads metadata files next to this one.
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 1)),  # Gray, like MNIST.
        'label': tfds.features.ClassLabel(names=['even', 'odd'])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(20):
      # PIL images: encoding numpy arrays would need TensorFlow.
      image = PIL.Image.new('L', (8, 8), 10 * i)
      yield i, {'image': image, 'label': i % 2}


def _prepared(name, tmp_path_factory) -> str:
  """A data_dir holding the registered builder `name`, prepared as array_record."""
  data_dir = str(tmp_path_factory.mktemp(name))
  tfds.builder(name, data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


@pytest.fixture(scope='module')
def tiny_tfds_dir(tmp_path_factory):
  return _prepared('fedpeft_tiny_images', tmp_path_factory)


def test_tfds_reads_prepared_array_record(tiny_tfds_dir):
  ds = sources.load('tfds', name='fedpeft_tiny_images', split='train',
                    data_dir=tiny_tfds_dir, image_size=4, num_classes=2)
  assert ds.class_names == ('even', 'odd')
  assert ds.images.shape == (20, 4, 4, 3) and ds.images.dtype == np.uint8
  assert (ds.images == ds.images[:, :1, :1, :1]).all()  # Constant gray.
  index = ds.images[:, 0, 0, 0].astype(int) // 10
  assert sorted(index.tolist()) == list(range(20))
  np.testing.assert_array_equal(ds.labels, index % 2)
  half = sources.load('tfds', name='fedpeft_tiny_images', split='train[:50%]',
                      data_dir=tiny_tfds_dir)
  assert half.images.shape == (10, 8, 8, 3)
  with pytest.raises(sources.DataError, match="'validation'.*train"):
    sources.load('tfds', name='fedpeft_tiny_images', split='validation',
                 data_dir=tiny_tfds_dir)


def test_tfds_download_only_when_asked(tmp_path):
  load = lambda **kw: sources.load('tfds', name='fedpeft_tiny_images',
                                   split='train', data_dir=str(tmp_path), **kw)
  with pytest.raises(sources.DataError, match='not prepared'):
    load()
  assert len(load(download=True)) == 20
  assert len(load()) == 20  # Prepared now.


def test_tfds_unknown_name(tmp_path):
  with pytest.raises(sources.DataError, match="'no_such_dataset_xyz'"):
    sources.load('tfds', name='no_such_dataset_xyz', split='train',
                 data_dir=str(tmp_path))


def test_tfds_tfrecord_without_tensorflow(tiny_tfds_dir, monkeypatch):
  try:
    import tensorflow  # pylint: disable=unused-import
    pytest.skip('TensorFlow is installed; this tests its absence.')
  except ImportError:
    pass
  # Pretend no stored format allows random access, as for tfrecord-only data.
  monkeypatch.setattr(tfds.core.file_adapters.FileFormat, 'with_random_access',
                      classmethod(lambda cls: set()))
  with pytest.raises(sources.DataError, match='tensorflow-cpu.*array_record'):
    sources.load('tfds', name='fedpeft_tiny_images', split='train',
                 data_dir=tiny_tfds_dir)


# Per-client data: each example's client id, for the natural partition.

# client -> class -> images: bob has no bee.
CLIENT_TREE = {'alice': {'ant': 2, 'bee': 1, 'cat': 1}, 'bob': {'ant': 1, 'cat': 3},
               'carol': {'bee': 2}}


def _make_client_tree(root: pathlib.Path, splits=('train', 'test')):
  for split in splits:
    for client, classes in CLIENT_TREE.items():
      for name, count in classes.items():
        (root / split / client / name).mkdir(parents=True)
        for i in range(count):
          (root / split / client / name / f'{i}.jpg').write_bytes(_jpeg(COLORS[name]))
  return root


def _assert_client_tree(ds):
  assert ds.class_names == ('ant', 'bee', 'cat') and len(ds) == 10
  # Sorted by path: alice's ant, ant, bee, cat; bob's ant, cat x3; carol's bee x2.
  assert ds.client_ids.tolist() == ['alice'] * 4 + ['bob'] * 4 + ['carol'] * 2
  assert ds.labels.tolist() == [0, 0, 1, 2, 0, 2, 2, 2, 1, 1]
  _assert_colors_match_labels(ds)


def test_client_folders_give_each_example_its_client(tmp_path):
  ds = sources.load('folder', path=str(_make_client_tree(tmp_path)), split='train',
                    clients=True, num_classes=3)
  _assert_client_tree(ds)
  flat = _make_tree(tmp_path / 'flat')
  assert sources.load('folder', path=str(flat), split='test').client_ids is None


def test_client_archive_with_top_level_directory(tmp_path):
  tree = _make_client_tree(tmp_path / 'tree')
  archive = tmp_path / 'data.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(tree, arcname='wrapper')
  _assert_client_tree(sources.load('folder', path=str(archive), split='train', clients=True))


def test_clients_asked_of_data_without_them(tmp_path):
  root = _make_tree(tmp_path)  # <split>/<class>/*.jpg: no client level.
  with pytest.raises(sources.DataError, match=r'No .*images in .*/train/<client>/<class>/') as e:
    sources.load('folder', path=str(root), split='train', clients=True)
  assert e.value.argument == 'clients'
  with pytest.raises(sources.DataError,
                     match=r"'val' not found.* layout: \[<top>/\]<split>/<client>/<class>/\*"
                           r"\.jpg\|"):
    sources.load('folder', path=str(root), split='val', clients=True)
  with pytest.raises(sources.DataError, match='Synthetic data has no clients') as e:
    sources.load('synthetic', split='train', num_classes=2, num_examples=4, image_size=4,
                 clients=True)
  assert e.value.argument == 'clients'


class FedpeftTinyWriters(tfds.core.GeneratorBasedBuilder):
  """12 constant 8x8 gray images, value = 10 * index, label = index parity, written by
  writer 'w<index % 3>'."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 1)),
        'label': tfds.features.ClassLabel(names=['even', 'odd']),
        'writer': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(12):
      yield i, {'image': PIL.Image.new('L', (8, 8), 10 * i), 'label': i % 2,
                'writer': f'w{i % 3}'}


@pytest.fixture(scope='module')
def writers_tfds_dir(tmp_path_factory):
  return _prepared('fedpeft_tiny_writers', tmp_path_factory)


def test_tfds_client_feature_gives_each_example_its_client(writers_tfds_dir):
  load = lambda **kw: sources.load('tfds', name='fedpeft_tiny_writers', split='train',
                                   data_dir=writers_tfds_dir, **kw)
  ds = load(clients=True, client_feature='writer')
  index = ds.images[:, 0, 0, 0].astype(int) // 10
  assert sorted(index.tolist()) == list(range(12))
  assert ds.client_ids.tolist() == [f'w{i % 3}' for i in index]
  assert load(client_feature='writer').client_ids is None  # Read only when asked.
  with pytest.raises(sources.DataError,
                     match=r"'fedpeft_tiny_writers' has no feature 'author'; its features "
                           r"are \[.*'writer'.*\]") as e:
    load(clients=True, client_feature='author')
  assert e.value.argument == 'client_feature'
  with pytest.raises(sources.DataError, match='needs client_feature') as e:
    load(clients=True)
  assert e.value.argument == 'client_feature'


def test_natural_partition_is_checked_at_launch(writers_tfds_dir):
  config = tiny_config()
  config.data.partition = 'natural'
  with pytest.raises(validation.ConfigError,
                     match=r"^--config.data.partition='natural': needs data that names each "
                           "example's client.*synthetic data has no clients$"):
    validation.validate(config)
  config.data.source, config.data.name = 'tfds', 'fedpeft_tiny_writers'
  config.data.data_dir = writers_tfds_dir
  for feature, needle in (('author', "has no feature 'author'; its features are"),
                          ('', 'needs client_feature')):
    config.data.client_feature = feature
    with pytest.raises(validation.ConfigError) as e:
      validation.validate(config)
    assert str(e.value).startswith(f'--config.data.client_feature={feature!r}: ')
    assert needle in str(e.value) and "'writer'" in str(e.value) and '\n' not in str(e.value)
  config.data.client_feature = 'writer'
  validation.validate(config)


# Every split is labelled by the training split's class names (issue 19).

# Skin-lesion-like class folders; each color says which class an image really is.
LESIONS = {'Malignant': (200, 30, 30), 'benign': (30, 200, 30)}
LAYOUTS = ('folders', 'archive', 'client folders', 'client archive')


def _png(color, size=8) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.new('RGB', (size, size), color).save(buffer, format='PNG')
  return buffer.getvalue()


def _split_tree(tmp_path: pathlib.Path, layout: str, **splits) -> tuple[str, bool]:
  """Writes each split's class folders (name -> color) in `layout` (one of LAYOUTS): two
  images per class folder, JPEG in the training split, PNG elsewhere; in the client layouts
  alice holds every class and bob the first one. Returns the data path and `clients`."""
  clients = layout.startswith('client')
  tree = tmp_path / 'tree'
  for split, classes in splits.items():
    for k, (name, color) in enumerate(classes.items()):
      owners = (['alice', 'bob'] if k == 0 else ['alice']) if clients else ['']
      for owner in owners:
        folder = tree / split / owner / name
        folder.mkdir(parents=True)
        for i in range(2):
          data = _jpeg(color) if split == 'train' else _png(color)
          (folder / f'{i}.{"jpg" if split == "train" else "png"}').write_bytes(data)
  if not layout.endswith('archive'):
    return str(tree), clients
  archive = tmp_path / 'data.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(tree, arcname='wrapper')
  return str(archive), clients


def _assert_labels_name_their_folders(ds, colors):
  """Each image's color is that of the class its label names."""
  assert len(ds) > 0
  for image, label in zip(ds.images, ds.labels):
    np.testing.assert_allclose(image.mean(axis=(0, 1)), colors[ds.class_names[label]], atol=8)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_every_split_is_labelled_by_the_training_splits_class_names(tmp_path, layout):
  path, clients = _split_tree(tmp_path, layout, train=COLORS, test=COLORS)
  load = functools.partial(sources.load, 'folder', path=path, clients=clients)
  train = load(split='train')
  assert train.class_names == ('ant', 'bee', 'cat')
  _assert_labels_name_their_folders(train, COLORS)
  # A training map in another order than this split's sorted folders (TFDS label names
  # need not be sorted): the labels follow the map, by name.
  order = ('cat', 'ant', 'bee')
  test = load(split='test', class_names=order)
  assert test.class_names == order and set(test.labels.tolist()) == {0, 1, 2}
  _assert_labels_name_their_folders(test, COLORS)
  assert (test.client_ids is not None) == clients
  subset = load(split='test', class_names=order, num_examples=3)
  assert subset.class_names == order
  _assert_labels_name_their_folders(subset, COLORS)


# The test split's class folders -> what the refusal must say besides the folders' names.
MISMATCHES = {
    # The example: numbered per split, 'malignant' became label 1, 'Malignant' 0.
    'case': ({'malignant': LESIONS['Malignant'], 'benign': LESIONS['benign']},
             ["no class folder is 'Malignant'",
              "'malignant' and 'Malignant' differ only in case or spaces"]),
    'spaces': ({'Malignant': LESIONS['Malignant'], 'benign ': LESIONS['benign']},
               ["no class folder is 'benign'",
                "'benign ' and 'benign' differ only in case or spaces"]),
    'extra class': ({**LESIONS, 'other': (30, 30, 200)}, []),
    'missing class': ({'benign': LESIONS['benign']},
                      ["no class folder is 'Malignant'", 'an empty folder keeps a class']),
}


@pytest.mark.parametrize('mismatch', MISMATCHES)
@pytest.mark.parametrize('layout', LAYOUTS)
def test_a_split_whose_class_folders_differ_from_the_training_splits_is_refused(
    tmp_path, layout, mismatch):
  test_classes, needles = MISMATCHES[mismatch]
  path, clients = _split_tree(tmp_path, layout, train=LESIONS, test=test_classes)
  load = functools.partial(sources.load, 'folder', path=path, clients=clients)
  train = load(split='train', num_classes=2)
  assert train.class_names == ('Malignant', 'benign')  # Sorted: upper case first.
  _assert_labels_name_their_folders(train, LESIONS)
  with pytest.raises(sources.DataError) as e:
    load(split='test', class_names=train.class_names, num_classes=2)
  message = str(e.value)
  assert e.value.argument == 'split' and '\n' not in message
  assert "split 'test' has class folders" in message
  assert "the training split ['Malignant', 'benign']" in message
  for name in test_classes:
    if name not in LESIONS:  # Each differing folder, named with its place(s).
      places = ([f'test/alice/{name}/'] + [f'test/bob/{name}/'] * (name == 'malignant')
                if clients else [f'test/{name}/'])
      assert f"{name!r} ({', '.join(map(repr, places))}) is no training class" in message
  for needle in needles:
    assert needle in message
  assert 'rename the folders' in message


@pytest.mark.parametrize('layout', ['folders', 'client folders'])
def test_the_class_folders_are_compared_before_any_image_is_decoded(tmp_path, layout):
  test_classes = {'malignant': LESIONS['Malignant'], 'benign': LESIONS['benign']}
  path, clients = _split_tree(tmp_path, layout, train=LESIONS, test=test_classes)
  owner = 'alice/' if clients else ''
  (pathlib.Path(path) / 'test' / owner / 'benign' / 'junk.png').write_bytes(b'not a png')
  with pytest.raises(sources.DataError, match="no class folder is 'Malignant'"):
    sources.load('folder', path=path, split='test', clients=clients,
                 class_names=('Malignant', 'benign'))


@pytest.mark.parametrize('layout', ['folders', 'client folders'])
def test_build_labels_the_test_split_by_the_training_splits_class_names(tmp_path, layout):
  test_classes = {'malignant': LESIONS['Malignant'], 'benign': LESIONS['benign']}
  path, clients = _split_tree(tmp_path, layout, train=LESIONS, test=test_classes)
  config = tiny_config()
  config.data.source, config.data.path, config.data.num_classes = 'folder', path, 2
  config.data.num_train_examples = config.data.num_test_examples = None
  config.data.partition = 'natural' if clients else 'iid'
  config.fl.num_clients, config.fl.clients_per_round = 2, 1
  train_set = build.load_data(config, 'train')
  _assert_labels_name_their_folders(train_set, LESIONS)
  with pytest.raises(validation.ConfigError) as e:
    build.build(config)  # Loads the test split after the training split, by its names.
  message = str(e.value)
  assert message.startswith("--config.data.test_split='test': ") and '\n' not in message
  assert "malignant/') is no training class" in message
  assert "no class folder is 'Malignant'" in message


def test_tfds_splits_are_labelled_by_the_training_splits_label_names(tiny_tfds_dir):
  load = functools.partial(sources.load, 'tfds', name='fedpeft_tiny_images', split='train',
                           data_dir=tiny_tfds_dir)
  ds = load(class_names=('odd', 'even'))
  assert ds.class_names == ('odd', 'even')
  parity = ds.images[:, 0, 0, 0].astype(int) // 10 % 2  # The builder's label, from pixels.
  np.testing.assert_array_equal(ds.labels, 1 - parity)  # 'odd' is label 0 now.
  np.testing.assert_array_equal(load(class_names=('even', 'odd')).labels, parity)
  with pytest.raises(sources.DataError) as e:
    load(class_names=('Even', 'odd'))
  message = str(e.value)
  assert e.value.argument == 'split' and '\n' not in message
  assert "TFDS 'fedpeft_tiny_images' split 'train' has label names ['even', 'odd']" in message
  assert "'even' is no training class, no label name is 'Even'" in message
  assert "'even' and 'Even' differ only in case or spaces" in message


class FedpeftTinyUnnamedLabels(tfds.core.GeneratorBasedBuilder):
  """4 constant 8x8 gray images with an integer label that is no ClassLabel."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 1)),
        'label': tfds.features.Scalar(dtype=np.int64)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(4):
      yield i, {'image': PIL.Image.new('L', (8, 8), 10 * i), 'label': i % 2}


def test_tfds_labels_without_names_are_refused(tmp_path_factory):
  data_dir = _prepared('fedpeft_tiny_unnamed_labels', tmp_path_factory)
  with pytest.raises(sources.DataError, match=r"'label' feature of type Scalar, not "
                                              r'ClassLabel, so its classes have no names'):
    sources.load('tfds', name='fedpeft_tiny_unnamed_labels', split='train',
                 data_dir=data_dir)


def test_synthetic_splits_are_labelled_by_the_training_splits_class_names():
  make = functools.partial(sources.load, 'synthetic', split='test', num_classes=4,
                           num_examples=40, image_size=4)
  plain = make()
  order = ('3', '1', '0', '2')
  relabelled = make(class_names=order)
  assert relabelled.class_names == order
  np.testing.assert_array_equal(relabelled.labels,
                                [order.index(str(label)) for label in plain.labels])
  np.testing.assert_array_equal(relabelled.images, plain.images)
  with pytest.raises(sources.DataError, match=r"'4' is no training class.*give every split "
                                              r'the same num_classes') as e:
    sources.load('synthetic', split='test', num_classes=5, num_examples=40, image_size=4,
                 class_names=order)
  assert e.value.argument == 'split'


# The contract every registered source keeps (issue 20): one test over `SOURCES.names()`,
# which a new source passes by being registered and given tiny data in `TINY`.


class Tiny(NamedTuple):
  """A source's tiny data: its own `options`, a `train` and a `test` split, what else it
  needs `given` (a source that makes images: their sizes), and `shown(images, seed)`: the
  class name each image shows, computed from its pixels."""
  options: dict
  train: str
  test: str
  given: dict
  shown: Callable[[np.ndarray, int], list[str]]


def _color_names(images, seed):
  del seed  # Files do not change with it.
  names = list(COLORS)
  colors = np.asarray([COLORS[n] for n in names], np.float32)
  means = images.reshape(len(images), -1, 3).mean(1)
  return [names[i] for i in ((means[:, None] - colors[None]) ** 2).sum(-1).argmin(1)]


def _template_names(images, seed, num_classes=3):
  """The nearest of the synthetic source's class templates (uniform in [0, 255) from
  np.random.default_rng(seed), the module docstring's recipe)."""
  templates = np.random.default_rng(seed).uniform(0, 255, (num_classes,) + images.shape[1:])
  flat = lambda a: a.reshape(len(a), -1).astype(np.float64)
  distance = ((flat(images)[:, None] - flat(templates)[None]) ** 2).sum(-1)
  return [str(k) for k in distance.argmin(1)]


TINY = {
    'folder': lambda tmp_path, request: Tiny(
        {'path': str(_make_tree(tmp_path))}, 'train', 'test', {}, _color_names),
    'tfds': lambda tmp_path, request: Tiny(
        {'name': 'fedpeft_tiny_images', 'data_dir': request.getfixturevalue('tiny_tfds_dir')},
        'train', 'train[:50%]', {},  # Gray 10 * index, labelled by its parity.
        lambda images, seed: [('even', 'odd')[int(v) // 10 % 2] for v in images[:, 0, 0, 0]]),
    'synthetic': lambda tmp_path, request: Tiny(
        {}, 'train', 'test', {'num_classes': 3, 'num_examples': 24, 'image_size': 8},
        _template_names),
}


def _assert_labelled(ds, tiny: Tiny, seed: int = 0):
  """uint8 images [N, H, W, 3], int32 labels [N] into distinct class names, each naming
  the class its image shows."""
  assert ds.images.dtype == np.uint8 and ds.images.ndim == 4 and ds.images.shape[-1] == 3
  assert ds.labels.dtype == np.int32 and ds.labels.shape == (len(ds.images),) and len(ds) > 0
  assert len(set(ds.class_names)) == ds.num_classes >= 2
  assert all(isinstance(name, str) for name in ds.class_names)
  assert 0 <= ds.labels.min() and ds.labels.max() < ds.num_classes
  assert [ds.class_names[label] for label in ds.labels] == tiny.shown(ds.images, seed)


# Sources of features instead of images (text) keep theirs in tests/test_text_source.py.
@pytest.mark.parametrize('name', [n for n, s in sources.SOURCES.items() if not s.features])
def test_every_source_keeps_the_contract(name, tmp_path, request):
  if name not in TINY:
    pytest.fail(f'data source {name!r} has no tiny data: add it to TINY in this file')
  tiny, spec = TINY[name](tmp_path, request), sources.SOURCES.get(name)
  flat = configs.flat_config(configs.base_config())
  assert spec.summary and set(spec.keys.values()) <= set(flat), spec.keys
  load = functools.partial(sources.load, name, **tiny.options, **tiny.given)
  train = load(split=tiny.train)
  _assert_labelled(train, tiny)
  # Another split, labelled by the training split's class names in another order.
  order = train.class_names[::-1]
  test = load(split=tiny.test, class_names=order)
  assert test.class_names == order
  _assert_labelled(test, tiny)
  with pytest.raises(sources.DataError) as e:
    load(split=tiny.test, class_names=train.class_names[:-1] + ('no such class',))
  assert e.value.argument == 'split' and "'no such class'" in str(e.value)
  # num_examples: how many images a source makes; of read data, a subset the same for every
  # seed, each example a row of the split with its label.
  half = [load(split=tiny.train, num_examples=len(train) // 2, seed=seed) for seed in (0, 1)]
  for seed, ds in enumerate(half):
    assert len(ds) == len(train) // 2 and ds.class_names == train.class_names
    _assert_labelled(ds, tiny, seed)
  if not spec.makes_images:
    np.testing.assert_array_equal(half[0].images, half[1].images)
    np.testing.assert_array_equal(half[0].labels, half[1].labels)
    rows = {(image.tobytes(), int(label)) for image, label in zip(train.images, train.labels)}
    assert all((image.tobytes(), int(label)) in rows
               for image, label in zip(half[0].images, half[0].labels))
    for argument, value in (('num_examples', len(train) + 1),
                            ('num_classes', train.num_classes + 1)):
      with pytest.raises(sources.DataError) as e:
        load(split=tiny.train, **{argument: value})
      assert e.value.argument == argument
  with pytest.raises(TypeError, match='no_such_option'):
    load(split=tiny.train, no_such_option=1)
