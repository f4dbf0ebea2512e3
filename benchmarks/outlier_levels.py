"""Which labels the outlier rule flags at given levels, read off finished runs' saved gauge verdicts (no training).

  python benchmarks/outlier_levels.py "BadNets 1%, seed 1=runs/s12/b1/s1_abl" "clean, seed 0=runs/s11/probe/clean_s0"
  python benchmarks/outlier_levels.py --levels=0.03,0.01 --plain NAME=WORKDIR ...   # the score without sampling

For each run (NAME=WORKDIR, or a workdir alone), from `returned.npz` (the first gauge's `outside_gauge_loss`),
`isolation.npz` (the pool and the training labels) and `config.json` (the target label, read for the table's
columns only): the target label's outlier score at each level (bold above the cutoff, 3.5), how many of its
examples outside the pool fall under each level and how many of those are poisoned (the mask in `isolation.npz`,
read for this count only), the highest other label's score, and the labels flagged by session 11's rule (`disown_below` alone, the plain score) and by the rule at `--levels`. One markdown
table on stdout.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
from abl_jax import abl, workdir as wd  # noqa: E402  pylint: disable=g-import-not-at-top


def scores(workdir: str, levels: tuple[float, ...], sampling: bool, z: float = 3.5) -> dict:
  """The run's target label, every level's outlier scores ([len(levels), classes]) and the flagged labels under
  session 11's rule and under `levels`."""
  verdicts = wd.outside_verdicts(workdir)
  if verdicts is None:
    raise SystemExit(f"{workdir}: no saved gauge verdicts outside the pool (returned.npz's outside_gauge_loss)")
  config = wd.read_json(os.path.join(workdir, "config.json"))
  own, labels, num_classes = verdicts.own, verdicts.labels, verdicts.num_classes
  flagged, _, level_scores = abl.outlier_labels(own, labels, num_classes, z, levels, sampling)
  before, _, _ = abl.outlier_labels(own, labels, num_classes, z,
                                    (config["abl"].get("disown_below") or 0.1,), sampling=False)
  target = config["attack"].get("target_label", 0)
  in_target = labels == target
  poisoned = verdicts.poisoned  # For the counts only.
  rejected = [(int((in_target & (own < v) & poisoned).sum()), int((in_target & (own < v)).sum())) for v in levels]
  return {"target": target, "scores": level_scores, "flagged": flagged, "before": before, "rejected": rejected}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+", help="NAME=WORKDIR or WORKDIR")
  parser.add_argument("--levels", default="0.1,0.05,0.02", help="comma-separated levels in (0, 1)")
  parser.add_argument("--plain", action="store_true", help="score without the binomial spread (session 11's)")
  args = parser.parse_args()
  levels = tuple(float(v) for v in args.levels.split(","))
  if not all(0 < v < 1 for v in levels):
    parser.error(f"--levels={args.levels} must hold levels in (0, 1)")
  shown = " / ".join(f"{v:g}" for v in levels)
  print(f"| run | the target label's score at < {shown} | its examples under each level: poisoned / all | "
        "the highest other label's score (level, label) | flagged: session 11's rule / these levels |")
  print("|---|---|---|---|---|")
  fmt = lambda labels: ", ".join(str(int(k)) for k in labels) or "none"
  for run in args.runs:
    name, _, workdir = run.rpartition("=")
    r = scores(workdir, levels, sampling=not args.plain)
    others = r["scores"].copy()
    others[:, r["target"]] = -np.inf
    i, k = np.unravel_index(np.argmax(others), others.shape)
    target = " / ".join(f"**{v:.1f}**" if v > 3.5 else f"{v:.1f}" for v in r["scores"][:, r["target"]])
    rejected = ", ".join(f"{p} / {n}" for p, n in r["rejected"])
    print(f"| {name or workdir} | {target} | {rejected} | {others[i, k]:.1f} ({levels[i]:g}, {k}) | "
          f"{fmt(r['before'])} / {fmt(r['flagged'])} |")


if __name__ == "__main__":
  main()
