"""Each label's kurtosis outlier score (abl.spectral_kurtosis_z's test) from finished runs' isolation.npz, and what
the test would defer at a cut-off: the attacked label's score against the highest of the labels without poison
(docs/defense.md, session 36).

    python benchmarks/kurtosis.py runs/s34/ia_s0_u runs/s35/unseen/clean_s50_bc
    python benchmarks/kurtosis.py runs --cutoff=3.5          # every run under runs/, one line each
    python benchmarks/kurtosis.py runs --json

A measurement, not part of the defense: it reads the poison mask to name the attacked label (the one holding
poisoned examples; none on clean data). Runs whose isolation gave the same kurtosis (one isolation model, several
defense variants) are counted once. Labels a spectral test already flagged are marked: the test defers only others.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.

from abl_jax import abl  # pylint: disable=wrong-import-position


def run_row(workdir: str, cutoff: float) -> dict[str, Any] | None:
  """One run's labels, scores and verdict at `cutoff`; None where its isolation.npz has no spectral statistics."""
  path = os.path.join(workdir, "isolation.npz")
  if not os.path.exists(path):
    return None
  with np.load(path) as saved:
    if "spectral_kurtosis" not in saved.files:
      return None
    kurtosis, labels, poisoned = saved["spectral_kurtosis"], saved["labels"], saved["is_poisoned"]
    cut = np.isfinite(saved["spectral_cut"])  # Flagged labels, and those deferred where the test ran.
    deferred = saved["spectral_deferred"] if "spectral_deferred" in saved.files else np.zeros(0, np.int64)
  counts = np.bincount(labels, minlength=len(kurtosis))
  scores = abl.kurtosis_outlier_scores(kurtosis, counts)
  attacked = sorted({int(k) for k in labels[poisoned]})
  flagged = np.setdiff1d(np.flatnonzero(cut), deferred)
  clean = [k for k in range(len(kurtosis)) if k not in attacked]
  return {"workdir": workdir, "kurtosis": np.round(kurtosis, 3).tolist(), "scores": np.round(scores, 2).tolist(),
          "attacked": attacked, "flagged": flagged.tolist(),
          "deferred": [k for k in range(len(kurtosis)) if scores[k] > cutoff and k not in flagged],
          "highest_clean": max(clean, key=lambda k: scores[k]) if clean else None}


def workdirs(paths: list[str], marker: str = "isolation.npz") -> list[str]:
  """The run directories under `paths` (each a run, or a folder searched for runs holding the file `marker`)."""
  found = []
  for path in paths:
    if os.path.exists(os.path.join(path, marker)):
      found.append(path)
    else:
      found += sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "**", marker), recursive=True))
  return found


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("paths", nargs="+", help="Run workdirs, or folders holding them.")
  parser.add_argument("--cutoff", type=float, default=3.5, help="The test's cut-off (abl.spectral_kurtosis_z).")
  parser.add_argument("--json", action="store_true", help="One JSON line per run instead of text.")
  args = parser.parse_args(argv)
  if args.cutoff <= 0:
    parser.error(f"--cutoff={args.cutoff} must be > 0")
  rows, seen = [], set()
  for workdir in workdirs(args.paths):
    row = run_row(workdir, args.cutoff)
    if row is None or tuple(row["kurtosis"]) in seen:
      continue
    seen.add(tuple(row["kurtosis"]))
    rows.append(row)
    if args.json:
      print(json.dumps(row))
      continue
    clean = row["highest_clean"]
    attacked = ", ".join(f"{k}: {row['scores'][k]:.2f}{' (flagged)' if k in row['flagged'] else ''}"
                         for k in row["attacked"]) or "none"
    print(f"{workdir}: attacked {attacked}; highest without poison {clean}: "
          f"{row['scores'][clean] if clean is not None else float('nan'):.2f}; deferred at {args.cutoff:g}: "
          f"{row['deferred'] or 'none'}")
  if not rows:
    parser.error(f"no run with spectral statistics under {args.paths}")
  clean_scores = [s for r in rows for k, s in enumerate(r["scores"]) if k not in r["attacked"]]
  if not args.json:
    print(f"{len(rows)} isolation models; {len(clean_scores)} labels without poison, highest score "
          f"{max(clean_scores):.2f}, {sum(s > args.cutoff for s in clean_scores)} above {args.cutoff:g}")
  return rows


if __name__ == "__main__":
  main()
