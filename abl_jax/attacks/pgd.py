"""Projected gradient descent (L-inf or L2) against a classifier, on uint8 images, in one jitted function.

    attack = make_pgd(model, mean, std, norm="linf", eps=8.0, step=1.5, steps=100, random_start=False)
    adv = attack(variables, images, labels, key)                    # one device (jit)
    adv = perturb(attack_pmapped, variables, images, labels, key, batch_size=512)  # all local devices

Every size is on the 0..255 pixel scale (L-inf eps 8 = 8/255). PGD ascends the summed cross-entropy of
the given labels with the model in inference mode. Example i's random start comes from
fold_in(key, start + i), so the result does not depend on the batch size or the device count.
The output is uint8 and lies exactly in the eps ball around the input and in 0..255.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from abl_jax import distributed, train

NORMS = ("linf", "l2")


def _norms(x: jax.Array) -> jax.Array:
  """Per-example L2 norms of [N, ...], shaped [N, 1, 1, 1] for broadcasting."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


def _project(delta: jax.Array, norm: str, eps: float) -> jax.Array:
  """`delta` projected onto the eps ball."""
  if norm == "linf":
    return jnp.clip(delta, -eps, eps)
  return delta * jnp.minimum(1.0, eps / jnp.maximum(_norms(delta), 1e-12))


def _random_start(keys: jax.Array, shape: tuple[int, ...], norm: str, eps: float) -> jax.Array:
  """Uniform in the L-inf box, or a random direction of length eps (L2); one key per example."""
  if norm == "linf":
    return jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32, -eps, eps))(keys)
  noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
  return eps * noise / jnp.maximum(_norms(noise), 1e-12)


def _quantize(x: jax.Array, delta: jax.Array, norm: str, eps: float) -> jax.Array:
  """x + delta as uint8 with the rounded perturbation still inside the eps ball and 0..255."""
  rounded = jnp.clip(jnp.round(x + delta), 0.0, 255.0) - x
  if norm == "linf":
    rounded = jnp.clip(rounded, -jnp.floor(eps), jnp.floor(eps))
  else:  # Rounding can lengthen delta; truncating towards zero never does (|trunc(d)| <= |d| per pixel).
    too_long = jnp.sum(jnp.square(rounded), axis=(1, 2, 3), keepdims=True) > eps * eps
    rounded = jnp.where(too_long, jnp.trunc(delta), rounded)
  # x is in 0..255 and x + rounded moved towards x when clipped, so the clip below changes nothing.
  return jnp.clip(x + rounded, 0.0, 255.0).astype(jnp.uint8)


def pgd(variables: Any, images: jax.Array, labels: jax.Array, keys: jax.Array, *, apply_fn: Callable,
        mean: Sequence[float], std: Sequence[float], norm: str, eps: float, step: float, steps: int,
        random_start: bool) -> jax.Array:
  """uint8 adversarial images maximising the cross-entropy of `labels`; one PRNG key per image."""
  if norm not in NORMS:
    raise ValueError(f"config.attack.pgd.norm={norm!r} is unknown; allowed: {', '.join(NORMS)}")
  x = images.astype(jnp.float32)

  def loss(delta):
    logits = apply_fn(variables, train.preprocess(x + delta, mean, std), train=False)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  def body(_, delta):
    g = jax.grad(loss)(delta)
    if norm == "linf":
      delta = delta + step * jnp.sign(g)
    else:
      delta = delta + step * g / jnp.maximum(_norms(g), 1e-12)
    delta = _project(delta, norm, eps)
    return jnp.clip(x + delta, 0.0, 255.0) - x  # Clipping to the pixel range keeps delta in the ball.

  delta = jnp.zeros_like(x)
  if random_start:
    delta = jnp.clip(x + _random_start(keys, x.shape[1:], norm, eps), 0.0, 255.0) - x
  delta = jax.lax.fori_loop(0, steps, body, delta)
  return _quantize(x, delta, norm, eps)


def example_keys(key: jax.Array, start: jax.Array | int, n: int) -> jax.Array:
  """The keys of examples start .. start + n - 1: fold_in(key, index)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(n))


def make_pgd(model: flax.linen.Module, mean: Sequence[float], std: Sequence[float], **pgd_kwargs) -> Callable:
  """jit of (variables, images, labels, key, start=0) -> uint8 adversarial images, on one device."""
  fn = functools.partial(pgd, apply_fn=model.apply, mean=tuple(mean), std=tuple(std), **pgd_kwargs)

  @jax.jit
  def attack(variables, images, labels, key, start=0):
    return fn(variables, images, labels, example_keys(key, start, images.shape[0]))

  return attack


def make_pgd_pmapped(model: flax.linen.Module, mean: Sequence[float], std: Sequence[float],
                     **pgd_kwargs) -> Callable:
  """pmap of (replicated variables, [dev, b, ...] images, [dev, b] labels, replicated key, replicated start)."""
  fn = functools.partial(pgd, apply_fn=model.apply, mean=tuple(mean), std=tuple(std), **pgd_kwargs)

  def attack(variables, images, labels, key, start):
    local = images.shape[0]
    first = start + jax.lax.axis_index(train.AXIS) * local  # Global position: device-count independent.
    return fn(variables, images, labels, example_keys(key, first, local))

  return jax.pmap(attack, axis_name=train.AXIS)


def perturb(attack_pmapped: Callable, variables: Any, images: np.ndarray, labels: np.ndarray, key: jax.Array,
            batch_size: int) -> np.ndarray:
  """`attack_pmapped` over a whole uint8 set in batches of `batch_size` split over all devices (every process)."""
  n_dev = jax.device_count()
  train.check_batch_size(batch_size, "config.attack.pgd.batch_size")
  total = len(images)
  batch_size = min(batch_size, -(-total // n_dev) * n_dev)  # A small set needs no padding to a large batch.
  rvars, rkey = train.replicate(variables), train.replicate(key)
  out = []
  for start in range(0, total, batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(x)
    if pad:  # One shape for every call: one compilation.
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    adv = attack_pmapped(rvars, train.local_batch(x), train.local_batch(y), rkey, train.replicate(np.int32(start)))
    out.append(np.asarray(adv).reshape(-1, *images.shape[1:]))
  if not out:
    return np.empty_like(images, dtype=np.uint8)
  return distributed.gather_batches(np.stack(out))[:total].astype(np.uint8)
