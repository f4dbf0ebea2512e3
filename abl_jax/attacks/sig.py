"""SIG (Barni et al., 2019): a clean-label attack adding a horizontal sinusoid to target-class images."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def signal(height: int, width: int, delta: float, freq: float) -> jax.Array:
  """The float32 [H, W, 1] signal v(i, j) = delta * sin(2 pi j freq / W), constant down each column."""
  j = jnp.arange(width, dtype=jnp.float32)
  row = delta * jnp.sin(2.0 * jnp.pi * j * freq / width)
  return jnp.broadcast_to(row[None, :, None], (height, width, 1)).astype(jnp.float32)


def apply_trigger(images: jax.Array, delta: float, freq: float) -> jax.Array:
  """uint8 images with the signal added, rounded and clipped to 0..255."""
  x = jnp.asarray(images, dtype=jnp.float32)
  v = signal(x.shape[-3], x.shape[-2], delta, freq)
  return jnp.clip(jnp.round(x + v), 0, 255).astype(jnp.uint8)
