"""A PNG of the clean-label poisoning: original, PGD-perturbed at several eps, perturbed + trigger.

  python -m abl_jax.attacks.clean_label_figure --config=configs/abl_clean_label.py:cpu --out=cl.png

Uses (or trains and caches) the config's surrogate; eps defaults to the config's eps times 1, 2 and 4
(for L-inf 8, 16, 32 and for L2 300, 600, 1200 as in the seed report's figure 1).
"""
from __future__ import annotations

import logging as pylogging
from typing import Sequence

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags
from PIL import Image, ImageDraw

from abl_jax import data
from abl_jax.attacks import clean_label, pgd, surrogate


def save_examples_png(path: str, original: np.ndarray, perturbed: Sequence[tuple[str, np.ndarray]],
                      triggered: np.ndarray, scale: int = 4) -> None:
  """Writes a grid of uint8 [N, H, W, C] images: one row per example, one column per stage, titled."""
  columns = [("original", original), *perturbed, ("+ trigger", triggered)]
  n, h, w = original.shape[:3]
  cell_w, cell_h, title_h, pad = w * scale, h * scale, 14, 4
  width = len(columns) * (cell_w + pad) + pad
  sheet = Image.new("RGB", (max(width, 1), title_h + n * (cell_h + pad) + pad), "white")
  draw = ImageDraw.Draw(sheet)
  for j, (title, images) in enumerate(columns):
    x = pad + j * (cell_w + pad)
    draw.text((x, 2), title, fill="black")
    for i, img in enumerate(np.asarray(images, np.uint8)):
      tile = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).convert("RGB")
      sheet.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (x, title_h + pad + i * (cell_h + pad)))
  sheet.save(path, format="PNG")


def make_figure(config: ml_collections.ConfigDict, out: str, num: int = 6,
                eps_list: Sequence[float] | None = None) -> None:
  """PGD on the first `num` target-class training images at each eps (step scaled with eps), saved to `out`."""
  train, _ = data.load(config.data, seed=config.seed)
  model, variables = surrogate.load_or_train(config, train)
  idx = np.flatnonzero(train.labels == config.attack.target_label)[:num]
  images, labels = train.images[idx], train.labels[idx]
  p = config.attack.pgd
  eps_list = list(eps_list or [p.eps * m for m in (1, 2, 4)])
  perturbed = []
  for eps in eps_list:
    attack = pgd.make_pgd(model, config.data.mean, config.data.std, norm=p.norm, eps=float(eps),
                          step=float(p.step * eps / p.eps), steps=int(p.steps), random_start=bool(p.random_start))
    title = f"{'L-inf' if p.norm == 'linf' else 'L2'}={eps:g}"  # The default font draws spaces narrow.
    perturbed.append((title, np.asarray(attack(variables, images, labels, jax.random.PRNGKey(0)))))
  stamped = np.asarray(clean_label.apply_trigger(perturbed[0][1], config.attack.trigger_style,
                                                 float(config.attack.trigger_amplitude)))
  save_examples_png(out, images, perturbed, stamped)
  logging.info("wrote %s: %d examples, eps %s", out, len(idx), ", ".join(f"{e:g}" for e in eps_list))


def _cli() -> None:
  """Defines the flags (only when run as a script, so that importing this module defines none) and runs."""
  config = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.")
  out = flags.DEFINE_string("out", "clean_label_examples.png", "Where to write the PNG.")
  num = flags.DEFINE_integer("num", 6, "Number of target-class examples (rows).")
  eps = flags.DEFINE_list("eps", [], "PGD radii (0..255 scale); default: config eps x 1, 2, 4.")
  flags.mark_flags_as_required(["config"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname or r.levelno >= pylogging.WARNING)
    make_figure(config.value, out.value, num.value, [float(e) for e in eps.value] or None)

  app.run(main)


if __name__ == "__main__":
  _cli()
