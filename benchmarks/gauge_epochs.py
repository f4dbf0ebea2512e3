"""Each kept checkpoint of a gauge as the judge of the examples outside the pool: every label's outlier score at each
level of the gauge's outlier test, and the attacked label's poisoned and clean examples it rejects (docs/defense.md,
session 37). Works on a run stopped after its gauge (`max_epochs`) as on a finished one; the run must have kept the
gauge's checkpoints (`--config.train.keep_checkpoints=60`).

    python benchmarks/gauge_epochs.py runs/s37/gc2_t9_s71 --steps=6,11   # the `cpu` gauge: global epochs 6-11

A measurement, not part of the defense: it reads the poison mask to name the attacked label and count its poisoned
examples. The gauge's CA and ASR after each epoch are in the run's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.

from abl_jax import abl  # pylint: disable=wrong-import-position


def judged(own: np.ndarray, labels: np.ndarray, poisoned: np.ndarray, num_classes: int, levels: tuple[float, ...],
           z: float, disown_below: float) -> dict[str, Any]:
  """The outlier test on one judge's probabilities of the labels (`own`) of the examples outside the pool."""
  flagged, _, scores = abl.outlier_labels(own, labels, num_classes, z, levels)
  attacked = np.unique(labels[poisoned])
  row: dict[str, Any] = {"flagged": flagged.tolist(), "scores": np.round(scores, 2).tolist()}
  if len(attacked) == 1:
    target = int(attacked[0])
    mine, rejected = labels == target, own < disown_below
    others = np.delete(scores, target, axis=1)
    row.update(target=target, target_scores=np.round(scores[:, target], 2).tolist(),
               highest_other=round(float(others.max()), 2) if others.size else None,
               poisoned_rejected=f"{int((rejected & poisoned).sum())} / {int(poisoned.sum())}",
               clean_rejected=f"{int((rejected & mine & ~poisoned).sum())} / {int((mine & ~poisoned).sum())}")
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdir")
  parser.add_argument("--steps", required=True, help="Checkpoint steps (global epochs), comma-separated.")
  args = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  from abl_jax import checkpoint, data, experiment, train  # pylint: disable=import-outside-toplevel
  from abl_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  cfg = workdir_lib.run_config(args.workdir)
  prep = experiment.prepare(cfg)
  model = experiment._model(cfg, prep.train)  # pylint: disable=protected-access
  mesh = train.make_mesh(jax.local_devices())
  with np.load(os.path.join(args.workdir, "isolation.npz")) as saved:
    labels, poisoned, pool = saved["labels"], saved["is_poisoned"], saved["pool"]
  outside = np.setdiff1d(np.arange(len(labels)), pool)
  print(f"{args.workdir}: {int(poisoned[pool].sum())} of {int(poisoned.sum())} poisoned examples in the pool")
  images = data.downsample(prep.train.images, cfg.abl.gauge_downsample)
  a = cfg.abl
  for step in (int(s) for s in args.steps.split(",")):
    variables = checkpoint.restore_variables(args.workdir, model, cfg, images.shape[1:], step=step)
    predict = train.predictor(model, variables, cfg.data.mean, cfg.data.std, cfg.train.eval_batch_size, mesh)
    own = np.exp(-np.asarray(predict(images[outside], labels[outside])[0], np.float64))
    row = judged(own, labels[outside], poisoned[outside], prep.train.num_classes, tuple(a.class_outlier_below),
                 a.class_outlier_z, a.disown_below)
    print(f"step {step}: {row}")


if __name__ == "__main__":
  main()
