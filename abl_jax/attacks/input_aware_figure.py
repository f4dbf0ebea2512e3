"""A PNG of the input-aware attack (the seed's figure 5): clean images, patterns, masks, backdoor images.

  python -m abl_jax.attacks.input_aware_figure --config=configs/abl_input_aware.py:cpu --out=ia.png

Uses (or trains and caches) the config's generators.
"""
from __future__ import annotations

from absl import app, flags, logging
import ml_collections
import numpy as np
from ml_collections import config_flags

from abl_jax import data
from abl_jax.attacks import input_aware_train, input_aware_trigger, sheet

ROWS = ("clean", "pattern", "mask", "backdoor")


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[0, 1] floats (or uint8) -> uint8 RGB [N, H, W, 3] (one-channel maps repeated)."""
  x = np.asarray(x)
  if x.dtype != np.uint8:
    x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def save_png(path: str, clean: np.ndarray, patterns: np.ndarray, masks: np.ndarray, backdoor: np.ndarray,
             scale: int = 4) -> None:
  """One row per kind (clean, pattern, mask, backdoor), one column per example, rows titled; PNG at `path`."""
  sheet.save_sheet(path, ROWS, [to_uint8(a) for a in (clean, patterns, masks, backdoor)], scale)


def write_examples(config: ml_collections.ConfigDict, variables: dict, images: np.ndarray, out: str) -> None:
  """The four rows for uint8 `images` under the generators `variables`, saved to `out`."""
  backdoor, patterns, masks = input_aware_trigger.trigger_parts(config, variables, images)
  save_png(out, images, patterns, masks, backdoor)
  logging.info("input_aware: wrote %s (%d examples; mean mask %.3f)", out, len(images), float(np.mean(masks)))


def make_figure(config: ml_collections.ConfigDict, out: str, num: int = 8) -> None:
  """Loads the data and the (cached or trained) generators; writes the first `num` test images' triggers."""
  train, test = data.load(config.data, seed=config.seed)
  variables, _ = input_aware_train.load_or_train(config, train)
  idx = np.linspace(0, len(test) - 1, min(num, len(test))).astype(np.int64)  # Spread over the classes.
  write_examples(config, variables, test.images[idx], out)


def _cli() -> None:
  """Defines the flags (only when run as a script, so that importing this module defines none) and runs."""
  config = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.")
  out = flags.DEFINE_string("out", "input_aware_examples.png", "Where to write the PNG.")
  num = flags.DEFINE_integer("num", 8, "Number of test images (columns).")
  flags.mark_flags_as_required(["config"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    make_figure(config.value, out.value, num.value)

  app.run(main)


if __name__ == "__main__":
  _cli()
