"""Runs one abl-jax experiment, or evaluates its latest checkpoint.

  python launch.py --config=configs/abl_sig.py --workdir=runs/sig
  python launch.py --config=configs/abl_sig.py:smoke --workdir=runs/sig-smoke --config.abl.gamma=0.3
  python launch.py --config=configs/abl_sig.py --workdir=runs/sig --mode=eval
  python launch.py --config=configs/table.py:cpu --workdir=runs/table-cpu   # every row of the results table
  python launch.py --mode=report --workdir=runs/table-cpu                   # report.md / report.json
  python launch.py --config=configs/abl_sig.py --workdir=runs/sig --config.distributed.coordinator_address=\
      host0:1234 --config.distributed.num_processes=2 --config.distributed.process_id=0  # docs/multihost.md
"""
import logging as pylogging
import os

from abl_jax import xla_flags

xla_flags.prefer_xla_cpu_convolutions()  # Before jax starts its backend (docs/benchmarks.md).

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from abl_jax import distributed, experiment, plots, report, table  # noqa: E402
from configs import common  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "report"],
                          "train: run (or resume) the experiment or table; eval: evaluate the latest checkpoint; "
                          "report: write WORKDIR/report.md and report.json from the runs (no --config).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete an existing run in --workdir and start over.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  # Orbax reports every checkpoint step at INFO; keep its warnings only.
  logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname or r.levelno >= pylogging.WARNING)
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is not None:  # Before anything touches devices; a table's config takes the defaults.
    distributed.initialize(config.distributed if "distributed" in config else common.base_config().distributed)
    if not distributed.is_primary():  # Progress once, from process 0; warnings and errors from every process.
      logging.set_verbosity(logging.WARNING)
  if _MODE.value == "report":
    if os.path.exists(os.path.join(workdir, "table.json")):
      table.draw(workdir)  # Pictures of finished rows that lack them (redrawn from the runs' files).
    print(report.write(workdir))
    return
  if config is None:
    raise app.UsageError("--config is required for --mode=train and --mode=eval")
  if table.is_table(config):
    if _MODE.value == "eval":
      raise app.UsageError("--mode=eval takes one experiment's config; evaluate a table's row with its own config")
    table.run(config, workdir, overwrite=_OVERWRITE.value)
  elif _MODE.value == "eval":
    experiment.evaluate_checkpoint(config, workdir)
  else:
    experiment.train_and_evaluate(config, workdir, overwrite=_OVERWRITE.value)
    if distributed.is_primary():
      logging.info("pictures: %s", ", ".join(plots.write_run_plots(workdir)))


if __name__ == "__main__":
  app.run(main)
