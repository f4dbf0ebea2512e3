"""Runs one abl-jax experiment, or evaluates its latest checkpoint.

  python launch.py --config=configs/abl_sig.py --workdir=runs/sig
  python launch.py --config=configs/abl_sig.py:smoke --workdir=runs/sig-smoke --config.abl.gamma=0.3
  python launch.py --config=configs/abl_sig.py --workdir=runs/sig --mode=eval
"""
import logging as pylogging

from absl import app, flags, logging
from ml_collections import config_flags

from abl_jax import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: run (or resume) the experiment; eval: evaluate the latest checkpoint.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete an existing run in --workdir and start over.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  # Orbax reports every checkpoint step at INFO; keep its warnings only.
  logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname or r.levelno >= pylogging.WARNING)
  if _MODE.value == "eval":
    experiment.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  else:
    experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
  app.run(main)
