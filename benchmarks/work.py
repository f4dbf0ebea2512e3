"""The defense's work against training without it, counted from two finished runs' files (no timing; docs/defense.md,
sessions 24 and 32).

    python benchmarks/work.py runs/table/s0/badnets_abl runs/table/s0/badnets_none
    python benchmarks/work.py DEFENDED NONE --gauge_step=0.25 --pass_image=0.238

Training images: each phase's steps (the global step at its last record in metrics.jsonl, less the previous
phase's) times its batch size; a gauge's steps (`gauge`, `regauge`) count `--gauge_step` of a full one where the
run trained them on downsampled images (`abl.gauge_downsample` > 1; a 16x16 step took a quarter to a third of a
32x32 one's time on 2 CPU cores, session 31). Passes over the training set: the isolation model's scoring
(`abl.score_epochs` of them), each gauge's judgement (`returned.npz`, `regauged.npz`; at `--gauge_step` where
downsampled) and the relearned check (`relearned.npz`: the examples outside the pool, and the images its trigger
transfer test stamped, `relearned_transfer_images`), each pass image at
`--pass_image` of a training image (1 / 4.2, measured in session 24). Wall time on a shared machine moves a pair's
ratio by more than the bar's margin (session 24); this count does not.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
from abl_jax import workdir as wd  # noqa: E402  pylint: disable=g-import-not-at-top

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


def _batch(config: dict[str, Any], phase: str) -> int:
  """The batch size `phase` trains with."""
  if phase.startswith("unlearning"):  # Joint unlearning pairs each step's isolated examples with retained ones.
    a = config["abl"]
    return int(a["unlearning_batch_size"]) + (int(a["joint_batch_size"]) if a["unlearning_mode"] == "joint" else 0)
  return int(config["train"]["batch_size"])


def work(run_dir: str, gauge_step: float, pass_image: float) -> dict[str, Any]:
  """Training-image equivalents of a finished run: per phase, the passes' images and the total."""
  config = wd.read_json(os.path.join(run_dir, "config.json"))
  results = wd.read_json(os.path.join(run_dir, "results.json"))
  n = int(results["num_train"])
  small = config.get("abl", {}).get("gauge_downsample", 1) > 1 and config["defense"]["name"] != "none"
  scale = lambda phase: gauge_step if small and phase in GAUGES else 1.0
  training = {p: s * _batch(config, p) * scale(p) for p, s in phase_steps(run_dir).items()}
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("defended", help="A finished defense run's workdir.")
  parser.add_argument("none", help="The same setting's finished run without defense.")
  parser.add_argument("--gauge_step", type=float, default=0.25,
                      help="A downsampled gauge step's cost against a full one (gauge_downsample > 1 only).")
  parser.add_argument("--pass_image", type=float, default=1 / 4.2,
                      help="An inference pass image's cost against a training image.")
  args = parser.parse_args(argv)
  for value, flag in ((args.gauge_step, "--gauge_step"), (args.pass_image, "--pass_image")):
    if not 0 < value <= 1:
      parser.error(f"{flag}={value} must be in (0, 1]")
  for run_dir in (args.defended, args.none):
    for name in ("config.json", "results.json", "metrics.jsonl"):
      if not os.path.exists(os.path.join(run_dir, name)):
        parser.error(f"{run_dir}/{name} is missing; give two finished runs' workdirs")
  defended, none = work(args.defended, args.gauge_step, args.pass_image), work(args.none, 1.0, args.pass_image)
  out = {"defended": defended, "none": none, "ratio": defended["total"] / none["total"]}
  print(f"{args.defended}: training images {defended['training']}, pass images {defended['pass_images']}; "
        f"{args.none}: {none['training']}; work {out['ratio']:.2f}x")
  return out


if __name__ == "__main__":
  main()
