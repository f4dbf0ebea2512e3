"""Multi-process runs on JAX's distributed runtime: process setup, shared work, gathers, barriers.

    distributed.initialize(config.distributed)    # in launch.py, before anything touches devices
    y = distributed.map_rows(fn, x)               # each process computes its share of the rows, all receive y
    if distributed.is_primary(): write files      # files are written once, by process 0...
    distributed.barrier("results")                # ...and the others wait before reading them

With one process every helper is the identity (or a no-op), so single-process runs are unchanged.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from abl_jax import registry



def _env_int(name: str) -> int:
  try:
    return int(os.environ.get(name, "0"))
  except ValueError:
    return 0


def cluster_detected() -> bool:
  """True when the environment describes a multi-process job JAX can join (coordinator, SLURM, Open MPI, TPU)."""
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")
              or ("SLURM_JOB_ID" in os.environ and _env_int("SLURM_NTASKS") > 1)
              or _env_int("OMPI_COMM_WORLD_SIZE") > 1
              or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Rejects bad config.distributed values with one line naming the field."""
  registry.check_name("config.distributed.initialize", cfg.initialize)
  if cfg.num_processes < 0:
    raise ValueError(f"config.distributed.num_processes={cfg.num_processes} must be >= 0 (0 = from the environment)")
  if cfg.process_id < -1 or (cfg.num_processes and cfg.process_id >= cfg.num_processes):
    raise ValueError(f"config.distributed.process_id={cfg.process_id} must be -1 (from the environment) or in "
                     f"0..num_processes-1")
  if cfg.coordinator_address and ":" not in cfg.coordinator_address:
    raise ValueError(f"config.distributed.coordinator_address={cfg.coordinator_address!r} must be host:port")


def initialize(cfg: ml_collections.ConfigDict) -> bool:
  """Joins the multi-process job `cfg` (= config.distributed) describes, if any; true when it did."""
  validate(cfg)
  wanted = cfg.initialize == "always" or (cfg.initialize == "auto" and (
      bool(cfg.coordinator_address) or cfg.num_processes > 1 or cluster_detected()))
  if not wanted:
    return False
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
    # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib (the default in jax 0.10).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=cfg.coordinator_address or None,
                             num_processes=cfg.num_processes or None,
                             process_id=None if cfg.process_id < 0 else cfg.process_id)
  counts = gather(np.array([jax.local_device_count()]))
  if len(set(counts.tolist())) > 1:
    raise ValueError(f"every process needs the same number of local devices; got {counts.tolist()}")
  logging.info("process %d of %d; %d local and %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """True on the process that writes files and logs progress (process 0)."""
  return jax.process_index() == 0


def gather(x: np.ndarray) -> np.ndarray:
  """Every process's `x` (same shape on each), concatenated along axis 0 in process order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def map_rows(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
  """fn(x), each process computing fn on its share of the rows and every process receiving all of them."""
  n = jax.process_count()
  if n == 1 or len(x) == 0:
    return fn(x)
  per = -(-len(x) // n)
  padded = np.concatenate([x, np.repeat(x[:1], per * n - len(x), axis=0)])  # Equal shares for the gather.
  p = jax.process_index()
  return gather(np.asarray(fn(padded[p * per:(p + 1) * per])))[:len(x)]


def everywhere(flag: bool) -> bool:
  """True when `flag` holds on every process (so that all of them take the same branch)."""
  return bool(np.all(gather(np.array([flag]))))


def barrier(name: str) -> None:
  """Waits until every process gets here (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)

