"""A PNG of the WaNet trigger: clean, warped and noise-mode images, their differences amplified, the field.

  python -m abl_jax.attacks.wanet_figure --config=configs/abl_wanet.py:cpu --out=wanet.png

The field is the one the experiment would use (config.seed's 'poison' key, schedule.key_for, as experiment.prepare derives it).
Difference rows show |image - clean| times `gain` (gray 0 = unchanged); the last row is the field's pixel
displacement (x in red, y in green, 128 = none, +-1 pixel = +-127) on the same scale as every image.
"""
from __future__ import annotations

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from abl_jax.attacks import sheet, wanet

ROWS = ("clean", "warped", "noise mode", "|warped-clean|", "|noise-clean|", "field")


def displacement_image(field: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3]: the field's displacement in pixels from the identity, x red and y green, 128 = 0."""
  h, w = field.shape[:2]
  moved = (field - wanet.identity_grid(h, w)) * np.array([(w - 1) / 2, (h - 1) / 2], np.float32)
  rgb = np.full((h, w, 3), 128.0)
  rgb[..., :2] += 127 * np.clip(moved, -1, 1)
  return rgb.astype(np.uint8)


def save_png(path: str, rows: list[np.ndarray], scale: int = 4) -> None:
  """One titled row per entry of ROWS (uint8 [N, H, W, 3] each), one column per example; PNG at `path`."""
  sheet.save_sheet(path, ROWS, rows, scale, title_width=96)


def figure_rows(images: np.ndarray, field: jax.Array, key: jax.Array, gain: float) -> list[np.ndarray]:
  """The rows of ROWS for uint8 `images`: clean, warped, noise mode, amplified differences, the field."""
  warped = np.asarray(wanet.warp(images, field))
  noisy = np.asarray(wanet.noise_warp(images, field, key))

  def diff(x):
    return np.clip(np.abs(x.astype(np.float32) - images) * gain, 0, 255).astype(np.uint8)

  disp = np.broadcast_to(displacement_image(np.asarray(field)), images.shape)
  return [images, warped, noisy, diff(warped), diff(noisy), disp]


def make_figure(config: ml_collections.ConfigDict, out: str, num: int = 8, gain: float = 10.0) -> dict[str, float]:
  """Writes the figure for `num` test images spread over the classes; returns the mean |differences|."""
  from abl_jax import data, schedule as schedule_lib  # The figure command sits above the library.
  _, test = data.load(config.data, seed=config.seed)
  k_field, _, k_noise, _ = jax.random.split(schedule_lib.key_for(config, "poison"), 4)  # As wanet.poison splits it.
  field = wanet.field_from_config(config.attack, k_field, *test.images.shape[1:3])
  idx = np.linspace(0, len(test) - 1, min(num, len(test))).astype(np.int64)
  rows = figure_rows(test.images[idx], field, k_noise, gain)
  save_png(out, rows)
  h, w = test.images.shape[1:3]
  moved = np.abs(np.asarray(field) - wanet.identity_grid(h, w)) * np.array([(w - 1) / 2, (h - 1) / 2])
  stats = {"mean_abs_warped_minus_clean": float(np.mean(np.abs(rows[1].astype(np.float32) - rows[0]))),
           "mean_abs_noise_minus_clean": float(np.mean(np.abs(rows[2].astype(np.float32) - rows[0]))),
           "mean_displacement_px": float(moved.mean()), "max_displacement_px": float(moved.max())}
  logging.info("wanet: wrote %s (%d examples, differences x%g): %s", out, len(idx), gain, stats)
  return stats


def _cli() -> None:
  """Defines the flags (only when run as a script, so that importing this module defines none) and runs."""
  config = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.")
  out = flags.DEFINE_string("out", "wanet_examples.png", "Where to write the PNG.")
  num = flags.DEFINE_integer("num", 8, "Number of test images (columns).")
  gain = flags.DEFINE_float("gain", 10.0, "Amplification of the difference rows.")
  flags.mark_flags_as_required(["config"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    print(make_figure(config.value, out.value, num.value, gain.value))

  app.run(main)


if __name__ == "__main__":
  _cli()
