"""Which of the isolation model's feature units carry the backdoor, found from the defense's own verdict, and what
the isolation model does without them (docs/defense.md, session 20).

    python benchmarks/feature_units.py runs/ia                  # a finished run whose gauge judged
    python benchmarks/feature_units.py runs/ia --zero=0,4,8,16  # how many units to take out, one model each

    python benchmarks/feature_units.py runs/ia --final          # the final model instead of the isolation model
    python benchmarks/feature_units.py runs/ia --direction      # also: a flagged label's examples along the units

Per feature unit (the input of the model's last Dense layer; the isolation model, or the final one with --final),
the standardised difference d between its mean over the examples the followed judgement disowned and its mean
over every other example (what a defender can compute), and the same with the poison mask (what the ground truth
says); the ten largest of each with their units. Then, for each count k of --zero, the model with the last layer's
weights from its k highest-d units set to 0: CA and ASR on the whole test set, and the share of the training
examples outside the disowned ones whose prediction it changes (what a defender could budget). A measurement, not
part of the defense: the mask is read for the ground-truth row and the ASR.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
import jax  # noqa: E402

from abl_jax import checkpoint, evaluate, experiment, train, workdir as wd  # noqa: E402
from benchmarks.flagged import auroc  # noqa: E402


def unit_differences(features: np.ndarray, chosen: np.ndarray) -> np.ndarray:
  """Each unit's (mean over `chosen` - mean over the rest) / the rest's standard deviation."""
  rest = np.setdiff1d(np.arange(len(features)), chosen)
  features = np.asarray(features, np.float64)
  return (features[chosen].mean(0) - features[rest].mean(0)) / (features[rest].std(0) + 1e-6)


def without_units(variables: Any, units: np.ndarray) -> Any:
  """`variables` with the kernel rows of `units` in the last Dense layer set to 0."""
  params = variables["params"]
  name = [k for k in params if k.startswith("Dense")][-1]
  kernel = np.array(params[name]["kernel"])
  kernel[np.asarray(units, int)] = 0.0
  return {**variables, "params": {**params, name: {**params[name], "kernel": kernel}}}


def direction_report(features: np.ndarray, judged: dict[str, np.ndarray], labels: np.ndarray,
                     poisoned: np.ndarray) -> None:
  """Prints, per label the judgement flagged, how its examples that train with their own label rank along the
  disowned-vs-rest direction (each unit's mean difference over the rest's variance): the AUROC of poisoned against
  clean, and how many lie beyond the midpoint between the disowned examples' median and the rest's."""
  features = np.asarray(features, np.float64)
  disowned = judged["disowned"]
  rest = np.setdiff1d(np.arange(len(labels)), disowned)
  projection = features @ ((features[disowned].mean(0) - features[rest].mean(0)) / (features[rest].var(0) + 1e-6))
  midpoint = (np.median(projection[disowned]) + np.median(projection[rest])) / 2
  own = judged["labels"][np.arange(len(labels)), labels] > 0.99
  if "left_out" in judged:
    own[judged["left_out"]] = False
  for k in judged.get("outlier_labels", ()):
    kept = np.flatnonzero(own & (labels == k))
    beyond = kept[projection[kept] > midpoint]
    print(f"  label {k}: {len(kept)} train with it ({int(poisoned[kept].sum())} poisoned); AUROC along the direction "
          f"{auroc(projection[kept][poisoned[kept]], projection[kept][~poisoned[kept]])}; beyond the midpoint "
          f"{len(beyond)} ({int(poisoned[beyond].sum())} poisoned)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--zero", default="0,1,2,4,8,16", help="comma-separated counts of units to take out")
  parser.add_argument("--final", action="store_true", help="the run's final model (its newest checkpoint) instead")
  parser.add_argument("--direction", action="store_true",
                      help="also rank each flagged label's examples that train with their label along the "
                           "disowned-vs-rest direction")
  args = parser.parse_args()
  config = wd.run_config(args.workdir)
  prep = experiment.prepare(config)
  wd.check_data(args.workdir, experiment.data_fingerprints(prep), write=False)
  model = experiment._model(config, prep.train)  # pylint: disable=protected-access
  variables = checkpoint.restore_variables(args.workdir, model, config, prep.train.images.shape[1:],
                                           directory="checkpoints" if args.final else "isolation_model")
  mesh = train.make_mesh(jax.local_devices())

  def predictor(v: Any, **kwargs: Any) -> train.Predict:
    return train.predictor(model, v, config.data.mean, config.data.std, config.train.eval_batch_size, mesh, **kwargs)

  path = wd.followed_judgement(args.workdir)
  if path is None:
    raise SystemExit(f"{args.workdir} holds no returned.npz: not a run whose gauge judged")
  disowned = wd.load_npz(path)["disowned"]
  features = np.asarray(predictor(variables, features=True)(prep.train.images, prep.train.labels)[2])
  ours = unit_differences(features, disowned)
  order = np.argsort(-ours)
  print(f"{os.path.basename(path)}: {len(disowned)} disowned ({int(prep.is_poisoned[disowned].sum())} poisoned); "
        f"{features.shape[1]} units")
  print(f"  d, disowned vs the rest: {np.round(ours[order[:10]], 2).tolist()}, units {order[:10].tolist()}")
  poisoned = np.flatnonzero(prep.is_poisoned)
  if len(poisoned):
    truth = unit_differences(features, poisoned)
    top = np.argsort(-truth)[:10]
    print(f"  d, poisoned vs clean:    {np.round(truth[top], 2).tolist()}, units {top.tolist()}")
  if args.direction:
    direction_report(features, wd.load_npz(path), prep.train.labels, np.asarray(prep.is_poisoned, bool))
  rest = np.setdiff1d(np.arange(len(prep.train.labels)), disowned)
  before = np.asarray(predictor(variables)(prep.train.images[rest], prep.train.labels[rest])[1])
  for k in (int(n) for n in args.zero.split(",")):
    fewer = without_units(variables, order[:k])
    m = evaluate.test_metrics(predictor(fewer), prep.test, prep.poisoned_test)
    changed = np.mean(np.asarray(predictor(fewer)(prep.train.images[rest], prep.train.labels[rest])[1]) != before)
    asr = m["attack_success_rate"]
    print(f"  {k:3d} units out: CA {m['clean_accuracy']:.4f} ASR {'n/a' if asr is None else f'{asr:.4f}'}; "
          f"training predictions changed (all but the disowned) {changed:.4f}", flush=True)


if __name__ == "__main__":
  main()
