"""One metrics stream per run: WORKDIR/metrics.jsonl, TensorBoard event files and the log, and one reader.

    writer = metrics.Writer(workdir)        # process 0 writes; on the others it does nothing
    writer.write(step, {"eval/clean_accuracy": 0.64}, phase="finetune", epoch=3, global_epoch=5)
    records = metrics.read(workdir)         # every record in order; a resumed run's repeats: the last wins
    metrics.series(records, "eval/clean_accuracy")

`step` is the run's global training step (all phases). Scalar names: train/* (every log_every steps:
loss, ce, accuracy, images_per_s), epoch/* (end of each training epoch: the same averaged, data_wait_share),
eval/* (test sets: clean_accuracy, attack_success_rate, clean_test_loss, poisoned_test_loss, full_test_set),
isolation/* (precision, recall, threshold, num_isolated, ..., metrics only), unlearning/* (isolated_loss,
isolated_accuracy, stopped). `tensorboard --logdir runs/` shows every run's WORKDIR/tensorboard.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

from absl import logging

from abl_jax import workdir as wd

FILE = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CONTEXT = ("step", "phase", "epoch", "global_epoch")  # Non-scalar fields of a record.


class Writer:
  """Writes each record to WORKDIR/metrics.jsonl, WORKDIR/tensorboard and (but train/*) the log."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, FILE)
    self.enabled = enabled
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # Event files without TensorFlow.
      self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD), flush_secs=30)

  def write(self, step: int, scalars: dict[str, Any], **context: Any) -> None:
    """One record of `scalars` (None values are left out) at global training `step`."""
    if not self.enabled:
      return
    values = {k: _plain(v) for k, v in scalars.items() if v is not None}
    wd.append_jsonl(self.path, {"step": int(step), **context, **values})
    for name, value in values.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(name, value, int(step))
    shown = {k: v for k, v in values.items() if not k.startswith("train/")}
    if shown:
      where = " ".join(f"{k} {context[k]}" for k in ("phase", "epoch") if k in context)
      logging.info("%s: %s", where or f"step {step}",
                   ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _plain(v: Any) -> Any:
  """JSON-able Python scalars from numpy ones."""
  return v.item() if hasattr(v, "item") else v


def read(workdir: str) -> list[dict[str, Any]]:
  """Every record of WORKDIR/metrics.jsonl in order, a record repeated by a resumed run replaced by the last one.

  Raises ValueError naming the file when it holds records of an older format (no global step).
  """
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return []
  by_key: dict[tuple, dict[str, Any]] = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        logging.warning("%s line %d is not JSON (an interrupted write?); skipped", path, number)
        continue
      if "step" not in record:
        raise ValueError(f"{path} was written by an older abl-jax (records without a global step); "
                         "rerun the experiment to use it here")
      key = (record["step"], record.get("phase"), record.get("epoch"), tuple(sorted(set(record) - set(CONTEXT))))
      by_key.pop(key, None)  # A repeat moves to the end, where its replacement was written.
      by_key[key] = record
  return list(by_key.values())


def series(records: Iterable[dict[str, Any]], name: str) -> list[dict[str, Any]]:
  """The records that hold scalar `name`, in order."""
  return [r for r in records if name in r]
