"""Blend (Chen et al., 2017): a full-image pattern mixed in with weight alpha, labels flipped."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


def make_pattern(pattern: str, seed: int, shape: tuple[int, int, int]) -> np.ndarray:
  """The uint8 [H, W, C] pattern: uniform noise from `seed` ('noise') or an image file resized to HxW."""
  height, width, channels = shape
  if pattern == "noise":
    noise = jax.random.randint(jax.random.PRNGKey(seed), (height, width, channels), 0, 256)
    return np.asarray(noise, dtype=np.uint8)
  with Image.open(pattern) as img:
    img = img.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(height, width, channels)


def apply_trigger(images: jax.Array, pattern: jax.Array, alpha: float) -> jax.Array:
  """uint8 images blended as (1 - alpha) * x + alpha * pattern, rounded."""
  x = jnp.asarray(images, dtype=jnp.float32)
  p = jnp.asarray(pattern, dtype=jnp.float32)
  mixed = (1.0 - alpha) * x + alpha * p
  return jnp.clip(jnp.round(mixed), 0, 255).astype(jnp.uint8)
