"""`folder`: a directory or tar archive of `<split>/<class>/*.jpg|*.jpeg|*.png` (e.g.
../shared/data/*.tar.gz), optionally wrapped in one top directory; with `clients`,
`<split>/<client>/<class>/*.jpg`, each example's client named by its folder.

Labels number the training split's sorted class folder names; every class folder of a
split is a class, even an empty one. Reads config key data.path (option `path`).
"""
from __future__ import annotations

import io
import os
import pathlib
import tarfile

import numpy as np
import PIL.Image

from fedpeft_jax.data.partition import PARTITIONS
from fedpeft_jax.data.sources import SOURCES
from fedpeft_jax.data.sources.base import (DataError, Dataset, Request, SourceSpec, finish,
                                           label_map, progress, stack, subset_rows,
                                           to_rgb_array)

_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
_ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar')


def load(request: Request, *, path: str = '') -> Dataset:
  """Reads `request.split` of the folder or archive at `path`: see the module docstring.
  Raises DataError naming `path` (missing, neither folder nor archive, unreadable), the
  split (missing, or class folders other than `request.class_names`: before any image is
  decoded), a file that does not decode, or images of different sizes ('image_size')."""
  depth = 4 if request.clients else 3  # Path parts of an image below the wrapping directory.
  levels = '<split>/<client>/<class>' if request.clients else '<split>/<class>'
  if not path:
    raise DataError('The folder source needs `path`, a directory or .tar.gz '
                    f'archive of {levels}/*.jpg.', argument='path')
  if not os.path.exists(path):
    raise DataError(f'Data path {path!r} does not exist (looked in '
                    f'{os.path.dirname(os.path.abspath(path))}; relative paths start '
                    f'at the working directory {os.getcwd()}).', argument='path')
  if os.path.isdir(path):
    found, dirs = _scan_directory(path, depth)
  elif path.endswith(_ARCHIVE_SUFFIXES):
    found, dirs = _scan_archive(path, request.split, depth)
  else:
    raise DataError(f'Data path {path!r} is neither a directory nor a '
                    f'{"/".join(_ARCHIVE_SUFFIXES)} archive.', argument='path')
  split = request.split
  # One wrapping directory iff every image sits one level deeper below it.
  root = ()
  if found and len({p[0] for p, _ in found}) == 1 and all(
      len(p) == depth + 1 for p, _ in found):
    root = found[0][0][:1]
  found = [(p[len(root):], data) for p, data in found if len(p) == depth + len(root)]
  where = '/'.join((path,) + root)
  if root + (split,) not in dirs:
    splits = sorted(d[-1] for d in dirs if d[:-1] == root)
    raise DataError(f'Split directory {split!r} not found in {where!r}; the '
                    f'splits there are {splits or "none"}. Expected layout: '
                    f'[<top>/]{levels}/*.jpg|*.jpeg|*.png.')
  found = sorted((e for e in found if e[0][0] == split), key=lambda e: e[0])
  if not found:
    if request.clients:
      raise DataError(f'No .jpg/.jpeg/.png images in {where}/{split}/<client>/<class>/; '
                      'per-client data puts each client\'s classes in a subdirectory of '
                      'the split.', argument='clients')
    raise DataError(f'No .jpg/.jpeg/.png images in {where}/{split}/<class>/; '
                    'put each class\'s images in a subdirectory of the split.')
  class_names = _class_names(dirs, root, depth, request, where)
  described = f'folder data {path!r} split {split!r}'
  if request.num_examples is not None:  # Only the subset's images are decoded.
    found = [found[i] for i in subset_rows(len(found), request.num_examples, described)]
    request = request._replace(num_examples=None)
  return finish(_decode(found, class_names, request, where, path), request, described)


def _class_names(dirs, root: tuple[str, ...], depth: int, request: Request,
                 where: str) -> tuple[str, ...]:
  """The split's labels' class names: its class folders (of any client, empty ones too),
  labelled by `request.class_names` when given (`label_map`)."""
  class_dirs = sorted(d[len(root):] for d in dirs if len(d) == len(root) + depth - 1
                      and d[:len(root) + 1] == root + (request.split,))
  places = {}
  for d in class_dirs:
    places.setdefault(d[-1], []).append(repr('/'.join(d) + '/'))
  return label_map(
      tuple(sorted(places)), request.class_names, f'{where!r} split {request.split!r}',
      'class folder',
      'rename the folders to match them (an empty folder keeps a class without images)',
      places)


def _decode(found, class_names: tuple[str, ...], request: Request, where: str,
            path: str) -> Dataset:
  """The images `found` ((parts, reader) below the wrapping directory `where` of `path`),
  labelled by their class folders' positions in `class_names`."""
  label_of = {c: i for i, c in enumerate(class_names)}
  images, names = [], []
  for parts, data in progress(found, f'decoding {request.split!r}'):
    names.append('/'.join(parts))
    try:
      with PIL.Image.open(io.BytesIO(data())) as image:
        images.append(to_rgb_array(image, request.image_size))
    except (OSError, SyntaxError, ValueError) as e:
      raise DataError(f'Cannot decode image {where}/{names[-1]} ({e}); '
                      'replace or delete the file.') from e
  labels = np.asarray([label_of[p[-2]] for p, _ in found], np.int32)
  client_ids = np.asarray([p[1] for p, _ in found]) if request.clients else None
  return Dataset(stack(images, names, f'{path!r} split {request.split!r}'), labels,
                 class_names, client_ids)


def _is_image(parts: tuple[str, ...], depth: int) -> bool:
  return len(parts) in (depth, depth + 1) and parts[-1].lower().endswith(_IMAGE_SUFFIXES)


def _scan_directory(path: str, depth: int):
  """Returns the candidate images as (parts, reader) and all directories."""
  found, dirs = [], set()
  base = pathlib.Path(path)
  for file in base.rglob('*'):
    parts = file.relative_to(base).parts
    if file.is_dir():
      dirs.add(parts)
    elif _is_image(parts, depth):
      found.append((parts, file.read_bytes))
  return found, dirs


def _scan_archive(path: str, split: str, depth: int):
  """Streams the archive once, keeping only bytes of images in `split`.

  Members are read sequentially (no seeking back in a gzip stream, nothing
  extracted to disk); images of other splits are listed but not kept.
  """
  found, dirs = [], set()
  try:
    with tarfile.open(path) as tar:
      for member in tar:
        parts = pathlib.PurePosixPath(member.name).parts
        parts = parts[1:] if parts[:1] == ('.',) else parts
        # Archives need not list directories: each member implies its parents.
        dirs.update(parts[:i] for i in range(1, len(parts)))
        if member.isdir():
          dirs.add(parts)
        elif member.isfile() and _is_image(parts, depth):
          data = tar.extractfile(member).read() if parts[-depth] == split else b''
          found.append((parts, lambda data=data: data))
  except (tarfile.TarError, OSError, EOFError) as e:
    raise DataError(f'Cannot read archive {path!r} ({e}); re-create or '
                    're-download it.') from e
  return found, dirs


def _check(config, needs_data: bool):
  path, natural = config.data.path, PARTITIONS.get(config.data.partition).needs_client_ids
  if needs_data and not (path and os.path.exists(path)):
    return 'data.path', ('no such folder or archive: give a directory or .tar.gz laid out '
                         f'as split/{"client/" if natural else ""}class/*.jpg')
  return None


SOURCES.register('folder', SourceSpec(
    load=load, summary='a directory or .tar.gz archive of split/class/*.jpg',
    keys={'path': 'data.path'}, check=_check,
    clients="source='folder' laid out as split/client/class/*.jpg"))
