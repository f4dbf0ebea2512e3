"""Spectral signatures (Tran et al., NeurIPS 2018) of a finished run's training set: per label, how far the top
direction of a model's penultimate features separates that label's poisoned examples from its clean ones.

    python benchmarks/spectral.py runs/sig                     # the isolation model (WORKDIR/isolation_model)
    python benchmarks/spectral.py runs/sig --checkpoint=8      # WORKDIR/checkpoints/8, e.g. the gauge's last epoch
    python benchmarks/spectral.py runs/sig --checkpoint=8 --downsample=2  # a gauge trained at gauge_downsample=2
    python benchmarks/spectral.py runs/sig --json              # one JSON line instead of a markdown table

A measurement, not part of the defense: it reads the poison mask. Per training label: its examples and poisoned
examples; the ratio of the first two singular values of its centred features, the size of the skewness of its
projections on the first direction and their kurtosis (what a defender could read without the mask); the AUROC
of poisoned against clean along that direction (the better of its two signs), and the recall of the poisoned
among the 1.5 x (poisoned count) examples with the largest squared projection (the paper's removal rule), and
`lda_auroc`: a linear discriminant fitted with the mask on half of the label, ranked on the other half (the most
any linear reading of these features could separate). Also the
long tail that `abl.spectral_outliers` would take (beyond 2 robust standard deviations on the long side) and the
median rank of its examples' isolation losses within the label (WORKDIR/isolation.npz; 0 = fitted best), and the
same along the pursuit direction (`abl.pursuit_direction`, `--pursuit_dims` whitened components; the rank
`abl.spectral_pursuit` compares), with that tail's size, its poisoned examples, and the direction's skewness.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
import flax.linen as nn  # noqa: E402  pylint: disable=g-import-not-at-top
import jax  # noqa: E402

from abl_jax import abl, checkpoint, data, experiment, train, workdir  # noqa: E402


def penultimate(model: nn.Module, variables: Any, images: np.ndarray, mean: Any, std: Any,
                batch: int = 500) -> np.ndarray:
  """The input of the model's last Dense layer (inference mode) for uint8 `images`, as float32 [N, D]."""
  predict = train.predictor(model, variables, mean, std, batch, train.make_mesh(jax.local_devices()), features=True)
  return predict(images, np.zeros(len(images), np.int32))[2]


def restored(run_dir: str, where: tuple[str, int | None] = ("isolation_model", None)) -> tuple[Any, Any, Any, Any]:
  """A finished run's config, prepared data, model and variables (`where`: WORKDIR/isolation_model, or
  ("checkpoints", step))."""
  config = workdir.run_config(run_dir)
  prep = experiment.prepare(config)
  model = experiment._model(config, prep.train)  # pylint: disable=protected-access
  variables = checkpoint.restore_variables(run_dir, model, config, prep.train.images.shape[1:], *where)
  return config, prep, model, variables


def _auroc(positive: np.ndarray, negative: np.ndarray) -> float:
  """P(a positive scores above a negative), ties counted half."""
  above = (positive[:, None] > negative[None, :]).mean()
  tied = (positive[:, None] == negative[None, :]).mean()
  return float(above + tied / 2)


def label_stats(features: np.ndarray, labels: np.ndarray, poisoned: np.ndarray,
                scores: np.ndarray | None = None, tail: float = 2.0, pursuit_dims: int = 16) -> list[dict[str, Any]]:
  """Per training label: the spectral statistics of its centred features (see the module docstring)."""
  rows = []
  for label in np.unique(labels):
    mine = labels == label
    projection, skewness, singular = abl.top_direction(features[mine])
    row = {"label": int(label), "examples": int(mine.sum()), "poisoned": int(poisoned[mine].sum()),
           "sv1_over_sv2": float(singular[0] / singular[1]), "skewness": skewness,
           "kurtosis": abl.kurtosis(projection), "tail": None, "tail_loss_rank": None,
           "auroc": None, "recall_at_1.5x": None, "lda_auroc": None}
    pursued, row["pursuit_skewness"] = abl.pursuit_direction(features[mine], pursuit_dims)
    beyond = pursued > abl.tail_cut(pursued, tail)
    row.update(pursuit_tail=int(beyond.sum()), pursuit_tail_poisoned=int(poisoned[mine][beyond].sum()),
               pursuit_rank=(float(np.median(abl.within_rank(scores[mine])[beyond]))
                             if scores is not None and beyond.any() else None))
    median = np.median(projection)
    far = projection - median > tail * 1.4826 * np.median(np.abs(projection - median))
    row["tail"] = int(far.sum())
    if scores is not None and far.any():  # Where the long tail's isolation losses rank within the label.
      rank = np.argsort(np.argsort(scores[mine], kind="stable"), kind="stable") / mine.sum()
      row["tail_loss_rank"] = float(np.median(rank[far]))
    bad = poisoned[mine]
    if 0 < bad.sum() < len(bad):
      auroc = _auroc(projection[bad], projection[~bad])
      row["auroc"] = max(auroc, 1.0 - auroc)
      removed = np.argsort(-projection ** 2, kind="stable")[:int(round(1.5 * bad.sum()))]
      row["recall_at_1.5x"] = float(bad[removed].sum() / bad.sum())
      row["lda_auroc"] = lda_auroc(features[mine], bad)
    rows.append(row)
  return rows


def lda_auroc(features: np.ndarray, poisoned: np.ndarray, seed: int = 0) -> float | None:
  """The best a linear rule could do with the mask itself: Fisher's discriminant fitted on a random half of the
  examples (poisoned against clean), its AUROC on the other half (None when a half lacks either kind)."""
  order = np.random.default_rng(seed).permutation(len(features))
  fit, held = order[:len(order) // 2], order[len(order) // 2:]
  if min(poisoned[fit].sum(), (~poisoned[fit]).sum(), poisoned[held].sum(), (~poisoned[held]).sum()) < 2:
    return None
  x, y = features[fit].astype(np.float64), poisoned[fit]
  bad, good = x[y].mean(axis=0), x[~y].mean(axis=0)
  within = np.cov(np.concatenate([x[y] - bad, x[~y] - good]).T) + 1e-3 * np.eye(x.shape[1])
  projection = features[held].astype(np.float64) @ np.linalg.solve(within, bad - good)
  return _auroc(projection[poisoned[held]], projection[~poisoned[held]])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="A finished run's workdir.")
  parser.add_argument("--checkpoint", type=int, default=None,
                      help="A step in WORKDIR/checkpoints (global epochs); default: WORKDIR/isolation_model.")
  parser.add_argument("--downsample", type=int, default=1,
                      help="Average the images over blocks of this side first (data.downsample): a gauge's "
                           "checkpoint from a run with abl.gauge_downsample=F saw images at F.")
  parser.add_argument("--json", action="store_true", help="Print one JSON line instead of a markdown table.")
  parser.add_argument("--pursuit_dims", type=int, default=16,
                      help="Whitened principal components the pursuit searches.")
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.workdir, "config.json")):
    sys.exit(f"spectral.py: {args.workdir}/config.json is missing; give it a run's workdir")
  if args.downsample < 1:
    sys.exit(f"spectral.py: --downsample={args.downsample} must be an integer >= 1")
  where = ("isolation_model", None) if args.checkpoint is None else ("checkpoints", args.checkpoint)
  config, prep, model, variables = restored(args.workdir, where)
  images = data.downsample(prep.train.images, args.downsample)
  features = penultimate(model, variables, images, config.data.mean, config.data.std,
                         config.train.eval_batch_size)
  iso = os.path.join(args.workdir, "isolation.npz")
  scores = np.load(iso)["scores"] if os.path.exists(iso) else None
  rows = label_stats(features, prep.train.labels, np.asarray(prep.is_poisoned, bool), scores,
                     pursuit_dims=args.pursuit_dims)
  which = "isolation_model" if args.checkpoint is None else f"checkpoints/{args.checkpoint}"
  if args.json:
    print(json.dumps({"workdir": args.workdir, "model": which, "labels": rows}))
    return
  keys = list(rows[0])
  fmt = lambda v: "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
  print(f"# {args.workdir} ({which})\n")
  print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
  for r in rows:
    print("| " + " | ".join(fmt(r[k]) for k in keys) + " |")


if __name__ == "__main__":
  main()
