"""What other defense settings would have picked, read off one finished ABL run's saved files (no training).

  python benchmarks/pool_analysis.py runs/s8/s0/sig_abl                 # markdown tables on stdout
  python benchmarks/pool_analysis.py runs/s8/s0/input_aware_abl --json  # one JSON line instead

From `epoch_scores.npz` (the isolation losses of the scored epochs) and `config.json`: the suspicious pool's
recall of the poison and its largest label share under other `abl.class_quantile` and `abl.pool_ratio` values,
and, at the run's own values, when ranked over each run of consecutive saved epochs (a run with
`abl.score_epochs` = `abl.isolation_epochs` saved every epoch, so every `score_epochs` can be read off it).
From `returned.npz` (the gauge's verdicts): how many pool examples each `abl.disown_below` would disown, and,
where the run saved the gauge's losses outside the pool (`abl.contradict_factor` on), how many examples
other contradiction factors would flag. The poison mask (`isolation.npz`) is read for these metrics only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
from abl_jax import abl  # noqa: E402  pylint: disable=g-import-not-at-top

QUANTILES = (0.5, 0.8, 0.9, 1.0)
POOL_RATIOS = (0.1, 0.15, 0.2, 0.25, 0.3)
DISOWN = (0.02, 0.05, 0.1, 0.2)
FACTORS = (2, 3, 5, 10, 20)


def _clean_mix(picked: np.ndarray, labels: np.ndarray, poisoned: np.ndarray) -> str:
  """The two labels most common among the clean examples of `picked`, with counts."""
  clean = picked[~poisoned[picked]]
  counts = np.bincount(labels[clean], minlength=int(labels.max()) + 1)
  top = np.argsort(-counts, kind="stable")[:2]
  return ", ".join(f"{counts[c]} of label {c}" for c in top if counts[c])


def pool_sweep(workdir: str) -> list[dict[str, Any]]:
  """Pool recall and largest label share for each (class_quantile, pool_ratio), ranked within each label
  (pool_rule=class_ratio) over the run's scored epochs."""
  config = json.load(open(os.path.join(workdir, "config.json")))["abl"]
  iso = np.load(os.path.join(workdir, "isolation.npz"))
  saved = np.load(os.path.join(workdir, "epoch_scores.npz"))
  epochs = _epochs(saved)[-config.get("score_epochs", 1):]
  labels, poisoned, isolated = iso["labels"], iso["is_poisoned"].astype(bool), iso["isolated"]
  num_classes = int(labels.max()) + 1
  rows = []
  for quantile in QUANTILES:
    ranking = abl.pool_ranking([saved[k] for k in epochs], labels, "class_ratio", quantile)
    for ratio in POOL_RATIOS:
      pool = abl.suspicious_pool(ranking, isolated, "class_ratio", ratio)
      share, label = abl.largest_label_share(pool, labels, num_classes)
      rows.append({"class_quantile": quantile, "pool_ratio": ratio, "pool": len(pool),
                   "recall": float(poisoned[pool].sum() / max(poisoned.sum(), 1)),
                   "largest_label_share": share, "largest_label": label})
  return rows


def _epochs(saved: Any) -> list[str]:
  """The keys of epoch_scores.npz in epoch order."""
  return sorted(saved.files, key=lambda k: int(k.split("_")[1]))


def epochs_sweep(workdir: str) -> list[dict[str, Any]]:
  """Pool recall and largest label share at the run's class_quantile and pool_ratio, ranked over each run of
  consecutive saved epochs (pool_rule=class_ratio)."""
  config = json.load(open(os.path.join(workdir, "config.json")))["abl"]
  iso = np.load(os.path.join(workdir, "isolation.npz"))
  saved = np.load(os.path.join(workdir, "epoch_scores.npz"))
  epochs = _epochs(saved)
  labels, poisoned, isolated = iso["labels"], iso["is_poisoned"].astype(bool), iso["isolated"]
  num_classes = int(labels.max()) + 1
  quantile, ratio = config.get("class_quantile", 0.8), config.get("pool_ratio", 0.2)
  rows = []
  for first in range(len(epochs)):
    for last in range(first, len(epochs)):
      window = epochs[first:last + 1]
      pool = abl.suspicious_pool(abl.pool_ranking([saved[k] for k in window], labels, "class_ratio", quantile),
                                 isolated, "class_ratio", ratio)
      share, label = abl.largest_label_share(pool, labels, num_classes)
      rows.append({"epochs": "-".join(e.split("_")[1] for e in (window[0], window[-1])), "pool": len(pool),
                   "recall": float(poisoned[pool].sum() / max(poisoned.sum(), 1)),
                   "largest_label_share": share, "largest_label": label})
  return rows


def disown_sweep(workdir: str) -> list[dict[str, Any]]:
  """For each abl.disown_below: the pool examples whose label the gauge gives less, poisoned and clean."""
  iso = np.load(os.path.join(workdir, "isolation.npz"))
  got = np.load(os.path.join(workdir, "returned.npz"))
  labels, poisoned, pool = iso["labels"], iso["is_poisoned"].astype(bool), iso["pool"]
  own = np.exp(-got["judge_loss"])  # The gauge's probability for each pool example's label, in pool order.
  rows = []
  for below in DISOWN:
    hit = pool[own < below]
    rows.append({"disown_below": below, "disowned": len(hit), "poisoned": int(poisoned[hit].sum()),
                 "poisoned_in_pool": int(poisoned[pool].sum()), "clean": _clean_mix(hit, labels, poisoned)})
  return rows


def contradiction_sweep(workdir: str) -> list[dict[str, Any]]:
  """For each contradiction factor: the examples outside the pool it would flag (needs contradict_factor on)."""
  iso = np.load(os.path.join(workdir, "isolation.npz"))
  got = np.load(os.path.join(workdir, "returned.npz"))
  if "outside_gauge_loss" not in got.files:
    return []
  labels, poisoned, scores = iso["labels"], iso["is_poisoned"].astype(bool), iso["scores"]
  outside = np.setdiff1d(np.arange(len(labels)), iso["pool"])
  rows = []
  for factor in FACTORS:
    hit = outside[abl.contradicts(got["outside_gauge_loss"][outside], got["outside_gauge_prediction"][outside],
                                  labels[outside], scores[outside], factor)]
    rows.append({"contradict_factor": factor, "flagged": len(hit), "poisoned": int(poisoned[hit].sum()),
                 "poisoned_outside": int(poisoned[outside].sum()), "clean": _clean_mix(hit, labels, poisoned)})
  return rows


def _table(rows: list[dict[str, Any]]) -> str:
  if not rows:
    return "(not saved by this run)\n"
  keys = list(rows[0])
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="A finished (or past give-back) ABL run's workdir.")
  parser.add_argument("--json", action="store_true", help="Print one JSON line instead of markdown tables.")
  args = parser.parse_args()
  for name in ("config.json", "isolation.npz", "epoch_scores.npz"):
    if not os.path.exists(os.path.join(args.workdir, name)):
      sys.exit(f"pool_analysis.py: {args.workdir}/{name} is missing; give it an ABL run's workdir")
  has_gauge = os.path.exists(os.path.join(args.workdir, "returned.npz"))
  out = {"workdir": args.workdir, "pool": pool_sweep(args.workdir), "epochs": epochs_sweep(args.workdir),
         "disown": disown_sweep(args.workdir) if has_gauge else [],
         "contradiction": contradiction_sweep(args.workdir) if has_gauge else []}
  if args.json:
    print(json.dumps(out))
    return
  print(f"# {args.workdir}\n\n## Pool recall by class_quantile and pool_ratio\n\n{_table(out['pool'])}\n"
        f"## Pool recall ranked over each run of consecutive saved epochs\n\n{_table(out['epochs'])}\n"
        f"## Pool examples disowned at each disown_below\n\n{_table(out['disown'])}\n"
        f"## Examples outside the pool flagged at each contradict_factor\n\n{_table(out['contradiction'])}")


if __name__ == "__main__":
  main()
