"""The input-aware trigger: the generators' modules and every image given its own or another image's trigger.

    g, m = input_aware_trigger.generators(config, channels=3)
    triggered, patterns, masks = input_aware_trigger.trigger_parts(config, variables, images)
    apply_trigger, cross_trigger = input_aware_trigger.make_trigger_fns(config, variables, key)

A backdoor input is x + (G(x) - x) * M(x); a cross-trigger input x1 + (G(x2) - x1) * M(x2). Both the
attacker's training (input_aware_train) and the poisoning (input_aware) build on this module.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from abl_jax import train as train_lib
from abl_jax.attacks.base import TriggerFn
from abl_jax.models import generator

CHUNK = 512  # Images per generator call (bounds the float32 activations).


def generators(config: ml_collections.ConfigDict, channels: int) -> tuple[generator.Generator, generator.Generator]:
  """The (pattern G, mask M) modules that config.attack.input_aware describes."""
  ia = config.attack.input_aware
  return (generator.pattern_generator(ia.generator_width, ia.generator_depth, channels),
          generator.mask_generator(ia.generator_width, ia.generator_depth))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _triggered(g: Any, m: Any, mean: tuple, std: tuple, variables: dict, images: jax.Array,
               sources: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(uint8 triggered images, patterns, masks): each image gets the trigger of its source image."""
  x = images.astype(jnp.float32) / 255.0
  n = train_lib.normalise(sources.astype(jnp.float32) / 255.0, mean, std)
  patterns = g.apply(variables["pattern"], n, train=False)
  masks = generator.threshold(m.apply(variables["mask"], n, train=False))
  out = generator.compose(x, patterns, masks)
  return jnp.clip(jnp.round(out * 255.0), 0, 255).astype(jnp.uint8), patterns, masks


def trigger_parts(config: ml_collections.ConfigDict, variables: dict, images: np.ndarray,
                  sources: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(triggered uint8, patterns [0, 1], masks [0, 1]) for `images` with the triggers of `sources` (default: own)."""
  images = np.asarray(images, np.uint8)
  sources = images if sources is None else np.asarray(sources, np.uint8)
  g, m = generators(config, images.shape[-1])
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  parts = []
  for s in range(0, len(images), CHUNK):
    x, src = images[s:s + CHUNK], sources[s:s + CHUNK]
    pad = min(CHUNK, 1 << (len(x) - 1).bit_length()) - len(x)  # A power-of-two size: few compilations.
    x, src = (np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (x, src))
    out = jax.device_get(_triggered(g, m, mean, std, variables, x, src))
    parts.append(tuple(o[:len(o) - pad] for o in out))
  if not parts:
    return images.copy(), np.zeros(images.shape, np.float32), np.zeros((*images.shape[:-1], 1), np.float32)
  return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def partners(n: int, key: jax.Array) -> np.ndarray:
  """A random derangement of 0..n-1 (one cycle through a permutation): partner[i] != i when n > 1."""
  perm = np.asarray(jax.random.permutation(key, n))
  out = np.empty(n, np.int64)
  out[perm] = np.roll(perm, -1)
  return out


def make_trigger_fns(config: ml_collections.ConfigDict, variables: dict,
                     key: jax.Array) -> tuple[TriggerFn, TriggerFn]:
  """(apply_trigger, cross_trigger) on uint8 numpy images; cross partners are a derangement from `key`."""

  def apply_trigger(images: np.ndarray) -> np.ndarray:
    return trigger_parts(config, variables, images)[0]

  def cross_trigger(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.uint8)
    return trigger_parts(config, variables, images, images[partners(len(images), key)])[0]

  return apply_trigger, cross_trigger
