"""XLA settings that must be in the environment before jax starts its backend.

    from abl_jax import xla_flags
    xla_flags.prefer_xla_cpu_convolutions()   # first thing in launch.py and tests/conftest.py
"""
from __future__ import annotations

import importlib.metadata
import os
import re

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
KEEP_YNN_ENV = "ABL_JAX_KEEP_YNNPACK"  # =1: keep jaxlib's default CPU kernels (to reproduce runs made with them).
# The first jaxlib whose XLA knows YNN_FLAG (found by searching the wheels' shared libraries); older ones
# abort on unknown XLA flags, and have no YNNPACK fusions to turn off.
FIRST_JAXLIB_WITH_YNN = (0, 8, 1)


def _jaxlib_version() -> tuple[int, ...] | None:
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None
  return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def prefer_xla_cpu_convolutions(environ: dict[str, str] | None = None,
                                jaxlib_version: tuple[int, ...] | None = None) -> str:
  """Turns off jaxlib's YNNPACK fusions on CPU unless XLA_FLAGS or ABL_JAX_KEEP_YNNPACK=1 says; returns XLA_FLAGS.

  YNNPACK's convolution weight gradient ran about 5x slower than PyTorch's on this project's CPU, and the
  whole training step 2-3x slower than with XLA's own kernels (docs/benchmarks.md). No effect on GPU/TPU.
  """
  env = os.environ if environ is None else environ
  version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  flags = env.get("XLA_FLAGS", "")
  keep = env.get(KEEP_YNN_ENV, "") == "1"
  if not keep and YNN_FLAG not in flags and version is not None and version >= FIRST_JAXLIB_WITH_YNN:
    env["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
  return env.get("XLA_FLAGS", "")
