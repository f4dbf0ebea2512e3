"""Where derived artifacts are cached: decoded image folders, trained surrogates, trained input-aware generators.

    path = cache.entry(config.data.cache_dir, "surrogates", spec, arrays, prefix="small_cnn-")

A trained entry is made under exclusive(path): a second process that wants the same entry (a parallel sweep)
waits for the first to finish it and then reads it, instead of training it again.

An entry's name is a hash of everything that determines it (a JSON spec and the arrays it was computed
from; for a trained model also numerics()), so a changed setting, dataset or set of kernels never reuses a stale
entry. The root is config.data.cache_dir, or
$XDG_CACHE_HOME/abl_jax (default ~/.cache/abl_jax).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from typing import Any, Iterable, Iterator

from absl import logging
import numpy as np


def root(cache_dir: str = "") -> str:
  """The cache root: `cache_dir`, or $XDG_CACHE_HOME/abl_jax (default ~/.cache/abl_jax)."""
  return os.path.expanduser(cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "abl_jax"))


def numerics() -> dict[str, str]:
  """What decides a trained entry's floating-point results besides its spec: the backend, jaxlib and XLA_FLAGS
  (the CPU kernels). Trained models go where these match, so that a cached one is the one training would give."""
  import jax  # pylint: disable=g-import-not-at-top  (xla_flags imports this module before jax may start)
  return {"backend": jax.default_backend(), "jaxlib": jax.lib.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def entry(cache_dir: str, kind: str, spec: dict[str, Any], arrays: Iterable[np.ndarray] = (), prefix: str = "",
          suffix: str = "") -> str:
  """ROOT/kind/<prefix><16 hex digits of the hash of spec and arrays><suffix>."""
  h = hashlib.sha1(json.dumps(spec, sort_keys=True).encode())
  for a in arrays:
    h.update(np.ascontiguousarray(a).data)
  return os.path.join(root(cache_dir), kind, f"{prefix}{h.hexdigest()[:16]}{suffix}")


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
  """Holds an advisory lock on `path`.lock (waiting for it if another process holds it) in a single-process run;
  a no-op in a multi-process run, whose processes decide together whether to train (distributed.everywhere)."""
  import jax  # pylint: disable=g-import-not-at-top  (xla_flags imports this module before jax may start)
  if jax.process_count() > 1:
    yield
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(f"{path}.lock", "w", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("cache: another process is making %s; waiting for it to finish", path)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
