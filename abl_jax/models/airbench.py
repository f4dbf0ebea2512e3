"""A fast-training VGG-like net after KellerJordan/cifar10-airbench (airbench94): a fixed whitening layer from
the training images, then three conv groups with BatchNorm and GELU.

    filters = whitening_filters(normalised_train_images)              # [2, 2, C, 4C], numpy
    model = Airbench(num_classes=10, whitening=as_attribute(filters))

The whitening filters are a module attribute (a tuple, so the module stays hashable for jit and lru_cache)
and the initial value of a non-trained variable in the `batch_stats` collection, the state TrainState
carries, checkpoints and restores without gradients or weight decay: a model restored from a checkpoint
keeps the filters of its run even when built without them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from abl_jax.models.batch_norm import BatchNorm
from abl_jax.models.small_cnn import max_pool_2x2

KERNEL = 2  # Side of the whitening layer's patches.
WHITENING_IMAGES = 5000  # Training images the filters are estimated from (airbench94's 5,000).
# airbench94 trains the BatchNorm biases with a 64x larger learning rate (same weight decay). Under plain
# SGD a bias used as 8 * b has exactly that: its steps are 8^2 times larger, its relative decay the same.
BIAS_SCALE = 8.0


def patches(images: np.ndarray, kernel: int = KERNEL) -> np.ndarray:
  """Every k x k patch of [N, H, W, C] images as rows [N*(H-k+1)*(W-k+1), k*k*C], in (row, column, channel) order."""
  n, h, w, c = images.shape
  views = [images[:, i:h - kernel + 1 + i, j:w - kernel + 1 + j] for i in range(kernel) for j in range(kernel)]
  return np.stack(views, axis=3).reshape(-1, kernel * kernel * c)


def whitening_filters(images: np.ndarray, kernel: int = KERNEL, eps: float = 5e-4,
                      chunk: int = 500) -> np.ndarray:
  """HWIO filters [k, k, C, k*k*C] mapping the k x k patches of `images` to (nearly) unit second moment.

  Filter i is the i-th eigenvector (largest eigenvalue first) of the patches' uncentred second moment, divided
  by sqrt(eigenvalue + eps); each eigenvector's sign makes its largest-magnitude entry positive, whatever sign
  LAPACK returns. `images` are float [N, H, W, C], normalised as the model sees them.
  """
  images = np.asarray(images)
  d = kernel * kernel * images.shape[-1]
  moment, count = np.zeros((d, d)), 0
  for s in range(0, len(images), chunk):  # Patches of all images at once would take gigabytes.
    p = patches(images[s:s + chunk].astype(np.float64), kernel)
    moment += p.T @ p
    count += len(p)
  eigenvalues, eigenvectors = np.linalg.eigh(moment / max(count, 1))
  eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
  signs = np.sign(eigenvectors[np.argmax(np.abs(eigenvectors), axis=0), np.arange(d)])
  filters = eigenvectors * signs / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)
  return filters.reshape(kernel, kernel, images.shape[-1], d).astype(np.float32)


def as_attribute(filters: np.ndarray | None) -> tuple[float, ...]:
  """Filters as the module attribute `Airbench.whitening` (a flat tuple; () for none)."""
  return () if filters is None else tuple(float(v) for v in np.asarray(filters, np.float32).ravel())


def partial_dirac_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """PyTorch's conv default (uniform +-1/sqrt(fan_in)) with the first min(in, out) filters the identity."""
  kh, kw, cin, cout = shape
  w = jax.random.uniform(key, shape, dtype, -1.0, 1.0) / np.sqrt(kh * kw * cin)
  n = min(cin, cout)
  eye = jnp.zeros((kh, kw, cin, n), dtype).at[kh // 2, kw // 2].set(jnp.eye(cin, n, dtype=dtype))
  return w.at[..., :n].set(eye)


class ConvBN(nn.Module):
  """3x3 conv (no bias), optional 2x2 max-pool, BatchNorm without scale (its bias at BIAS_SCALE), GELU."""
  features: int
  pool: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, kernel_init=partial_dirac_init,
                dtype=self.dtype)(x)
    if self.pool:
      x = max_pool_2x2(x)
    x = BatchNorm(use_running_average=not train, momentum=0.6, epsilon=1e-5, use_scale=False, use_bias=False,
                  dtype=self.dtype)(x)
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return nn.gelu(x + BIAS_SCALE * bias.astype(x.dtype))


class Airbench(nn.Module):
  """Whitening 2x2 conv (fixed filters and their negatives, trained bias), GELU, then three groups of
  conv-pool-BN-GELU and conv-BN-GELU (widths w, 4w, 4w), a global max-pool and a bias-free linear layer / 9.

  `whitening`: whitening_filters(...) through as_attribute; () means identity filters (un-whitened patches),
  what a model built only to restore a checkpoint into needs.
  """
  num_classes: int
  width: int = 64
  whitening: tuple[float, ...] = ()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    d = KERNEL * KERNEL * x.shape[-1]
    if self.whitening and len(self.whitening) != d * d:
      raise ValueError(f"Airbench.whitening holds {len(self.whitening)} values; images with {x.shape[-1]} "
                       f"channels need {d * d} (whitening_filters of a {KERNEL}x{KERNEL} patch)")
    initial = np.asarray(self.whitening, np.float32) if self.whitening else np.eye(d, dtype=np.float32)
    filters = self.variable("batch_stats", "whitening", lambda: jnp.asarray(initial.reshape(KERNEL, KERNEL, -1, d)))
    kernel = jax.lax.stop_gradient(filters.value).astype(self.dtype)
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    bias = self.param("whitening_bias", nn.initializers.zeros, (2 * d,))
    x = nn.gelu(jnp.concatenate([y, -y], axis=-1) + bias.astype(self.dtype))
    for features in (self.width, 4 * self.width, 4 * self.width):
      x = ConvBN(features, pool=True, dtype=self.dtype)(x, train)
      x = ConvBN(features, pool=False, dtype=self.dtype)(x, train)
    x = jnp.max(x, axis=(1, 2))  # airbench94's 3x3 max-pool of the last 3x3 map, for any image size.
    x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype)(x) / 9.0
    return x.astype(jnp.float32)
