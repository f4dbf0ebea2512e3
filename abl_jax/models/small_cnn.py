"""A small VGG-style CNN, fast enough for CPU runs."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from abl_jax.models.batch_norm import BatchNorm
from abl_jax.models.resnet import conv_init


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max-pool with stride 2 and VALID padding: the values of nn.max_pool(x, (2, 2), strides=(2, 2))."""
  # A max over reshaped axes: its gradient is elementwise, where XLA's CPU backend expands the gradient of
  # reduce_window (select-and-scatter) into index iotas, an argmax reduce-window and a scatter, which took
  # 28% of the small CNN's training step (docs/benchmarks.md). Gradients differ only where the window ties.
  n, h, w, c = x.shape
  with jax.named_scope("max_pool"):  # Names its forward and gradient in profiles (benchmarks/step_profile.py).
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SmallCNN(nn.Module):
  """Three pairs of 3x3 conv-BN-ReLU (widths w, 2w, 4w), each pair followed by 2x2 max-pool."""
  num_classes: int
  width: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    for features in (self.width, self.width * 2, self.width * 4):
      for _ in range(2):
        x = nn.Conv(features, (3, 3), padding=1, use_bias=False, kernel_init=conv_init,
                    dtype=self.dtype)(x)
        x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)(x)
        x = nn.relu(x)
      x = max_pool_2x2(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return x.astype(jnp.float32)
