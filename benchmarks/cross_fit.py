"""Cross-fitted gauges against the run's own: does a judge that never trained on an example tell a flagged label's
poisoned examples from its clean ones better than the gauge that trained on them (docs/defense.md, session 20)?

    python benchmarks/cross_fit.py runs/ia --out=/tmp/xfit-ia     # a finished default run whose gauge judged

Two gauges (the run's gauge recipe: fresh weights, gauge_epochs x --epochs_factor, class-balanced batches) each
train on one half of the examples outside the run's pool (split within each label, seeded by the run's seed); each
judges the other half, and the pool gets their mean. Printed for the run's first gauge (returned.npz) and for the
cross-fitted pair: each label's share of examples outside the pool given their label under 0.1, 0.05 and 0.02
and its outlier score (abl.outlier_scores with the sampling term, as the defense computes it), and for each label
that holds poison the fates of its clean and poisoned examples outside the pool (under disown_below, up to
own_above, at least own_above) and the AUROC of poisoned against clean (low probability = poisoned). A
measurement, not part of the defense: it reads the poison mask. The gauges' checkpoints go to --out.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
from abl_jax import abl, experiment, metrics, schedule, train, workdir as wd  # noqa: E402
from abl_jax.checkpoint import Checkpointer  # noqa: E402
from benchmarks.flagged import auroc  # noqa: E402


def halves(outside: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`outside` split in two within each label (the first half of a label's shuffled examples, and the rest)."""
  rng = np.random.default_rng(seed)
  first = []
  for k in np.unique(labels[outside]):
    mine = rng.permutation(outside[labels[outside] == k])
    first.append(mine[: len(mine) // 2])
  first = np.sort(np.concatenate(first))
  return first, np.setdiff1d(outside, first)


def report(name: str, own: np.ndarray, labels: np.ndarray, poisoned: np.ndarray, outside: np.ndarray,
           disown_below: float, own_above: float) -> None:
  """Prints the shares, outlier scores, fates and AUROCs of one judgement (`own`: each example's probability of
  its label)."""
  print(f"== {name}")
  levels = (0.1, 0.05, 0.02)
  _, shares, scores = abl.outlier_labels(own[outside], labels[outside], labels.max() + 1, np.inf, levels)
  for level, share, score in zip(levels, shares, scores):
    print(f"  under {level}: shares {np.round(share, 3).tolist()}; outlier scores {np.round(score, 1).tolist()}")
  is_outside = np.zeros(len(labels), bool)
  is_outside[outside] = True
  for k in np.unique(labels[poisoned]):
    mine = is_outside & (labels == k)
    fates = {}
    for fate, low, high in (("rejected", 0.0, disown_below), ("doubted", disown_below, own_above),
                            ("backed", own_above, np.inf)):
      chosen = mine & (own >= low) & (own < high)
      fates[fate] = f"{int((chosen & ~poisoned).sum())} / {int((chosen & poisoned).sum())}"
    print(f"  label {k}, clean / poisoned outside the pool: {fates}; AUROC "
          f"{auroc(-own[mine & poisoned], -own[mine & ~poisoned])}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--out", required=True, help="a new or empty folder for the two gauges' checkpoints")
  parser.add_argument("--epochs_factor", type=int, default=1, help="each gauge trains gauge_epochs x this")
  args = parser.parse_args()
  config = wd.run_config(args.workdir)
  prep = experiment.prepare(config)
  wd.check_data(args.workdir, experiment.data_fingerprints(prep), write=False)
  if os.path.exists(args.out) and os.listdir(args.out):
    raise SystemExit(f"--out={args.out} is not empty; give a new or empty folder")
  os.makedirs(args.out, exist_ok=True)
  model = experiment._model(config, prep.train)  # pylint: disable=protected-access
  mesh = train.default_mesh()
  evaluation = schedule.Evaluation(prep.test, prep.poisoned_test, prep.test, prep.poisoned_test, prep.is_poisoned)
  state = experiment._initial_state(config, model, prep.train.images.shape[1:])  # pylint: disable=protected-access
  run = schedule.Run(config, args.out, prep.train, evaluation, model, mesh, train.replicate(state, mesh),
                     Checkpointer(os.path.join(args.out, "checkpoints"), 1), metrics.Writer(args.out, enabled=True),
                     {})
  labels, poisoned = prep.train.labels, np.asarray(prep.is_poisoned, bool)
  pool = wd.load_npz(os.path.join(args.workdir, "isolation.npz"))["pool"]
  outside = np.setdiff1d(np.arange(len(labels)), pool)
  first, second = halves(outside, labels, config.seed)
  probabilities = []
  for name, examples in (("gauge_a", first), ("gauge_b", second)):
    schedule.run_phase(run, schedule._gauge_phase(  # pylint: disable=protected-access
        run, name, examples, config.abl.gauge_epochs * args.epochs_factor))
    # The gauges see the images as the run's gauges did (config.abl.gauge_downsample).
    judge = schedule._judging(run)  # pylint: disable=protected-access
    probabilities.append(np.asarray(judge(prep.train.images, labels)[2]))
    tested = evaluation.test_metrics(lambda images, y: judge(images, y)[:2], full=True)
    print(f"{name}: test {tested}", flush=True)
  run.checkpoints.close()
  run.writer.close()
  crossed = np.empty(len(labels))
  crossed[first] = probabilities[1][first, labels[first]]
  crossed[second] = probabilities[0][second, labels[second]]
  crossed[pool] = (probabilities[0][pool, labels[pool]] + probabilities[1][pool, labels[pool]]) / 2
  own_first = np.exp(-np.asarray(wd.load_npz(os.path.join(args.workdir, "returned.npz"))["outside_gauge_loss"],
                                 np.float64))
  a = config.abl
  report("the run's first gauge (trained on every example outside the pool)", own_first, labels, poisoned, outside,
         a.disown_below, a.own_above)
  report("cross-fitted (each half judged by the gauge of the other)", crossed, labels, poisoned, outside,
         a.disown_below, a.own_above)


if __name__ == "__main__":
  main()
