"""On-device preprocessing as for the official ViT fine-tuning.

Datasets stay on the accelerator as uint8 at their stored size; each batch is
augmented and resized inside the jitted client step, so no host round trip
happens within a round.
"""
import jax
import jax.numpy as jnp


def _to_model_input(images, image_size: int):
  """Resizes uint8 NHWC images to `image_size` and scales them to [-1, 1]."""
  x = images.astype(jnp.float32)
  if x.shape[1:3] != (image_size, image_size):
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), 'bilinear')
  return x / 127.5 - 1.0


def eval_images(images, image_size: int):
  return _to_model_input(images, image_size)


def train_images(rng, images, image_size: int):
  """Random crop (reflect-padded by 1/8 of the side) and horizontal flip."""
  batch, height, width, _ = images.shape
  pad_h, pad_w = height // 8, width // 8
  padded = jnp.pad(images, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)), mode='reflect')
  crop_rng, flip_rng = jax.random.split(rng)
  offsets = jax.random.randint(crop_rng, (batch, 2), 0,
                               jnp.array([2 * pad_h + 1, 2 * pad_w + 1]))
  crop = lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
  cropped = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(flip_rng, 0.5, (batch, 1, 1, 1))
  augmented = jnp.where(flip, cropped[:, :, ::-1], cropped)
  return _to_model_input(augmented, image_size)
