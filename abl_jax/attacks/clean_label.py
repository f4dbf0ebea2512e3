"""Clean-label (label-consistent) backdoor (Turner, Tsipras and Madry, 2019).

Target-class images are pushed away from their own class by PGD against a surrogate classifier, then
stamped with a trigger; their labels stay correct, so the trigger is the easiest cue for the class.

    adv = clean_label.perturb_images(config, train, chosen, key)   # uint8, PGD only
    stamped = clean_label.apply_trigger(adv, style="corner", amplitude=0.0)
"""
from __future__ import annotations

import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from abl_jax import registry, train as train_lib
from abl_jax.attacks import badnets, pgd, surrogate
from abl_jax.data import Dataset

TRIGGER_STYLES = ("corner", "all_corners")


def trigger_layout(height: int, width: int, style: str) -> tuple[np.ndarray, np.ndarray]:
  """(mask, value): where BadNets' 3x3 grid goes for `style`, and its 0/255 values, both [H, W, 1]."""
  if style not in TRIGGER_STYLES:
    raise ValueError(f"config.attack.trigger_style={style!r} is unknown; allowed: {', '.join(TRIGGER_STYLES)}")
  mask = np.zeros((height, width, 1), bool)
  value = np.zeros((height, width, 1), np.float32)
  grid = np.asarray(badnets.PATTERN, np.float32)[:, :, None]
  rows = [slice(height - 3, height)] if style == "corner" else [slice(0, 3), slice(height - 3, height)]
  cols = [slice(width - 3, width)] if style == "corner" else [slice(0, 3), slice(width - 3, width)]
  for r in rows:
    for c in cols:
      mask[r, c], value[r, c] = True, grid
  return mask, value


def apply_trigger(images: jax.Array, style: str = "corner", amplitude: float = 0.0) -> jax.Array:
  """uint8 images with the grid stamped: overwritten (amplitude 0) or added as +/-amplitude, clipped."""
  x = jnp.asarray(images, dtype=jnp.float32)
  mask, value = trigger_layout(x.shape[-3], x.shape[-2], style)
  if amplitude:
    x = x + mask * jnp.where(value > 0, amplitude, -amplitude)
  else:
    x = jnp.where(mask, value, x)
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Rejects bad clean-label settings (config.attack.*) with one line naming the field."""
  if "pgd" not in cfg or "surrogate" not in cfg:
    raise ValueError("config.attack.pgd / config.attack.surrogate are missing: clean_label needs "
                     "configs/abl_clean_label.py (or configs.common.add_clean_label(config))")
  p, s = cfg.pgd, cfg.surrogate
  checks = [
      (p.norm in pgd.NORMS, "pgd.norm", p.norm, "one of " + ", ".join(pgd.NORMS)),
      (p.eps > 0, "pgd.eps", p.eps, "> 0 (0..255 pixel scale)"),
      (p.step > 0, "pgd.step", p.step, "> 0 (0..255 pixel scale)"),
      (p.steps >= 0, "pgd.steps", p.steps, ">= 0"),
      (cfg.trigger_style in TRIGGER_STYLES, "trigger_style", cfg.trigger_style, "one of " + ", ".join(TRIGGER_STYLES)),
      (0 <= cfg.trigger_amplitude <= 255, "trigger_amplitude", cfg.trigger_amplitude, "in [0, 255] (0 = overwrite)"),
      (s.model in registry.MODELS, "surrogate.model", s.model, "one of " + ", ".join(registry.MODELS)),
      (s.epochs >= 0, "surrogate.epochs", s.epochs, ">= 0"),
      (not s.adversarial or s.adv_steps >= 1, "surrogate.adv_steps", s.adv_steps, ">= 1 when adversarial"),
  ]
  for ok, field, value, allowed in checks:
    if not ok:
      raise ValueError(f"config.attack.{field}={value!r} must be {allowed}")
  for field in ("pgd.batch_size", "surrogate.batch_size"):
    group, name = field.split(".")
    train_lib.check_batch_size(cfg[group][name], f"config.attack.{field}")


def perturb_images(config: ml_collections.ConfigDict, train: Dataset, chosen: np.ndarray,
                   key: jax.Array) -> np.ndarray:
  """PGD (config.attack.pgd) against the cached surrogate on train.images[chosen], true labels; uint8."""
  model, variables = surrogate.load_or_train(config, train)
  p = config.attack.pgd
  attack = pgd.make_pgd(model, config.data.mean, config.data.std, norm=p.norm, eps=float(p.eps),
                       step=float(p.step), steps=int(p.steps), random_start=bool(p.random_start))
  images, labels = train.images[chosen], train.labels[chosen]
  t0 = time.perf_counter()
  adv = pgd.perturb(attack, variables, images, labels, key, p.batch_size)
  seconds = time.perf_counter() - t0
  before = surrogate.accuracy(model, variables, config, images, labels)
  after = surrogate.accuracy(model, variables, config, adv, labels)
  logging.info("clean_label: PGD (%s, eps %g, step %g, %d steps%s) on %d target images in %.1f s (%.0f img/s); "
               "surrogate accuracy on them %.3f -> %.3f", p.norm, p.eps, p.step, p.steps,
               ", random start" if p.random_start else "", len(images), seconds, len(images) / max(seconds, 1e-9),
               before, after)
  return adv
