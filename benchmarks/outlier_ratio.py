"""Each finished defense run's top share of rejected examples outside the pool against the next label's, at the
loosest level (abl.class_outlier_ratio's test), and whether the test would flag a label the run did not flag, for
the first gauge and the second (docs/defense.md, session 41).

    python benchmarks/outlier_ratio.py runs/s40/def/s0/wanet_abl runs/s41/q
    python benchmarks/outlier_ratio.py runs --ratio=1.6          # every run under runs/, one line each
    python benchmarks/outlier_ratio.py runs --json

A measurement, not part of the defense: it reads the poison mask to name the attacked label (the one holding
poisoned examples; none on clean data). The counts are the labels of the examples outside the pool; the cut-off
of the improbable-count guard is the run's abl.class_outlier_z.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.

from abl_jax import abl  # pylint: disable=wrong-import-position
from benchmarks.kurtosis import workdirs  # pylint: disable=wrong-import-position


def run_row(workdir: str, ratio: float) -> dict[str, Any] | None:
  """One run's ratios and verdicts at `ratio`; None where it has no saved judgement at levels."""
  paths = {name: os.path.join(workdir, f"{name}.npz") for name in ("isolation", "returned", "regauged")}
  if not (os.path.exists(paths["isolation"]) and os.path.exists(paths["returned"])):
    return None
  with np.load(paths["isolation"]) as saved:
    labels, pool, poisoned = saved["labels"], saved["pool"], saved["is_poisoned"]
  config = json.load(open(os.path.join(workdir, "config.json"), encoding="utf-8"))
  z = config["abl"]["class_outlier_z"]
  num_classes = int(labels.max()) + 1
  counts = np.bincount(np.delete(labels, pool), minlength=num_classes)
  row = {"workdir": workdir, "attacked": sorted({int(k) for k in labels[poisoned]})}
  for name in ("returned", "regauged"):
    if not os.path.exists(paths[name]):
      continue
    with np.load(paths[name]) as saved:
      if "outlier_shares" not in saved.files:
        return None
      loosest = int(np.argmax(saved["outlier_levels"])) if "outlier_levels" in saved.files else 0
      shares, flagged = saved["outlier_shares"][loosest], saved["outlier_labels"]
    top, top_ratio = abl.top_share_ratio(shares, counts)
    dominant = abl.dominant_label(shares, counts, ratio, z)
    row[name] = {"top": top, "ratio": round(top_ratio, 2),
                 "flagged": [int(k) for k in flagged], "dominant": dominant.tolist(),
                 "new": np.setdiff1d(dominant, flagged).tolist()}
  return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("paths", nargs="+", help="Run workdirs, or folders holding them.")
  parser.add_argument("--ratio", type=float, default=1.6, help="The test's ratio (abl.class_outlier_ratio).")
  parser.add_argument("--json", action="store_true", help="One JSON line per run instead of text.")
  args = parser.parse_args(argv)
  if not args.ratio > 1:
    parser.error(f"--ratio={args.ratio} must be > 1")
  rows = [row for row in (run_row(w, args.ratio) for w in workdirs(args.paths, "returned.npz")) if row is not None]
  for row in rows:
    if args.json:
      print(json.dumps(row))
      continue
    judged = "; ".join(
        f"{name} top {row[name]['top']} at {row[name]['ratio']:.2f}x the next, flagged {row[name]['flagged'] or 'none'}"
        f"{', the ratio adds ' + str(row[name]['new']) if row[name]['new'] else ''}"
        for name in ("returned", "regauged") if name in row)
    print(f"{row['workdir']}: attacked {row['attacked'] or 'none'}; {judged}")
  if not rows:
    parser.error(f"no run with a gauge's judgement at levels under {args.paths}")
  clean = [r["returned"]["ratio"] for r in rows if r["returned"]["top"] not in r["attacked"]]
  if not args.json:
    print(f"{len(rows)} runs; the top label is clean on {len(clean)}, at most {max(clean, default=float('nan')):.2f}x "
          f"the next; the ratio {args.ratio:g} adds a flag on {sum(bool(r['returned']['new']) for r in rows)}")
  return rows


if __name__ == "__main__":
  main()
