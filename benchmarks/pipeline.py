"""Wall time of each phase of an ABL run, and the share of training time spent waiting for data.

  python benchmarks/pipeline.py --config=configs/abl_badnets.py:cpu                 # runs it in a temporary workdir
  python benchmarks/pipeline.py --config=configs/abl_badnets.py:smoke --workdir=/tmp/p
  python benchmarks/pipeline.py --workdir=runs/badnets-cpu-abl                      # reads a finished run only

With --config, runs abl_jax.experiment.train_and_evaluate (in --workdir, or a temporary one that is
deleted afterwards) and times the whole call; without it, reads a finished run's files. What each
number covers (from results.json "wall_time", isolation.json and metrics.jsonl, as experiment.py
writes them):
- poison: loading the data (decoding or reading the cache) and poisoning the training set;
- isolation, finetune, unlearning (or train, without defense): the phase's training epochs, each
  epoch's first step including compilation; not the per-epoch CA/ASR evaluation nor the checkpoints;
- scoring: the isolation pass (every training example's loss, batched), isolating, writing
  isolation.npz (isolation.json "seconds"); it sits between the isolation and fine-tuning phases;
- evaluate: the final metrics (CA, ASR, losses on the training and test sets);
- other (only when this script ran the experiment): the rest of the call, mostly the per-epoch
  evaluations, checkpoints and the evaluation before unlearning.
data_wait_share: per phase, the mean over epochs of run_epoch's share of the epoch spent waiting for
the next batch (gathering, sharding and copying it to the device; metrics.jsonl epoch/data_wait_share).
Like launch.py, it turns jaxlib's YNNPACK convolutions off on CPU unless XLA_FLAGS sets them
(abl_jax/xla_flags.py); train_step.py and isolation.py keep whatever XLA_FLAGS says. Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
from abl_jax import xla_flags  # noqa: E402  pylint: disable=g-import-not-at-top

xla_flags.prefer_xla_cpu_convolutions()  # Time the run with the kernels launch.py uses.

from abl_jax import experiment, metrics  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import train_step as ts  # noqa: E402  pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'; "
                                          "omit it to read a finished run in --workdir.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to run in (kept) or to read; default: a temporary one.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "With --config: start --workdir's run over.")


def read_run(workdir: str) -> dict[str, Any]:
  """Phase wall times, scoring time and per-phase data-wait share and images/s of a finished run."""
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  out = {"phase_s": {k: round(v, 2) for k, v in results.get("wall_time", {}).items()},
         "clean_accuracy": results.get("clean_accuracy"), "attack_success_rate": results.get("attack_success_rate")}
  iso_path = os.path.join(workdir, "isolation.json")
  if os.path.exists(iso_path):
    with open(iso_path) as f:
      out["phase_s"]["scoring"] = round(json.load(f)["seconds"], 2)
    out["num_train"] = results.get("num_train")
  waits, rates = {}, {}
  for record in metrics.series(metrics.read(workdir), "epoch/data_wait_share"):
    waits.setdefault(record["phase"], []).append(record["epoch/data_wait_share"])
    rates.setdefault(record["phase"], []).append(record["epoch/images_per_s"])
  out["data_wait_share"] = {p: round(sum(v) / len(v), 4) for p, v in waits.items()}
  out["train_images_per_s"] = {p: round(sum(v) / len(v), 1) for p, v in rates.items()}
  out["phase_s_sum"] = round(sum(out["phase_s"].values()), 2)
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None and workdir is None:
    raise app.UsageError("give --config (to run) or --workdir (to read a finished run)")
  out: dict[str, Any] = {"benchmark": "pipeline", **ts.machine()}
  temporary = None
  if config is not None:
    if workdir is None:
      workdir = temporary = tempfile.mkdtemp(prefix="abl_pipeline_")
    out["config"] = {"attack": config.attack.name, "defense": config.defense.name, "model": config.model.name,
                     "data": config.data.source, "train_size": config.data.train_size,
                     "batch_size": config.train.batch_size}
    already = os.path.exists(os.path.join(workdir, "results.json")) and not _OVERWRITE.value
    t0 = time.perf_counter()
    experiment.train_and_evaluate(config, workdir, overwrite=_OVERWRITE.value)
    if already:
      out["note"] = "the workdir held a finished run: read, not rerun (--overwrite reruns it)"
    else:
      out["total_s"] = round(time.perf_counter() - t0, 2)
  try:
    out["workdir"] = None if temporary else workdir
    out.update(read_run(workdir))
    if "total_s" in out:
      out["phase_s"]["other"] = round(out["total_s"] - out["phase_s_sum"], 2)
  finally:
    if temporary:
      shutil.rmtree(temporary, ignore_errors=True)
  logging.info("pipeline figures follow")
  ts.finish(out)


if __name__ == "__main__":
  app.run(main)
