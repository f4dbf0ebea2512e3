"""Adversarial images per second of the clean-label PGD: abl_jax vs a plain PyTorch loop (if torch is installed).

  python benchmarks/pgd.py                      # ResNet-18, batch 256, L-inf 10 steps, all local devices
  python benchmarks/pgd.py --steps=100 --model=small_cnn --batch=512 --repeats=3

Both sides run the same PGD (L-inf eps 8/255, step 2/255, no random start, inference-mode BatchNorm,
summed cross-entropy) on the same random uint8 batch against an untrained CIFAR ResNet-18 (speed does
not depend on the weights). The JAX side is one data-parallel call per batch (compilation excluded); the
PyTorch side loops over steps with autograd on the default CUDA device, or on CPU. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
from abl_jax import models, train  # noqa: E402  pylint: disable=g-import-not-at-top
from abl_jax.attacks import pgd  # noqa: E402  pylint: disable=g-import-not-at-top

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def bench_jax(args, images: np.ndarray, labels: np.ndarray) -> float:
  """Adversarial images per second of abl_jax's data-parallel PGD."""
  model = models.create_model(args.model, 10)
  state = train.create_train_state(model, train.sgd(0.0, 0.9, 0.0), jax.random.PRNGKey(0), images.shape[1:])
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  attack = pgd.make_pgd(model, MEAN, STD, norm="linf", eps=8.0, step=2.0, steps=args.steps, random_start=False)
  run = lambda: pgd.perturb(attack, variables, images, labels, jax.random.PRNGKey(0), args.batch)
  run()  # Compile.
  t0 = time.perf_counter()
  for _ in range(args.repeats):
    run()
  return args.repeats * len(images) / (time.perf_counter() - t0)


def bench_torch(args, images: np.ndarray, labels: np.ndarray) -> tuple[float, str] | None:
  """The same PGD as a plain PyTorch loop; None when torch is not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  # Optional: not a dependency.
    from torch import nn
  except ImportError:
    return None
  device = "cuda" if torch.cuda.is_available() else "cpu"

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
      self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
      self.short = nn.Sequential()
      if stride != 1 or cin != cout:
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.b1(self.c1(x)))
      return torch.relu(self.b2(self.c2(y)) + self.short(x))

  layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
  for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
    layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
    cin = cout
  net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)).to(device).eval()
  for p in net.parameters():
    p.requires_grad_(False)
  mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
  x_all = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float()
  y_all = torch.from_numpy(labels.astype(np.int64)).to(device)
  loss_fn = nn.CrossEntropyLoss(reduction="sum")

  def attack(x, y):
    delta = torch.zeros_like(x)
    for _ in range(args.steps):
      delta.requires_grad_(True)
      loss = loss_fn(net(((x + delta) / 255.0 - mean) / std), y)
      (g,) = torch.autograd.grad(loss, delta)
      delta = (delta.detach() + 2.0 * g.sign()).clamp(-8.0, 8.0)
      delta = (x + delta).clamp(0, 255) - x
    return (x + delta).round().clamp(0, 255).to(torch.uint8).cpu()

  def run():
    for s in range(0, len(x_all), args.batch):
      attack(x_all[s:s + args.batch], y_all[s:s + args.batch])

  run()  # Warm-up (cuDNN autotuning).
  t0 = time.perf_counter()
  for _ in range(args.repeats):
    run()
  if device == "cuda":
    torch.cuda.synchronize()
  return args.repeats * len(images) / (time.perf_counter() - t0), f"torch {torch.__version__} on {device}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet18", help="resnet18, wrn16_1 or small_cnn (torch side: resnet18)")
  parser.add_argument("--batch", type=int, default=256, help="Images per PGD call (global batch).")
  parser.add_argument("--batches", type=int, default=2, help="Batches per timed pass.")
  parser.add_argument("--steps", type=int, default=10, help="PGD steps.")
  parser.add_argument("--repeats", type=int, default=1, help="Timed passes (after one warm-up pass).")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch * args.batches, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (len(images),)).astype(np.int32)
  out = {"model": args.model, "batch": args.batch, "steps": args.steps, "images": len(images),
         "jax_devices": [str(d) for d in jax.local_devices()], "jax": jax.__version__, "host": platform.node()}
  out["jax_images_per_s"] = round(bench_jax(args, images, labels), 2)
  torch_result = bench_torch(args, images, labels) if args.model == "resnet18" else None
  if torch_result is None:
    out["torch"] = "skipped: torch is not installed" if args.model == "resnet18" else "skipped: resnet18 only"
  else:
    out["torch_images_per_s"], out["torch"] = round(torch_result[0], 2), torch_result[1]
    out["jax_over_torch"] = round(out["jax_images_per_s"] / torch_result[0], 3)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
