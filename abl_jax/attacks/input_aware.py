"""Input-aware dynamic backdoor (Nguyen and Tran, NeurIPS 2020), materialised as a poisoned training set.

    poisoned = input_aware.poison(config, train, key, n)   # trains (or reuses) the generators first
    poisoned.is_poisoned, poisoned.is_cross                  # ground truth, for metrics only
    poisoned.apply_trigger(test_images)                      # each image its own trigger
    poisoned.cross_trigger(test_images)                      # each image another test image's trigger

A backdoor input is x + (G(x) - x) * M(x); a cross-trigger input x1 + (G(x2) - x1) * M(x2). `n` non-target
training images get their own trigger and the target label; round(cross_rate * N) others (any class) get
the trigger of another training image and keep their labels. Everything is stored as uint8.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from abl_jax import models, train as train_lib
from abl_jax.attacks import input_aware_train
from abl_jax.attacks.base import Poisoned, TriggerFn
from abl_jax.data import Dataset
from abl_jax.models import generator

CHUNK = 512  # Images per generator call (bounds the float32 activations).


def validate(cfg: ml_collections.ConfigDict, num_train: int, num_poison: int) -> None:
  """Rejects bad input-aware settings (config.attack.*) with one line naming the field."""
  if "input_aware" not in cfg:
    raise ValueError("config.attack.input_aware is missing: input_aware needs configs/abl_input_aware.py "
                     "(or configs.common.add_input_aware(config))")
  ia = cfg.input_aware
  per_device = ia.batch_size // max(jax.device_count(), 1)
  checks = [
      (0.0 <= ia.cross_rate < 1.0, "cross_rate", ia.cross_rate, "in [0, 1)"),
      (num_poison + round(ia.cross_rate * num_train) <= num_train, "cross_rate", ia.cross_rate,
       f"at most 1 - poison_rate ({num_poison} backdoor examples already)"),
      (int(ia.p_attack * per_device) >= 1, "p_attack", ia.p_attack,
       f"large enough for one example per device batch of {per_device} (p_attack * {per_device} >= 1)"),
      (int(ia.p_cross * per_device) >= 1, "p_cross", ia.p_cross,
       f"large enough for one example per device batch of {per_device} (p_cross * {per_device} >= 1)"),
      (ia.p_attack + ia.p_cross <= 1.0, "p_cross", ia.p_cross, "at most 1 - p_attack"),
      (ia.generator_width >= 2, "generator_width", ia.generator_width, ">= 2"),
      (ia.generator_depth >= 1, "generator_depth", ia.generator_depth, ">= 1"),
      (ia.mask_epochs >= 0 and ia.epochs >= 0, "epochs", (ia.mask_epochs, ia.epochs), ">= 0 (and mask_epochs)"),
      (0.0 <= ia.mask_density <= 1.0, "mask_density", ia.mask_density, "in [0, 1]"),
      (not ia.classifier or ia.classifier in models.MODELS, "classifier", ia.classifier,
       "'' (config.model.name) or one of " + ", ".join(models.MODELS)),
  ]
  for ok, field, value, allowed in checks:
    if not ok:
      raise ValueError(f"config.attack.input_aware.{field}={value!r} must be {allowed}")
  train_lib.check_batch_size(ia.batch_size, "config.attack.input_aware.batch_size")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _triggered(g: Any, m: Any, mean: tuple, std: tuple, variables: dict, images: jax.Array,
               sources: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(uint8 triggered images, patterns, masks): each image gets the trigger of its source image."""
  x = images.astype(jnp.float32) / 255.0
  n = input_aware_train.normalise(sources.astype(jnp.float32) / 255.0, mean, std)
  patterns = g.apply(variables["pattern"], n, train=False)
  masks = generator.threshold(m.apply(variables["mask"], n, train=False))
  out = generator.compose(x, patterns, masks)
  return jnp.clip(jnp.round(out * 255.0), 0, 255).astype(jnp.uint8), patterns, masks


def trigger_parts(config: ml_collections.ConfigDict, variables: dict, images: np.ndarray,
                  sources: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(triggered uint8, patterns [0, 1], masks [0, 1]) for `images` with the triggers of `sources` (default: own)."""
  images = np.asarray(images, np.uint8)
  sources = images if sources is None else np.asarray(sources, np.uint8)
  g, m = input_aware_train.generators(config, images.shape[-1])
  g, m = g.clone(bn_axis_name=None), m.clone(bn_axis_name=None)  # Inference outside pmap.
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


def materialise(config: ml_collections.ConfigDict, train: Dataset, variables: dict, key: jax.Array,
                num_poison: int) -> Poisoned:
  """The fixed poisoned set: `num_poison` non-target backdoor examples, round(cross_rate N) cross ones."""
  cfg = config.attack
  k_bd, k_cross, k_partner, k_test = jax.random.split(key, 4)
  n = len(train)
  non_target = np.flatnonzero(train.labels != cfg.target_label)
  bd = non_target[np.asarray(jax.random.choice(k_bd, len(non_target), (num_poison,), replace=False))]
  rest = np.setdiff1d(np.arange(n), bd)
  num_cross = round(cfg.input_aware.cross_rate * n)
  cross = rest[np.asarray(jax.random.choice(k_cross, len(rest), (num_cross,), replace=False))]
  # Each cross example's trigger comes from a uniformly drawn other training image (clean).
  other = np.asarray(jax.random.randint(k_partner, (num_cross,), 0, max(n - 1, 1)))
  other = other + (other >= cross)

  images, labels = train.images.copy(), train.labels.copy()
  images[bd] = trigger_parts(config, variables, train.images[bd])[0]
  labels[bd] = cfg.target_label
  images[cross] = trigger_parts(config, variables, train.images[cross], train.images[other])[0]
  is_poisoned, is_cross = np.zeros(n, bool), np.zeros(n, bool)
  is_poisoned[bd], is_cross[cross] = True, True
  apply_trigger, cross_trigger = make_trigger_fns(config, variables, k_test)
  target_size = int(np.sum(labels == cfg.target_label))
  logging.info("input_aware: %d backdoor examples (%.2f%% of %d, %.2f%% of target class %d, relabelled) and %d "
               "cross-trigger examples (%.2f%%, labels kept)", num_poison, 100 * num_poison / n, n,
               100 * num_poison / target_size, cfg.target_label, num_cross, 100 * num_cross / n)
  return Poisoned(Dataset(images, labels, train.class_names), is_poisoned, apply_trigger,
                  is_cross=is_cross, cross_trigger=cross_trigger)


def poison(config: ml_collections.ConfigDict, train: Dataset, key: jax.Array, num_poison: int) -> Poisoned:
  """Trains (or reuses the cached) generators, then materialises the poisoned set."""
  validate(config.attack, len(train), num_poison)
  variables, _ = input_aware_train.load_or_train(config, train)
  png = input_aware_train.cache_path(config, train) + "-examples.png"
  if not os.path.exists(png):  # Clean images, patterns, masks, backdoor images of the first 8 training images.
    from abl_jax.attacks import input_aware_figure
    input_aware_figure.write_examples(config, variables, train.images[:8], png)
  return materialise(config, train, variables, key, num_poison)


def attack_metrics(config: ml_collections.ConfigDict, variables: dict, model: Any, model_vars: dict,
                   test: Dataset) -> dict[str, float]:
  """The attacker's classifier on the test set: CA, ASR (non-target, own triggers), cross-trigger accuracy."""
  predict = _predictor(model.clone(bn_axis_name=None), tuple(config.data.mean), tuple(config.data.std))
  apply_trigger, cross_trigger = make_trigger_fns(config, variables, jax.random.PRNGKey(0))
  keep = test.labels != config.attack.target_label
  return {
      "clean_accuracy": float(np.mean(predict(model_vars, test.images) == test.labels)),
      "attack_success_rate": float(np.mean(predict(model_vars, apply_trigger(test.images[keep]))
                                           == config.attack.target_label)),
      "cross_trigger_accuracy": float(np.mean(predict(model_vars, cross_trigger(test.images)) == test.labels)),
  }


def _predictor(model: Any, mean: tuple, std: tuple) -> Callable[[dict, np.ndarray], np.ndarray]:
  """Predicted classes of uint8 images, in chunks (inference mode)."""
  fn = jax.jit(lambda v, x: jnp.argmax(model.apply(v, train_lib.preprocess(x, mean, std), train=False), -1))
  return lambda v, images: np.concatenate(
      [np.asarray(fn(v, images[s:s + CHUNK])) for s in range(0, len(images), CHUNK)] or [np.zeros(0, np.int64)])
