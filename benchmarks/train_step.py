"""Training images per second of one model and batch: abl_jax's data-parallel step, and PyTorch eager (--torch).

  python benchmarks/train_step.py --model=small_cnn --batch=256 --torch
  python benchmarks/train_step.py --model=resnet18 --batch=128 --steps=5 --repeats=3 --torch
  python benchmarks/train_step.py --model=small_cnn --part=forward --torch      # inference forward only
  XLA_FLAGS=--xla_cpu_use_thunk_runtime=false python benchmarks/train_step.py --impl=jit --torch

Both sides train the same architecture (same layers, widths, BatchNorm, bias-free convolutions) with
cross-entropy and SGD (momentum 0.9, L2 weight decay 5e-4 added to the gradient, as abl_jax's optimizer)
on one fixed random uint8 batch already in memory: data loading is not timed (benchmarks/pipeline.py
measures the time spent waiting for data). Both normalise the uint8 images inside the timed step, with
no augmentation unless --augment (JAX side only: its on-device crop and flip). Timing starts after
warm-up; the first call (compilation + one step) is reported separately, and compile_s is it less one
steady step. With --torch the two sides alternate, --repeats times, in this process, and the ratio is
the median of the per-repeat ratios (robust to a machine whose load changes). Prints one JSON line.

--part=step times the whole training step; grad forward + backward only (no optimizer update, both sides);
forward the inference forward pass (running BatchNorm statistics; the isolation scoring pass per image).
--part=convs times each of the model's convolutions alone (lax.conv_general_dilated NHWC/HWIO against
torch conv2d and aten.convolution_backward): forward, input gradient, weight gradient, in ms per step.
--impl=mesh (default) is abl_jax.train.make_train_step over a mesh of the local devices, the step every
training phase runs; --impl=jit is the same computation under a plain jax.jit on one device.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
from abl_jax import abl, models, train  # noqa: E402  pylint: disable=g-import-not-at-top

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MOMENTUM, WEIGHT_DECAY, LR = 0.9, 5e-4, 0.01
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def machine() -> dict[str, Any]:
  """Where and when a figure was taken: CPU model and cores, accelerators, load, date, versions."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  except OSError:
    pass
  return {"host": platform.node(), "cpu": cpu, "cpu_cores": os.cpu_count(),
          "jax_devices": sorted({f"{d.platform}:{getattr(d, 'device_kind', '')}" for d in jax.local_devices()}),
          "jax_device_count": jax.local_device_count(), "jax": jax.__version__, "python": platform.python_version(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def finish(out: dict[str, Any]) -> None:
  """Adds the load at the end of the run and prints the figure line."""
  out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  print(json.dumps(out), flush=True)


def random_batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """n random uint8 CIFAR-shaped images and labels (speed does not depend on the pixels)."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, (n,)).astype(np.int32)


def param_count(tree: Any) -> int:
  """Number of scalars in a pytree of arrays."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------- JAX


def jax_runner(args: argparse.Namespace, images: np.ndarray, labels: np.ndarray) -> tuple[Callable[[int], None], dict]:
  """A function running n steps of the JAX side (blocking at the end), and facts about it."""
  n_dev = jax.local_device_count() if args.impl == "mesh" else 1
  if args.batch % n_dev:
    raise ValueError(f"--batch={args.batch} must be a multiple of the {n_dev} local devices")
  dtype = DTYPES[args.dtype]
  model = models.create_model(args.model, 10, args.width, dtype=dtype)
  tx = train.sgd(LR, MOMENTUM, WEIGHT_DECAY)
  state = train.create_train_state(model, tx, jax.random.PRNGKey(0), images.shape[1:])
  info = {"jax_params": param_count(state.params)}
  key = jax.random.PRNGKey(1)

  if args.impl == "mesh":
    mesh = train.make_mesh(jax.local_devices())
    if args.part == "forward":
      fn = train._infer_step(model, MEAN, STD, mesh)  # What train.predictor runs per batch.
      state = {"params": state.params, "batch_stats": state.batch_stats}
    elif args.part == "step":
      fn = train.make_train_step(model, abl.cross_entropy_loss, MEAN, STD, momentum=MOMENTUM,
                                 weight_decay=WEIGHT_DECAY, augment_data=args.augment, mesh=mesh)
    else:
      raise ValueError("--part=grad needs --impl=jit")
    state = train.replicate(state, mesh)
    x, y = train.put_batch(images, mesh), train.put_batch(labels, mesh)
    keys = (train.replicate(key, mesh), train.replicate(np.float32(LR), mesh))  # The step's key and rate.
  else:
    fn = _jit_fn(model, args.part, args.augment)
    x, y, keys = jax.device_put(images), jax.device_put(labels), (key,)

  holder = {"state": state}

  def run(n: int) -> None:
    out = None
    for _ in range(n):
      if args.part in ("forward", "grad"):
        out = fn(holder["state"], x, y)
      else:
        holder["state"], out = fn(holder["state"], x, y, *keys)
    jax.block_until_ready((out, holder["state"]))

  run.lower = lambda: fn.lower(holder["state"], x, y, *(() if args.part in ("forward", "grad") else keys))
  return run, info


def _jit_fn(model: Any, part: str, augment_data: bool) -> Callable:
  """The train step (or its forward / forward+backward part) under jax.jit on one device."""

  def loss_of(params, state, x, labels):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.mean(ce), (logits, ce, updates["batch_stats"])

  def prep(images, key):
    if augment_data:
      images = train.augment(images, jax.random.split(key, images.shape[0]))
    return train.preprocess(images, MEAN, STD)

  if part == "forward":
    def forward(state, images, labels):
      logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                           train.preprocess(images, MEAN, STD), train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels), jnp.argmax(logits, -1)
    return jax.jit(forward)

  if part == "grad":
    def grad(state, images, labels):
      return jax.grad(lambda p: loss_of(p, state, train.preprocess(images, MEAN, STD), labels)[0])(state.params)
    return jax.jit(grad)

  def step(state, images, labels, key):
    (loss, (logits, ce, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(
        state.params, state, prep(images, key), labels)
    metrics = {"loss": loss, "ce": jnp.mean(ce), "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics
  return jax.jit(step, donate_argnums=(0,))


# -------------------------------------------------------------------------------------------- PyTorch


def torch_model(name: str, width: int = 0) -> Any:
  """The PyTorch twin of models.create_model(name, 10, width): same layers, widths and BatchNorm."""
  import torch  # pylint: disable=g-import-not-at-top  # Optional: a benchmark dependency only.
  from torch import nn  # pylint: disable=g-import-not-at-top

  def conv(cin, cout, k=3, stride=1):
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)

  class Basic(nn.Module):
    """ResNet-18's post-activation block."""

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.c1, self.b1, self.c2, self.b2 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout), conv(cout, cout), nn.BatchNorm2d(cout)
      self.short = nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None

    def forward(self, x):
      y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
      return torch.relu(y + (x if self.short is None else self.short(x)))

  class Wide(nn.Module):
    """WRN's pre-activation block; a changed width takes the shortcut from BN-ReLU(x)."""

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.b1, self.c1, self.b2, self.c2 = nn.BatchNorm2d(cin), conv(cin, cout, 3, stride), nn.BatchNorm2d(cout), conv(cout, cout)
      self.short = conv(cin, cout, 1, stride) if cin != cout else None

    def forward(self, x):
      o = torch.relu(self.b1(x))
      y = self.c2(torch.relu(self.b2(self.c1(o))))
      return y + (x if self.short is None else self.short(o))

  head = lambda c: [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
  if name == "resnet18":
    w = width or 64
    layers, cin = [conv(3, w), nn.BatchNorm2d(w), nn.ReLU()], w
    for i, stride in enumerate((1, 2, 2, 2)):
      layers += [Basic(cin, w * 2**i, stride), Basic(w * 2**i, w * 2**i, 1)]
      cin = w * 2**i
    return nn.Sequential(*layers, *head(cin))
  if name == "wrn16_1":
    layers, cin = [conv(3, 16)], 16
    for i, stride in enumerate((1, 2, 2)):
      layers += [Wide(cin, 16 * 2**i, stride), Wide(16 * 2**i, 16 * 2**i, 1)]
      cin = 16 * 2**i
    return nn.Sequential(*layers, nn.BatchNorm2d(cin), nn.ReLU(), *head(cin))
  if name == "small_cnn":
    w, layers, cin = width or 16, [], 3
    for f in (w, 2 * w, 4 * w):
      for _ in range(2):
        layers += [conv(cin, f), nn.BatchNorm2d(f), nn.ReLU()]
        cin = f
      layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, *head(cin))
  if name == "airbench":
    return _torch_airbench(width or 64)
  raise ValueError(f"unknown model {name!r}; allowed: {', '.join(models.MODELS)}")


def _torch_airbench(width: int) -> Any:
  """The PyTorch twin of models.Airbench (identity whitening filters, a buffer: not a parameter)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class ConvBN(nn.Module):
    def __init__(self, cin, cout, pool):
      super().__init__()
      self.conv, self.pool = nn.Conv2d(cin, cout, 3, 1, 1, bias=False), pool
      self.norm, self.bias = nn.BatchNorm2d(cout, affine=False), nn.Parameter(torch.zeros(cout))

    def forward(self, x):
      x = self.conv(x)
      x = nn.functional.max_pool2d(x, 2) if self.pool else x
      return nn.functional.gelu(self.norm(x) + 8.0 * self.bias[:, None, None], approximate="tanh")

  class Airbench(nn.Module):
    def __init__(self):
      super().__init__()
      self.register_buffer("whitening", torch.eye(12).reshape(12, 2, 2, 3).permute(0, 3, 1, 2).contiguous())
      self.whitening_bias = nn.Parameter(torch.zeros(24))
      groups, cin = [], 24
      for f in (width, 4 * width, 4 * width):
        groups += [ConvBN(cin, f, True), ConvBN(f, f, False)]
        cin = f
      self.groups, self.fc = nn.Sequential(*groups), nn.Linear(cin, 10, bias=False)

    def forward(self, x):
      y = nn.functional.conv2d(x, self.whitening)
      x = nn.functional.gelu(torch.cat([y, -y], 1) + self.whitening_bias[:, None, None], approximate="tanh")
      return self.fc(torch.amax(self.groups(x), dim=(2, 3))) / 9.0

  return Airbench()


def torch_runner(args: argparse.Namespace, images: np.ndarray, labels: np.ndarray) -> tuple[Callable[[int], None], dict]:
  """A function running n steps of the PyTorch eager side (CPU, or the default CUDA device), and facts."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  layout = torch.channels_last if args.torch_layout == "channels_last" else torch.contiguous_format
  net = torch_model(args.model, args.width).to(device).to(memory_format=layout)
  opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
  x_u8 = torch.from_numpy(images).to(device)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def prep():  # uint8 NHWC -> normalised float NCHW (logical), in the requested memory format.
    x = x_u8.permute(0, 3, 1, 2).float().div(255.0).sub(mean).div(std)
    return x.contiguous(memory_format=layout)

  def one():
    if args.part == "forward":
      net.eval()
      with torch.inference_mode(), autocast():
        logits = net(prep())
        return F.cross_entropy(logits.float(), y, reduction="none"), logits.argmax(1)
    net.train()
    with autocast():
      logits = net(prep())
      loss = F.cross_entropy(logits.float(), y)
    if args.part == "grad":
      net.zero_grad(set_to_none=True)
      loss.backward()
      return loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), (logits.argmax(1) == y).float().mean()

  def run(n: int) -> None:
    for _ in range(n):
      one()
    if device == "cuda":
      torch.cuda.synchronize()

  info = {"torch": torch.__version__, "torch_device": device, "torch_threads": torch.get_num_threads(),
          "torch_layout": args.torch_layout, "torch_mkldnn": bool(torch.backends.mkldnn.is_available()
                                                                  and torch.backends.mkldnn.enabled),
          "torch_params": sum(p.numel() for p in net.parameters())}
  return run, info


# ------------------------------------------------------------------------- per-convolution breakdown


def conv_shapes(model_name: str, width: int, batch: int) -> list[tuple]:
  """(input NHWC shape, kernel HWIO shape, stride) of every convolution in the model, in call order."""
  import flax.linen as fnn  # pylint: disable=g-import-not-at-top
  model = models.create_model(model_name, 10, width)
  found = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, fnn.Conv) and context.method_name == "__call__":
      x = args[0]
      kernel = (*module.kernel_size, x.shape[-1], module.features)
      strides = module.strides if isinstance(module.strides, tuple) else (module.strides or 1,) * 2
      found.append((tuple(x.shape), kernel, int(strides[0])))
    return next_fun(*args, **kwargs)

  with fnn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, 32, 32, 3)), train=False))
  return found


def conv_breakdown(args: argparse.Namespace) -> dict[str, Any]:
  """Seconds per step of each convolution's forward, input gradient and weight gradient, per side."""
  shapes = conv_shapes(args.model, args.width, args.batch)
  rng = np.random.default_rng(0)
  jobs = {}  # (side, part) -> list of zero-argument callables, one per convolution.
  for x_shape, k_shape, stride in shapes:
    x = rng.standard_normal(x_shape, dtype=np.float32)
    k = rng.standard_normal(k_shape, dtype=np.float32) * 0.1
    pad = k_shape[0] // 2
    conv = lambda a, b, s=stride, p=pad: jax.lax.conv_general_dilated(
        a, b, (s, s), [(p, p), (p, p)], dimension_numbers=("NHWC", "HWIO", "NHWC"))
    xj, kj = jax.device_put(x), jax.device_put(k)
    y, vjp = jax.vjp(conv, xj, kj)
    gy = jnp.ones_like(y)
    fwd = jax.jit(conv)
    dx = jax.jit(lambda a, b, g, c=conv: jax.vjp(lambda u: c(u, b), a)[1](g)[0])
    dw = jax.jit(lambda a, b, g, c=conv: jax.vjp(lambda v: c(a, v), b)[1](g)[0])
    jobs.setdefault(("jax", "forward"), []).append(lambda f=fwd, a=xj, b=kj: f(a, b).block_until_ready())
    jobs.setdefault(("jax", "input_grad"), []).append(lambda f=dx, a=xj, b=kj, g=gy: f(a, b, g).block_until_ready())
    jobs.setdefault(("jax", "weight_grad"), []).append(lambda f=dw, a=xj, b=kj, g=gy: f(a, b, g).block_until_ready())
    if args.torch:
      import torch  # pylint: disable=g-import-not-at-top
      layout = torch.channels_last if args.torch_layout == "channels_last" else torch.contiguous_format
      xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=layout)
      kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous(memory_format=layout)
      gt = torch.ones(tuple(y.shape[i] for i in (0, 3, 1, 2))).contiguous(memory_format=layout)
      back = lambda mask, a=xt, b=kt, g=gt, s=stride, p=pad: torch.ops.aten.convolution_backward(
          g, a, b, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask)
      tf = lambda a=xt, b=kt, s=stride, p=pad: torch.nn.functional.conv2d(a, b, None, s, p)
      jobs.setdefault(("torch", "forward"), []).append(tf)
      jobs.setdefault(("torch", "input_grad"), []).append(lambda f=back: f([True, False, False]))
      jobs.setdefault(("torch", "weight_grad"), []).append(lambda f=back: f([False, True, False]))
  for fns in jobs.values():  # Compile and warm up.
    for fn in fns:
      fn()
      fn()
  seconds = {key: [0.0] * len(fns) for key, fns in jobs.items()}
  for _ in range(args.repeats):  # The sides alternate, convolution by convolution.
    for i in range(len(shapes)):
      for key, fns in jobs.items():
        t0 = time.perf_counter()
        for _ in range(args.steps):
          fns[i]()
        seconds[key][i] += (time.perf_counter() - t0) / (args.steps * args.repeats)
  out = {"convs": [f"{x[1]}x{x[2]}x{x[3]}->{k[3]}/s{s}" for x, k, s in shapes]}
  for (side, part), secs in seconds.items():
    out[f"{side}_{part}_ms"] = [round(1e3 * v, 2) for v in secs]
    out[f"{side}_{part}_ms_total"] = round(1e3 * sum(secs), 1)
  if args.torch:
    for part in ("forward", "input_grad", "weight_grad"):
      out[f"jax_over_torch_{part}"] = round(out[f"torch_{part}_ms_total"] / out[f"jax_{part}_ms_total"], 3)
  return out


# ------------------------------------------------------------------------------------------------ main


def timed(run: Callable[[int], None], steps: int) -> float:
  """Seconds for `steps` steps."""
  t0 = time.perf_counter()
  run(steps)
  return time.perf_counter() - t0


def parser() -> argparse.ArgumentParser:
  """The command-line flags (shared with the tests)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="resnet18", choices=models.MODELS)
  p.add_argument("--width", type=int, default=0, help="Base width; 0 = the model's default.")
  p.add_argument("--batch", type=int, default=128, help="Global batch (split over the local devices).")
  p.add_argument("--steps", type=int, default=10, help="Timed steps per repeat and side.")
  p.add_argument("--repeats", type=int, default=3, help="Timed blocks per side (alternating with --torch).")
  p.add_argument("--warmup", type=int, default=2, help="Untimed steps after the first call, per side.")
  p.add_argument("--part", default="step", choices=("step", "grad", "forward", "convs"),
                 help="convs: time each convolution's forward, input and weight gradient alone (float32).")
  p.add_argument("--impl", default="mesh", choices=("mesh", "jit"))
  p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="Compute dtype (torch: autocast).")
  p.add_argument("--augment", action="store_true", help="JAX side only: on-device crop + flip in the step.")
  p.add_argument("--torch", action="store_true", help="Also time PyTorch eager (needs torch installed).")
  p.add_argument("--torch_layout", default="nchw", choices=("nchw", "channels_last"))
  p.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default.")
  p.add_argument("--no_jax", action="store_true", help="Time the PyTorch side only.")
  return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark and prints (and returns) its figure line."""
  args = parser().parse_args(argv)
  images, labels = random_batch(args.batch)
  out = {"benchmark": "train_step", "model": args.model, "width": args.width, "batch": args.batch,
         "part": args.part, "impl": args.impl, "dtype": args.dtype, "augment": args.augment,
         "steps": args.steps, "repeats": args.repeats, **machine()}
  if args.part == "convs":
    out.update(conv_breakdown(args))
    finish(out)
    return out
  sides = {}
  if not args.no_jax:
    sides["jax"] = jax_runner(args, images, labels)
  if args.torch:
    sides["torch"] = torch_runner(args, images, labels)
  for name, (run, info) in sides.items():
    out.update(info)
    out[f"{name}_first_call_s"] = round(timed(run, 1), 3)  # JAX: compilation + one step.
    run(args.warmup)
  rates = {name: [] for name in sides}
  for _ in range(args.repeats):
    for name, (run, _) in sides.items():
      rates[name].append(args.steps * args.batch / timed(run, args.steps))
  for name, r in rates.items():
    out[f"{name}_images_per_s"] = round(statistics.median(r), 1)
    out[f"{name}_images_per_s_all"] = [round(v, 1) for v in r]
    out[f"{name}_compile_s"] = round(max(out[f"{name}_first_call_s"] - args.batch / statistics.median(r), 0.0), 3)
  if len(rates) == 2:
    out["jax_over_torch"] = round(statistics.median(j / t for j, t in zip(rates["jax"], rates["torch"])), 3)
  finish(out)
  return out


if __name__ == "__main__":
  main()
