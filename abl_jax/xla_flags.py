"""XLA settings that must be in the environment before jax starts its backend.

    from abl_jax import xla_flags
    xla_flags.prefer_xla_cpu_convolutions()   # on importing abl_jax (abl_jax/__init__.py), before jax starts
    xla_flags.use_compilation_cache()         # launch.py: compiled steps kept on disk for the next run
"""
from __future__ import annotations

import importlib.metadata
import os
import re

from abl_jax import cache

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
KEEP_YNN_ENV = "ABL_JAX_KEEP_YNNPACK"  # =1: keep jaxlib's default CPU kernels (to reproduce runs made with them).
# The first jaxlib whose XLA knows YNN_FLAG (found by searching the wheels' shared libraries); older ones
# abort on unknown XLA flags, and have no YNNPACK fusions to turn off.
FIRST_JAXLIB_WITH_YNN = (0, 8, 1)
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"  # jax's own setting: where compiled programs are kept between processes.
NO_CACHE_ENV = "ABL_JAX_NO_COMPILATION_CACHE"  # =1: compile everything afresh (to time compilation).


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


def use_compilation_cache(environ: dict[str, str] | None = None) -> str:
  """Points jax's persistent compilation cache at $XDG_CACHE_HOME/abl_jax/xla unless JAX_COMPILATION_CACHE_DIR
  is set or ABL_JAX_NO_COMPILATION_CACHE=1; returns the directory ('' for none).

  A run compiles the same steps as the run before it (the same model, batch and phase losses): ResNet-18's
  training step compiled in 3.36 s with an empty cache and 0.56 s from it on the 2-core CPU (docs/benchmarks.md).
  jax keys every entry by the program, the compile options, the XLA flags and the backend's version, so a
  cached program is the one a fresh compilation would give.
  """
  env = os.environ if environ is None else environ
  if env.get(NO_CACHE_ENV, "") == "1":
    return ""
  if CACHE_ENV not in env:
    env[CACHE_ENV] = os.path.join(cache.root(), "xla")
  return env[CACHE_ENV]
