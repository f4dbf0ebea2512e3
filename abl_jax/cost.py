"""The work a finished run did, counted from its files: training images per phase, and the defense's passes over
the training set, as training-image equivalents (docs/defense.md, sessions 24 and 32).

    cost.work("runs/table/s0/badnets_abl")["total"] / cost.work("runs/table/s0/badnets_none")["total"]

No timing: on shared cores two runs' wall times move a pair's ratio by more than the cost bar's margin; this count
does not. A gauge step on images downsampled by `abl.gauge_downsample` > 1 counts GAUGE_STEP of a full one (a 16x16
step took a quarter to a third of a 32x32 one's time on 2 CPU cores, session 31), an inference image PASS_IMAGE of
a training image (1 / 4.2, session 24).
"""
from __future__ import annotations

import os
from typing import Any

from abl_jax import workdir as wd

GAUGE_STEP = 0.25
PASS_IMAGE = 1 / 4.2
GAUGES = ("gauge", "regauge")
NOT_TRAINING = ("isolate", "give_back", "regauge_give_back")  # Records of decisions, not of training steps.


def phase_steps(run_dir: str) -> dict[str, int]:
  """Training steps per phase of a finished run, in the order its metrics.jsonl first names them."""
  last: dict[str, int] = {}
  for record in wd.read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
    phase = record.get("phase")
    if phase is not None and phase not in NOT_TRAINING:
      last[phase] = max(last.get(phase, 0), int(record["step"]))
  steps, before = {}, 0
  for phase, step in last.items():
    steps[phase], before = step - before, step
  return steps


def batch_size(config: dict[str, Any], phase: str) -> int:
  """The batch size `phase` trains with, from a run's config.json."""
  if phase.startswith("unlearning"):  # Joint unlearning pairs each step's isolated examples with retained ones.
    a = config["abl"]
    return int(a["unlearning_batch_size"]) + (int(a["joint_batch_size"]) if a["unlearning_mode"] == "joint" else 0)
  return int(config["train"]["batch_size"])


def work(run_dir: str, gauge_step: float = GAUGE_STEP, pass_image: float = PASS_IMAGE) -> dict[str, Any]:
  """Training-image equivalents of a finished run: per phase, the passes' images and the total."""
  config = wd.read_json(os.path.join(run_dir, "config.json"))
  results = wd.read_json(os.path.join(run_dir, "results.json"))
  n = int(results["num_train"])
  small = config.get("abl", {}).get("gauge_downsample", 1) > 1 and config["defense"]["name"] != "none"
  scale = lambda phase: gauge_step if small and phase in GAUGES else 1.0
  training = {p: s * batch_size(config, p) * scale(p) for p, s in phase_steps(run_dir).items()}
  passes = 0.0
  if config["defense"]["name"] != "none":
    abl = config["abl"]
    passes += abl["score_epochs"] * n
    for name in ("returned.npz", "regauged.npz"):
      if os.path.exists(os.path.join(run_dir, name)):
        passes += n * (gauge_step if small else 1.0)
    if os.path.exists(os.path.join(run_dir, "relearned.npz")):
      passes += n - len(wd.load_npz(os.path.join(run_dir, "isolation.npz"))["pool"])
      passes += int(wd.load_npz(os.path.join(run_dir, "relearned.npz")).get("relearned_transfer_images", 0))
  total = sum(training.values()) + passes * pass_image
  return {"workdir": run_dir, "training": {p: round(v) for p, v in training.items()},
          "pass_images": round(passes), "total": total}


def ratio(defended: str, none: str, gauge_step: float = GAUGE_STEP, pass_image: float = PASS_IMAGE) -> float:
  """A defended run's work over the same setting's run without defense."""
  return work(defended, gauge_step, pass_image)["total"] / work(none, 1.0, pass_image)["total"]
