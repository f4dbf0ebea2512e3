"""The pool's outlier labels (config.abl.pool_outlier_z) read off finished runs' saved judgements (no training).

    python benchmarks/pool_outliers.py runs/s19/new/b1_t9_s7 runs/s18/table/s0/clean_abl ...
    python benchmarks/pool_outliers.py --z=10 runs/s1[5-9]/*/*_abl        # shells expand; runs without a gauge skipped

For each run whose first gauge judged (`returned.npz`), from `isolation.npz` (pool, spectral suspects, training
labels) and `config.json` (the target, for the columns only): the share of each label's pool examples, the
spectral suspects aside, that the gauge gives their label under disown_below, scored as the defense scores it
(abl.outlier_scores with the sampling term); the target's score, the highest score of a label that is not the
target (any label, on clean data), how many pool examples of that label were rejected, and the poisoned among the
target's rejected (the mask in `isolation.npz`, read for this count only). One markdown row per run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
from abl_jax import abl, workdir as wd  # noqa: E402


def pool_scores(labels: np.ndarray, own: np.ndarray, judged: np.ndarray, num_classes: int,
                disown_below: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each label's rejected count, share and outlier score over the pool examples where `judged` is True (`labels`
  and `own`, the gauge's probability of the label, cover the pool)."""
  rejected = np.bincount(labels[judged & (own < disown_below)], minlength=num_classes)
  _, shares, scores = abl.outlier_labels(own[judged], labels[judged], num_classes, np.inf, (disown_below,))
  return rejected, shares[0], scores[0]


def row(workdir: str, z: float) -> str | None:
  """The markdown row of one run, None where no gauge judged it."""
  path = os.path.join(workdir, "returned.npz")
  if not os.path.exists(path):
    return None
  isolation, judgement = wd.load_npz(os.path.join(workdir, "isolation.npz")), wd.load_npz(path)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  pool, labels = isolation["pool"], isolation["labels"]
  suspected = isolation.get("suspected", pool[:0])
  own = np.exp(-np.asarray(judgement["judge_loss"], np.float64))
  judged = ~np.isin(pool, suspected)
  disown_below = config["abl"].get("disown_below", 0.1) or 0.1
  num_classes = int(labels.max()) + 1
  rejected, shares, scores = pool_scores(labels[pool], own, judged, num_classes, disown_below)
  target = config["attack"]["target_label"] if config["attack"]["name"] != "none" else None
  others = [k for k in range(num_classes) if k != target]
  top = max(others, key=lambda k: scores[k])
  flagged = np.flatnonzero(scores > z).tolist()
  if target is None:
    target_cells = "- | -"
  else:
    mine = pool[judged & (labels[pool] == target) & (own < disown_below)]
    target_cells = (f"{scores[target]:.1f} | {rejected[target]} ({int(isolation['is_poisoned'][mine].sum())} "
                    f"poisoned), share {shares[target]:.2f}")
  return (f"| {workdir} | {config['attack']['name']} | {target_cells} | {scores[top]:.1f} (label {top}, "
          f"{rejected[top]} rejected) | {np.median(shares):.3f} | {flagged or 'none'} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+")
  parser.add_argument("--z", type=float, default=3.5, help="the cut-off of the last column")
  args = parser.parse_args()
  print(f"| run | attack | target's score | target's rejected | highest other label's score | median share | "
        f"labels above {args.z} |")
  print("|---|---|---|---|---|---|---|")
  for workdir in args.runs:
    line = row(workdir, args.z)
    if line is not None:
      print(line)


if __name__ == "__main__":
  main()
