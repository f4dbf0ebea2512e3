"""A run's directory: which run it holds, who writes it, and how its files are written.

    workdir.claim(config, path, overwrite)   # refuses a directory that holds a run of another config
    workdir.write_json(path, obj)            # every result file: a temporary name, then renamed
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import ml_collections
from absl import logging

from abl_jax import distributed, models

RESULT_FILES = ("results.json", "eval.json", "metrics.jsonl", "isolation.npz", "isolation.json", "config.json",
                "unlearning_curve.json", "examples.npz")


class WorkdirError(ValueError):
  """The workdir holds a different run."""


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as the JSON object config.json holds."""
  return json.loads(config.to_json_best_effort())


def claim(config: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> None:
  """Makes `workdir` this run's, refusing one that holds a run of another config (the primary writes)."""
  if distributed.is_primary():
    _claim(config, workdir, overwrite)
  distributed.barrier("claim_workdir")
  check_same_config(config, workdir)  # Every process, once the primary has written config.json.


def _claim(config: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> None:
  path = os.path.join(workdir, "config.json")
  if overwrite and os.path.isdir(workdir):
    logging.warning("--overwrite: deleting the previous run in %s", workdir)
    for name in (*RESULT_FILES, "checkpoints", "before_unlearning"):
      p = os.path.join(workdir, name)
      if os.path.isdir(p):
        shutil.rmtree(p)
      elif os.path.exists(p):
        os.remove(p)
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(path):
    check_same_config(config, workdir)
  else:
    write_json(path, config_json(config))


def check_same_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises WorkdirError naming the fields where `config` differs from the workdir's run."""
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  unused = unused_fields(config)
  # A group missing on one side differs as a whole ("config.distributed"), hence the added dot.
  diffs = [d for d in diff(comparable(saved), comparable(config_json(config)), "config")
           if not (d[0] + ".").startswith(unused)]
  if diffs:
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:3])
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise WorkdirError(f"workdir {workdir} holds a run with a different config ({shown}{more}); "
                       "use another --workdir, or --overwrite to start over")


def comparable(saved: dict[str, Any]) -> dict[str, Any]:
  """A config.json with train.dtype resolved on this machine (runs saved before the field existed ran float32)."""
  out = json.loads(json.dumps(saved))
  out["train"]["dtype"] = models.compute_dtype(out["train"].get("dtype", "float32"))
  return out


def unused_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Config prefixes that cannot change this run: the process setup (a run may resume with another process
  count) and the abl group without ABL (a new default there does not make a no-defense run another one)."""
  return ("config.distributed.", "config.abl.") if config.defense.name == "none" else ("config.distributed.",)


def diff(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
  """(path, a's value, b's value) wherever two JSON trees differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) for d in diff(a.get(k), b.get(k), f"{prefix}.{k}")]
  return [] if a == b else [(prefix, a, b)]


def write_json(path: str, obj: dict[str, Any]) -> None:
  """Writes `obj` as JSON to a temporary name, then renames it into `path`."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)
