"""CIFAR ResNet-18 and the WideResNet (WRN-16-1) used by the ABL authors."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn

from abl_jax.models.batch_norm import BatchNorm

ModuleDef = Callable[..., nn.Module]

# He-normal on fan-out, the usual initialisation of both architectures.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _layers(dtype: Any, train: bool) -> tuple[ModuleDef, ModuleDef]:
  """Bias-free 3x3 convolution and PyTorch-style BatchNorm factories."""
  conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=1, use_bias=False,
                           kernel_init=conv_init, dtype=dtype)
  norm = functools.partial(BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           dtype=dtype)
  return conv, norm


class BasicBlock(nn.Module):
  """Post-activation residual block: conv-BN-ReLU-conv-BN, plus shortcut, then ReLU."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = self.conv(self.features, strides=self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.norm()(self.conv(self.features)(y))
    if x.shape != y.shape:
      x = self.conv(self.features, kernel_size=(1, 1), strides=self.strides, padding=0)(x)
      x = self.norm()(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool, four stages of two BasicBlocks."""
  num_classes: int
  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    conv, norm = _layers(self.dtype, train)
    x = nn.relu(norm()(conv(self.width)(x)))
    for i, strides in enumerate((1, 2, 2, 2)):
      for j in range(2):
        x = BasicBlock(self.width * 2**i, strides if j == 0 else 1, conv, norm)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return x.astype(jnp.float32)


class WideBlock(nn.Module):
  """Pre-activation block: BN-ReLU-conv-BN-ReLU-conv, plus shortcut (1x1 conv if shape changes)."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    o = nn.relu(self.norm()(x))
    y = self.conv(self.features, strides=self.strides)(o)
    y = self.conv(self.features)(nn.relu(self.norm()(y)))
    if x.shape[-1] != self.features:  # As in the reference code, the shortcut sees BN-ReLU(x).
      x = self.conv(self.features, kernel_size=(1, 1), strides=self.strides, padding=0)(o)
    return x + y


class WideResNet(nn.Module):
  """WideResNet (Zagoruyko & Komodakis) for 32x32 inputs, without dropout."""
  num_classes: int
  depth: int = 16
  widen_factor: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}")
    conv, norm = _layers(self.dtype, train)
    x = conv(16)(x)
    for i, strides in enumerate((1, 2, 2)):
      for j in range((self.depth - 4) // 6):
        x = WideBlock(16 * 2**i * self.widen_factor, strides if j == 0 else 1, conv, norm)(x)
    x = nn.relu(norm()(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return x.astype(jnp.float32)


class WRN16_1(WideResNet):
  """WRN-16-1 (channels 16, 16, 32, 64), the ABL authors' smaller model."""
