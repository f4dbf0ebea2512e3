"""WaNet (Nguyen and Tran, ICLR 2021): a fixed, smooth random warping field as the trigger.

    field = make_field(key, 32, 32, k=4, s=0.5)        # [H, W, 2] sampling grid (x, y) in [-1, 1]
    warped = warp(images, field)                       # uint8 [N, H, W, C], the backdoor images
    noisy = noise_warp(images, field, key)             # noise mode: field + per-image random jitter
    poisoned = poison(config.attack, train, key, n)    # the materialised training set

As in the reference code (VinAIResearch/Warping-based_Backdoor_Attack-release, kept by BackdoorBench): a
k x k control grid of uniform noise in [-1, 1], divided by its mean absolute value, upsampled bicubically
(align_corners) to the image, scaled by s / H and added to the identity grid, clamped to [-1, 1], and
sampled bilinearly (PyTorch's grid_sample, align_corners=True, zero padding). Noise-mode ("cross" in the
reference) examples add uniform noise in [-1, 1] / H per pixel to the grid, clamp again, and keep labels.
"""
from __future__ import annotations

import functools

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from abl_jax.attacks.base import Poisoned, TriggerFn, apply_in_chunks
from abl_jax.data import Dataset

_CUBIC_A = -0.75  # PyTorch's bicubic kernel coefficient (Keys' cubic convolution).


def validate(cfg: ml_collections.ConfigDict, num_train: int, num_poison: int) -> None:
  """Rejects bad WaNet settings (config.attack.wanet.*) with one line naming the field."""
  if "wanet" not in cfg:
    raise ValueError("config.attack.wanet is missing: wanet needs configs/abl_wanet.py "
                     "(or configs.common.add_wanet(config))")
  w = cfg.wanet
  num_noise = round(w.cross_ratio * num_poison)
  checks = [
      (w.k >= 2, "k", w.k, ">= 2 (control points per side)"),
      (w.s >= 0.0, "s", w.s, ">= 0"),
      (0.0 < w.grid_rescale <= 1.0, "grid_rescale", w.grid_rescale, "in (0, 1]"),
      (w.cross_ratio >= 0.0, "cross_ratio", w.cross_ratio, ">= 0"),
      (num_poison + num_noise <= num_train, "cross_ratio", w.cross_ratio,
       f"at most {(num_train - num_poison) / max(num_poison, 1):.2f} ({num_poison} of {num_train} images "
       "already warped; noise-mode examples come from the rest)"),
  ]
  for ok, field, value, allowed in checks:
    if not ok:
      raise ValueError(f"config.attack.wanet.{field}={value!r} must be {allowed}")


def _cubic(t: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel at distances |t| (a = -0.75, as PyTorch)."""
  t, a = np.abs(t), _CUBIC_A
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's bicubic upsampling with align_corners=True (edges replicated)."""
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    src = i * scale
    base = int(np.floor(src))
    t = src - base
    for offset in (-1, 0, 1, 2):
      m[i, min(max(base + offset, 0), n_in - 1)] += _cubic(np.float64(t - offset))
  return m.astype(np.float32)


def identity_grid(height: int, width: int) -> np.ndarray:
  """[H, W, 2] grid whose sampling returns the image: (x, y) = (column, row) mapped to [-1, 1]."""
  ys, xs = np.linspace(-1, 1, height, dtype=np.float32), np.linspace(-1, 1, width, dtype=np.float32)
  return np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def control_grid(key: jax.Array, k: int, height: int, width: int) -> jax.Array:
  """[H, W, 2] smooth random offsets: k x k uniform [-1, 1] points over their mean |value|, upsampled."""
  ins = jax.random.uniform(key, (2, k, k), jnp.float32, -1.0, 1.0)
  ins = ins / jnp.mean(jnp.abs(ins))
  return jnp.einsum("hk,ckl,wl->hwc", upsample_matrix(k, height), ins, upsample_matrix(k, width))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def make_field(key: jax.Array, height: int, width: int, k: int, s: float = 0.5,
               grid_rescale: float = 1.0) -> jax.Array:
  """The fixed WaNet warping field: [H, W, 2] sampling grid in [-1, 1] from `key`."""
  grid = (identity_grid(height, width) + s * control_grid(key, k, height, width) / height) * grid_rescale
  return jnp.clip(grid, -1.0, 1.0)


def grid_sample(images: jax.Array, grid: jax.Array) -> jax.Array:
  """Bilinear sampling of float images [N, H, W, C] at grid [N, Ho, Wo, 2] (align_corners, zero padding)."""
  _, h, w, _ = images.shape
  x = (grid[..., 0] + 1) * 0.5 * (w - 1)
  y = (grid[..., 1] + 1) * 0.5 * (h - 1)
  x0, y0 = jnp.floor(x), jnp.floor(y)
  wx, wy = x - x0, y - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)

  def corner(img, yi, xi, weight):
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    value = img[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
    return value * jnp.where(inside, weight, 0.0)[..., None]

  def one(img, x0, y0, wx, wy):
    return (corner(img, y0, x0, (1 - wx) * (1 - wy)) + corner(img, y0, x0 + 1, wx * (1 - wy))
            + corner(img, y0 + 1, x0, (1 - wx) * wy) + corner(img, y0 + 1, x0 + 1, wx * wy))

  return jax.vmap(one)(images, x0, y0, wx, wy)


def _to_output(x: jax.Array, round_output: bool) -> jax.Array:
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8) if round_output else x


@functools.partial(jax.jit, static_argnames=("round_output",))
def warp(images: jax.Array, field: jax.Array, *, round_output: bool = True) -> jax.Array:
  """uint8 images [N, H, W, C] warped by `field`: uint8 (rounded), or float32 0..255 without rounding."""
  x = jnp.asarray(images).astype(jnp.float32)
  grid = jnp.broadcast_to(field, (x.shape[0], *field.shape))
  return _to_output(grid_sample(x, grid), round_output)


def noise_grids(field: jax.Array, key: jax.Array, n: int) -> jax.Array:
  """[n, H, W, 2]: the field plus uniform [-1, 1] / H noise per pixel and image, clamped to [-1, 1]."""
  noise = jax.random.uniform(key, (n, *field.shape), jnp.float32, -1.0, 1.0)
  return jnp.clip(field[None] + noise / field.shape[0], -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("round_output",))
def noise_warp(images: jax.Array, field: jax.Array, key: jax.Array, *, round_output: bool = True) -> jax.Array:
  """Noise mode: each image warped by the field plus its own random noise grid (labels are kept)."""
  x = jnp.asarray(images).astype(jnp.float32)
  return _to_output(grid_sample(x, noise_grids(field, key, x.shape[0])), round_output)


def field_from_config(cfg: ml_collections.ConfigDict, key: jax.Array, height: int, width: int) -> jax.Array:
  """The attack's field (config.attack.wanet's k, s, grid_rescale) from `key`, which comes from config.seed."""
  w = cfg.wanet
  return make_field(key, height, width, int(w.k), float(w.s), float(w.grid_rescale))


def trigger_fns(field: jax.Array, key: jax.Array) -> tuple[TriggerFn, TriggerFn]:
  """(apply_trigger, noise_trigger) on uint8 numpy images; the noise of image i is fold_in(key, i)."""

  def apply_trigger(images: np.ndarray) -> np.ndarray:
    return apply_in_chunks(lambda x: warp(x, field), np.asarray(images, np.uint8))

  def noise_trigger(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.uint8)
    out, chunk = np.empty_like(images), 4096
    for start in range(0, len(images), chunk):
      out[start:start + chunk] = np.asarray(noise_warp(images[start:start + chunk], field, jax.random.fold_in(key, start)))
    return out

  return apply_trigger, noise_trigger


def choose(labels: np.ndarray, target: int, num_poison: int, cross_ratio: float,
           key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """(backdoor indices: non-target images, noise-mode indices: round(cross_ratio * num_poison) of the rest)."""
  k_bd, k_noise = jax.random.split(key)
  non_target = np.flatnonzero(labels != target)
  bd = np.sort(non_target[np.asarray(jax.random.choice(k_bd, len(non_target), (num_poison,), replace=False))])
  rest = np.setdiff1d(np.arange(len(labels)), bd)
  num_noise = round(cross_ratio * num_poison)
  noise = np.sort(rest[np.asarray(jax.random.choice(k_noise, len(rest), (num_noise,), replace=False))])
  return bd, noise


def poison(cfg: ml_collections.ConfigDict, train: Dataset, key: jax.Array, num_poison: int) -> Poisoned:
  """The fixed poisoned set: `num_poison` warped non-target images relabelled, cross_ratio x as many noise-mode."""
  validate(cfg, len(train), num_poison)
  k_field, k_choice, k_noise, k_test = jax.random.split(key, 4)
  field = field_from_config(cfg, k_field, *train.images.shape[1:3])
  bd, noise = choose(train.labels, cfg.target_label, num_poison, cfg.wanet.cross_ratio, k_choice)
  apply_trigger, noise_trigger = trigger_fns(field, k_noise)
  images, labels = train.images.copy(), train.labels.copy()
  images[bd] = apply_trigger(train.images[bd])
  labels[bd] = cfg.target_label
  images[noise] = noise_trigger(train.images[noise])
  is_poisoned, is_noise = np.zeros(len(train), bool), np.zeros(len(train), bool)
  is_poisoned[bd], is_noise[noise] = True, True
  _, test_noise_trigger = trigger_fns(field, k_test)
  n = len(train)
  target_size = int(np.sum(labels == cfg.target_label))
  logging.info("wanet: %d warped examples (%.2f%% of %d, %.2f%% of target class %d, relabelled) and %d noise-mode "
               "examples (%.2f%%, labels kept); field: k=%d, s=%g", num_poison, 100 * num_poison / n, n,
               100 * num_poison / target_size, cfg.target_label, len(noise), 100 * len(noise) / n,
               cfg.wanet.k, cfg.wanet.s)
  return Poisoned(Dataset(images, labels, train.class_names), is_poisoned, apply_trigger,
                  is_cross=is_noise, cross_trigger=test_noise_trigger)
