"""Loads official ViT `.npz` checkpoints into a model's parameter tree.

The files are flat: keys are `/`-joined Flax paths. PEFT additions and the new
head are not in them; everything else must match by name and shape, and any
mismatch is reported in full rather than one key at a time.
"""
from __future__ import annotations

import logging
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedpeft_jax import errors

# Parameters a pretrained backbone does not provide.
_NOT_IN_CHECKPOINT = ('adapter', 'prompt', 'lora_')
_HEAD = 'head/'
_POSEMB = 'Transformer/posembed_input/pos_embedding'
_PRE_LOGITS = 'pre_logits/'
_SHOWN = 5  # Keys named per kind of mismatch: the message stays one line.


class CheckpointError(errors.UserError):
  pass


def _is_new(key: str) -> bool:
  return key.startswith(_HEAD) or any(
      part.startswith(_NOT_IN_CHECKPOINT) for part in key.split('/'))


def interpolate_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """Resizes (1, 1 + g*g, D) position embeddings to (1, num_tokens, D) bilinearly.

  The class token's embedding is kept as is; only the patch grid is resized.
  """
  cls, grid = posemb[:, :1], posemb[0, 1:]
  old = int(round(np.sqrt(grid.shape[0])))
  new = int(round(np.sqrt(num_tokens - 1)))
  if old * old != grid.shape[0] or new * new != num_tokens - 1:
    raise CheckpointError(
        f'cannot interpolate position embeddings of shape {posemb.shape} to '
        f'{num_tokens} tokens: both grids must be square')
  grid = grid.reshape(old, old, -1)
  grid = jax.image.resize(jnp.asarray(grid, jnp.float32), (new, new, grid.shape[-1]),
                          'bilinear')
  return np.concatenate([cls, np.asarray(grid).reshape(1, new * new, -1)], axis=1)


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """Every array's shape in an `.npz`, read from the headers alone (no data loaded)."""
  if not os.path.isfile(path):
    raise CheckpointError(
        f'checkpoint {path!r} does not exist (looked in '
        f'{os.path.dirname(os.path.abspath(path))}; relative paths start at the working '
        f'directory {os.getcwd()}): give an official ViT .npz file (e.g. ViT-B_16.npz from '
        "the vision_transformer release), or '' to train from random initialisation",
        argument='path')
  shapes = {}
  try:
    with zipfile.ZipFile(path) as archive:
      for name in archive.namelist():
        with archive.open(name) as member:
          version = np.lib.format.read_magic(member)
          read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                         else np.lib.format.read_array_header_2_0)
          shapes[name.removesuffix('.npy')] = read_header(member)[0]
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise CheckpointError(
        f'checkpoint {path!r} is not a readable .npz file ({e}): a truncated download or '
        'another format; download it again', argument='path') from None
  return shapes


def _keys_to_load(path: str, checkpoint_shapes: dict, model_shapes: dict) -> list[str]:
  """The backbone keys to take from the checkpoint; raises naming every mismatch.

  A `pre_logits` layer the model lacks is dropped with a warning; position
  embeddings of another grid size are interpolated on loading.
  """
  has_pre_logits = any(k.startswith(_PRE_LOGITS) for k in model_shapes)
  if not has_pre_logits and any(k.startswith(_PRE_LOGITS) for k in checkpoint_shapes):
    logging.warning('%s has a pre_logits layer and the model has none '
                    '(model.representation_size unset): dropping it.', path)
  available = {k for k in checkpoint_shapes
               if not k.startswith(_HEAD) and (has_pre_logits or not k.startswith(_PRE_LOGITS))}
  expected = {k for k in model_shapes if not _is_new(k)}
  missing = sorted(expected - available)
  unexpected = sorted(available - expected)
  interpolated = lambda k: (k == _POSEMB and
                            checkpoint_shapes[k][-1] == model_shapes[k][-1])
  misshaped = sorted(f'{k}: checkpoint {checkpoint_shapes[k]} vs model {model_shapes[k]}'
                     for k in expected & available
                     if tuple(checkpoint_shapes[k]) != tuple(model_shapes[k])
                     and not interpolated(k))
  if missing or unexpected or misshaped:
    groups = [f'{title} ({len(keys)}): ' + ', '.join(keys[:_SHOWN])
              + (f' and {len(keys) - _SHOWN} more' if len(keys) > _SHOWN else '')
              for title, keys in (('missing', missing), ('unexpected', unexpected),
                                  ('mis-shaped', misshaped)) if keys]
    raise CheckpointError(
        f'checkpoint {path} does not match the model (give the checkpoint of this model '
        'size, or set the model size and representation size to the checkpoint\'s): '
        + '; '.join(groups), argument='path')
  return sorted(expected)


def check_compatible(path: str, abstract_params) -> None:
  """Raises what `load_pretrained` would, reading only the file's headers: cheap at launch."""
  model_shapes = {k: v.shape for k, v in traverse_util.flatten_dict(abstract_params,
                                                                    sep='/').items()}
  _keys_to_load(path, read_shapes(path), model_shapes)


def load_pretrained(path: str, init_params):
  """Returns `init_params` with every backbone leaf replaced from `path`.

  Args:
    path: an official-layout `.npz` file (ViT-B/16 ImageNet-21k, the shared ViT-Ti/4).
    init_params: freshly initialised parameters (arrays or ShapeDtypeStructs
      are not enough: the head and PEFT leaves keep these values).
  Raises:
    CheckpointError naming every missing, unexpected and mis-shaped key, or an
    unreadable file.
  """
  flat = traverse_util.flatten_dict(init_params, sep='/')
  keys = _keys_to_load(path, read_shapes(path), {k: v.shape for k, v in flat.items()})
  with np.load(path) as f:
    for k in keys:
      value = f[k]
      if k == _POSEMB and value.shape != flat[k].shape:
        logging.info('Interpolating position embeddings %s -> %s', value.shape, flat[k].shape)
        value = interpolate_posemb(value, flat[k].shape[1])
      flat[k] = jnp.asarray(value, dtype=flat[k].dtype)
  return traverse_util.unflatten_dict(flat, sep='/')
