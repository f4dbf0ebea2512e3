"""The relearned check of finished runs (config.abl.relearned_at > 0), scored again at other settings from what
relearned.npz keeps (docs/defense.md, session 18).

    python benchmarks/relearned.py runs/s18/table/s0/*_abl        # one line per run that ran the check
    python benchmarks/relearned.py runs/frog --above=0.8,0.9        # the cut-offs to score at

A measurement, not part of the defense: it reads the poison mask and the attack's target. Per run: the labels the
check flagged and their examples it acted on (poisoned among them), the coherence of the learned rejected examples,
of the other rejected and of the label's typical examples for each label the share flagged (the check keeps a label
where the first is the highest; runs before session 19 have the first two), then, for the model's probabilities as
they were (raw) and with its class bias removed (adjusted, what the check uses) at each --above: the label with
the highest outlier score, that score, and "(target)" where it is the attack's target.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.

from abl_jax import abl  # pylint: disable=wrong-import-position


def rescored(labels: np.ndarray, outside: np.ndarray, candidates: np.ndarray, probability: np.ndarray,
             above: float, num_classes: int) -> np.ndarray:
  """Each label's outlier score of its share of the examples outside the pool among `candidates` whose
  `probability` is at least `above` (the check's statistic)."""
  counts = np.bincount(labels[outside], minlength=num_classes)
  learned = np.bincount(labels[candidates[probability >= above]], minlength=num_classes)
  return abl.outlier_scores(learned / np.maximum(counts, 1), counts, sampling=True)


def report(workdir: str, aboves: list[float]) -> str | None:
  """One line for `workdir`, or None where it has no relearned.npz with candidates."""
  path = os.path.join(workdir, "relearned.npz")
  if not os.path.exists(path):
    return None
  saved = dict(np.load(path))
  if "relearned_candidates" not in saved:
    return None
  iso = np.load(os.path.join(workdir, "isolation.npz"))
  with open(os.path.join(workdir, "config.json")) as f:
    attack = json.load(f)["attack"]
  target = attack["target_label"] if attack["name"] != "none" else None
  labels, poisoned = iso["labels"], iso["is_poisoned"]
  outside = np.setdiff1d(np.arange(len(labels)), iso["pool"])
  num_classes = int(labels.max()) + 1
  acted = saved["relearned_rejected"]
  parts = [f"{workdir}: flagged {saved['relearned_labels'].tolist() or 'none'}"
           f" (target {target if target is not None else 'none'}), acted on {len(acted)}"
           f" ({int(poisoned[acted].sum())} poisoned)"]
  if "relearned_coherence" in saved:  # Each label the share flagged: its learned rejected examples' coherence, the
    coherence = saved["relearned_coherence"]  # other rejected's, its typical examples' (runs since session 19).
    measured = np.flatnonzero(~np.isnan(coherence[0]))
    parts.append("coherence " + (", ".join(f"{k}: " + " / ".join(f"{v:.2f}" for v in coherence[:, k])
                                           for k in measured) or "none measured"))
  for name, key in (("raw", "relearned_raw_probability"), ("adjusted", "relearned_probability")):
    for above in aboves:
      scores = rescored(labels, outside, saved["relearned_candidates"], saved[key], above, num_classes)
      top = int(np.argmax(scores))
      parts.append(f"{name} {above:g}: {top}{' (target)' if top == target else ''} {scores[top]:.1f}")
  return " | ".join(parts)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--above", default="0.8,0.9", help="Comma-separated cut-offs (relearned_above) to score at.")
  args = parser.parse_args()
  aboves = [float(v) for v in args.above.split(",")]
  lines = [line for line in (report(w, aboves) for w in args.workdirs) if line]
  if not lines:
    sys.exit("relearned.py: none of the workdirs ran the relearned check (config.abl.relearned_at > 0) with "
             "today's relearned.npz")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
