"""Runs one abl-jax experiment, or evaluates its latest checkpoint.

  python launch.py --config=configs/abl_sig.py --workdir=runs/sig
  python launch.py --config=configs/abl_sig.py:smoke --workdir=runs/sig-smoke --config.abl.gamma=0.3
  python launch.py --config=configs/abl_sig.py --workdir=runs/sig --mode=eval
  python launch.py --config=configs/table.py:cpu --workdir=runs/table-cpu   # every row of the results table
  python launch.py --mode=report --workdir=runs/table-cpu                   # report.md / report.json
  python launch.py --config=configs/abl_sig.py --workdir=runs/sig --config.distributed.coordinator_address=\
      host0:1234 --config.distributed.num_processes=2 --config.distributed.process_id=0  # docs/multihost.md

Run from the repository root (config paths and the shared data path are relative to it). A mistake in the
command, config, workdir or data ends the run with exit code 2 and one line saying what to change
(--verbosity=1 shows the traceback); Ctrl-C ends it with exit code 130, and rerunning the command resumes.
"""
import os
import re
import sys

from abl_jax import xla_flags  # The package selects XLA's CPU kernels before jax starts (abl_jax/__init__.py).

xla_flags.use_compilation_cache()  # Compiled steps kept for the next run (docs/benchmarks.md).

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from abl_jax import cli, distributed, experiment, plots, report, table, workdir as wd  # noqa: E402
from configs import common  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "report"],
                          "train: run (or resume) the experiment or table; eval: evaluate the latest checkpoint; "
                          "report: write WORKDIR/report.md and report.json from the runs (no --config).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete an existing run in --workdir and start over.")
flags.mark_flags_as_required(["workdir"])


def _verbose(argv: list[str]) -> bool:
  """Whether --verbosity (-v) >= 1 is on the command line: then tracebacks are shown."""
  for i, a in enumerate(argv):
    m = re.match(r"^--?(?:verbosity|v)(?:=(-?\d+))?$", a)
    if m:
      value = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "0")
      return value.lstrip("-").isdigit() and int(value) >= 1
  return False


def _fail(message: str, code: int = cli.EXIT_USER_ERROR) -> None:
  print(f"launch.py: {message}", file=sys.stderr)
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistake in a flag or a --config.* field reported as one line (exit code 2)."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg and not os.path.exists(config_arg.split(":")[0]):
    _fail(f"--config={config_arg}: {config_arg.split(':')[0]} does not exist (relative to {os.getcwd()}; run "
          "launch.py from the repository root)")
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # absl's flags.Error and the config's own errors.
    if _verbose(argv):
      raise
    config = None
    if config_arg:
      try:
        values = flags.FlagValues()
        only = [argv[0], f"--config={config_arg}"]
        config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=only)
        values(only)
        config = values.config
      except Exception:  # pylint: disable=broad-except  # The config file itself fails: its own error below.
        pass
    unknown = [p for p in cli.override_paths(argv) if config is not None and not cli.has_field(config, p)]
    _fail(cli.unknown_field_message(config, unknown[0]) if unknown else cli.one_line(e))


def main(argv):
  try:
    with cli.interrupts_repeated():
      _main(argv)
  except KeyboardInterrupt:
    if _verbose(sys.argv):
      raise
    print("launch.py: interrupted; rerun the same command to resume", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # The lock is released and the last checkpoint complete; skip the interpreter's teardown, which can
    # crash while XLA's threads are still in the interrupted computation.
    os._exit(cli.EXIT_INTERRUPTED)
  except app.UsageError as e:
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except  # Our own bugs keep their traceback.
    if not cli.is_user_error(e) or _verbose(sys.argv):
      raise
    _fail(cli.one_line(e))


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(cli.shown_record)
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is not None:  # Before anything touches devices; a table's config takes the defaults.
    distributed.initialize(config.distributed if "distributed" in config else common.base_config().distributed)
    if not distributed.is_primary():  # Progress once, from process 0; warnings and errors from every process.
      logging.set_verbosity(logging.WARNING)
  if _MODE.value == "report":
    if not os.path.isdir(workdir):
      raise wd.WorkdirError(f"--workdir={workdir} does not exist; run the table (or an experiment) there first")
    wd.check(workdir)  # report.md and pictures are written there.
    if os.path.exists(os.path.join(workdir, "table.json")):
      table.draw(workdir)  # Pictures of finished rows that lack them (redrawn from the runs' files).
    print(report.write(workdir))
    return
  if config is None:
    raise app.UsageError("--config is required for --mode=train and --mode=eval")
  if not table.is_table(config):
    for field, instead in cli.unused_overrides(config, cli.override_paths(sys.argv)):
      logging.warning("--%s is not used by this run: %s", field, instead)
  if table.is_table(config):
    if _MODE.value == "eval":
      raise app.UsageError("--mode=eval takes one experiment's config; evaluate a table's row with its own config")
    if not distributed.is_primary():
      table.run(config, workdir, overwrite=_OVERWRITE.value)
      return
    wd.check(workdir)
    with wd.lock(workdir):  # Each row locks its own directory too; this keeps a second sweep out.
      table.run(config, workdir, overwrite=_OVERWRITE.value)
  elif _MODE.value == "eval":
    experiment.evaluate_checkpoint(config, workdir)
  else:
    experiment.train_and_evaluate(config, workdir, overwrite=_OVERWRITE.value)
    if distributed.is_primary():
      logging.info("pictures: %s", ", ".join(plots.write_run_plots(workdir)))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
