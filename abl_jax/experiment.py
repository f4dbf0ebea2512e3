"""One experiment end to end: load, poison, train (no defense or ABL), evaluate, write results.

    results = experiment.train_and_evaluate(config, workdir)   # resumes an interrupted run
    metrics = experiment.evaluate_checkpoint(config, workdir)  # latest checkpoint -> eval.json

The ground-truth poison mask goes to `evaluate` only: the phases below receive images and labels.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from abl_jax import abl, attacks, data, distributed, evaluate, models, train, workdir as wd
from abl_jax.checkpoint import Checkpointer
from abl_jax.workdir import WorkdirError, check_same_config

DEFENSES = ("none", "abl")
SCHEDULES = ("cosine", "step", "constant")
SOURCES = ("tfds", "folder", "synthetic")
# Fields a run started from another run's fine-tuned model (config.abl.start_from) may change.
UNLEARNING_FIELDS = ("abl.unlearning_", "abl.joint_", "abl.stop_accuracy", "abl.start_from")


@dataclasses.dataclass(frozen=True)
class Phase:
  """One training phase: which examples, which loss, which optimizer, how long."""
  name: str
  epochs: int
  examples: str  # 'all', 'retained' (not isolated), 'isolated', or 'joint' (isolated + retained per step)
  loss_fn: abl.LossFn
  lr: Callable[[int], float]  # steps_per_epoch -> optax schedule (or a constant)
  batch_size: int
  augment: bool
  bn_train: bool = True  # False: BatchNorm in inference mode, statistics unchanged.


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Everything a run needs before training; `is_poisoned` is for metrics only."""
  train: data.Dataset
  is_poisoned: np.ndarray
  test: data.Dataset
  poisoned_test: data.Dataset | None
  seconds: float
  cross_test: data.Dataset | None = None  # input_aware: test images with other images' triggers, true labels.
  is_cross: np.ndarray | None = None  # input_aware: training examples with a cross trigger (metrics only).


def _allowed(field: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{field}={value!r} is unknown; allowed: {', '.join(allowed)}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects bad names and ranges before any work, with one line naming the field."""
  _allowed("config.data.source", config.data.source, SOURCES)
  if "distributed" in config:
    distributed.validate(config.distributed)
  _allowed("config.model.name", config.model.name, models.MODELS)
  _allowed("config.attack.name", config.attack.name, attacks.ATTACKS)
  _allowed("config.defense.name", config.defense.name, DEFENSES)
  _allowed("config.train.schedule", config.train.schedule, SCHEDULES)
  _allowed("config.train.dtype", config.train.dtype, models.DTYPES)
  _allowed("config.abl.loss", config.abl.loss, abl.ISOLATION_LOSSES)
  _allowed("config.abl.unlearning_mode", config.abl.unlearning_mode, abl.UNLEARNING_MODES)
  _allowed("config.abl.unlearning_loss", config.abl.unlearning_loss, abl.UNLEARNING_LOSSES)
  _allowed("config.abl.unlearning_bn", config.abl.unlearning_bn, abl.UNLEARNING_BN)
  _allowed("config.abl.unlearning_stop", config.abl.unlearning_stop, abl.STOP_RULES)
  if not 0.0 <= config.abl.joint_exclude_ratio < 1.0:
    raise ValueError(f"config.abl.joint_exclude_ratio={config.abl.joint_exclude_ratio} must be in [0, 1)")
  if not 0.0 <= config.abl.stop_accuracy <= 1.0:
    raise ValueError(f"config.abl.stop_accuracy={config.abl.stop_accuracy} must be in [0, 1]")
  if config.abl.start_from and not os.path.exists(os.path.join(config.abl.start_from, "config.json")):
    raise ValueError(f"config.abl.start_from={config.abl.start_from!r} holds no run (no config.json)")
  if config.attack.name != "none" and not 0.0 < config.attack.poison_rate <= 1.0:
    raise ValueError(f"config.attack.poison_rate={config.attack.poison_rate} must be in (0, 1]")
  if not 0.0 < config.abl.isolation_ratio < 1.0:
    raise ValueError(f"config.abl.isolation_ratio={config.abl.isolation_ratio} must be in (0, 1)")
  for field in ("train.batch_size", "train.eval_batch_size", "abl.unlearning_batch_size", "abl.joint_batch_size"):
    group, name = field.split(".")
    train.check_batch_size(config[group][name], f"config.{field}")
  for field in ("train.epochs", "abl.isolation_epochs", "abl.finetune_epochs", "abl.unlearning_epochs"):
    group, name = field.split(".")
    if config[group][name] < 0:
      raise ValueError(f"config.{field}={config[group][name]} must be >= 0")


def phases(config: ml_collections.ConfigDict) -> list[Phase]:
  """The training phases the config asks for, in order."""
  t, a = config.train, config.abl
  if config.defense.name == "none":
    def baseline_lr(steps_per_epoch: int) -> optax.Schedule:
      total = max(t.epochs * steps_per_epoch, 1)
      if t.schedule == "cosine":
        return optax.cosine_decay_schedule(t.learning_rate, total)
      if t.schedule == "step":
        return optax.piecewise_constant_schedule(
            t.learning_rate, {int(e * steps_per_epoch): 0.1 for e in t.lr_boundaries})
      return optax.constant_schedule(t.learning_rate)
    return [Phase("train", t.epochs, "all", abl.cross_entropy_loss, baseline_lr, t.batch_size, t.augment)]

  def finetune_lr(steps_per_epoch: int) -> optax.Schedule:
    return optax.piecewise_constant_schedule(
        a.finetune_lr, {int(e * steps_per_epoch): 0.1 for e in a.finetune_lr_boundaries})

  return [
      Phase("isolation", a.isolation_epochs, "all", abl.isolation_loss(a.loss, a.gamma),
            lambda _: a.isolation_lr, t.batch_size, False),
      Phase("finetune", a.finetune_epochs, "retained", abl.cross_entropy_loss, finetune_lr,
            t.batch_size, t.augment),
      Phase("unlearning", a.unlearning_epochs, "isolated" if a.unlearning_mode == "ascent" else "joint",
            abl.unlearning_step_loss(a.unlearning_mode, a.unlearning_batch_size // jax.device_count(),
                                     a.joint_weight, a.unlearning_loss),
            lambda _: a.unlearning_lr, a.unlearning_batch_size, False, bn_train=a.unlearning_bn == "train"),
  ]


def prepare(config: ml_collections.ConfigDict) -> Prepared:
  """Loads the data and poisons the training set (deterministic in config.seed)."""
  t0 = time.perf_counter()
  train_set, test_set = data.load(config.data, seed=config.seed)
  poisoned = attacks.poison(config.attack, train_set, _key(config, "poison"), config=config)
  poisoned_test = None
  if poisoned.apply_trigger is not None:
    poisoned_test = attacks.poisoned_test_set(test_set, poisoned, config.attack.target_label)
  return Prepared(poisoned.train, poisoned.is_poisoned, test_set, poisoned_test, time.perf_counter() - t0,
                  attacks.cross_test_set(test_set, poisoned), poisoned.is_cross)


_PURPOSES = ("poison", "init", "data", "augment")


def _key(config: ml_collections.ConfigDict, purpose: str) -> jax.Array:
  """The PRNG key for one purpose, derived from config.seed."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), _PURPOSES.index(purpose))


def _model(config: ml_collections.ConfigDict, num_classes: int):
  """The classifier; parameters, optimizer state and BatchNorm statistics stay float32 in every dtype."""
  dtype = jnp.dtype(models.compute_dtype(config.train.dtype))
  return models.create_model(config.model.name, num_classes, config.model.width, dtype=dtype,
                             bn_axis_name=train.AXIS)


class _Log:
  """Appends JSON lines to WORKDIR/metrics.jsonl."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")

  def __call__(self, **record: Any) -> None:
    if not distributed.is_primary():  # Every process holds the same record; one writes it.
      return
    wd.append_jsonl(self.path, record)


def _subset(ds: data.Dataset | None, size: int) -> data.Dataset | None:
  """An evenly spaced subset of `size` examples for per-epoch evaluation (0 = all)."""
  if ds is None or not size or size >= len(ds):
    return ds
  return ds.take(np.linspace(0, len(ds) - 1, size).astype(np.int64))


def _isolate(config, workdir, eval_fn, state, prep: Prepared, log: _Log) -> np.ndarray:
  """Scores every training example with the isolation model and isolates the lowest losses."""
  t0 = time.perf_counter()
  scores, _ = train.predict(eval_fn, state, prep.train.images, prep.train.labels, config.train.eval_batch_size)
  isolated = abl.isolate(scores, config.abl.isolation_ratio)
  stats = evaluate.isolation_metrics(isolated, prep.is_poisoned)  # Metrics only: nothing below reads them.
  stats["threshold"] = float(scores[isolated[-1]])
  stats["seconds"] = time.perf_counter() - t0
  # is_poisoned is the ground truth, saved for the report's histogram only; the phases read scores/isolated.
  if distributed.is_primary():
    wd.write_npz(os.path.join(workdir, "isolation.npz"), scores=scores, isolated=isolated, is_poisoned=prep.is_poisoned)
    wd.write_json(os.path.join(workdir, "isolation.json"), stats)
  distributed.barrier("isolation")  # The others read isolation.npz later (joint unlearning's pool).
  logging.info("isolation: %d examples with loss <= %.4g isolated; precision %.3f, recall %s (ground truth, "
               "metrics only)", stats["num_isolated"], stats["threshold"], stats["precision"] or 0.0,
               "n/a" if stats["recall"] is None else f"{stats['recall']:.3f}")
  log(phase="isolate", **stats)
  return isolated


def _load_isolated(workdir: str) -> np.ndarray:
  path = os.path.join(workdir, "isolation.npz")
  if not os.path.exists(path):
    raise WorkdirError(f"{path} is missing but the checkpoint is past isolation; use --overwrite to start over")
  return wd.load_npz(path)["isolated"]


def _joint_pool(config, workdir: str, isolated: np.ndarray, num_train: int) -> np.ndarray:
  """The retained examples joint unlearning descends on: all but the lowest `joint_exclude_ratio` scores."""
  ratio = config.abl.joint_exclude_ratio
  if ratio <= config.abl.isolation_ratio:
    return np.setdiff1d(np.arange(num_train), isolated)
  # The isolation model's scores, as for isolation itself: low loss = suspect. Examples too suspect to
  # descend on (the backdoor examples isolation missed) but too many to ascend on are left out.
  scores = wd.load_npz(os.path.join(workdir, "isolation.npz"))["scores"]
  pool = np.setdiff1d(np.arange(num_train), abl.isolate(scores, ratio))
  logging.info("joint unlearning descends on %d retained examples (the lowest-loss %.0f%% left out, "
               "config.abl.joint_exclude_ratio)", len(pool), 100 * ratio)
  return pool


def _epoch_order(phase: Phase, config, isolated: np.ndarray | None, num_train: int, key: jax.Array,
                 joint_pool: np.ndarray | None = None) -> np.ndarray:
  """One epoch's [steps, batch] indices into the training set for `phase`."""
  if phase.examples == "all":
    return train.epoch_order(num_train, phase.batch_size, key)
  retained = np.setdiff1d(np.arange(num_train), isolated)
  if phase.examples in ("isolated", "retained"):
    chosen = isolated if phase.examples == "isolated" else retained
    return chosen[train.epoch_order(len(chosen), phase.batch_size, key)]
  # joint: every step pairs a batch of isolated examples with config.abl.joint_batch_size retained ones,
  # laid out so that each device's shard holds its isolated examples first (see abl.joint_unlearning_loss).
  k_iso, k_ret = jax.random.split(key)
  iso = isolated[train.epoch_order(len(isolated), phase.batch_size, k_iso)]
  steps, n_dev = len(iso), jax.device_count()  # Global: each device's shard of the global batch.
  retained = retained if joint_pool is None else joint_pool
  ret = retained[np.resize(np.asarray(jax.random.permutation(k_ret, len(retained))),
                           steps * config.abl.joint_batch_size)].reshape(steps, -1)
  return np.concatenate([iso.reshape(steps, n_dev, -1), ret.reshape(steps, n_dev, -1)], axis=2).reshape(steps, -1)


def _isolated_metrics(config, eval_fn, rstate, prep: Prepared, isolated: np.ndarray) -> dict[str, float]:
  """Loss and accuracy on the isolated examples with their training labels (what a defender has)."""
  ce, pred = train.predict(eval_fn, rstate, prep.train.images[isolated], prep.train.labels[isolated],
                           config.train.eval_batch_size)
  return {"isolated_loss": float(np.mean(ce)), "isolated_accuracy": float(np.mean(pred == prep.train.labels[isolated])),
          "_pred": pred}


def _before_unlearning(config, workdir, eval_fn, rstate, prep: Prepared, isolated, done, wall, log: _Log) -> None:
  """Saves the fine-tuned model (config.abl.start_from reuses it) and its metrics on the full test set."""
  record = {"phase": "unlearning", "epoch": 0, "global_epoch": done, "full_test_set": True}
  record.update(evaluate.test_metrics(eval_fn, rstate, prep.test, prep.poisoned_test, config.train.eval_batch_size))
  metrics = _isolated_metrics(config, eval_fn, rstate, prep, isolated)
  metrics.pop("_pred")
  record.update(metrics)
  log(**record)
  _write_curve(workdir)
  if not distributed.is_primary():
    return
  saved = Checkpointer(os.path.join(workdir, "before_unlearning"), 1)
  saved.save(done, train.unreplicate(rstate), {"phase": "before_unlearning", "epoch": 0, "global_epoch": done,
                                               "wall_time": wall})
  saved.close()
  asr = record["attack_success_rate"]
  logging.info("before unlearning: CA %.4f, ASR %s (full test set); isolated set loss %.4f accuracy %.3f",
               record["clean_accuracy"], "n/a" if asr is None else f"{asr:.4f}", record["isolated_loss"],
               record["isolated_accuracy"])


def _unlearning_check(config, eval_fn, rstate, prep: Prepared, isolated, record: dict[str, Any]) -> bool:
  """Adds the isolated set's metrics to `record`; true when the defender's stopping rule fires."""
  metrics = _isolated_metrics(config, eval_fn, rstate, prep, isolated)
  pred = metrics.pop("_pred")
  record.update(metrics)
  # The rule receives the isolated examples' predictions and training labels: never the poison mask.
  return abl.stop_unlearning(pred, prep.train.labels[isolated], config.abl.unlearning_stop,
                             config.abl.stop_accuracy)


def unlearning_curve(workdir: str) -> list[dict[str, Any]]:
  """CA, ASR and isolated-set metrics per unlearning epoch (0 = before), from WORKDIR/metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  by_epoch: dict[int, dict[str, Any]] = {}
  if os.path.exists(path):
    for r in wd.read_jsonl(path):
      if r.get("phase") == "unlearning" and "global_epoch" in r:
        by_epoch[r["epoch"]] = r  # A repeated epoch (resumed run): the last record wins.
  keys = ("epoch", "clean_accuracy", "attack_success_rate", "isolated_loss", "isolated_accuracy", "stopped")
  return [{k: by_epoch[e].get(k) for k in keys} for e in sorted(by_epoch)]


def _write_curve(workdir: str) -> None:
  if distributed.is_primary():
    wd.write_json(os.path.join(workdir, "unlearning_curve.json"), {"curve": unlearning_curve(workdir)})


def _check_start_from(config: ml_collections.ConfigDict) -> None:
  """Refuses a config.abl.start_from run that differs in more than the unlearning fields."""
  source = config.abl.start_from
  saved = wd.read_json(os.path.join(source, "config.json"))
  diffs = [d for d in wd.diff(wd.comparable(saved), wd.comparable(wd.config_json(config)), "config")
           if not any((d[0] + ".").startswith("config." + f) for f in (*UNLEARNING_FIELDS, "distributed."))]
  if diffs:
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:3])
    raise WorkdirError(f"config.abl.start_from={source!r} ran a different experiment ({shown}); only "
                       f"{', '.join(f + '*' for f in UNLEARNING_FIELDS)} may differ")


def _start_from(config, workdir: str, state, wall: dict[str, float]):
  """Starts this run at unlearning from config.abl.start_from's fine-tuned model and isolation."""
  source = config.abl.start_from
  saved = Checkpointer(os.path.join(source, "before_unlearning"), 1)
  restored = saved.restore_latest(like=state)
  if restored is None:
    raise WorkdirError(f"config.abl.start_from={source!r} has not reached unlearning yet (no before_unlearning "
                       "checkpoint); finish that run first")
  step, state, meta = restored
  saved.close()
  if distributed.is_primary():
    for name in ("isolation.npz", "isolation.json"):
      with wd.atomic(os.path.join(workdir, name)) as tmp:
        shutil.copy(os.path.join(source, name), tmp)
  distributed.barrier("start_from")
  logging.info("starting at unlearning from %s (its isolation and fine-tuned model, global epoch %d)", source, step)
  return state, meta["global_epoch"], {**meta["wall_time"], "poison": wall["poison"]}


@wd.guarded
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
                       max_epochs: int | None = None) -> dict[str, Any] | None:
  """Runs (or resumes) the experiment in `workdir` and returns what it writes to results.json.

  `max_epochs` stops after that many epochs in all (checkpointed), returning None: an interruption.
  """
  validate(config)
  results_path = os.path.join(workdir, "results.json")
  if not overwrite and os.path.exists(results_path):
    check_same_config(config, workdir)
    logging.warning("%s already holds a finished run; not training again (--overwrite starts over, "
                    "--mode=eval re-evaluates)", workdir)
    return wd.read_json(results_path)
  if not overwrite and os.path.exists(os.path.join(workdir, "config.json")):
    check_same_config(config, workdir)

  prep = prepare(config)
  model = _model(config, prep.train.num_classes)
  plan = phases(config)
  if config.defense.name == "abl":
    abl.num_isolated(len(prep.train), config.abl.isolation_ratio)  # Fail now, not after isolation training.
  if config.abl.start_from and config.defense.name == "abl":
    _check_start_from(config)
  wd.claim(config, workdir, overwrite)  # Only once the config has proved valid.
  log = _Log(workdir)
  eval_fn = train.make_eval_step(model, config.data.mean, config.data.std)
  epoch_test, epoch_poisoned = _subset(prep.test, config.train.epoch_eval_size), _subset(
      prep.poisoned_test, config.train.epoch_eval_size)

  placeholder_tx = train.sgd(0.0, config.train.momentum, config.train.weight_decay)
  state = train.create_train_state(model, placeholder_tx, _key(config, "init"), prep.train.images.shape[1:])
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
  done, wall = 0, {"poison": prep.seconds}
  if (restored := ckpt.restore_latest(like=state)) is not None:
    latest, state, meta = restored
    done, wall = meta["global_epoch"], {**meta["wall_time"], "poison": prep.seconds}
    logging.info("resuming %s from checkpoint %d (phase %s, epoch %d)", workdir, latest, meta["phase"], meta["epoch"])
  elif config.abl.start_from and config.defense.name == "abl":
    state, done, wall = _start_from(config, workdir, state, wall)

  isolated = None
  start = 0
  sizes = {"all": len(prep.train)}  # Examples per phase, for the ETA.
  if config.defense.name == "abl":
    k = abl.num_isolated(len(prep.train), config.abl.isolation_ratio)
    sizes.update(isolated=k, joint=k, retained=len(prep.train) - k)
  for index, phase in enumerate(plan):
    end = start + phase.epochs
    if phase.examples != "all" and isolated is None:
      if done > start or os.path.exists(os.path.join(workdir, "isolation.npz")):
        isolated = _load_isolated(workdir)
      else:
        isolated = _isolate(config, workdir, eval_fn, train.replicate(state), prep, log)
    if done >= end:
      start = end
      continue
    steps = -(-sizes[phase.examples] // phase.batch_size)
    tx = train.sgd(phase.lr(steps), config.train.momentum, config.train.weight_decay)
    state = train.with_optimizer(state, tx) if done == start else state.replace(tx=tx)
    step_fn = train.make_train_step(model, phase.loss_fn, config.data.mean, config.data.std,
                                    augment_data=phase.augment, bn_train=phase.bn_train)
    rstate = train.replicate(state)
    later = sum(-(-sizes[p.examples] // p.batch_size) * p.epochs for p in plan[index + 1:])
    logging.info("phase %s: %d epochs on %d examples (%d steps of %d)", phase.name, phase.epochs,
                 sizes[phase.examples], steps, phase.batch_size)
    unlearning = phase.name == "unlearning"
    joint_pool = _joint_pool(config, workdir, isolated, len(prep.train)) if phase.examples == "joint" else None
    if unlearning and done == start:
      _before_unlearning(config, workdir, eval_fn, rstate, prep, isolated, done, wall, log)
    for epoch in range(done - start, phase.epochs):
      t0 = time.perf_counter()
      data_key = jax.random.fold_in(jax.random.fold_in(_key(config, "data"), index), epoch)
      aug_key = jax.random.fold_in(jax.random.fold_in(_key(config, "augment"), index), epoch)
      order = _epoch_order(phase, config, isolated, len(prep.train), data_key, joint_pool)
      describe = f"{phase.name} epoch {epoch + 1}/{phase.epochs}"
      rstate, summary = train.run_epoch(
          step_fn, rstate, prep.train.images, prep.train.labels, order, aug_key,
          log_every=config.train.log_every_steps, describe=describe,
          eta_steps_after=(phase.epochs - epoch - 1) * steps + later,
          on_log=lambda m, e=epoch: log(phase=phase.name, epoch=e + 1, **m))
      wall[phase.name] = wall.get(phase.name, 0.0) + time.perf_counter() - t0
      done += 1
      record = {"phase": phase.name, "epoch": epoch + 1, "global_epoch": done,
                **{f"train_{k}": v for k, v in summary.items()}}
      every = config.train.eval_every_epochs
      if unlearning or (every and ((epoch + 1) % every == 0 or epoch + 1 == phase.epochs)):
        record.update(evaluate.test_metrics(eval_fn, rstate, epoch_test, epoch_poisoned,
                                            config.train.eval_batch_size))
        asr = record["attack_success_rate"]
        logging.info("%s: CA %.4f, ASR %s (on %d test images)", describe, record["clean_accuracy"],
                     "n/a" if asr is None else f"{asr:.4f}", len(epoch_test))
      meta = {"phase": phase.name, "epoch": epoch + 1, "global_epoch": done, "wall_time": wall}
      if unlearning:
        stop = _unlearning_check(config, eval_fn, rstate, prep, isolated, record)
        if stop and epoch + 1 < phase.epochs:
          logging.info("unlearning stopped after epoch %d: accuracy on the isolated set %.3f <= %.3f "
                       "(config.abl.unlearning_stop)", epoch + 1, record["isolated_accuracy"],
                       config.abl.stop_accuracy)
          record["stopped"] = True
          done = meta["global_epoch"] = end  # The phase counts as finished: a resume does not go on.
          meta["stopped_at_epoch"] = epoch + 1
      log(**record)
      if unlearning:
        _write_curve(workdir)
      if distributed.is_primary():
        ckpt.save(done, train.unreplicate(rstate), meta)
      if max_epochs is not None and done >= max_epochs:
        ckpt.close()
        distributed.barrier("interrupted")
        logging.info("stopping after %d epochs (max_epochs); rerun to resume", done)
        return None
      if done >= end:
        break
    state = train.unreplicate(rstate)
    start = end
  ckpt.close()

  t0 = time.perf_counter()
  results = _with_isolation(_final_metrics(config, eval_fn, train.replicate(state), prep), workdir)
  wall["evaluate"] = time.perf_counter() - t0
  results["wall_time"] = wall
  if distributed.is_primary():
    save_examples(workdir, prep, config.attack.target_label)
    wd.write_json(results_path, results)
  distributed.barrier("results")
  if not distributed.is_primary():  # The same metrics; the primary's file also has its wall times.
    results = wd.read_json(results_path)
  logging.info("results: %s", _summary(results))
  return results


def save_examples(workdir: str, prep: Prepared, target: int) -> None:
  """Writes WORKDIR/examples.npz: one clean and triggered test image per non-target class (for the gallery)."""
  if prep.poisoned_test is None:
    return
  keep = np.flatnonzero(prep.test.labels != target)  # poisoned_test holds these test images, in this order.
  pos = np.array([np.flatnonzero(prep.test.labels[keep] == c)[0] for c in np.unique(prep.test.labels[keep])])
  wd.write_npz(os.path.join(workdir, "examples.npz"), clean=prep.test.images[keep[pos]],
           triggered=prep.poisoned_test.images[pos], labels=prep.test.labels[keep[pos]], target=target,
           class_names=np.array(prep.test.class_names))


def _final_metrics(config, eval_fn, rstate, prep: Prepared) -> dict[str, Any]:
  """Every metric of results.json / eval.json, on the full test set."""
  out: dict[str, Any] = {"attack": config.attack.name, "defense": config.defense.name}
  out.update(evaluate.test_metrics(eval_fn, rstate, prep.test, prep.poisoned_test, config.train.eval_batch_size))
  out.update(evaluate.train_metrics(eval_fn, rstate, prep.train, prep.is_poisoned, config.train.eval_batch_size))
  out["num_train"], out["num_poisoned"], out["num_test"] = len(prep.train), int(prep.is_poisoned.sum()), len(prep.test)
  out["num_poisoned_test"] = 0 if prep.poisoned_test is None else len(prep.poisoned_test)
  if prep.cross_test is not None:  # input_aware: a trigger from another image should not flip the label.
    out.update(evaluate.cross_trigger_metrics(eval_fn, rstate, prep.cross_test, prep.is_cross,
                                              config.train.eval_batch_size))
  out["isolation"] = None
  out["config"] = wd.config_json(config)
  out["versions"] = {"python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jax.lib.__version__,
                     "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "devices": [str(d) for d in jax.local_devices()], "processes": jax.process_count(),
                     "global_devices": jax.device_count()}
  return out


@wd.guarded
def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Restores the latest checkpoint in `workdir`, evaluates it, and writes WORKDIR/eval.json."""
  validate(config)
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise WorkdirError(f"workdir {workdir} holds no run (no config.json); train first")
  check_same_config(config, workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
  if ckpt.latest() is None:
    raise WorkdirError(f"workdir {workdir} holds no checkpoint to evaluate")
  prep = prepare(config)
  model = _model(config, prep.train.num_classes)
  tx = train.sgd(0.0, config.train.momentum, config.train.weight_decay)
  state = train.create_train_state(model, tx, _key(config, "init"), prep.train.images.shape[1:])
  latest, state, meta = ckpt.restore_latest(like=state)
  ckpt.close()
  out = _final_metrics(config, train.make_eval_step(model, config.data.mean, config.data.std),
                       train.replicate(state), prep)
  out["checkpoint"] = {"step": latest, "phase": meta["phase"], "epoch": meta["epoch"]}
  if distributed.is_primary():
    wd.write_json(os.path.join(workdir, "eval.json"), _with_isolation(out, workdir))
  distributed.barrier("eval")
  logging.info("eval of checkpoint %d (%s epoch %d): %s", latest, meta["phase"], meta["epoch"], _summary(out))
  return out


def _with_isolation(out: dict[str, Any], workdir: str) -> dict[str, Any]:
  """Adds the run's isolation stats and unlearning summary (CA/ASR before it, where it stopped)."""
  path = os.path.join(workdir, "isolation.json")
  if os.path.exists(path):
    out["isolation"] = wd.read_json(path)
  curve = unlearning_curve(workdir)
  if curve:
    a = out["config"]["abl"]
    out["unlearning"] = {
        "mode": a["unlearning_mode"], "loss": a["unlearning_loss"], "bn": a["unlearning_bn"], "stop": a["unlearning_stop"],
        "start_from": a["start_from"] or None,
        "before": {k: curve[0][k] for k in ("clean_accuracy", "attack_success_rate", "isolated_accuracy")},
        "epochs_run": curve[-1]["epoch"],
        "stopped_at_epoch": next((c["epoch"] for c in curve if c["stopped"]), None),
    }
  return out


def _summary(r: dict[str, Any]) -> str:
  asr = r["attack_success_rate"]
  iso = r.get("isolation") or {}
  text = f"CA {r['clean_accuracy']:.4f}, ASR {'n/a' if asr is None else f'{asr:.4f}'}"
  if iso.get("precision") is not None:
    text += f", isolation precision {iso['precision']:.3f} recall {iso['recall'] or 0:.3f}"
  return text
