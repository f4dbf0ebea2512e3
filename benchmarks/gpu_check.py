"""The one-command accelerator check: device and versions, ResNet-18 training images/s in bfloat16 and float32
(and PyTorch's, when torch is installed), isolation scoring examples/s over a CIFAR-10-sized set, and one short
ABL row against BadNets on the full 50,000-image training set; one JSON file and a few printed lines.

  python benchmarks/gpu_check.py --data=data/cifar10-jpeg.tar.gz --out=gpu_check.json   # on a GPU, < 8 min
  python benchmarks/gpu_check.py --tiny --out=/tmp/gpu_check.json                        # CPU, tiny sizes (tests)

Needs only the project, its wheels and the CIFAR-10 image folder or tar (no internet): copy the shared
`cifar10-jpeg.tar.gz` into the repository (an ignored folder such as data/) before running it on a lent
machine. The ABL row runs `configs/abl_badnets.py` (the default defense) with ResNet-18 and a short schedule
(--isolation_epochs, --gauge_epochs, --finetune_epochs, --unlearning_epochs) in a temporary workdir (or
--workdir), and reports its CA, ASR, isolation precision/recall and wall time per phase. Timing figures exclude compilation (reported apart).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
from abl_jax import xla_flags  # noqa: E402  pylint: disable=g-import-not-at-top

xla_flags.prefer_xla_cpu_convolutions()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from abl_jax import experiment  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import isolation, train_step  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import abl_badnets  # noqa: E402  pylint: disable=g-import-not-at-top


def environment() -> dict[str, Any]:
  """The devices and the versions that matter."""
  out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
         "jax": jax.__version__, "jaxlib": jax.lib.__version__, "backend": jax.default_backend(),
         "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()], "device_count": jax.device_count(),
         "xla_flags": os.environ.get("XLA_FLAGS", "")}
  for name in ("flax", "optax", "orbax.checkpoint", "torch"):
    if importlib.util.find_spec(name.split(".")[0]) is not None:
      module = __import__(name, fromlist=["__version__"])
      out[name] = getattr(module, "__version__", "?")
  if hasattr(os, "getloadavg"):
    out["load_average"] = [round(v, 2) for v in os.getloadavg()]
  return out


def training_speed(args: argparse.Namespace) -> dict[str, Any]:
  """Training images/s of the model in each dtype (and PyTorch's when installed), from benchmarks/train_step.py."""
  out = {}
  torch = ["--torch"] if importlib.util.find_spec("torch") is not None and not args.tiny else []
  for dtype in ("bfloat16", "float32"):
    argv = [f"--model={args.model}", f"--width={args.width}", f"--batch={args.batch}", f"--dtype={dtype}",
            f"--steps={args.steps}", f"--repeats={args.repeats}", "--warmup=1", *torch]
    r = train_step.main(argv)
    out[dtype] = {k: r[k] for k in r if k.startswith(("jax_", "torch_")) and not k.endswith("_all")}
  return out


def scoring_speed(args: argparse.Namespace) -> dict[str, Any]:
  """Isolation scoring (one inference pass per example) examples/s over `args.score_examples` random images."""
  iso_args = isolation.parser().parse_args([f"--model={args.model}", f"--width={args.width}"])
  score, _ = isolation.jax_scorer(iso_args)
  images, labels = train_step.random_batch(args.score_examples)
  t0 = time.perf_counter()
  score(images[:args.score_batch], labels[:args.score_batch], args.score_batch)  # Compilation.
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  score(images, labels, args.score_batch)
  seconds = time.perf_counter() - t0
  return {"examples": args.score_examples, "batch": args.score_batch, "compile_s": round(compile_s, 2),
          "seconds": round(seconds, 2), "examples_per_s": round(args.score_examples / seconds, 1)}


def abl_row(args: argparse.Namespace) -> dict[str, Any]:
  """One ABL run against BadNets (short schedule): CA, ASR, isolation and wall time per phase."""
  c = abl_badnets.get_config("smoke" if args.tiny else "")
  if not args.tiny:
    c.data.source, c.data.path = "folder", args.data
  c.model.name, c.model.width = args.model, args.width
  c.abl.isolation_epochs, c.abl.finetune_epochs = args.isolation_epochs, args.finetune_epochs
  c.abl.finetune_lr_boundaries = (max(args.finetune_epochs - 1, 1), 1000)
  c.abl.unlearning_epochs, c.abl.gauge_epochs = args.unlearning_epochs, args.gauge_epochs
  c.train.log_every_steps = 100
  workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
  t0 = time.perf_counter()
  try:
    r = experiment.train_and_evaluate(c, workdir, overwrite=True)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  iso = r["isolation"] or {}
  return {"config": "configs/abl_badnets.py" + (":smoke" if args.tiny else ""), "num_train": r["num_train"],
          "epochs": {"isolation": args.isolation_epochs, "gauge": args.gauge_epochs,
                     "finetune": args.finetune_epochs, "unlearning": args.unlearning_epochs},
          "clean_accuracy": r["clean_accuracy"], "attack_success_rate": r["attack_success_rate"],
          "isolation_precision": iso.get("precision"), "isolation_recall": iso.get("recall"),
          "wall_time_s": {k: round(v, 1) for k, v in r["wall_time"].items()},
          "total_s": round(time.perf_counter() - t0, 1)}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", default="data/cifar10-jpeg.tar.gz", help="CIFAR-10 image folder or .tar.gz of one.")
  p.add_argument("--out", default="gpu_check.json", help="Where to write the JSON.")
  p.add_argument("--tiny", action="store_true", help="Tiny sizes on synthetic data (CPU; what the tests run).")
  p.add_argument("--workdir", default="", help="Keep the ABL row's run here ('' = a temporary directory).")
  p.add_argument("--model", default="resnet18")
  p.add_argument("--width", type=int, default=0)
  p.add_argument("--batch", type=int, default=512, help="Training batch of the speed figures.")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--score_examples", type=int, default=50_000)
  p.add_argument("--score_batch", type=int, default=1000)
  p.add_argument("--isolation_epochs", type=int, default=3)
  p.add_argument("--finetune_epochs", type=int, default=5)
  p.add_argument("--gauge_epochs", type=int, default=2)
  p.add_argument("--unlearning_epochs", type=int, default=0)
  p.add_argument("--skip", default="", help="Comma-separated parts to skip: speed, scoring, abl.")
  return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parser().parse_args(argv)
  if args.tiny:
    # The smoke config's model: in a process that ran it (the tests), the ABL row reuses its compiled steps.
    args.model, args.width, args.batch, args.steps, args.repeats = "small_cnn", 8, 16, 2, 1
    args.score_examples, args.score_batch = 64, 32
    args.isolation_epochs, args.gauge_epochs, args.finetune_epochs, args.unlearning_epochs = 1, 1, 1, 0
  elif not os.path.exists(args.data):
    raise SystemExit(f"gpu_check: --data={args.data!r} does not exist; copy the CIFAR-10 image tar there "
                     "(this project's: ../shared/datasets/cifar10-jpeg.tar.gz)")
  skip = set(filter(None, args.skip.split(",")))
  out: dict[str, Any] = {"check": "gpu_check", "environment": environment()}
  print(f"gpu_check: {out['environment']['backend']} {out['environment']['devices']}, jax {jax.__version__}",
        flush=True)
  t0 = time.perf_counter()
  if "speed" not in skip:
    out["train_step"] = training_speed(args)
    for dtype, r in out["train_step"].items():
      torch = f", torch {r['torch_images_per_s']}" if "torch_images_per_s" in r else ""
      print(f"gpu_check: {args.model} training, batch {args.batch}, {dtype}: jax {r['jax_images_per_s']} "
            f"images/s{torch}", flush=True)
  if "scoring" not in skip:
    out["scoring"] = scoring_speed(args)
    print(f"gpu_check: isolation scoring {out['scoring']['examples_per_s']} examples/s over "
          f"{args.score_examples}", flush=True)
  if "abl" not in skip:
    out["abl_badnets"] = r = abl_row(args)
    print(f"gpu_check: ABL vs BadNets on {r['num_train']} images: CA {r['clean_accuracy']:.4f}, ASR "
          f"{r['attack_success_rate']:.4f}, isolation P {r['isolation_precision']} R {r['isolation_recall']}; "
          f"phases {r['wall_time_s']}", flush=True)
  out["total_s"] = round(time.perf_counter() - t0, 1)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"gpu_check: {out['total_s']} s in all; wrote {args.out}", flush=True)
  return out


if __name__ == "__main__":
  main()
