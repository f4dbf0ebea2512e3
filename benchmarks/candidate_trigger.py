"""Each label's pursuit tail as a candidate trigger: the tail's mean image minus the rest of the label's, added to
other labels' training images; how often a finished run's model then predicts the label, against without it.

    python benchmarks/candidate_trigger.py runs/sig                  # the isolation model (WORKDIR/isolation_model)
    python benchmarks/candidate_trigger.py runs/sig --images=2000    # other labels' images tried per label

The candidate triggers are those `config.abl.candidate_triggers` adds in fine-tuning (`abl.candidate_triggers` on
the model's penultimate features; docs/defense.md, sessions 28 and 29). Per label: the share of the sampled images
predicted as the label before and after, the tail's median isolation-loss rank within the label
(WORKDIR/isolation.npz), its size, the mean absolute pixel change; the poison mask marks the attacked labels only
(P).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
import jax  # noqa: E402

from abl_jax import abl, train  # noqa: E402
from benchmarks import spectral  # noqa: E402

Predict = Callable[[np.ndarray], np.ndarray]  # uint8 images -> predicted classes.


def label_rises(predict: Predict, images: np.ndarray, labels: np.ndarray, features: np.ndarray,
                num_classes: int, sample: int = 2000, tail: float = 2.0, dims: int = 16,
                seed: int = 0) -> list[dict[str, Any]]:
  """Per label: its pursuit tail's mean image minus the rest of the label's, added (clipped, rounded) to `sample`
  images of other labels; the share predicted as the label before and after, the tail and its change's size."""
  rng = np.random.default_rng(seed)
  deltas, tails = abl.candidate_triggers(images, labels, features, num_classes, tail, dims)
  rows = []
  for label in range(num_classes):
    others = np.flatnonzero(labels != label)
    pick = rng.choice(others, min(sample, len(others)), replace=False)
    moved = np.clip(images[pick].astype(np.float32) + deltas[label], 0, 255).round().astype(np.uint8)
    rows.append({"label": label, "tail": tails[label], "before": float(np.mean(predict(images[pick]) == label)),
                 "after": float(np.mean(predict(moved) == label)), "change": float(np.abs(deltas[label]).mean())})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="A finished ABL run's workdir.")
  parser.add_argument("--images", type=int, default=2000, help="Other labels' images tried per label.")
  parser.add_argument("--dims", type=int, default=16, help="Whitened principal components the pursuit searches.")
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.workdir, "isolation_model")):
    sys.exit(f"candidate_trigger.py: {args.workdir}/isolation_model is missing; give it an ABL run's workdir")
  config, prep, model, variables = spectral.restored(args.workdir)
  run = train.predictor(model, variables, config.data.mean, config.data.std, config.train.eval_batch_size,
                        train.make_mesh(jax.local_devices()), features=True)
  images, labels = prep.train.images, prep.train.labels
  _, _, features = run(images, labels)
  predict = lambda x: run(x, np.zeros(len(x), np.int32))[1]
  rows = label_rises(predict, images, labels, features, prep.train.num_classes, args.images, dims=args.dims)
  scores = np.load(os.path.join(args.workdir, "isolation.npz"))["scores"]
  poisoned = np.asarray(prep.is_poisoned, bool)
  print(f"# {args.workdir} (isolation_model)\n")
  print("| label | attacked | tail | before | after | rise | tail's loss rank | mean pixel change |\n|" + "---|" * 8)
  for r in rows:
    mine = np.flatnonzero(labels == r["label"])
    rank = float(np.median(abl.within_rank(scores[mine])[np.isin(mine, r["tail"])]))
    print(f"| {r['label']} | {'P' if poisoned[mine].any() else ''} | {len(r['tail'])} | {r['before']:.3f} | "
          f"{r['after']:.3f} | {r['after'] - r['before']:+.3f} | {rank:.2f} | {r['change']:.1f} |")


if __name__ == "__main__":
  main()
