"""Backdoor attacks on a training set, and the triggered test set that measures them.

    poisoned = attacks.poison(config.attack, train, key)  # clean_label, input_aware also need config=config
    poisoned.train, poisoned.is_poisoned  # the poisoned set; ground truth for metrics only
    asr_set = attacks.poisoned_test_set(test, poisoned, config.attack.target_label)
"""
from __future__ import annotations

import functools

from absl import logging
import jax
import ml_collections
import numpy as np

from abl_jax import distributed, registry
from abl_jax.attacks import badnets, blend, clean_label, input_aware, sig, wanet
from abl_jax.attacks.base import Poisoned, TriggerFn, apply_in_chunks
from abl_jax.data import Dataset

_CLEAN_LABEL = ("sig", "clean_label")  # Poison target-class images and keep their labels.
_LABEL_FLIP = ("badnets", "blend")

__all__ = ["Poisoned", "apply_in_chunks", "cross_test_set", "poison", "poisoned_test_set"]


def _trigger(cfg: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> TriggerFn:
  """The configured attack's trigger, jitted and applied in chunks with numpy uint8 output."""
  if cfg.name == "badnets":
    fn = badnets.apply_trigger
  elif cfg.name == "blend":
    pattern = blend.make_pattern(cfg.pattern, cfg.pattern_seed, image_shape)
    fn = functools.partial(blend.apply_trigger, pattern=pattern, alpha=float(cfg.alpha))
  elif cfg.name == "clean_label":
    fn = functools.partial(clean_label.apply_trigger, style=cfg.trigger_style,
                           amplitude=float(cfg.trigger_amplitude))
  else:
    fn = functools.partial(sig.apply_trigger, delta=float(cfg.delta), freq=float(cfg.freq))
  jitted = jax.jit(fn)
  return lambda images: apply_in_chunks(jitted, np.asarray(images, dtype=np.uint8))


def _validate(cfg: ml_collections.ConfigDict, train: Dataset) -> int:
  """Rejects bad attack settings with one line naming the field; returns how many to poison."""
  registry.check_name("config.attack.name", cfg.name)
  if not 0 <= cfg.target_label < train.num_classes:
    raise ValueError(f"config.attack.target_label={cfg.target_label} must be in 0..{train.num_classes - 1}")
  if cfg.name == "none":
    return 0
  registry.check_range("config.attack.poison_rate", cfg.poison_rate, 0.0, 1.0, low_open=True)
  if cfg.name == "blend":
    registry.check_range("config.attack.alpha", cfg.alpha, 0.0, 1.0)
  if cfg.name == "clean_label":
    clean_label.validate(cfg)
  n = max(1, round(cfg.poison_rate * len(train)))
  in_target = int(np.sum(train.labels == cfg.target_label))
  if cfg.name in _CLEAN_LABEL:
    available, kind = in_target, "target-class"
  else:
    available, kind = len(train) - in_target, "non-target"
  if n > available:
    raise ValueError(
        f"config.attack.poison_rate={cfg.poison_rate} asks for {n} {cfg.name} images but only {available} "
        f"{kind} images (class {cfg.target_label}) exist; max rate {available / len(train):.4f}")
  if cfg.name == "input_aware":  # Backdoor examples are non-target images, relabelled (as BadNets').
    input_aware.validate(cfg, len(train), n)
  if cfg.name == "wanet":  # Warped examples too; noise-mode ones come from the rest.
    wanet.validate(cfg, len(train), n)
  return n


def poison(cfg: ml_collections.ConfigDict, train: Dataset, key: jax.Array,
           config: ml_collections.ConfigDict | None = None) -> Poisoned:
  """Poisons a copy of `train` with the attack `cfg` (= config.attack), deterministic in `key`.

  clean_label and input_aware also need the whole `config` (normalisation, cache, their own training).
  """
  n = _validate(cfg, train)
  if cfg.name in ("clean_label", "input_aware") and config is None:
    raise ValueError(f"attack {cfg.name} needs the whole config: poison(config.attack, train, key, config=config)")
  if cfg.name == "input_aware":  # Trains (or reuses) its generators; also marks cross-trigger examples.
    return input_aware.poison(config, train, key, n)
  if cfg.name == "wanet":  # Also marks the noise-mode examples (is_cross; labels kept).
    return wanet.poison(cfg, train, key, n)
  if cfg.name == "none":
    logging.info("none: poisoned 0 of %d training images", len(train))
    return Poisoned(train, np.zeros(len(train), dtype=bool), None)

  is_target = train.labels == cfg.target_label
  # SIG and clean_label keep labels, so they poison target-class images. BadNets and Blend pick among the
  # non-target images (the ABL code and BackdoorBench pick from all), so that every poisoned
  # example really is relabelled and the poison count is the number of wrong labels.
  candidates = np.flatnonzero(is_target if cfg.name in _CLEAN_LABEL else ~is_target)
  k_choice, k_attack = jax.random.split(key) if cfg.name == "clean_label" else (key, None)
  chosen = candidates[np.asarray(jax.random.choice(k_choice, len(candidates), (n,), replace=False))]
  is_poisoned = np.zeros(len(train), dtype=bool)
  is_poisoned[chosen] = True

  apply_trigger = _trigger(cfg, train.images.shape[1:])
  images, labels = train.images.copy(), train.labels.copy()
  source = train.images[is_poisoned]
  if cfg.name == "clean_label":  # Adversarially perturbed (PGD on the surrogate) before the trigger.
    source = clean_label.perturb_images(config, train, np.flatnonzero(is_poisoned), k_attack)
  # Each process triggers its share of the poisoned images; every process receives all of them.
  images[is_poisoned] = distributed.map_rows(apply_trigger, source)
  if cfg.name in _LABEL_FLIP:
    labels[is_poisoned] = cfg.target_label

  # Share of the examples labelled target (after poisoning) that carry the trigger.
  target_size = int(np.sum(labels == cfg.target_label))
  logging.info("%s: poisoned %d of %d training images (%.2f%% of the set, %.2f%% of target class %d)",
               cfg.name, n, len(train), 100 * n / len(train), 100 * n / target_size, cfg.target_label)
  return Poisoned(Dataset(images, labels, train.class_names), is_poisoned, apply_trigger)


def poisoned_test_set(test: Dataset, poisoned: Poisoned, target_label: int) -> Dataset:
  """The non-target test images with the trigger applied, all labelled `target_label` (for ASR)."""
  if poisoned.apply_trigger is None:
    raise ValueError("poisoned_test_set needs a trigger; attack 'none' has none")
  keep = test.labels != target_label
  labels = np.full(int(keep.sum()), target_label, dtype=np.int32)
  return Dataset(poisoned.apply_trigger(test.images[keep]), labels, test.class_names)


def cross_test_set(test: Dataset, poisoned: Poisoned) -> Dataset | None:
  """Every test image with the attack's cross trigger and its true label, else None.

  input_aware: another test image's trigger; wanet: the noise-mode warp (the reference code's "cross" mode).
  """
  if poisoned.cross_trigger is None:
    return None
  return Dataset(poisoned.cross_trigger(test.images), test.labels.copy(), test.class_names)
