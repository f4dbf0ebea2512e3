"""launch.py with one change to the default defense's fine-tuning, for measurements that did not become options
(docs/defense.md, session 20). Every launch.py flag works; the probe's log lines start with "probe:".

    python benchmarks/finetune_probes.py --probe=frozen_units --units=8 --config=configs/abl_input_aware.py:cpu \\
        --workdir=runs/ia-frozen
    python benchmarks/finetune_probes.py --probe=direction --config=configs/abl_input_aware.py:cpu \\
        --workdir=runs/ia-direction

frozen_units: once the isolation model is restored for fine-tuning, the last layer's weights from the --units
feature units that the followed judgement's disowned examples raise most (benchmarks/feature_units.py's d) are set
to 0 and kept there (their gradients masked in the fine-tuning phases).
direction: before fine-tuning, in each label the judgement flagged, the examples that train with their own label
and whose isolation-model features lie beyond the midpoint between the disowned examples' median and the rest's
median along the disowned-vs-rest direction (each unit's mean difference over the rest's variance) are left out.
The printed counts of poisoned examples read the mask (metrics only).
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
import jax  # noqa: E402
from absl import flags  # noqa: E402

from abl_jax import schedule, train, workdir as wd  # noqa: E402
from benchmarks import feature_units  # noqa: E402

flags.DEFINE_enum("probe", None, ["frozen_units", "direction"], "The change to fine-tuning.")
flags.DEFINE_integer("units", 8, "frozen_units: how many feature units to take out.")
flags.mark_flag_as_required("probe")
FLAGS = flags.FLAGS
_ACTIVE: dict[str, Any] = {"mask": None, "phase": ""}


def _features(run: schedule.Run) -> np.ndarray:
  return np.asarray(run.predict(features=True)(run.train.images, run.train.labels)[2], np.float64)


def _freeze_units(run: schedule.Run) -> None:
  judged = wd.load_npz(wd.followed_judgement(run.workdir))
  d = feature_units.unit_differences(_features(run), judged["disowned"])
  units = np.argsort(-d)[:FLAGS.units]
  host = train.to_host(run.state)
  variables = feature_units.without_units({"params": host.params}, units)
  name = [k for k in host.params if k.startswith("Dense")][-1]
  mask = jax.tree.map(lambda x: np.ones(np.shape(x), np.float32), dict(host.params))
  kernel = np.ones(np.shape(host.params[name]["kernel"]), np.float32)
  kernel[units] = 0.0
  mask = {**mask, name: {**mask[name], "kernel": kernel}}
  run.state = train.replicate(host.replace(params=variables["params"]), run.mesh)
  _ACTIVE["mask"] = mask
  print(f"probe: units {units.tolist()} (d {np.round(d[units], 2).tolist()}) out of the last layer", flush=True)


def _leave_out_direction(run: schedule.Run) -> None:
  judged = wd.load_npz(wd.followed_judgement(run.workdir))
  flagged = judged.get("outlier_labels", np.array([], int))
  if not len(flagged) or run.labels is None or run.labels.ndim != 2:
    print("probe: no flagged label; nothing left out", flush=True)
    return
  labels, disowned = run.train.labels, judged["disowned"]
  features = _features(run)
  rest = np.setdiff1d(np.arange(len(labels)), disowned)
  weights = (features[disowned].mean(0) - features[rest].mean(0)) / (features[rest].var(0) + 1e-6)
  projection = features @ weights
  midpoint = (np.median(projection[disowned]) + np.median(projection[rest])) / 2
  own = run.labels[np.arange(len(labels)), labels] > 0.99
  out = np.flatnonzero(own & np.isin(labels, flagged) & (projection > midpoint))
  if run.left_out is not None:
    out = np.setdiff1d(out, run.left_out)
  poisoned = int(run.evaluation.is_poisoned[out].sum())
  print(f"probe: labels {flagged.tolist()}: {len(out)} examples left out ({poisoned} poisoned)", flush=True)
  run.left_out = out if run.left_out is None else np.union1d(run.left_out, out)


def _patch() -> None:
  restore, finetune, run_phase = schedule._restore_isolation_model, schedule.finetune, schedule.run_phase  # pylint: disable=protected-access
  apply_gradients = train.apply_gradients

  def restored(run: schedule.Run) -> None:
    restore(run)
    if FLAGS.probe == "frozen_units":
      _freeze_units(run)

  def finetuned(run: schedule.Run) -> None:
    if FLAGS.probe == "direction" and run.done == run.cursor:
      _leave_out_direction(run)
    finetune(run)

  def phase(run: schedule.Run, p: schedule.Phase) -> None:
    _ACTIVE["phase"] = p.name  # Read when the phase's step is traced: every phase traces its own.
    train._cached_train_step.cache_clear()  # pylint: disable=protected-access
    run_phase(run, p)

  def masked(state, grads, *args):
    if _ACTIVE["mask"] is not None and _ACTIVE["phase"].startswith("finetune"):
      grads = jax.tree.map(lambda g, m: g * m, grads, _ACTIVE["mask"])
    return apply_gradients(state, grads, *args)

  schedule._restore_isolation_model = restored  # pylint: disable=protected-access
  schedule.finetune, schedule.run_phase = finetuned, phase
  train.apply_gradients = masked


if __name__ == "__main__":
  _patch()
  sys.argv[0] = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch.py")
  runpy.run_path(sys.argv[0], run_name="__main__")
