"""BatchNorm on XLA's CPU backend: flax's nn.BatchNorm against abl_jax.models.batch_norm, and the per-channel sum.

    taskset -c 0 python benchmarks/batch_norm.py --shape=256,32,32,16

Times, in one process and alternating: the per-channel sum of an [N, H, W, C] tensor over its first three axes
(jnp.sum) and over the wide view `batch_norm.channel_sum` takes; and one training-mode BatchNorm forward +
backward (a smooth loss on its output) with each module. Prints one JSON line (ms per call, medians of
`--repeats` blocks of `--calls` calls) with the machine, load and versions.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from abl_jax.models import batch_norm  # noqa: E402
from benchmarks.train_step import finish, machine  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="256,32,32,16", help="N,H,W,C of the activations")
  p.add_argument("--calls", type=int, default=20, help="calls per timed block")
  p.add_argument("--repeats", type=int, default=3, help="timed blocks per function (the median is reported)")
  args = p.parse_args(argv)
  shape = tuple(int(s) for s in args.shape.split(","))
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 2 + 0.5
  w = jax.random.normal(jax.random.PRNGKey(1), shape)

  def bn_step(module):
    variables = module.init(jax.random.PRNGKey(2), x, use_running_average=False)

    def loss(params, x):
      y, _ = module.apply({**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"])
      return jnp.sum(jnp.tanh(y) * w)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: grad(variables["params"], x)

  fns = {
      "sum_leading_axes": functools.partial(jax.jit(lambda v: jnp.sum(v, axis=(0, 1, 2))), x),
      "channel_sum": functools.partial(jax.jit(batch_norm.channel_sum), x),
      "flax_batch_norm_fwd_bwd": bn_step(nn.BatchNorm(momentum=0.9, epsilon=1e-5)),
      "abl_jax_batch_norm_fwd_bwd": bn_step(batch_norm.BatchNorm(momentum=0.9, epsilon=1e-5)),
  }
  out = {"benchmark": "batch_norm", "shape": list(shape), **machine()}
  for f in fns.values():
    jax.block_until_ready(f())  # Compile.
  times = {name: [] for name in fns}
  for _ in range(args.repeats):
    for name, f in fns.items():
      t0 = time.perf_counter()
      for _ in range(args.calls):
        r = f()
      jax.block_until_ready(r)
      times[name].append((time.perf_counter() - t0) / args.calls * 1e3)
  out.update({f"{name}_ms": round(statistics.median(t), 3) for name, t in times.items()})
  finish(out)
  return out


if __name__ == "__main__":
  main()
