"""Orbax checkpoints of the train state plus where the run stands (phase and epoch).

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=2)
    ckpt.save(global_epoch, state, {"phase": "finetune", "epoch": 3})
    state, meta = ckpt.restore(ckpt.latest(), like=state)
    step, state, meta = ckpt.restore_latest(like=state)   # a damaged newest step: the newest intact one
    variables = restore_variables(workdir, model, config, image_shape)   # a finished run's model, for inference
    predict = latest_predictor(workdir, num_classes, image_shape)        # ... as a predict function

Every Checkpointer is process-local (Orbax never synchronises processes here): in a multi-process run
the primary alone saves host copies, and every process restores from the shared workdir.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from abl_jax import distributed, models, train
from abl_jax import workdir as wd


class CheckpointMismatchError(ValueError):
  """The checkpoint in a workdir does not fit the model the config describes."""


class DamagedCheckpointError(ValueError):
  """No checkpoint in a directory can be read, and not because of the config."""


# Files every intact step holds (Orbax's layout); a missing, empty or invalid one marks the step damaged.
_JSON_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA")
_DATA_FILES = ("state/manifest.ocdbt",)


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
      restored = self._read(step, target)
    except Exception as e:  # pylint: disable=broad-except  # Orbax and tensorstore raise many types.
      damage = self._damage(step, target, e)
      if damage is not None:
        raise DamagedCheckpointError(f"checkpoint {step} in {self.directory} is damaged ({damage})") from e
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointMismatchError(
          f"checkpoint {step} in {self.directory} does not fit the configured model "
          f"(config.model.*): {first}") from e
    _check_shapes(target, restored.state, self.directory)
    return flax.serialization.from_state_dict(like, restored.state), dict(restored.meta)

  def restore_latest(self, like: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest intact checkpoint, or None when there is none.

    Damaged newer steps are reported and moved to DIRECTORY.damaged/ (the primary moves them), so that
    the run goes on from the step restored and saves its next steps where they were.
    """
    damaged = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, like)
      except DamagedCheckpointError as e:
        logging.warning("%s", e)
        damaged.append(step)
        continue
      if damaged:
        logging.warning("resuming from checkpoint %d in %s, the newest intact one; the damaged %s moved to %s",
                        step, self.directory, ", ".join(map(str, damaged)), self.directory + ".damaged")
        self._set_aside(damaged)
      return step, state, meta
    if damaged:
      raise DamagedCheckpointError(
          f"every checkpoint in {self.directory} is damaged (steps {', '.join(map(str, damaged))}); delete "
          f"{self.directory} to train from the start (or --overwrite to start the whole run over)")
    return None

  def _read(self, step: int, target: Any) -> Any:
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))

  def _damage(self, step: int, target: Any, error: Exception) -> str | None:
    """Why checkpoint `step` is damaged, or None when it is intact and `error` means another model."""
    root = os.path.join(self.directory, str(step))
    for name in (*_JSON_FILES, *_DATA_FILES):
      path = os.path.join(root, name)
      if not os.path.exists(path):
        return f"{path} is missing"
      if os.path.getsize(path) == 0:
        return f"{path} is empty"
    trees = {}
    for name in _JSON_FILES:
      path = os.path.join(root, name)
      try:
        with open(path) as f:
          trees[name] = json.load(f)
      except ValueError as e:
        return f"{path} is not valid JSON: {e}"
    saved = set(trees["state/_METADATA"].get("tree_metadata", {}))
    wanted = {str(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path))
              for path, _ in jax.tree_util.tree_flatten_with_path(target)[0]}
    model = lambda keys: {k for k in keys if k.startswith(("('params',", "('batch_stats',"))}  # noqa: E731
    if model(saved) != model(wanted):
      return None  # Another model's parameters: a config mismatch, not damage.
    first = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0]
    return f"its array data cannot be read: {type(error).__name__}: {first[:300]}"

  def _set_aside(self, steps: list[int]) -> None:
    if distributed.is_primary():
      os.makedirs(self.directory + ".damaged", exist_ok=True)
      for step in steps:
        dest = os.path.join(self.directory + ".damaged", str(step))
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(os.path.join(self.directory, str(step)), dest)
    self._manager.reload()

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


def restore_variables(workdir: str, model: Any, config: ml_collections.ConfigDict, image_shape: tuple[int, ...],
                      directory: str = "checkpoints", step: int | None = None) -> dict[str, Any]:
  """The variables of a run's model saved in WORKDIR/<directory> at `step` (None: the newest intact one)."""
  tx = train.sgd(0.0, config.train.momentum, config.train.weight_decay)
  # The state's structure without compiling the initialisation: zeros of the right shapes, overwritten below.
  shapes = jax.eval_shape(lambda: train.create_train_state(model, tx, jax.random.PRNGKey(0), image_shape))
  like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  ckpt = Checkpointer(os.path.join(workdir, directory), config.train.keep_checkpoints)
  try:
    if step is not None:
      state = ckpt.restore(step, like)[0]
    elif (restored := ckpt.restore_latest(like=like)) is None:
      raise FileNotFoundError(f"{os.path.join(workdir, directory)} holds no checkpoint to restore")
    else:
      state = restored[1]
  finally:
    ckpt.close()
  # The final model (the newest checkpoint of a finished run) with its calibration, if it had one.
  offset = wd.logit_offset(workdir) if directory == "checkpoints" and step is None else None
  return train.variables_of(state, offset)


def latest_predictor(workdir: str, num_classes: int, image_shape: tuple[int, ...],
                     mesh: jax.sharding.Mesh | None = None) -> train.Predict:
  """The (images, labels) -> (cross-entropy, predicted class) function of the run's newest checkpoint (its final
  model, with its calibration, once finished), built from the run's own config.json."""
  config = wd.run_config(workdir)
  dtype = models.compute_dtype(config.train.get("dtype", "float32"))
  model = models.create_model(config.model.name, num_classes, config.model.width, dtype=jnp.dtype(dtype))
  variables = restore_variables(workdir, model, config, image_shape)
  mesh = mesh or train.default_mesh()
  batch = config.train.eval_batch_size if config.train.eval_batch_size % mesh.size == 0 else mesh.size
  return train.predictor(model, variables, config.data.mean, config.data.std, batch, mesh)
