"""Examples per second of ABL's isolation scoring pass: abl_jax's batched pass against batch-size-1 loops.

  python benchmarks/isolation.py --model=small_cnn --torch                   # 50,000 examples, batch 500
  python benchmarks/isolation.py --model=resnet18 --examples=5000 --single=100 --torch

The pass scores every training example with the isolation model (per-example cross-entropy,
inference-mode BatchNorm) so that the lowest losses can be isolated. Timed here on random uint8
CIFAR-shaped images (speed does not depend on the pixels or weights), after a warm-up call that
compiles (its time is reported apart):
- jax_batched: abl_jax.train.predictor, as the ABL run scores the training set
  (config.train.eval_batch_size, default 500), over all --examples;
- jax_batch1: the same predict with one example per device per call (our own per-example loop);
- torch_batch1 (--torch): the reference's loop (bboylyg/ABL scores each example with batch size 1 and
  calls loss.item() on each), PyTorch eager, model and loss only: the reference's DataLoader and
  per-image transforms are not timed, so this flatters it;
- torch_batched (--torch): PyTorch eager in batches of --batch, for comparison.
The batch-1 loops and torch_batched are timed on a subset (--single, --torch_examples) and their
rate is extrapolated to --examples (reported as *_seconds_extrapolated). The measurements alternate
in --rounds rounds, each taking its share of every measurement, so that a change of machine load
falls on all of them. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
from abl_jax import models, train  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import train_step as ts  # noqa: E402  pylint: disable=g-import-not-at-top


def jax_scorer(args: argparse.Namespace) -> tuple[Callable[[np.ndarray, np.ndarray, int], None], dict]:
  """predict(images, labels, batch_size) with abl_jax's train.predictor (as isolation runs it), and facts about it."""
  model = models.create_model(args.model, 10, args.width, dtype=ts.DTYPES[args.dtype])
  state = train.create_train_state(model, train.sgd(0.0, 0.9, 0.0), jax.random.PRNGKey(0), (32, 32, 3))

  def score(images: np.ndarray, labels: np.ndarray, batch_size: int) -> None:
    # Returns host arrays: finished. The predictor is built per call, as each isolation pass builds one.
    train.predictor(model, train.variables_of(state), ts.MEAN, ts.STD, batch_size)(images, labels)

  return score, {"jax_params": ts.param_count(state.params)}


def torch_scorer(args: argparse.Namespace) -> tuple[Callable[[np.ndarray, np.ndarray, int], None], dict]:
  """The same scoring in PyTorch eager: batch_size 1 is the reference's loop (one .item() per example)."""
  import torch  # pylint: disable=g-import-not-at-top  # Optional: a benchmark dependency only.
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  net = ts.torch_model(args.model, args.width).to(device).eval()
  mean = torch.tensor(ts.MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(ts.STD, device=device).view(1, 3, 1, 1)

  def score(images: np.ndarray, labels: np.ndarray, batch_size: int) -> None:
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    losses = []
    with torch.inference_mode():
      for s in range(0, len(images), batch_size):
        x = x_all[s:s + batch_size].to(device).permute(0, 3, 1, 2).float().div(255.0).sub(mean).div(std)
        ce = F.cross_entropy(net(x), y_all[s:s + batch_size].to(device), reduction="none")
        if batch_size == 1:
          losses.append(ce.item())  # As the reference: a Python float per example.
        else:
          losses.append(ce.cpu())

  return score, {"torch": torch.__version__, "torch_device": device, "torch_threads": torch.get_num_threads(),
                 "torch_params": sum(p.numel() for p in net.parameters())}


def parser() -> argparse.ArgumentParser:
  """The command-line flags."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="resnet18", choices=models.MODELS)
  p.add_argument("--width", type=int, default=0, help="Base width; 0 = the model's default.")
  p.add_argument("--dtype", default="float32", choices=tuple(ts.DTYPES), help="JAX compute dtype.")
  p.add_argument("--examples", type=int, default=50_000, help="Size of the scored set (CIFAR-10's training set).")
  p.add_argument("--batch", type=int, default=500, help="Batch of the batched passes (config.train.eval_batch_size).")
  p.add_argument("--single", type=int, default=500, help="Examples timed in each batch-1 loop (extrapolated).")
  p.add_argument("--torch_examples", type=int, default=5000, help="Examples timed in torch's batched pass.")
  p.add_argument("--rounds", type=int, default=2, help="Alternating rounds the measurements are split into.")
  p.add_argument("--torch", action="store_true", help="Also time PyTorch eager (needs torch installed).")
  return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark and prints (and returns) its figure line."""
  args = parser().parse_args(argv)
  n_dev = jax.local_device_count()
  unit = args.batch * args.rounds  # Every round scores whole batches.
  examples = max(unit, args.examples // unit * unit)
  images, labels = ts.random_batch(examples)
  out = {"benchmark": "isolation", "model": args.model, "width": args.width, "dtype": args.dtype,
         "examples": examples, "batch": args.batch, "rounds": args.rounds, **ts.machine()}
  jax_score, info = jax_scorer(args)
  out.update(info)
  # name -> (score function, batch size, examples timed)
  plan = {"jax_batched": (jax_score, args.batch, examples), "jax_batch1": (jax_score, n_dev, args.single)}
  if args.torch:
    torch_score, info = torch_scorer(args)
    out.update(info)
    plan["torch_batch1"] = (torch_score, 1, args.single)
    plan["torch_batched"] = (torch_score, args.batch, min(args.torch_examples, examples))
  for name, (score, batch, _) in plan.items():  # Warm-up: compilation for JAX.
    t0 = time.perf_counter()
    score(images[:batch], labels[:batch], batch)
    out[f"{name}_first_call_s"] = round(time.perf_counter() - t0, 3)
  seconds = dict.fromkeys(plan, 0.0)
  counts = dict.fromkeys(plan, 0)
  for r in range(args.rounds):
    for name, (score, batch, total) in plan.items():
      share = total // args.rounds // batch * batch or batch
      start = r * share % max(examples - share + 1, 1)
      t0 = time.perf_counter()
      score(images[start:start + share], labels[start:start + share], batch)
      seconds[name] += time.perf_counter() - t0
      counts[name] += share
  for name in plan:
    rate = counts[name] / seconds[name]
    out[f"{name}_examples_timed"] = counts[name]
    out[f"{name}_examples_per_s"] = round(rate, 1)
    key = "seconds" if counts[name] >= examples else "seconds_extrapolated"
    out[f"{name}_{key}"] = round(examples / rate, 1)
  reference = "torch_batch1" if args.torch else "jax_batch1"
  out["speedup_over"] = reference
  out["jax_batched_speedup"] = round(out["jax_batched_examples_per_s"] / out[f"{reference}_examples_per_s"], 1)
  ts.finish(out)
  return out


if __name__ == "__main__":
  main()
