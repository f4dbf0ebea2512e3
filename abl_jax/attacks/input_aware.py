"""Input-aware dynamic backdoor (Nguyen and Tran, NeurIPS 2020), materialised as a poisoned training set.

    poisoned = input_aware.poison(config, train, key, n)   # trains (or reuses) the generators first
    poisoned.is_poisoned, poisoned.is_cross                  # ground truth, for metrics only
    poisoned.apply_trigger(test_images)                      # each image its own trigger
    poisoned.cross_trigger(test_images)                      # each image another test image's trigger

A backdoor input is x + (G(x) - x) * M(x); a cross-trigger input x1 + (G(x2) - x1) * M(x2)
(input_aware_trigger). `n` non-target
training images get their own trigger and the target label; round(cross_rate * N) others (any class) get
the trigger of another training image and keep their labels. Everything is stored as uint8.
"""
from __future__ import annotations

from absl import logging
import jax
import ml_collections
import numpy as np

from abl_jax import registry, train as train_lib
from abl_jax.attacks import input_aware_train
from abl_jax.attacks.base import Poisoned
from abl_jax.attacks.input_aware_trigger import make_trigger_fns, trigger_parts
from abl_jax.data import Dataset

def validate(cfg: ml_collections.ConfigDict, num_train: int, num_poison: int) -> None:
  """Rejects bad input-aware settings (config.attack.*) with one line naming the field."""
  if "input_aware" not in cfg:
    raise ValueError("config.attack.input_aware is missing: input_aware needs configs/abl_input_aware.py "
                     "(or configs.common.add_input_aware(config))")
  ia = cfg.input_aware
  pairs = ia.batch_size
  checks = [
      (0.0 <= ia.cross_rate < 1.0, "cross_rate", ia.cross_rate, "in [0, 1)"),
      (num_poison + round(ia.cross_rate * num_train) <= num_train, "cross_rate", ia.cross_rate,
       f"at most 1 - poison_rate ({num_poison} backdoor examples already)"),
      (int(ia.p_attack * pairs) >= 1, "p_attack", ia.p_attack,
       f"large enough for one example per batch of {pairs} (p_attack * {pairs} >= 1)"),
      (int(ia.p_cross * pairs) >= 1, "p_cross", ia.p_cross,
       f"large enough for one example per batch of {pairs} (p_cross * {pairs} >= 1)"),
      (ia.p_attack + ia.p_cross <= 1.0, "p_cross", ia.p_cross, "at most 1 - p_attack"),
      (ia.generator_width >= 2, "generator_width", ia.generator_width, ">= 2"),
      (ia.generator_depth >= 1, "generator_depth", ia.generator_depth, ">= 1"),
      (ia.mask_epochs >= 0 and ia.epochs >= 0, "epochs", (ia.mask_epochs, ia.epochs), ">= 0 (and mask_epochs)"),
      (0.0 <= ia.mask_density <= 1.0, "mask_density", ia.mask_density, "in [0, 1]"),
      (not ia.classifier or ia.classifier in registry.MODELS, "classifier", ia.classifier,
       "'' (config.model.name) or one of " + ", ".join(registry.MODELS)),
  ]
  for ok, field, value, allowed in checks:
    if not ok:
      raise ValueError(f"config.attack.input_aware.{field}={value!r} must be {allowed}")
  train_lib.check_batch_size(ia.batch_size, "config.attack.input_aware.batch_size")


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
  return materialise(config, train, variables, key, num_poison)
