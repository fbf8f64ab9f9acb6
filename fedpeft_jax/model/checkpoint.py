"""Loads official ViT `.npz` checkpoints into a model's parameter tree.

The files are flat: keys are `/`-joined Flax paths. PEFT additions (the names each
registered method declares it adds, `fedpeft_jax.peft.is_added`) and the new head are
not in them; everything else must match by name and shape, and any
mismatch is reported in full rather than one key at a time.
"""
from __future__ import annotations

import logging
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from flax import traverse_util

from fedpeft_jax import errors
from fedpeft_jax import peft

_HEAD = 'head/'
_POSEMB = 'Transformer/posembed_input/pos_embedding'
_PRE_LOGITS = 'pre_logits/'
_SHOWN = 5  # Keys named per kind of mismatch: the message stays one line.


class CheckpointError(errors.UserError):
  pass


def _is_new(key: str) -> bool:
  """A parameter a pretrained backbone does not provide: the head, or a PEFT addition."""
  return key.startswith(_HEAD) or peft.is_added(tuple(key.split('/')))


# How a position-embedding grid is resized for another image size (`resample_posemb`).
POSEMB_RESAMPLERS = ('zoom', 'bicubic')


def _check_resampler(method: str) -> None:
  if method not in POSEMB_RESAMPLERS:
    raise CheckpointError(
        f'unknown position-embedding resampler {method!r}: use one of '
        f'{", ".join(POSEMB_RESAMPLERS)}', argument='posemb_resample')


def _square_grid(num_tokens: int) -> bool:
  """Whether `num_tokens` is a class token plus a square grid of patches."""
  side = int(round(np.sqrt(max(num_tokens - 1, 0))))
  return side >= 1 and side * side == num_tokens - 1


def resample_posemb(posemb: np.ndarray, num_tokens: int, method: str = 'zoom',
                    class_token: bool = True) -> np.ndarray:
  """Resizes (1, [1 +] g*g, D) position embeddings to (1, num_tokens, D).

  The class token's embedding, when there is one, is kept as is; the remaining
  g*g tokens are a square (g, g, D) grid, resized to (h, h, D) with
  h*h = num_tokens [- 1] and flattened row-major, as the official loader does.

  Args:
    posemb: (1, N, D) embeddings as stored in a checkpoint.
    num_tokens: the model's token count, class token included.
    method: 'zoom' (default): the official google-research/vision_transformer
      loader (`vit_jax/checkpoint.py`, `load_pretrained`):
      `scipy.ndimage.zoom(grid, (h/g, h/g, 1), order=1)`, i.e. linear
      interpolation on align-corners coordinates (input index i*(g-1)/(h-1)),
      with no antialiasing when shrinking: corner tokens are kept exactly.
      'bicubic': timm's `resample_abs_pos_embed` with its defaults
      (`F.interpolate(mode='bicubic', align_corners=False, antialias=True)`),
      which PyTorch computes as PIL does: Keys' cubic with a = -0.5 on
      half-pixel centres, the kernel widened by g/h when shrinking, and the
      weights that fall outside the grid dropped and the rest renormalised.
      That is `jax.image.resize(..., 'cubic', antialias=True)`, equal to timm
      up to float32 rounding (no torch needed). timm before 0.9
      (`resize_pos_embed`) used antialias=False, which PyTorch computes with
      a = -0.75 and replicated borders; that variant is not offered.
    class_token: whether token 0 is the class token (the official loader's
      `classifier == 'token'`); False resizes all N tokens as the grid.
  Returns:
    (1, num_tokens, D) float array: float32 unless `posemb` is float64.
  Raises:
    CheckpointError when either grid is not square or `method` is unknown.
  """
  _check_resampler(method)
  posemb = np.asarray(posemb)
  if posemb.dtype != np.float64:
    posemb = posemb.astype(np.float32)  # scipy.ndimage has no float16/bfloat16.
  prefix = 1 if class_token else 0
  count = posemb.shape[1] - prefix if posemb.ndim == 3 and posemb.shape[0] == 1 else -1
  old = int(round(np.sqrt(max(count, 0))))
  new = int(round(np.sqrt(max(num_tokens - prefix, 0))))
  if count < 1 or old * old != count or new < 1 or new * new != num_tokens - prefix:
    raise CheckpointError(
        f'cannot resample position embeddings of shape {posemb.shape} to '
        f'{num_tokens} tokens: both grids must be square'
        + (' after the class token' if class_token else ''))
  tokens, grid = posemb[:, :prefix], posemb[0, prefix:]
  grid = grid.reshape(old, old, -1)
  if method == 'zoom':
    grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  else:
    grid = np.asarray(jax.image.resize(jnp.asarray(grid, jnp.float32),
                                       (new, new, grid.shape[-1]), 'cubic', antialias=True),
                      posemb.dtype)
  assert grid.shape[:2] == (new, new), (grid.shape, new)
  return np.concatenate([tokens, grid.reshape(1, new * new, -1)], axis=1)


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
  embeddings of another square grid size are resampled on loading.
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
  interpolated = lambda k: (k == _POSEMB and len(checkpoint_shapes[k]) == 3
                            and checkpoint_shapes[k][::2] == tuple(model_shapes[k])[::2]
                            and _square_grid(checkpoint_shapes[k][1])
                            and _square_grid(model_shapes[k][1]))
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


def load_pretrained(path: str, init_params, posemb_resample: str = 'zoom'):
  """Returns `init_params` with every backbone leaf replaced from `path`.

  Args:
    path: an official-layout `.npz` file (ViT-B/16 ImageNet-21k, the shared ViT-Ti/4).
    init_params: freshly initialised parameters (arrays or ShapeDtypeStructs
      are not enough: the head and PEFT leaves keep these values).
    posemb_resample: how position embeddings of another grid size are resized,
      one of POSEMB_RESAMPLERS (see `resample_posemb`); the class token's is kept.
  Raises:
    CheckpointError naming every missing, unexpected and mis-shaped key, an
    unreadable file, or an unknown `posemb_resample`.
  """
  _check_resampler(posemb_resample)  # Before reading any weights.
  flat = traverse_util.flatten_dict(init_params, sep='/')
  keys = _keys_to_load(path, read_shapes(path), {k: v.shape for k, v in flat.items()})
  with np.load(path) as f:
    for k in keys:
      value = f[k]
      if k == _POSEMB and value.shape != flat[k].shape:
        logging.info('Resampling position embeddings %s -> %s (%s)', value.shape,
                     flat[k].shape, posemb_resample)
        value = resample_posemb(value, flat[k].shape[1], posemb_resample)
      flat[k] = jnp.asarray(value, dtype=flat[k].dtype)
  return traverse_util.unflatten_dict(flat, sep='/')
