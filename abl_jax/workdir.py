"""A run's directory: which run it holds, who writes it, and how its files are written.

    workdir.check(path)                      # before any work: a directory this process can write
    with workdir.lock(path): ...             # one process at a time (WORKDIR/.lock names the holder)
    workdir.claim(config, path, overwrite)   # refuses a directory that holds a run of another config
    workdir.write_json(path, obj)            # every output file: a temporary name, then renamed
    workdir.read_json(path)                  # a damaged file is named in the error
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import functools
import io
import json
import os
import shutil
import socket
import sys
import tempfile
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np
from absl import logging

from abl_jax import distributed, models

RESULT_FILES = ("results.json", "eval.json", "metrics.jsonl", "isolation.npz", "isolation.json", "config.json",
                "unlearning_curve.json", "examples.npz", "data.json")
# The defense's decisions, each read back where a run resumes (so never left behind for a new run to reuse).
DECISION_FILES = ("epoch_scores.npz", "returned.npz", "regauged.npz", "relearned.npz", "isolation_model",
                  "gauge_model")
PICTURES = ("curves.png", "isolation.png", "scores_per_class.png", "spectral.png", "judge.png", "rejected.png",
            "gallery.png")
# Everything a run writes, removed by --overwrite (report.* and table.json belong to a table's directory).
OUTPUTS = (*RESULT_FILES, *DECISION_FILES, *PICTURES, "tensorboard", "checkpoints", "checkpoints.damaged",
           "before_unlearning")
LOCK = ".lock"
_TMP = ".tmp"  # Infix of a file being written: NAME.tmpPID, renamed to NAME when complete.


class WorkdirError(ValueError):
  """The workdir cannot be used as asked: another run's, in use, not writable, or a file in it damaged."""


class DamagedFileError(WorkdirError):
  """A file of the run cannot be read."""


def check(workdir: str) -> None:
  """Refuses, before any work, a workdir that is not a directory or cannot be written."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory; pass a directory (new or of this run)")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f"--workdir={workdir} cannot be created: {existing} is a file")
  try:  # A write, not os.access: root passes os.access on a read-only file system.
    with tempfile.TemporaryFile(dir=existing, prefix=".abl_jax_write_check"):
      pass
  except OSError as e:
    what = "the workdir" if existing == path else f"{existing}, where it would be created,"
    raise WorkdirError(f"--workdir={workdir}: {what} is not writable ({e.strerror}); pass a writable "
                       "directory (a finished run's directory gets its pictures written too)") from None


def _holder() -> dict[str, Any]:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}


def _describe(holder: dict[str, Any]) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')}: "
          f"{holder.get('command') or '?'})")


def _read_holder(fd: int) -> dict[str, Any] | None:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 65536).decode(errors="replace")
  try:
    return json.loads(text) if text.strip() else None
  except ValueError:
    return {"command": text.strip()[:200]}


def _pid_alive(pid: Any) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ValueError, TypeError, ProcessLookupError):
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/.lock (an OS file lock, freed on any exit, and the holder's pid and host) while the body runs.

  A second process refuses at once, naming the holder; a lock file left by a killed process is taken over
  with a warning. A directory the lock created and nothing else filled is removed again.
  """
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      os_lock = True
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        holder = _read_holder(fd) or {}
        os.close(fd)
        raise WorkdirError(f"workdir {workdir} is in use by {_describe(holder)}; wait for it to finish or stop "
                           f"it, or use another --workdir") from None
      os_lock = False  # A file system without flock: the pid in the file decides.
    try:  # The holder may have removed the file between our open and flock: lock the file that is there.
      same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  try:
    previous = _read_holder(fd)
    if previous and previous.get("pid") != os.getpid():
      if not os_lock and previous.get("host") == socket.gethostname() and _pid_alive(previous.get("pid")):
        os.close(fd)
        raise WorkdirError(f"workdir {workdir} is in use by {_describe(previous)}; wait for it to finish or stop "
                           f"it, or use another --workdir")
      logging.warning("workdir %s: taking over the lock left by %s, which no longer runs", workdir,
                      _describe(previous))
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(_holder()).encode())
    os.fsync(fd)
  except BaseException:
    os.close(fd)
    raise
  try:
    yield
  finally:
    with contextlib.suppress(OSError):
      os.remove(path)
    os.close(fd)
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(workdir)  # Only when empty: a config refused before any file was written.


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Runs `fn(config, workdir, ...)` after check(workdir), holding lock(workdir) on the primary process."""

  @functools.wraps(fn)
  def wrapper(config: ml_collections.ConfigDict, workdir: str, *args: Any, **kwargs: Any) -> Any:
    if not distributed.is_primary():  # The primary alone writes files (docs/multihost.md).
      return fn(config, workdir, *args, **kwargs)
    check(workdir)
    with lock(workdir):
      return fn(config, workdir, *args, **kwargs)

  return wrapper


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
    remove_outputs(workdir)
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(path):
    check_same_config(config, workdir)
  else:
    write_json(path, config_json(config))


def check_data(workdir: str, fingerprints: dict[str, str], *, write: bool) -> None:
  """Raises WorkdirError where WORKDIR/data.json names other data than `fingerprints`; writes it where missing
  and `write` (the primary)."""
  path = os.path.join(workdir, "data.json")
  if os.path.exists(path):
    saved = read_json(path)
    differ = [k for k in sorted(set(saved) | set(fingerprints)) if saved.get(k) != fingerprints.get(k)]
    if differ:
      raise WorkdirError(
          f"workdir {workdir} holds a run on other data ({', '.join(differ)} differ from its data.json): the "
          "dataset or an attack's cached model (input-aware generators, clean-label surrogate; config.data.cache_dir) "
          "changed since; put it back, or use --overwrite to start over")
  elif write and distributed.is_primary():
    write_json(path, fingerprints)


def remove_outputs(workdir: str) -> list[str]:
  """Deletes every output of a previous run in `workdir` (pictures and half-written files too); returns their names."""
  names = sorted(n for n in os.listdir(workdir) if n in OUTPUTS or any(n.startswith(o + _TMP) for o in OUTPUTS))
  if names:
    logging.warning("--overwrite: deleting the previous run in %s (%s)", workdir, ", ".join(names))
  for name in names:
    p = os.path.join(workdir, name)
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p)
    else:
      os.remove(p)
  return names


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run in `workdir` was made with (its config.json)."""
  return ml_collections.ConfigDict(read_json(os.path.join(workdir, "config.json")))


def check_same_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises WorkdirError naming the fields where `config` differs from the workdir's run."""
  saved = read_json(os.path.join(workdir, "config.json"))
  unused = unused_fields(config)
  # A group missing on one side differs as a whole ("config.distributed"), hence the added dot.
  diffs = [d for d in diff(comparable(saved), comparable(config_json(config)), "config")
           if not (d[0] + ".").startswith(unused)
           and not (d[1] is None and d[0] in ADDED_FIELDS and d[2] == ADDED_FIELDS[d[0]])]
  if diffs:
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:3])
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise WorkdirError(f"workdir {workdir} holds a run with a different config ({shown}{more}); "
                       "use another --workdir, or --overwrite to start over")


# Fields added after runs were made, with the value that does what a run without them did: a config.json that
# lacks one ran with that value.
ADDED_FIELDS = {
    "config.train.label_smoothing": 0.0, "config.abl.pool_rule": "isolated", "config.abl.pool_ratio": 0.2,
    "config.abl.finetune_init": "isolation", "config.abl.finetune_schedule": "step",
    "config.abl.finetune_balance": False, "config.abl.return_rule": "none", "config.abl.return_epoch": 0,
    "config.abl.gauge_epochs": 0, "config.abl.kept_out": "drop", "config.abl.relabel_confidence": 0.0,
    "config.abl.score_epochs": 1, "config.abl.class_quantile": 0.5,
    "config.abl.contradict_factor": 0.0, "config.abl.disown_below": 0.0, "config.abl.own_above": 1.0,
    "config.abl.unsure": "distill", "config.abl.class_outlier_z": 0.0,
    "config.abl.regauge": False, "config.abl.class_outlier_below": [],
    "config.abl.flagged_rejected": "disown", "config.abl.spectral_skew": 0.0, "config.abl.spectral_tail": 2.0,
    "config.abl.spectral_kurtosis": 0.0, "config.abl.spectral_bimodality": 0.0, "config.abl.spectral_kurtosis_z": 0.0,
    "config.abl.regauge_epochs": 0,
    "config.abl.flagged_doubted": "keep", "config.abl.flagged_unsure": "drop",
    "config.abl.spectral_judged": False, "config.abl.relearned_at": 0.0, "config.abl.relearned_above": 0.8,
    "config.abl.relearned_draws": 0, "config.abl.relearned_tested": "outliers",
    "config.abl.relearned_untypical": "skip", "config.abl.class_outlier_ratio": 0.0,
    "config.abl.relearned_doubted": "keep", "config.abl.relearned_then": "continue", "config.abl.pool_outlier_z": 0.0,
    "config.abl.regauge_init": "fresh", "config.abl.finetune_mix": "none", "config.abl.gauge_mix": "none",
    "config.abl.gauge_drop": 0.0, "config.abl.gauge_drop_cap": 0.5, "config.abl.gauge_drop_epochs": 0,
    "config.abl.candidate_pool": False,
    "config.abl.finetune_mix_alpha": 1.0,
    "config.abl.finetune_mix_epochs": 0, "config.abl.calibrate_flagged": False,
    "config.abl.spectral_pursuit": 0.0, "config.abl.spectral_pursuit_dims": 16, "config.abl.candidate_triggers": 0.0,
    "config.abl.candidate_scale": [1.0, 1.0], "config.abl.gauge_downsample": 1,
}


def comparable(saved: dict[str, Any]) -> dict[str, Any]:
  """A config.json with train.dtype resolved on this machine ('auto' equals what it resolves to)."""
  out = json.loads(json.dumps(saved))
  if "dtype" in out.get("train", {}):
    out["train"]["dtype"] = models.compute_dtype(out["train"]["dtype"])
  return out


def unused_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Config prefixes that cannot change this run: the process setup (a run may resume with another process
  count), the evaluation batch size (inference gives each example the same outputs in any batch: to the bit on
  CPU, tested; to rounding on accelerators, as with another process count), the model the final evaluation
  compares with (attack.floor_model) and the abl group without ABL (a new default there does not make a
  no-defense run another one)."""
  always = ("config.distributed.", "config.train.eval_batch_size.", "config.attack.floor_model.")
  return always + ("config.abl.",) if config.defense.name == "none" else always


def diff(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
  """(path, a's value, b's value) wherever two JSON trees differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) for d in diff(a.get(k), b.get(k), f"{prefix}.{k}")]
  return [] if a == b else [(prefix, a, b)]


@contextlib.contextmanager
def atomic(path: str) -> Iterator[str]:
  """Yields a temporary name next to `path` to write; renames it into `path` once the body has finished."""
  tmp = f"{path}{_TMP}{os.getpid()}"
  try:
    yield tmp
    os.replace(tmp, path)  # A kill leaves the old file or the new one, never half of one.
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON to a temporary name, then renames it into `path`."""
  with atomic(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, indent=2)


def write_text(path: str, text: str) -> None:
  """Writes `text` to a temporary name, then renames it into `path`."""
  with atomic(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_npz(path: str, **arrays: Any) -> None:
  """np.savez to a temporary name, then renamed into `path`."""
  with atomic(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)


def _damaged(path: str, e: Exception) -> DamagedFileError:
  first = (str(e).strip().splitlines() or [""])[0]
  return DamagedFileError(f"{path} is damaged ({type(e).__name__}: {first}); delete it to have the run write it "
                          "again (or --overwrite to start the run over)")


def read_json(path: str) -> Any:
  """The JSON in `path`; a file that is not valid JSON raises DamagedFileError naming it."""
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except ValueError as e:
    raise _damaged(path, e) from None


def load_npz(path: str) -> dict[str, np.ndarray]:
  """Every array in the .npz file `path`; a damaged file raises DamagedFileError naming it."""
  with open(path, "rb") as f:
    blob = f.read()
  try:
    with np.load(io.BytesIO(blob)) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # pylint: disable=broad-except  # zipfile, zlib, pickle and format errors alike.
    raise _damaged(path, e) from None


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a JSON-lines file; a line cut off by a kill is skipped with a warning (its epoch was redone)."""
  records = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      try:
        records.append(json.loads(line))
      except ValueError:
        logging.warning("%s: skipping line %d, cut off by an interrupted write", path, i)
  return records


def append_jsonl(path: str, record: dict[str, Any]) -> None:
  """Appends `record` as one line, first ending a line an interrupted write left unfinished."""
  with open(path, "a+b") as f:
    start = b""
    if f.tell() > 0:
      f.seek(-1, os.SEEK_END)
      start = b"" if f.read(1) == b"\n" else b"\n"
    f.write(start + json.dumps(record).encode() + b"\n")


@dataclasses.dataclass(frozen=True)
class OutsideVerdicts:
  """The first gauge's verdicts on the training examples outside the pool, as a finished run saved them."""
  examples: np.ndarray  # Their indices into the training set.
  labels: np.ndarray  # Their training labels.
  own: np.ndarray  # The gauge's probability of that label (float64).
  poisoned: np.ndarray  # The ground-truth mask (pictures and counts only); all False where none was saved.
  num_classes: int


def outside_verdicts(workdir: str) -> OutsideVerdicts | None:
  """The first gauge's verdicts outside the pool from returned.npz and isolation.npz; None for a run without them."""
  judged, npz = os.path.join(workdir, "returned.npz"), os.path.join(workdir, "isolation.npz")
  if not (os.path.exists(judged) and os.path.exists(npz)):
    return None
  saved, iso = load_npz(judged), load_npz(npz)
  if "outside_gauge_loss" not in saved:
    return None
  labels = iso["labels"]
  outside = np.setdiff1d(np.arange(len(labels)), iso["pool"])
  mask = iso["is_poisoned"][outside].astype(bool) if "is_poisoned" in iso else np.zeros(len(outside), bool)
  return OutsideVerdicts(outside, labels[outside], np.exp(-saved["outside_gauge_loss"][outside].astype(np.float64)),
                         mask, int(labels.max()) + 1)


def followed_judgement(workdir: str) -> str | None:
  """The path of the judgement fine-tuning followed: the second gauge's (regauged.npz) where one judged, else the
  first's (returned.npz); None before either."""
  for name in ("regauged.npz", "returned.npz"):
    if os.path.exists(os.path.join(workdir, name)):
      return os.path.join(workdir, name)
  return None


def suspected_labels(summary: dict[str, Any]) -> list[int] | None:
  """The labels the defense treated as attacked, from a run's isolation.json: those spectral signatures flagged,
  the outlier labels of the judgement fine-tuning followed (the second gauge's where one judged), those whose split
  the gauge judged (split_labels) and those the relearned check flagged. None where none of these tests ran."""
  if not {"spectral_labels", "outlier_labels", "relearned_labels"} & set(summary):
    return None
  outliers = summary.get("regauge_outlier_labels", summary.get("outlier_labels", []))
  return sorted({int(k) for k in [*summary.get("spectral_labels", []), *outliers, *summary.get("split_labels", []),
                                  *summary.get("relearned_labels", [])]})


def logit_offset(workdir: str) -> np.ndarray | None:
  """The offsets added to the final model's logits (WORKDIR/calibration.npz), None where none were."""
  path = os.path.join(workdir, "calibration.npz")
  if not os.path.exists(path):
    return None
  saved = load_npz(path)
  return saved["logit_offset"] if len(saved["calibrated_labels"]) else None
