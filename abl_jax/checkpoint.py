"""Orbax checkpoints of the train state plus where the run stands (phase and epoch).

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=2)
    ckpt.save(global_epoch, state, {"phase": "finetune", "epoch": 3})
    state, meta = ckpt.restore(ckpt.latest(), like=state)

Every Checkpointer is process-local (Orbax never synchronises processes here): in a multi-process run
the primary alone saves host copies, and every process restores from the shared workdir.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from abl_jax import distributed


class CheckpointMismatchError(ValueError):
  """The checkpoint in a workdir does not fit the model the config describes."""


class Checkpointer:
  """Saves and restores (train state, metadata) pairs keyed by a global epoch counter."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)  # Orbax cannot create it with active_processes set.
    me = jax.process_index()
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})))

  def latest(self) -> int | None:
    """The newest saved global epoch, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes `state` (a host or device pytree) and JSON `meta` as checkpoint `step`."""
    tree = jax.device_get(flax.serialization.to_state_dict(state))
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                     meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` into the structure of `like` (host arrays)."""
    target = jax.tree.map(np.asarray, flax.serialization.to_state_dict(like))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointMismatchError(
          f"checkpoint {step} in {self.directory} does not fit the configured model "
          f"(config.model.*): {first}") from e
    _check_shapes(target, restored.state, self.directory)
    return flax.serialization.from_state_dict(like, restored.state), dict(restored.meta)

  def close(self) -> None:
    self._manager.close()


def _check_shapes(expected: Any, got: Any, directory: str) -> None:
  exp = jax.tree_util.tree_flatten_with_path(expected)[0]
  act = jax.tree_util.tree_flatten_with_path(got)[0]
  if len(exp) != len(act):
    raise CheckpointMismatchError(f"checkpoint in {directory} has {len(act)} arrays, the configured model "
                                  f"{len(exp)}; config.model.* differs from the run that wrote it")
  for (path, e), (_, a) in zip(exp, act):
    if np.shape(e) != np.shape(a):
      raise CheckpointMismatchError(
          f"checkpoint in {directory}: {jax.tree_util.keystr(path)} has shape {np.shape(a)}, the configured "
          f"model expects {np.shape(e)}; config.model.* differs from the run that wrote it")


def save_once(path: str, tree: Any, meta: dict[str, Any]) -> None:
  """Writes a one-off checkpoint (a cache entry) under a temporary name, then renames it into `path`.

  If a concurrent run wrote `path` meanwhile, its copy is kept and this one dropped. In a multi-process
  run every process calls it and the primary writes.
  """
  if distributed.is_primary():
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt = Checkpointer(tmp, 1)
    ckpt.save(0, jax.device_get(tree), meta)
    ckpt.close()
    try:
      os.rename(tmp, path)
    except OSError:
      shutil.rmtree(tmp, ignore_errors=True)
  distributed.barrier("save_once")
