"""BadNets (Gu et al., 2017): a 3x3 grid patch in the bottom-right corner, labels flipped."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The ABL authors' gridTrigger: one 3x3 block, the same on every channel. numpy, so that importing this
# module does not start a JAX backend (jax.distributed.initialize must come first).
PATTERN = np.array([[0, 0, 255],
                    [0, 255, 0],
                    [255, 0, 255]], dtype=np.uint8)


def apply_trigger(images: jax.Array) -> jax.Array:
  """uint8 images [..., H, W, C] with their last 3 rows and columns overwritten by the grid."""
  images = jnp.asarray(images, dtype=jnp.uint8)
  return images.at[..., -3:, -3:, :].set(jnp.asarray(PATTERN)[:, :, None])
