"""Projected gradient descent (L-inf or L2) against a classifier, on uint8 images, in one jitted function.

    attack = make_pgd(model, mean, std, norm="linf", eps=8.0, step=1.5, steps=100, random_start=False)
    adv = perturb(attack, variables, images, labels, key, batch_size=512)   # batches split over all devices

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

from jax.sharding import Mesh

from abl_jax import train

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


def make_pgd(model: flax.linen.Module, mean: Sequence[float], std: Sequence[float], mesh: Mesh | None = None,
             **pgd_kwargs) -> Callable:
  """Data-parallel (variables, images, labels, key, start) -> uint8 adversarial images, over `mesh` (default: all)."""
  fn = functools.partial(pgd, apply_fn=model.apply, mean=tuple(mean), std=tuple(std), **pgd_kwargs)

  def attack(variables, images, labels, key, start):
    return fn(variables, images, labels, train.example_keys(key, images.shape[0], start))

  return train.data_parallel(attack, mesh, batch_args=(1, 2), num_args=5, batch_outputs=True)


def perturb(attack: Callable, variables: Any, images: np.ndarray, labels: np.ndarray, key: jax.Array,
            batch_size: int, mesh: Mesh | None = None) -> np.ndarray:
  """`attack` (make_pgd's for the same `mesh`) over a whole uint8 set in batches of `batch_size`."""
  mesh = mesh or train.default_mesh()
  train.check_batch_size(batch_size, "config.attack.pgd.batch_size", mesh)
  total = len(images)
  batch_size = min(batch_size, -(-total // mesh.size) * mesh.size)  # A small set needs no padding to a large batch.
  placed_vars, placed_key = train.replicate((variables, key), mesh)
  out = []
  for start in range(0, total, batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(x)
    if pad:  # One shape for every call: one compilation.
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    out.append(attack(placed_vars, train.put_batch(x, mesh), train.put_batch(y, mesh), placed_key,
                      train.replicate(np.int32(start), mesh)))
  if not out:
    return np.empty_like(images, dtype=np.uint8)
  return np.concatenate(train.to_host(out))[:total].astype(np.uint8)
