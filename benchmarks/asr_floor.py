"""The ASR a model shows without having learned a backdoor: its share of triggered non-target test images
classified as the target, for a model trained on clean data (the floor any defense's ASR is compared to).

    python benchmarks/asr_floor.py --model=runs/clean-none --config=configs/abl_badnets.py:cpu \
        [--config.attack.target_label=3 | --targets=all | --targets=3,5]

--model: a finished run's workdir (its latest checkpoint); --config: the attack whose test-time trigger is
applied (its data and seed must be the run's). Within a run, `--config.attack.floor_model=<workdir>` measures the
same at the final evaluation (results.json floor_asr; the results table sets its clean row). Prints one JSON line per target class (the config's, or
--targets): the ASR under that trigger, and the share of the untriggered non-target images sent to the target.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from abl_jax import experiment, plots  # noqa: E402


def define_flags() -> None:
  """The command line's flags (defined at start-up only, so that tests can import this beside other scripts)."""
  flags.DEFINE_string("model", None, "Workdir of a finished run.", required=True)
  config_flags.DEFINE_config_file("config", None, "The attack config (its trigger is applied to the test set).")
  flags.DEFINE_string("targets", "", "Target classes, comma-separated, or 'all'; empty: config.attack.target_label.")


def targets(spec: str, default: int, num_classes: int) -> list[int]:
  """The target classes `spec` names ('' = `default`, 'all' = every class), each checked."""
  if not spec:
    return [default]
  names = [str(t) for t in range(num_classes)] if spec == "all" else spec.split(",")
  for t in names:
    if not (t.strip().isdigit() and int(t) < num_classes):
      raise ValueError(f"--targets: {t!r} is not a class (0..{num_classes - 1}) or 'all'")
  return [int(t) for t in names]


def floor(model: str, prep: experiment.Prepared, attack: str, target: int) -> dict:
  """The model's ASR under the prepared test-time trigger for `target`, and its untriggered rate."""
  test = prep.test
  pred = plots.predict_latest(model, prep.poisoned_test.images, test.num_classes)
  clean_pred = plots.predict_latest(model, test.images[test.labels != target], test.num_classes)
  return {"model": model, "attack": attack, "target_label": target, "asr": float(np.mean(pred == target)),
          "clean_images_classified_as_target": float(np.mean(clean_pred == target))}


def main(_):
  config = flags.FLAGS.config
  prep = experiment.prepare(config)
  for target in targets(flags.FLAGS.targets, config.attack.target_label, prep.test.num_classes):
    if target != config.attack.target_label:  # The test-time trigger goes on the other classes' images.
      config.attack.target_label = target
      prep = experiment.prepare(config)
    print(json.dumps(floor(flags.FLAGS.model, prep, config.attack.name, target)), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
