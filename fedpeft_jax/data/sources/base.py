"""What every data source shares: the `Dataset` it returns, the `Request` it is given,
the `SourceSpec` it registers, and the helpers that label, subset and stack images.

A source is a function `load(request, **options) -> Dataset`: `request` holds what every
source is asked (split, image size, class names, ...), `options` its own arguments (a
folder's `path`, a TFDS dataset's `name`), read from the config keys its spec declares.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
import types
from typing import Any, Callable, NamedTuple

import numpy as np
import PIL.Image
import tqdm

from fedpeft_jax import errors


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One split, whole, in host memory: N examples, row i of every array the i-th.

  Image sources fill `images`; text sources leave it None and hold their arrays in
  `features` (the `text` source: {'input_ids': int32 [N, T], 'loss_mask': uint8 [N, T]},
  T = data.max_length, loss_mask 1 where the token at t is a target predicted from t - 1),
  with `labels` all 0 and `class_names` ('text',). `dropped_clients`: how many of the
  split's clients the source left out (the text source's data.min_client_examples, as
  LEAF drops small clients); None: the source drops none.
  """
  images: np.ndarray | None  # uint8 [N, H, W, 3]; None: a source of `features`.
  labels: np.ndarray  # int32 [N], ids into `class_names`.
  class_names: tuple[str, ...]
  client_ids: np.ndarray | None = None  # [N], each example's client; None: not read.
  features: dict[str, np.ndarray] | None = None  # Name -> [N, ...] arrays; None: images.
  dropped_clients: int | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self):
    return len(self.labels)


class DataError(errors.UserError):
  """A data problem the user must fix; the message says what and how."""


class Request(NamedTuple):
  """What every source is asked for, whatever it reads.

  `split`: the split's name in the data. `image_size`: resize every image to this many
  pixels square (None: as stored). `num_classes`: the classes the data must have (None:
  any); a source that makes images makes this many. `num_examples`: a random subset of the
  split of that many (None: all of it), the same for every `seed` (`finish`); a source that
  makes images makes this many. `seed`: what made images depend on. `clients`: read each
  example's client id (`Dataset.client_ids`). `class_names`: None for the training split,
  whose labels then number its own class names; for every other split the training split's
  `Dataset.class_names`, by which its examples are labelled (`label_map`).
  """
  split: str
  image_size: int | None = None
  num_classes: int | None = None
  num_examples: int | None = None
  seed: int = 0
  clients: bool = False
  class_names: tuple[str, ...] | None = None


def _read_key(config, key: str):
  for part in key.split('.'):
    config = config[part]
  return config


class SourceSpec(NamedTuple):
  """A registered data source.

  `load(request: Request, **options) -> Dataset`: uint8 images [N, H, W, 3] and int32
  labels into its class names, labelled by `request.class_names` when given (`label_map`)
  and cut to `request.num_examples` (`finish`); raises DataError naming its argument.
  `keys`: each of `load`'s own `options` -> the config key it is read from (`options`).
  `check(config, needs_data)`: its launch checks of the config, returning the first
  problem as (config key, what is allowed) or None; with `needs_data` False (--mode=masks)
  nothing that opens files or data. `clients`: how its data names each example's client,
  for the natural partition ('' : it cannot). `makes_images`: it makes its images instead of
  reading them, so `num_examples` and `num_classes` say how many, and `image_size` is the
  model's unless data.storage_size is set. `features`: the names of the arrays its
  Datasets hold in `Dataset.features` instead of images (the `text` source: 'input_ids',
  'loss_mask'); (): it returns images.
  """
  load: Callable[..., Dataset]
  summary: str
  keys: Mapping[str, str] = types.MappingProxyType({})
  check: Callable[[Any, bool], tuple[str, str] | None] = lambda config, needs_data: None
  clients: str = ''
  makes_images: bool = False
  features: tuple[str, ...] = ()

  def options(self, config) -> dict:
    """`load`'s own arguments from `config`, by `keys`."""
    return {argument: _read_key(config, key) for argument, key in self.keys.items()}


def finish(ds: Dataset, request: Request, where: str) -> Dataset:
  """`ds` checked against `request.num_classes` and cut to a random subset of
  `request.num_examples` (None: all of it), the same for every seed.

  Raises DataError (argument 'num_classes') when the data has another number of classes,
  and (argument 'num_examples') when the subset is larger than the split; `where` names
  the split in the message, e.g. "folder data 'pcam.tar.gz' split 'train'"."""
  if request.num_classes is not None and ds.num_classes != request.num_classes:
    # Labels beyond the model's head would silently train on garbage.
    raise DataError(
        f'{where} has {ds.num_classes} classes {ds.class_names}, but '
        f'num_classes={request.num_classes} was asked for; set num_classes to match the '
        'data or point at other data.', argument='num_classes')
  if request.num_examples is None:
    return ds
  return subset(ds, request.num_examples, where)


def subset_rows(total: int, num_examples: int, where: str) -> np.ndarray:
  """The sorted rows of a random subset of `num_examples` of `total`, the same every time
  (a source may pick them before decoding anything). Raises DataError (argument
  'num_examples') unless 1 <= num_examples <= total."""
  if not 1 <= num_examples <= total:
    raise DataError(f'{where} has {total} examples; a subset of {num_examples} cannot be '
                    f'drawn from it: ask for 1..{total}, or None for all of them.',
                    argument='num_examples')
  return np.sort(np.random.default_rng(0).permutation(total)[:num_examples])


def subset(ds: Dataset, num_examples: int, where: str) -> Dataset:
  """`num_examples` rows of `ds` drawn at random, in their order, the same every time."""
  keep = subset_rows(len(ds), num_examples, where)
  take = lambda rows: None if rows is None else rows[keep]
  features = None if ds.features is None else {k: v[keep] for k, v in ds.features.items()}
  return dataclasses.replace(ds, images=take(ds.images), labels=ds.labels[keep],
                             client_ids=take(ds.client_ids), features=features)


def _fold(name: str) -> str:
  """A class name without case and spaces, to point out names that differ only in those."""
  return ''.join(name.split()).casefold()


def label_map(names: tuple[str, ...], class_names: Sequence[str] | None, where: str,
              what: str, fix: str, places: dict[str, list[str]] | None = None
              ) -> tuple[str, ...]:
  """The class names whose positions are `where`'s labels.

  `names`: the split's own class names; `class_names`: the training split's, or None when
  this is the training split (its own `names` then number its labels). Raises DataError
  (argument 'split') when the two differ as sets, naming each differing class with its
  `places` (e.g. its folders), and pointing out names that differ only in case or spaces,
  which are different classes. `what`: what a class name is, singular ('class folder').
  """
  if class_names is None:
    return names
  class_names = tuple(class_names)
  if len(set(class_names)) != len(class_names):  # A Dataset's class names never repeat.
    raise ValueError(f'class_names {class_names} repeat a name.')
  extra = [n for n in names if n not in class_names]
  missing = [n for n in class_names if n not in names]
  if not extra and not missing:
    return class_names
  places = places or {}

  def located(name):
    found = places.get(name, [])
    shown = ', '.join(found[:3]) + (f' and {len(found) - 3} more' if len(found) > 3 else '')
    return f'{name!r} ({shown})' if found else repr(name)

  differences = [f'{located(n)} is no training class' for n in extra]
  differences += [f'no {what} is {n!r}' for n in missing]
  alike = [f'{e!r} and {m!r}' for e in extra for m in missing if _fold(e) == _fold(m)]
  hint = f' ({"; ".join(alike)} differ only in case or spaces)' if alike else ''
  raise DataError(
      f"{where} has {what}s {list(names)}, the training split {list(class_names)}: "
      f"{', '.join(differences)}{hint}; every split is labelled by the training split's "
      f'class names, so {fix}.', argument='split')


def relabel(own_names: tuple[str, ...], class_names: tuple[str, ...]) -> np.ndarray:
  """int32 [len(own_names)]: the label in `class_names` of each of the data's own labels
  (`label_map`'s result holds the same names)."""
  label_of = {c: i for i, c in enumerate(class_names)}
  return np.asarray([label_of[c] for c in own_names], np.int32)


def progress(iterable, description: str, total: int | None = None, unit: str = 'img'):
  """A progress bar on a terminal; nothing when the output is a file or a pipe."""
  return tqdm.tqdm(iterable, desc=description, total=total, unit=unit, leave=False,
                   disable=None)


def to_rgb_array(image: PIL.Image.Image, image_size: int | None) -> np.ndarray:
  """uint8 [H, W, 3] of `image`, resized bicubically to `image_size` square if given."""
  image = image.convert('RGB')
  if image_size is not None and image.size != (image_size, image_size):
    image = image.resize((image_size, image_size), PIL.Image.BICUBIC)
  return np.asarray(image, dtype=np.uint8)


def stack(images: list[np.ndarray], names: list[str], where: str) -> np.ndarray:
  """Stacks equally sized images, naming an odd one out otherwise (argument 'image_size')."""
  for image, name in zip(images, names):
    if image.shape != images[0].shape:
      raise DataError(
          f'Images in {where} differ in size: {names[0]} is '
          f'{images[0].shape[:2]}, {name} is {image.shape[:2]}; set '
          '`image_size` to resize them all.', argument='image_size')
  return np.stack(images)
