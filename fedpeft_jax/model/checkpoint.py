"""Loads official ViT `.npz` checkpoints into a model's parameter tree.

The files are flat: keys are `/`-joined Flax paths. PEFT additions and the new
head are not in them; everything else must match by name and shape, and any
mismatch is reported in full rather than one key at a time.
"""
from __future__ import annotations

import logging
import os

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


def load_pretrained(path: str, init_params):
  """Returns `init_params` with every backbone leaf replaced from `path`.

  Args:
    path: an official-layout `.npz` file (ViT-B/16 ImageNet-21k, the shared ViT-Ti/4).
    init_params: freshly initialised parameters (arrays or ShapeDtypeStructs
      are not enough: the head and PEFT leaves keep these values).
  Raises:
    CheckpointError naming every missing, unexpected and mis-shaped key.
  """
  if not os.path.exists(path):
    raise CheckpointError(
        f'checkpoint {path!r} does not exist: set --config.model.checkpoint to an '
        'official ViT .npz file (e.g. ViT-B_16.npz from the vision_transformer '
        "release) or to '' to train from random initialisation")
  with np.load(path) as f:
    ckpt = {k: f[k] for k in f.files}
  flat = traverse_util.flatten_dict(init_params, sep='/')

  has_pre_logits = any(k.startswith(_PRE_LOGITS) for k in flat)
  if not has_pre_logits and any(k.startswith(_PRE_LOGITS) for k in ckpt):
    logging.warning('%s has a pre_logits layer and the model has none '
                    '(model.representation_size unset): dropping it.', path)
    ckpt = {k: v for k, v in ckpt.items() if not k.startswith(_PRE_LOGITS)}
  ckpt = {k: v for k, v in ckpt.items() if not k.startswith(_HEAD)}

  expected = {k for k in flat if not _is_new(k)}
  missing = sorted(expected - ckpt.keys())
  unexpected = sorted(ckpt.keys() - expected)
  if _POSEMB in ckpt and _POSEMB in flat:
    want = flat[_POSEMB].shape
    if ckpt[_POSEMB].shape != want and ckpt[_POSEMB].shape[-1] == want[-1]:
      logging.info('Interpolating position embeddings %s -> %s',
                   ckpt[_POSEMB].shape, want)
      ckpt[_POSEMB] = interpolate_posemb(ckpt[_POSEMB], want[1])
  misshaped = sorted(f'{k}: checkpoint {ckpt[k].shape} vs model {flat[k].shape}'
                     for k in expected & ckpt.keys() if ckpt[k].shape != flat[k].shape)
  if missing or unexpected or misshaped:
    lines = [f'checkpoint {path} does not match the model '
             '(check model.name and model.representation_size):']
    for title, keys in (('missing', missing), ('unexpected', unexpected),
                        ('mis-shaped', misshaped)):
      if keys:
        lines.append(f'  {title} ({len(keys)}): ' + ', '.join(keys))
    raise CheckpointError('\n'.join(lines))

  for k in expected:
    flat[k] = jnp.asarray(ckpt[k], dtype=flat[k].dtype)
  return traverse_util.unflatten_dict(flat, sep='/')
