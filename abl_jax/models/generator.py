"""The input-aware attack's generators (Nguyen and Tran, 2020): pattern G and mask M, CIFAR-10 shape.

    g = Generator(out_channels=3)                  # pattern generator: [N, H, W, 3] in [0, 1]
    m = Generator(out_channels=1)                  # mask generator (raw); masks = threshold(m(...))
    variables = g.init(key, x, train=False)        # x: normalised float32 [N, H, W, C]

Encoder: `depth` stages of two 3x3 conv-BN-ReLU blocks then 2x2 max-pool, widths width * 2**i (32-64-128);
one middle block; decoder: `depth` stages of 2x bilinear up-sampling then two blocks, halving the width,
the last block without ReLU and with `out_channels`; output tanh(x) / 2 + 0.5. H and W must be
divisible by 2**depth.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from abl_jax.models.small_cnn import max_pool_2x2


class ConvBlock(nn.Module):
  """3x3 conv (with bias, as PyTorch's default), BatchNorm, optional ReLU."""
  features: int
  relu: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = nn.Conv(self.features, (3, 3), padding=1)(x)
    # PyTorch BatchNorm2d(momentum=0.05) in the reference = flax momentum 0.95.
    x = nn.BatchNorm(use_running_average=not train, momentum=0.95, epsilon=1e-5)(x)
    return nn.relu(x) if self.relu else x


def upsample2x(x: jnp.ndarray) -> jnp.ndarray:
  """Bilinear 2x up-sampling with half-pixel centres (PyTorch's align_corners=False)."""
  n, h, w, c = x.shape
  return jax.image.resize(x, (n, 2 * h, 2 * w, c), method="bilinear")


class Generator(nn.Module):
  """Encoder-decoder from normalised images to `out_channels` maps in [0, 1] (see the module docstring)."""
  out_channels: int = 3
  width: int = 32
  depth: int = 3

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    block = lambda f, relu=True: ConvBlock(f, relu)  # noqa: E731
    features = self.width
    for i in range(self.depth):
      features = self.width * 2 ** i
      x = block(features)(x, train)
      x = block(features)(x, train)
      x = max_pool_2x2(x)
    x = block(features)(x, train)
    for i in range(self.depth):
      x = upsample2x(x)
      x = block(features)(x, train)
      last = i == self.depth - 1
      out = self.out_channels if last else features // 2
      x = block(out, relu=not last)(x, train)
      features //= 2
    return jnp.tanh(x) / 2 + 0.5


def threshold(m: jnp.ndarray) -> jnp.ndarray:
  """The mask generator's steep threshold tanh(20 m - 10) / 2 + 0.5, mapping [0, 1] into [0, 1]."""
  return jnp.tanh(20.0 * m - 10.0) / 2 + 0.5


def compose(images: jnp.ndarray, patterns: jnp.ndarray, masks: jnp.ndarray) -> jnp.ndarray:
  """The triggered input x + (pattern - x) * mask (any common pixel scale; masks broadcast over channels)."""
  return images + (patterns - images) * masks


def pattern_generator(width: int = 32, depth: int = 3, channels: int = 3) -> Generator:
  """G: `channels` output maps (the image's channels)."""
  return Generator(channels, width, depth)


def mask_generator(width: int = 32, depth: int = 3) -> Generator:
  """M before the threshold: one output map."""
  return Generator(1, width, depth)
