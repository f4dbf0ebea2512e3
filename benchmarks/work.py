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
from abl_jax import cost  # noqa: E402  pylint: disable=g-import-not-at-top

def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("defended", help="A finished defense run's workdir.")
  parser.add_argument("none", help="The same setting's finished run without defense.")
  parser.add_argument("--gauge_step", type=float, default=cost.GAUGE_STEP,
                      help="A downsampled gauge step's cost against a full one (gauge_downsample > 1 only).")
  parser.add_argument("--pass_image", type=float, default=cost.PASS_IMAGE,
                      help="An inference pass image's cost against a training image.")
  args = parser.parse_args(argv)
  for value, flag in ((args.gauge_step, "--gauge_step"), (args.pass_image, "--pass_image")):
    if not 0 < value <= 1:
      parser.error(f"{flag}={value} must be in (0, 1]")
  for run_dir in (args.defended, args.none):
    for name in ("config.json", "results.json", "metrics.jsonl"):
      if not os.path.exists(os.path.join(run_dir, name)):
        parser.error(f"{run_dir}/{name} is missing; give two finished runs' workdirs")
  defended = cost.work(args.defended, args.gauge_step, args.pass_image)
  none = cost.work(args.none, 1.0, args.pass_image)
  out = {"defended": defended, "none": none, "ratio": defended["total"] / none["total"]}
  print(f"{args.defended}: training images {defended['training']}, pass images {defended['pass_images']}; "
        f"{args.none}: {none['training']}; work {out['ratio']:.2f}x")
  return out


if __name__ == "__main__":
  main()
