"""Where a training step's time goes, by layer kind and direction: JAX (XLA CPU profile) against PyTorch eager.

  taskset -c 0 python benchmarks/step_profile.py --model=small_cnn --batch=256 --torch
  python benchmarks/step_profile.py --model=resnet18 --batch=64 --steps=3

JAX: the step of benchmarks/train_step.py --impl=jit (abl_jax's train step on one device) runs
--steps times under jax.profiler after warm-up; each XLA thunk in the trace is an instruction of the
compiled module, grouped by the JAX name stack in its op_name metadata: '<conv|batchnorm|relu|maxpool|
dense|loss|model other> <forward|backward>' ('backward' under transpose(...)), 'update & rest' outside
the model (optimizer, metrics, input normalisation), 'layout copies' (the transposes XLA inserts, mostly
for the gradient convolutions). Instructions without an op_name take their users' group (a weight-gradient
convolution XLA rewrote is 'conv backward'; the index iotas and argmax reduce-window XLA builds for a
reduce_window gradient are 'maxpool backward'). PyTorch: the same architecture's step
(train_step.torch_runner) under torch.profiler, self CPU time of each aten operator, grouped by name the
same way. With several threads thunks overlap, so the per-group sums can exceed the step time: profile on
one core (taskset -c 0). Prints one JSON line: ms per step by group on each side and the top entries;
keeps whatever XLA_FLAGS says (like train_step.py).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from benchmarks import train_step as ts  # noqa: E402  pylint: disable=g-import-not-at-top

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Component of the model an XLA operation was traced from, by its op_name (the JAX name stack), in order.
_COMPONENTS = (("conv", ("conv_general_dilated",)), ("batchnorm", ("BatchNorm",)),
               ("loss", ("take_along_axis", "log_softmax", "logsumexp", "softmax")),
               ("maxpool", ("max_pool", "reduce_window", "select_and_scatter", "reduce_max")),
               ("relu", ("relu", "select_n", "/gt")), ("dense", ("Dense", "dot_general")))


def group_of(op_name: str) -> str:
  """'<component> <forward|backward>' of an op_name; 'update & rest' outside the model and the loss."""
  direction = "backward" if "transpose(" in op_name else "forward"
  for component, keys in _COMPONENTS:
    if any(k in op_name for k in keys):
      return f"{component} {direction}"
  return f"model other {direction}" if "jvp(" in op_name else "update & rest"


def hlo_groups(hlo_text: str) -> dict[str, str]:
  """Each instruction of the entry computation -> the group of its op_name (or of its fusion's, or users')."""
  computations: dict[str, list[tuple[str, str]]] = {}
  current, entry = None, None
  for line in hlo_text.splitlines():
    header = re.match(r"^\s*(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
    if header:
      current = header.group(2)
      entry = current if header.group(1) else entry
      computations[current] = []
    elif current is not None and (m := _INSTR.match(line)):
      computations[current].append((m.group(1), m.group(2)))
  first_name = {}
  for comp, instrs in computations.items():
    first_name[comp] = next((n.group(1) for _, body in instrs if (n := _OP_NAME.search(body))), None)
  groups: dict[str, str] = {}
  users: dict[str, list[str]] = collections.defaultdict(list)
  for name, body in computations.get(entry, []):
    if re.match(r"(copy|transpose)[.\w-]*$|transpose_copy_fusion", name):
      groups[name] = "layout copies"  # Operand transposes XLA adds (mostly for the gradient convolutions).
      continue
    op = _OP_NAME.search(body)
    op_name = op.group(1) if op else next((first_name[c] for c in _CALLS.findall(body) if first_name.get(c)), None)
    if op_name:
      groups[name] = group_of(op_name)
    for operand in _OPERAND.findall(body.split("metadata=")[0]):
      users[operand].append(name)
  for name, body in computations.get(entry, []):
    if name not in groups and re.search(r"\bconvolution\(", body):
      groups[name] = "conv backward"  # A gradient convolution XLA rewrote (no op_name).
  changed = True
  while changed:  # Index iotas, zero broadcasts, argmax reduce-windows carry no op_name: group them by their users.
    changed = False
    for name, _ in computations.get(entry, []):
      inherited = None if name in groups else next((groups[u] for u in users.get(name, []) if u in groups), None)
      if inherited:
        groups[name], changed = inherited, True
  return {name: groups.get(name, "unattributed") for name, _ in computations.get(entry, [])}


def _thunk_times(trace_dir: str, names: set[str]) -> dict[str, float]:
  """Total microseconds per HLO instruction name over the profiled steps."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  total: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and e.get("name") in names:
      total[e["name"]] += float(e.get("dur", 0.0))
  return total


def profile_groups(run: Callable[[int], None], hlo_text: str, steps: int) -> tuple[dict[str, float], dict[str, float]]:
  """Runs `run(steps)` under jax.profiler: (ms per step by group, ms per step by instruction) of the module."""
  groups = hlo_groups(hlo_text)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    run(steps)
    jax.profiler.stop_trace()
    times = {name: us / 1e3 / steps for name, us in _thunk_times(trace_dir, set(groups)).items()}
  by_group: dict[str, float] = collections.defaultdict(float)
  for name, ms in times.items():
    by_group[groups[name]] += ms
  return dict(by_group), times


def _ranked(ms: dict[str, float]) -> dict[str, float]:
  return {k: round(v, 2) for k, v in sorted(ms.items(), key=lambda kv: -kv[1])}


def profile_jax(args: argparse.Namespace, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """ms per step by group, and the heaviest instructions, of the jitted train step."""
  args.impl, args.part = "jit", "step"
  run, _ = ts.jax_runner(args, images, labels)
  run(1 + args.warmup)
  hlo = run.lower().compile().as_text()  # The runner's own executable (cached): its instruction names.
  by_group, times = profile_groups(run, hlo, args.steps)
  groups = hlo_groups(hlo)
  top = sorted(times.items(), key=lambda kv: -kv[1])[:args.top]
  return {"jax_ms_per_step_by_group": _ranked(by_group), "jax_ms_per_step_profiled": round(sum(times.values()), 2),
          "jax_top": [[name, groups[name], round(ms, 2)] for name, ms in top]}


_TORCH_GROUPS = (("conv backward", ("convolution_backward",)), ("conv forward", ("convolution",)),
                 ("batchnorm backward", ("batch_norm_backward",)), ("batchnorm forward", ("batch_norm",)),
                 ("maxpool backward", ("max_pool2d_with_indices_backward",)), ("maxpool forward", ("max_pool",)),
                 ("relu backward", ("threshold_backward",)), ("relu forward", ("relu", "clamp_min")),
                 ("dense forward", ("addmm", "aten::mm", "aten::linear")),
                 ("loss forward", ("log_softmax", "nll_loss")))


def torch_group(op: str) -> str:
  """The group of a leaf aten operator, named as group_of names XLA's (loss gradients under 'loss forward')."""
  return next((g for g, keys in _TORCH_GROUPS if any(k in op for k in keys)), "update & rest")


def profile_torch(args: argparse.Namespace, images, labels) -> dict[str, Any]:
  """ms per step by group (self CPU time of the leaf aten operators) of the PyTorch eager step."""
  import torch  # pylint: disable=g-import-not-at-top
  args.part = "step"
  run, _ = ts.torch_runner(args, images, labels)
  run(1 + args.warmup)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    run(args.steps)
  by_group: dict[str, float] = collections.defaultdict(float)
  rows = []
  for avg in prof.key_averages():
    ms = avg.self_cpu_time_total / 1e3 / args.steps
    by_group[torch_group(avg.key)] += ms
    rows.append((avg.key, torch_group(avg.key), round(ms, 2)))
  rows.sort(key=lambda r: -r[2])
  return {"torch_ms_per_step_by_group": _ranked(by_group),
          "torch_ms_per_step_profiled": round(sum(by_group.values()), 2),
          "torch_top": [list(r) for r in rows[:args.top]]}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="small_cnn", choices=ts.models.MODELS)
  p.add_argument("--width", type=int, default=0, help="Base width; 0 = the model's default.")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--steps", type=int, default=5, help="Profiled steps per side.")
  p.add_argument("--warmup", type=int, default=2, help="Untimed steps after the first call, per side.")
  p.add_argument("--dtype", default="float32", choices=tuple(ts.DTYPES))
  p.add_argument("--top", type=int, default=8, help="How many of the heaviest instructions / operators to list.")
  p.add_argument("--torch", action="store_true", help="Also profile PyTorch eager (needs torch installed).")
  p.add_argument("--torch_layout", default="nchw", choices=("nchw", "channels_last"))
  p.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default.")
  return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parser().parse_args(argv)
  args.augment = False
  images, labels = ts.random_batch(args.batch)
  out = {"benchmark": "step_profile", "model": args.model, "batch": args.batch, "steps": args.steps,
         **ts.machine()}
  out.update(profile_jax(args, images, labels))
  if args.torch:
    out.update(profile_torch(args, images, labels))
  ts.finish(out)
  return out


if __name__ == "__main__":
  main()
