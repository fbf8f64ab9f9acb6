"""Vision Transformers (`model.name` vit_b16, vit_ti4, ...) from the official `.npz`
checkpoints, for image classification."""
from __future__ import annotations

import jax.numpy as jnp

from fedpeft_jax import errors
from fedpeft_jax import peft
from fedpeft_jax.model import checkpoint as checkpoint_lib
from fedpeft_jax.model import vit
from fedpeft_jax.model.families import MODEL_FAMILIES
from fedpeft_jax.model.families.base import ModelFamily


def build(config, method: str, peft_options: dict) -> vit.VisionTransformer:
  """The ViT of `config.model` with the additions of `method`."""
  return vit.VisionTransformer(
      vit.SIZES[config.model.name], config.data.num_classes,
      peft.modules_for(method, **peft_options),
      representation_size=config.model.representation_size,
      dtype=jnp.dtype(config.model.dtype), attention=config.model.attention or None)


def dummy_input(config) -> tuple:
  return (jnp.zeros((1, config.model.image_size, config.model.image_size, 3), jnp.float32),)


def load_pretrained(config, params):
  return checkpoint_lib.load_pretrained(config.model.checkpoint, params,
                                        config.model.posemb_resample)


def check_pretrained(config, abstract_params) -> None:
  checkpoint_lib.check_compatible(config.model.checkpoint, abstract_params)


def checks(config, needs_weights: bool):
  """`model.name` a ViT size, an image size its patches divide, a known position-embedding
  resampler, and a checkpoint file that opens (its headers only)."""
  if config.model.name not in vit.SIZES:
    yield 'model.name', f'must be one of {", ".join(vit.SIZES)}'
    return
  patch = vit.SIZES[config.model.name].patch_size
  if not (isinstance(config.model.image_size, int) and config.model.image_size > 0):
    yield 'model.image_size', 'must be > 0'
  elif config.model.image_size % patch:
    yield 'model.image_size', (f'must be divisible by the patch size {patch} of '
                               f'{config.model.name}')
  if config.model.posemb_resample not in checkpoint_lib.POSEMB_RESAMPLERS:
    yield 'model.posemb_resample', ('must be one of '
                                    f'{", ".join(checkpoint_lib.POSEMB_RESAMPLERS)}')
  if config.model.checkpoint and needs_weights:  # Opens the file; reads no weights.
    try:
      checkpoint_lib.read_shapes(config.model.checkpoint)
    except errors.UserError as e:
      yield 'model.checkpoint', str(e)


MODEL_FAMILIES.register('vit', ModelFamily(
    build=build, dummy_input=dummy_input, load_pretrained=load_pretrained,
    check_pretrained=check_pretrained, task='image_classification', checks=checks,
    dimensions=lambda config: vit.SIZES[config.model.name],
    summary='Vision Transformer, official .npz checkpoints'))
