"""What every attack returns, and chunked application of a trigger."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np

from abl_jax.data import Dataset

TriggerFn = Callable[[np.ndarray], np.ndarray]


class Poisoned(NamedTuple):
  """A poisoned training set, its ground-truth mask, and the test-time trigger.

  `is_poisoned` is ground truth for metrics only: the defense must never see it.
  `apply_trigger` maps uint8 images [N, H, W, C] to triggered uint8 images (numpy);
  it is None for the clean baseline (attack 'none'), which has no trigger.
  `is_cross` (ground truth too) and `cross_trigger` exist for input_aware and wanet: the training examples
  carrying a trigger that must not flip the label (input_aware: another image's; wanet: the noise-mode warp)
  with their true labels, and the same kind of trigger for test images.
  """
  train: Dataset
  is_poisoned: np.ndarray
  apply_trigger: Optional[TriggerFn]
  is_cross: Optional[np.ndarray] = None
  cross_trigger: Optional[TriggerFn] = None


def apply_in_chunks(fn: Callable, images: np.ndarray, chunk_size: int = 8192) -> np.ndarray:
  """`fn` applied to `images` a chunk at a time, as a uint8 numpy array."""
  # Chunks bound the float32 intermediates (4x the uint8 input) on large training sets.
  out = np.empty_like(images, dtype=np.uint8)
  for start in range(0, len(images), chunk_size):
    out[start:start + chunk_size] = np.asarray(fn(images[start:start + chunk_size]))
  return out
