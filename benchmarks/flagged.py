"""What becomes of a flagged label's examples, and how well each signal the defender has tells its poisoned ones
from its clean ones: a finished run where the gauge flagged an outlier label (docs/defense.md, session 17).

    python benchmarks/flagged.py runs/wanet                    # the judgement fine-tuning followed (regauged.npz
                                                               # where a second gauge judged, else returned.npz)
    python benchmarks/flagged.py runs/wanet --checkpoint=15    # also: the model of WORKDIR/checkpoints/15 as a judge
    python benchmarks/flagged.py runs/wanet --knn=30           # also: the label's share of each example's 30 nearest
                                                               # training examples in the isolation model's features
    python benchmarks/flagged.py runs/wanet --json             # one JSON line
    python benchmarks/flagged.py runs/badnets --label=6        # a label nothing flagged (the attack's target)

A measurement, not part of the defense: it reads the poison mask. Per flagged label: its clean and poisoned
examples by fate (disowned, left out, kept with their label), the share of its examples in the pool and outside it
that the gauge rejects, and its unsure pool examples (abl.flagged_unsure); then, over its examples outside the pool
and over the kept ones alone, the AUROC of poisoned against clean of the gauge's probability of the label (low =
poisoned), of the isolation loss after each scored epoch (low = poisoned, as isolation assumes), with
--checkpoint, of that model's probability of the label, and with --knn, of the share of each example's nearest
neighbours (cosine, the isolation model's penultimate features, every training example) that carry the label.
0.5 is chance; below 0.5 the signal points the other way.
Where a second gauge judged: each flagged label's outlier score by the first gauge, by the second as the defense
computes it, and by the second over the examples it trained on (the first's rejected ones left out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.

from abl_jax import abl, workdir as workdir_lib  # pylint: disable=wrong-import-position


def auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
  """P(a positive scores above a negative), ties counted half; None when either side is empty."""
  positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
  if not len(positive) or not len(negative):
    return None
  above = (positive[:, None] > negative[None, :]).mean()
  return float(above + (positive[:, None] == negative[None, :]).mean() / 2)


def judgement_of(workdir: str, name: str) -> dict[str, np.ndarray]:
  """The arrays of WORKDIR/<name> (returned.npz, regauged.npz)."""
  with np.load(os.path.join(workdir, name)) as saved:
    return dict(saved)


def judgement(workdir: str) -> tuple[str, dict[str, np.ndarray]]:
  """The file of the judgement fine-tuning followed, and its arrays."""
  path = workdir_lib.followed_judgement(workdir)
  if path is None:
    raise FileNotFoundError(f"{workdir} holds no returned.npz: not a run whose gauge judged")
  return os.path.basename(path), judgement_of(workdir, os.path.basename(path))


def knn_share(features: np.ndarray, labels: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
  """For each example of `rows`: the share of its `k` nearest other examples (cosine similarity of `features`) whose
  label is its own."""
  unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  similarity = unit[rows] @ unit.T
  similarity[np.arange(len(rows)), rows] = -np.inf  # Not its own neighbour.
  nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
  return (labels[nearest] == labels[rows][:, None]).mean(axis=1)


def label_report(labels: np.ndarray, poisoned: np.ndarray, pool: np.ndarray, judged: dict[str, np.ndarray],
                 epoch_scores: dict[str, np.ndarray], disown_below: float,
                 model_probability: np.ndarray | None = None, which: list[int] | None = None,
                 own_above: float = 0.5, knn: np.ndarray | None = None) -> list[dict[str, Any]]:
  """One row per flagged label of `judged` (a returned.npz / regauged.npz), or per label of `which`: fates and
  AUROCs (module docstring)."""
  n = len(labels)
  mark = lambda rows: np.isin(np.arange(n), rows)
  disowned, left_out = mark(judged.get("disowned", [])), mark(judged.get("kept_out", []))
  left_out |= mark(judged.get("left_out", []))
  in_pool = mark(pool)
  gauge = np.exp(-judged["outside_gauge_loss"].astype(np.float64))  # NaN in the pool.
  out = []
  for label in judged["outlier_labels"].tolist() if which is None else which:
    mine = labels == label
    fates = {}
    for fate, where in (("disowned", disowned), ("left_out", left_out & ~disowned),
                        ("kept", ~disowned & ~left_out)):
      fates[fate] = {"clean": int((mine & where & ~poisoned).sum()), "poisoned": int((mine & where & poisoned).sum())}
    row: dict[str, Any] = {"label": int(label), "examples": int(mine.sum()), "poisoned": int((mine & poisoned).sum()),
                           "poisoned_in_pool": int((mine & poisoned & in_pool).sum()), **fates}
    if "judge_loss" in judged:  # The gauge's rejected share in the pool and outside it (abl.flagged_unsure=auto).
      pool_own = np.exp(-judged["judge_loss"].astype(np.float64))
      outside = np.flatnonzero(~in_pool)
      shares = abl.rejected_shares(pool_own < disown_below, labels[pool],
                                   np.isin(outside, judged.get("class_rejected", [])), labels[outside], [label])[:, 0]
      row["rejected_share"] = {"pool": None if np.isnan(shares[0]) else float(shares[0]), "outside": float(shares[1])}
      unsure = pool[(labels[pool] == label) & (pool_own >= disown_below) & (pool_own < own_above)]
      row["pool_unsure"] = {"clean": int((~poisoned[unsure]).sum()), "poisoned": int(poisoned[unsure].sum())}
    for group, where in (("outside", mine & ~in_pool), ("kept", mine & ~in_pool & (gauge >= disown_below))):
      signals = {"gauge_probability": gauge, **{f"isolation_loss_{k}": v for k, v in sorted(epoch_scores.items())}}
      if model_probability is not None:
        signals["model_probability"] = model_probability
      if knn is not None:
        signals["knn_share"] = knn
      row[f"auroc_{group}"] = {k: auroc(-v[where & poisoned], -v[where & ~poisoned]) for k, v in signals.items()}
      row[f"{group}_examples"] = {"clean": int((where & ~poisoned).sum()), "poisoned": int((where & poisoned).sum())}
    out.append(row)
  return out


def regauge_scores(labels: np.ndarray, first: dict[str, np.ndarray], second: dict[str, np.ndarray],
                   levels: tuple[float, ...], num_classes: int) -> dict[int, dict[str, float]]:
  """Per label the first gauge flagged: its outlier score (the highest over `levels`) by the first gauge, by the
  second as the defense computes it (every example outside the pool), and by the second over the examples it was
  trained on (without those the first rejected, which it never saw)."""

  def score(judged: dict[str, np.ndarray], drop: np.ndarray) -> np.ndarray:
    own = np.exp(-judged["outside_gauge_loss"].astype(np.float64))
    where = ~np.isnan(own) & ~np.isin(np.arange(len(labels)), drop)
    return abl.outlier_labels(own[where], labels[where], num_classes, np.inf, levels)[2].max(axis=0)

  none = np.array([], np.int64)
  scores = (score(first, none), score(second, none), score(second, first["class_rejected"]))
  return {int(k): {"first": float(scores[0][k]), "second": float(scores[1][k]),
                   "second_on_its_training_examples": float(scores[2][k])} for k in first["outlier_labels"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="A finished run's workdir.")
  parser.add_argument("--checkpoint", type=int, default=None,
                      help="A step in WORKDIR/checkpoints whose model also judges (its probability of the label).")
  parser.add_argument("--knn", type=int, default=None,
                      help="Also rank by the label's share of each example's K nearest neighbours (isolation model).")
  parser.add_argument("--label", type=int, action="append", default=None,
                      help="Report this label (repeatable) instead of the flagged ones, e.g. a target nothing flagged.")
  parser.add_argument("--json", action="store_true", help="Print one JSON line instead of tables.")
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.workdir, "isolation.npz")):
    sys.exit(f"flagged.py: {args.workdir}/isolation.npz is missing; give it the workdir of a defended run")
  with np.load(os.path.join(args.workdir, "isolation.npz")) as iso:
    labels, poisoned, pool = iso["labels"], iso["is_poisoned"].astype(bool), iso["pool"]
  try:
    name, judged = judgement(args.workdir)
  except FileNotFoundError as e:
    sys.exit(f"flagged.py: {e}")
  scores_path = os.path.join(args.workdir, "epoch_scores.npz")
  epoch_scores = dict(np.load(scores_path)) if os.path.exists(scores_path) else {}
  with open(os.path.join(args.workdir, "config.json")) as f:
    config = json.load(f)
  if args.knn is not None and args.knn < 1:
    sys.exit(f"flagged.py: --knn={args.knn}; allowed: an integer >= 1")
  model_probability = knn = None
  if args.checkpoint is not None or args.knn is not None:
    import jax  # pylint: disable=import-outside-toplevel
    from abl_jax import checkpoint, experiment, train  # pylint: disable=import-outside-toplevel
    cfg = workdir_lib.run_config(args.workdir)
    prep = experiment.prepare(cfg)
    model = experiment._model(cfg, prep.train)  # pylint: disable=protected-access
    mesh = train.make_mesh(jax.local_devices())
    shape = prep.train.images.shape[1:]
    if args.checkpoint is not None:
      variables = checkpoint.restore_variables(args.workdir, model, cfg, shape, step=args.checkpoint)
      predict = train.predictor(model, variables, cfg.data.mean, cfg.data.std, cfg.train.eval_batch_size, mesh)
      model_probability = np.exp(-np.asarray(predict(prep.train.images, labels)[0], np.float64))
    if args.knn is not None:
      from benchmarks import spectral  # pylint: disable=import-outside-toplevel
      variables = checkpoint.restore_variables(args.workdir, model, cfg, shape, "isolation_model")
      features = np.asarray(spectral.penultimate(model, variables, prep.train.images, cfg.data.mean, cfg.data.std,
                                                 cfg.train.eval_batch_size), np.float64)
      reported = np.flatnonzero(np.isin(labels, judged["outlier_labels"] if args.label is None else args.label))
      knn = np.full(len(labels), np.nan)
      knn[reported] = knn_share(features, labels, reported, args.knn)
  rows = label_report(labels, poisoned, pool, judged, epoch_scores, config["abl"]["disown_below"], model_probability,
                      args.label, own_above=config["abl"]["own_above"], knn=knn)
  rescored = {}
  if name == "regauged.npz":
    levels = tuple(config["abl"]["class_outlier_below"]) or (config["abl"]["disown_below"],)
    rescored = regauge_scores(labels, judgement_of(args.workdir, "returned.npz"), judged, levels, int(labels.max()) + 1)
  if args.json:
    print(json.dumps({"workdir": args.workdir, "judgement": name, "checkpoint": args.checkpoint, "labels": rows,
                      "outlier_scores": rescored}))
    return
  for label, s in rescored.items():
    print(f"# {args.workdir}: label {label}'s outlier score: first gauge {s['first']:.2f}, second gauge "
          f"{s['second']:.2f} (as the defense computes it), {s['second_on_its_training_examples']:.2f} over the "
          "examples the second gauge trained on\n")
  if not rows:
    print(f"# {args.workdir} ({name}): no label flagged")
  for r in rows:
    print(f"# {args.workdir} ({name}), label {r['label']}: {r['examples']} examples, {r['poisoned']} poisoned "
          f"({r['poisoned_in_pool']} in the pool)\n")
    if "rejected_share" in r:
      share, unsure = r["rejected_share"], r["pool_unsure"]
      pool_share = "none" if share["pool"] is None else f"{share['pool']:.3f}"
      print(f"The gauge rejects {pool_share} of its pool examples and {share['outside']:.3f} of those outside the "
            f"pool; its unsure pool examples: {unsure['clean']} clean, {unsure['poisoned']} poisoned\n")
    print("| fate | clean | poisoned |\n|---|---|---|")
    for fate in ("disowned", "left_out", "kept"):
      print(f"| {fate} | {r[fate]['clean']} | {r[fate]['poisoned']} |")
    print("\n| AUROC, poisoned against clean | " + " | ".join(r["auroc_outside"]) + " |\n|" + "---|" * (
        len(r["auroc_outside"]) + 1))
    for group in ("outside", "kept"):
      sizes = r[f"{group}_examples"]
      cells = ["" if v is None else f"{v:.3f}" for v in r[f"auroc_{group}"].values()]
      where = "outside the pool" + ("" if group == "outside" else f", gauge >= {config['abl']['disown_below']}")
      print(f"| {where} ({sizes['clean']} clean, {sizes['poisoned']} poisoned) | " + " | ".join(cells) + " |")
    print()


if __name__ == "__main__":
  main()
