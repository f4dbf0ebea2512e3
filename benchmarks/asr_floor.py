"""The ASR a model shows without having learned a backdoor: its share of triggered non-target test images
classified as the target, for a model trained on clean data (the floor any defense's ASR is compared to).

    python benchmarks/asr_floor.py --model=runs/clean-none --config=configs/abl_badnets.py:cpu \
        [--config.attack.target_label=3]

--model: a finished run's workdir (its latest checkpoint); --config: the attack whose test-time trigger is
applied (its data and seed must be the run's). Prints the ASR under that trigger for every target class.
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

flags.DEFINE_string("model", None, "Workdir of a finished run.", required=True)
config_flags.DEFINE_config_file("config", None, "The attack config (its trigger is applied to the test set).")


def main(_):
  config = flags.FLAGS.config
  prep = experiment.prepare(config)
  test = prep.test
  target = config.attack.target_label
  keep = test.labels != target
  triggered = prep.poisoned_test.images
  pred = plots.predict_latest(flags.FLAGS.model, triggered, test.num_classes)
  clean_pred = plots.predict_latest(flags.FLAGS.model, test.images[keep], test.num_classes)
  out = {"model": flags.FLAGS.model, "attack": config.attack.name, "target_label": target,
         "asr": float(np.mean(pred == target)),
         "clean_images_classified_as_target": float(np.mean(clean_pred == target))}
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
