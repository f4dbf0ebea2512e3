"""A PNG contact sheet for the attack figures: one titled row of images per kind, one column per example."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def save_sheet(path: str, titles: Sequence[str], rows: Sequence[np.ndarray], scale: int = 4,
               title_width: int = 64) -> None:
  """Row r is `rows[r]` (uint8 [N, H, W, 3]) titled `titles[r]`, each image enlarged `scale` times; PNG at `path`."""
  n, h, w = rows[0].shape[:3]
  pad, cell_w, cell_h = 4, w * scale, h * scale
  sheet = Image.new("RGB", (title_width + n * (cell_w + pad) + pad, len(rows) * (cell_h + pad) + pad), "white")
  draw = ImageDraw.Draw(sheet)
  for r, (title, images) in enumerate(zip(titles, rows)):
    y = pad + r * (cell_h + pad)
    draw.text((4, y + cell_h // 2 - 6), title, fill="black")
    for i, img in enumerate(images):
      sheet.paste(Image.fromarray(img).resize((cell_w, cell_h), Image.NEAREST),
                  (title_width + pad + i * (cell_w + pad), y))
  sheet.save(path, format="PNG")
