"""Image classification datasets loaded whole into memory as uint8 arrays, from data
sources registered by name (`SOURCES`): each file here registers one.

Federated simulation partitions one split across many clients by index, so every source
returns the full split as numpy arrays rather than a stream. Sources: `folder` (a
directory or tar archive of `<split>/<class>/*.jpg`, e.g. ../shared/data/*.tar.gz),
`tfds` (prepared TFDS data, read without TensorFlow through array_record), `synthetic`
(learnable noise images for tests) and `text` (JSON lines, Parquet or CSV records tokenized
into `Dataset.features` instead of images, for the decoder). With `clients`, each example's client id is read too:
a folder is then laid out `<split>/<client>/<class>/*.jpg`, a TFDS dataset names it in
`client_feature`.

Labels number the training split's class names (sorted folder names, or the TFDS label
feature's names); every other split is loaded with those `class_names` and labelled by
name, so a class is the same label in every split, and a split whose class names differ
is refused.

Adding a source is adding a file that calls `SOURCES.register(name, SourceSpec(...))`
(see `base.SourceSpec` and README "Extending").
"""
from __future__ import annotations

from collections.abc import Sequence

from fedpeft_jax import registry
from fedpeft_jax.data.sources.base import DataError, Dataset, Request, SourceSpec

SOURCES: registry.Registry[SourceSpec] = registry.Registry('data source', argument='source')

registry.import_all(__name__, __path__)

# Where validation used to find it; TFDS's own check now (`tfds.py`).
from fedpeft_jax.data.sources.tfds import check_client_feature  # pylint: disable=C0413


def load(source: str, *, split: str, image_size: int | None = None,
         num_classes: int | None = None, num_examples: int | None = None, seed: int = 0,
         clients: bool = False, class_names: Sequence[str] | None = None,
         **options) -> Dataset:
  """Loads one split of `source` with images of `image_size` if given, and with
  `clients` each example's client id (from the folder layout or `client_feature`).

  `options`: the source's own arguments (`SOURCES.get(source).keys`), e.g. `path` for
  `folder`; `name`, `data_dir`, `download` and `client_feature` for `tfds`.
  `num_examples`: how many images `synthetic` makes; from real data, a random subset of
  that many (None: the whole split), the same for every `seed` so that seeds vary the
  training, not the data.
  `class_names`: None for the training split, whose labels then number its own class
  names (sorted class folder names; the TFDS label feature's names); for every other split
  the training split's `Dataset.class_names`, by which its examples are labelled by name.
  Returns uint8 images [N, H, W, 3] and int32 labels [N] in [0, num_classes).
  Raises DataError (argument 'source') for an unknown source; (argument 'split'), before
  any image is decoded, when the split's class names differ from `class_names` in any
  name, case and spaces included; TypeError for an option the source does not take.
  """
  if source not in SOURCES:
    raise DataError(f'Unknown data source {source!r}; use one of {SOURCES.names()}.',
                    argument='source')
  spec = SOURCES.get(source)
  unknown = sorted(set(options) - set(spec.keys))
  if unknown:
    raise TypeError(f'data source {source!r} takes the options {sorted(spec.keys)}; '
                    f'not {unknown}')
  request = Request(split=split, image_size=image_size, num_classes=num_classes,
                    num_examples=num_examples, seed=seed, clients=clients,
                    class_names=None if class_names is None else tuple(class_names))
  return spec.load(request, **options)


__all__ = ['SOURCES', 'DataError', 'Dataset', 'Request', 'SourceSpec', 'check_client_feature',
           'load']
