"""BatchNorm with flax.linen.BatchNorm's variables and maths, and per-channel sums XLA's CPU backend runs fast.

A drop-in for `nn.BatchNorm` as the models use it (no axis_name, feature axis last, fast variance): the same
parameter and statistics names (`scale`, `bias`; `mean`, `var`), the same running-average update and the same
outputs up to float32 summation order. Two things differ in how it is computed:
- per-channel sums over [N, H, W, C] are taken over a [N*H*W / k, k*C] view (rows of about 1,024 values), then
  over k: XLA's CPU reduction of the leading axes of a tensor whose last axis is narrow (16-64 channels) ran
  4-5x slower than the same sum over wide rows (docs/benchmarks.md);
- the training-mode gradient is written out (`normalize_train`'s custom VJP): two such sums, sum(dy) and
  sum(dy * x), and one elementwise pass, where autodiff of the forward adds narrow reductions of its own.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

ROW = 1024  # Values per row of the wide view the channel sums reduce over.


def _count(x: jax.Array) -> int:
  return x.size // x.shape[-1]


def channel_sum(x: jax.Array) -> jax.Array:
  """The float32 sum of `x` over every axis but the last."""
  c, n = x.shape[-1], _count(x)
  k = 1
  while k * c < ROW and n % (2 * k) == 0:
    k *= 2
  x = x.astype(jnp.float32).reshape(n // k, k * c)
  return jnp.sum(x, axis=0).reshape(k, c).sum(axis=0)


def batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and (biased) variance of `x` in float32, as E[x^2] - E[x]^2 clipped at 0."""
  n = _count(x)
  x = x.astype(jnp.float32)
  mean = channel_sum(x) / n
  return mean, jnp.maximum(channel_sum(x * x) / n - mean * mean, 0.0)


def _forward(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
  mean, var = batch_stats(x)
  inv = jax.lax.rsqrt(var + epsilon)
  a = scale * inv
  y = (x.astype(jnp.float32) * a + (bias - mean * a)).astype(x.dtype)
  return (y, mean, var), (x, a, mean, inv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x - mean) / sqrt(var + epsilon) * scale + bias with the batch's statistics; returns (y, mean, var)."""
  return _forward(x, scale, bias, epsilon)[0]


def _backward(epsilon: float, residuals, cotangents):
  x, a, mean, inv = residuals
  dy = cotangents[0].astype(jnp.float32)  # The statistics are outputs for the running averages only.
  xf = x.astype(jnp.float32)
  n = _count(x)
  dbias = channel_sum(dy)
  dscale = inv * (channel_sum(dy * xf) - mean * dbias)  # sum(dy * x_hat)
  k = a * inv * dscale / n
  dx = a * dy - k * xf + (k * mean - a * dbias / n)
  return dx.astype(x.dtype), dscale, dbias


normalize_train.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
  """`nn.BatchNorm(use_running_average, momentum, epsilon, dtype, use_scale, use_bias)` over the last axis."""
  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  use_scale: bool = True
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    scale = (self.param("scale", nn.initializers.ones, (features,), jnp.float32) if self.use_scale
             else jnp.ones((features,), jnp.float32))
    bias = (self.param("bias", nn.initializers.zeros, (features,), jnp.float32) if self.use_bias
            else jnp.zeros((features,), jnp.float32))
    dtype = self.dtype or jnp.result_type(x, jnp.float32)
    if use_running_average:
      a = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
      y = x.astype(jnp.float32) * a + (bias - ra_mean.value * a)
      return y.astype(dtype)
    y, mean, var = normalize_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(dtype)

