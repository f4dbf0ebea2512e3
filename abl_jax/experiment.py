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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from abl_jax import abl, attacks, data, distributed, evaluate, metrics, models, registry, schedule, train, workdir as wd
from abl_jax.workdir import WorkdirError, check_same_config
from abl_jax.checkpoint import Checkpointer, latest_predictor

# Fields a run started from another run's fine-tuned model (config.abl.start_from) may change.
UNLEARNING_FIELDS = ("abl.unlearning_", "abl.joint_", "abl.stop_accuracy", "abl.start_from")


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Everything a run needs before training; `is_poisoned` is for metrics only."""
  train: data.Dataset
  is_poisoned: np.ndarray
  test: data.Dataset
  poisoned_test: data.Dataset | None
  seconds: float
  cross_test: data.Dataset | None = None  # input_aware / wanet: test images with another image's trigger or
  #                                          the noise-mode warp, true labels.
  is_cross: np.ndarray | None = None  # Training examples with such a trigger (metrics only).


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects bad names and ranges before any work, with one line naming the field."""
  for field in ("data.source", "model.name", "attack.name", "defense.name", "train.schedule", "train.dtype",
                "abl.loss", "abl.unlearning_mode", "abl.unlearning_loss", "abl.unlearning_bn", "abl.unlearning_stop",
                "abl.pool_rule", "abl.finetune_init", "abl.finetune_schedule", "abl.finetune_mix", "abl.gauge_mix",
                "abl.return_rule",
                "abl.kept_out", "abl.unsure", "abl.flagged_rejected", "abl.flagged_doubted",
                "abl.flagged_unsure",
                "abl.relearned_doubted", "abl.relearned_then", "abl.relearned_tested", "abl.relearned_untypical",
                "abl.regauge_init"):
    group, name = field.split(".")
    registry.check_name(f"config.{field}", config[group][name])
  if "distributed" in config:
    distributed.validate(config.distributed)
  registry.check_range("config.train.label_smoothing", config.train.label_smoothing, 0.0, 1.0, high_open=True)
  if config.model.width < 0:
    raise ValueError(f"config.model.width={config.model.width} must be >= 0 (0 = the model's default)")
  registry.check_range("config.abl.joint_exclude_ratio", config.abl.joint_exclude_ratio, 0.0, 1.0, high_open=True)
  registry.check_range("config.abl.stop_accuracy", config.abl.stop_accuracy, 0.0, 1.0)
  registry.check_range("config.abl.pool_ratio", config.abl.pool_ratio, 0.0, 1.0, high_open=True)
  registry.check_range("config.abl.class_quantile", config.abl.class_quantile, 0.0, 1.0, low_open=True)
  registry.check_range("config.abl.relabel_confidence", config.abl.relabel_confidence, 0.0, 1.0)
  registry.check_range("config.abl.relearned_at", config.abl.relearned_at, 0.0, 1.0, high_open=True)
  registry.check_range("config.abl.relearned_above", config.abl.relearned_above, 0.0, 1.0, low_open=True)
  if not config.abl.finetune_mix_alpha > 0:
    raise ValueError(f"config.abl.finetune_mix_alpha={config.abl.finetune_mix_alpha} must be > 0")
  if config.abl.finetune_mix_epochs < 0:
    raise ValueError(f"config.abl.finetune_mix_epochs={config.abl.finetune_mix_epochs} must be >= 0 (0 = every epoch)")
  if config.abl.score_epochs < 1:
    raise ValueError(f"config.abl.score_epochs={config.abl.score_epochs} must be >= 1")
  if config.abl.contradict_factor and not config.abl.contradict_factor >= 1:
    raise ValueError(f"config.abl.contradict_factor={config.abl.contradict_factor} must be 0 (off) or >= 1")
  if config.abl.class_outlier_z < 0:
    raise ValueError(f"config.abl.class_outlier_z={config.abl.class_outlier_z} must be 0 (off) or > 0")
  if config.abl.class_outlier_ratio and not config.abl.class_outlier_ratio > 1:
    raise ValueError(f"config.abl.class_outlier_ratio={config.abl.class_outlier_ratio} must be 0 (off) or > 1")
  if config.abl.pool_outlier_z < 0:
    raise ValueError(f"config.abl.pool_outlier_z={config.abl.pool_outlier_z} must be 0 (off) or > 0")
  for level in tuple(config.abl.class_outlier_below):
    if not 0 < level < 1:
      raise ValueError(f"config.abl.class_outlier_below={tuple(config.abl.class_outlier_below)} must hold levels "
                       "in (0, 1) (or be () for disown_below alone)")
  registry.check_range("config.abl.disown_below", config.abl.disown_below, 0.0, 1.0, high_open=True)
  if not config.abl.disown_below < config.abl.own_above <= 1.0:
    raise ValueError(f"config.abl.own_above={config.abl.own_above} must be in (config.abl.disown_below="
                     f"{config.abl.disown_below}, 1]")
  if config.abl.calibrate_flagged and config.abl.unlearning_epochs:
    raise ValueError("config.abl.calibrate_flagged=True offsets the fine-tuned model's logits: it needs "
                     f"config.abl.unlearning_epochs=0 (got {config.abl.unlearning_epochs})")
  a = config.abl
  if (config.defense.name == "abl" and a.flagged_doubted == "return" and a.gauge_epochs
      and registry.looks_for_outlier_labels(a) and not schedule.relearned_epoch(a)):
    raise ValueError("config.abl.flagged_doubted='return' gives the doubted examples back at the relearned check, "
                     f"which does not run here (config.abl.relearned_at={a.relearned_at}, "
                     f"config.abl.finetune_epochs={a.finetune_epochs}): set relearned_at in (0, 1) with "
                     "finetune_epochs >= 2, or flagged_doubted='drop'")
  for field in ("gauge_epochs", "regauge_epochs", "relearned_draws"):
    if config.abl[field] < 0:
      raise ValueError(f"config.abl.{field}={config.abl[field]} must be >= 0")
  if config.abl.relearned_untypical == "transfer" and not config.abl.relearned_draws:
    raise ValueError("config.abl.relearned_untypical='transfer' leaves a label without typical examples to the "
                     "transfer test, which config.abl.relearned_draws=0 turns off: set relearned_draws > 0 or "
                     "relearned_untypical='skip'")
  if config.abl.relearned_tested == "learned" and not config.abl.relearned_draws:
    raise ValueError("config.abl.relearned_tested='learned' flags labels on the transfer test alone, which "
                     "config.abl.relearned_draws=0 turns off: set relearned_draws > 0 or relearned_tested='outliers'")
  if config.abl.spectral_skew < 0:
    raise ValueError(f"config.abl.spectral_skew={config.abl.spectral_skew} must be 0 (off) or > 0")
  if not (config.abl.spectral_kurtosis == 0 or 1 < config.abl.spectral_kurtosis < 3):
    raise ValueError(f"config.abl.spectral_kurtosis={config.abl.spectral_kurtosis} must be 0 (off) or in (1, 3) "
                     "(two equal point masses give 1, a normal 3)")
  if not (config.abl.spectral_bimodality == 0 or 1 / 3 < config.abl.spectral_bimodality <= 1):
    raise ValueError(f"config.abl.spectral_bimodality={config.abl.spectral_bimodality} must be 0 (off) or in "
                     "(1/3, 1] (a normal gives 1/3, a uniform 5/9, two equal point masses 1)")
  if not 0 <= config.abl.gauge_drop <= 1:
    raise ValueError(f"config.abl.gauge_drop={config.abl.gauge_drop} must be in [0, 1] (0 = off)")
  if not 0 < config.abl.gauge_drop_cap <= 1:
    raise ValueError(f"config.abl.gauge_drop_cap={config.abl.gauge_drop_cap} must be in (0, 1]")
  if not (isinstance(config.abl.gauge_drop_epochs, int) and config.abl.gauge_drop_epochs >= 0):
    raise ValueError(f"config.abl.gauge_drop_epochs={config.abl.gauge_drop_epochs} must be an integer >= 0 "
                     "(0 = every gauge epoch)")
  if config.abl.gauge_drop == 1 and config.abl.gauge_drop_cap == 1:
    raise ValueError("config.abl.gauge_drop=1 with config.abl.gauge_drop_cap=1 leaves every example out of the "
                     "gauges' training; lower one of them")
  if config.abl.spectral_kurtosis_z < 0:
    raise ValueError(f"config.abl.spectral_kurtosis_z={config.abl.spectral_kurtosis_z} must be 0 (off) or > 0 "
                     "(an outlier score; 3.5 is the usual cut-off)")
  if not 0 <= config.abl.spectral_pursuit < 1:
    raise ValueError(f"config.abl.spectral_pursuit={config.abl.spectral_pursuit} must be 0 (off) or in (0, 1) "
                     "(a median loss rank within the label)")
  if not (isinstance(config.abl.spectral_pursuit_dims, int) and config.abl.spectral_pursuit_dims >= 2):
    raise ValueError(f"config.abl.spectral_pursuit_dims={config.abl.spectral_pursuit_dims} must be an integer >= 2")
  if not 0 <= config.abl.candidate_triggers <= 1:
    raise ValueError(f"config.abl.candidate_triggers={config.abl.candidate_triggers} must be 0 (off) or in (0, 1] "
                     "(the share of each fine-tuning batch given another label's candidate trigger)")
  scale = tuple(config.abl.candidate_scale)
  if not (len(scale) == 2 and all(isinstance(f, (int, float)) for f in scale) and 0 < scale[0] <= scale[1]):
    raise ValueError(f"config.abl.candidate_scale={scale} must be two numbers (low, high) with 0 < low <= high "
                     "(the range each candidate trigger's factor is drawn from)")
  if config.abl.candidate_pool and not config.abl.candidate_triggers:
    raise ValueError("config.abl.candidate_pool=True adds candidate triggers to fine-tuning, but "
                     "config.abl.candidate_triggers=0 adds none; set candidate_triggers in (0, 1] or "
                     "candidate_pool=False")
  if not (isinstance(config.abl.gauge_downsample, int) and config.abl.gauge_downsample >= 1):
    raise ValueError(f"config.abl.gauge_downsample={config.abl.gauge_downsample} must be an integer >= 1 "
                     "(1 = full resolution)")
  if not config.abl.spectral_tail > 0:
    raise ValueError(f"config.abl.spectral_tail={config.abl.spectral_tail} must be > 0")
  if config.abl.finetune_init == "gauge" and not (config.abl.gauge_epochs and config.abl.return_rule == "agree"):
    raise ValueError("config.abl.finetune_init='gauge' needs a gauge: config.abl.gauge_epochs > 0 and "
                     "config.abl.return_rule='agree'")
  if config.defense.name == "abl" and config.abl.return_rule != "none" and not config.abl.gauge_epochs and not (
      1 <= config.abl.return_epoch < config.abl.finetune_epochs):
    raise ValueError(f"config.abl.return_epoch={config.abl.return_epoch} must be in [1, "
                     f"{config.abl.finetune_epochs}) (config.abl.finetune_epochs) when config.abl.return_rule="
                     f"{config.abl.return_rule!r} and config.abl.gauge_epochs=0")
  floor = config.attack.floor_model
  if floor and not (os.path.exists(os.path.join(floor, "results.json"))
                    and os.path.exists(os.path.join(floor, "data.json"))):
    raise ValueError(f"config.attack.floor_model={floor!r} holds no finished run (no results.json and data.json); "
                     "give the workdir of a finished run on the same test set, or ''")
  if config.abl.start_from and not os.path.exists(os.path.join(config.abl.start_from, "config.json")):
    raise ValueError(f"config.abl.start_from={config.abl.start_from!r} holds no run (no config.json)")
  if config.attack.name != "none":
    registry.check_range("config.attack.poison_rate", config.attack.poison_rate, 0.0, 1.0, low_open=True)
  registry.check_range("config.abl.isolation_ratio", config.abl.isolation_ratio, 0.0, 1.0, low_open=True,
                       high_open=True)
  for field in ("train.batch_size", "train.eval_batch_size", "abl.unlearning_batch_size", "abl.joint_batch_size"):
    group, name = field.split(".")
    train.check_batch_size(config[group][name], f"config.{field}")
  for field in ("train.epochs", "abl.isolation_epochs", "abl.finetune_epochs", "abl.unlearning_epochs"):
    group, name = field.split(".")
    if config[group][name] < 0:
      raise ValueError(f"config.{field}={config[group][name]} must be >= 0")


def prepare(config: ml_collections.ConfigDict) -> Prepared:
  """Loads the data and poisons the training set (deterministic in config.seed)."""
  t0 = time.perf_counter()
  train_set, test_set = data.load(config.data, seed=config.seed)
  poisoned = attacks.poison(config.attack, train_set, schedule.key_for(config, "poison"), config=config)
  poisoned_test = None
  if poisoned.apply_trigger is not None:
    poisoned_test = attacks.poisoned_test_set(test_set, poisoned, config.attack.target_label)
  return Prepared(poisoned.train, poisoned.is_poisoned, test_set, poisoned_test, time.perf_counter() - t0,
                  attacks.cross_test_set(test_set, poisoned), poisoned.is_cross)


def data_fingerprints(prep: Prepared) -> dict[str, str]:
  """data.fingerprint of each dataset the run trains or is tested on (saved in data.json, checked on resume)."""
  sets = {"train": prep.train, "test": prep.test, "poisoned_test": prep.poisoned_test, "cross_test": prep.cross_test}
  return {name: data.fingerprint(ds.images, ds.labels) for name, ds in sets.items() if ds is not None}


def _model(config: ml_collections.ConfigDict, train_set: data.Dataset):
  """The classifier; parameters, optimizer state and BatchNorm statistics stay float32 in every dtype."""
  dtype = jnp.dtype(models.compute_dtype(config.train.dtype))
  whitening = None
  if config.model.name == "airbench":  # Its first layer whitens the patches of the images the defender has.
    x = train_set.images[:models.airbench.WHITENING_IMAGES].astype(np.float32) / 255.0
    mean, std = np.asarray(config.data.mean, np.float32), np.asarray(config.data.std, np.float32)
    whitening = models.whitening_filters((x - mean) / std)
  return models.create_model(config.model.name, train_set.num_classes, config.model.width, dtype=dtype,
                             whitening=whitening)


def _subset(ds: data.Dataset | None, size: int) -> data.Dataset | None:
  """An evenly spaced subset of `size` examples for per-epoch evaluation (0 = all)."""
  if ds is None or not size or size >= len(ds):
    return ds
  return ds.take(np.linspace(0, len(ds) - 1, size).astype(np.int64))


def unlearning_curve(workdir: str) -> list[dict[str, Any]]:
  """Isolated-set metrics, CA and ASR per unlearning epoch (0 = before, full test set), from the metrics stream."""
  # Every unlearning epoch records the isolated set's metrics; CA and ASR where it was evaluated.
  records = [r for r in metrics.series(metrics.read(workdir), "unlearning/isolated_accuracy")
             if r.get("phase") == "unlearning"]
  by_epoch = {r["epoch"]: r for r in records}
  return [{"epoch": e, "clean_accuracy": r.get("eval/clean_accuracy"),
           "attack_success_rate": r.get("eval/attack_success_rate"),
           "isolated_loss": r.get("unlearning/isolated_loss"), "isolated_accuracy": r.get("unlearning/isolated_accuracy"),
           "stopped": bool(r.get("unlearning/stopped"))} for e, r in sorted(by_epoch.items())]


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


def _start_from(run: schedule.Run) -> None:
  """Starts `run` at unlearning from config.abl.start_from's fine-tuned model and isolation."""
  source = run.config.abl.start_from
  saved = Checkpointer(os.path.join(source, "before_unlearning"), 1)
  restored = saved.restore_latest(like=train.to_host(run.state))
  if restored is None:
    raise WorkdirError(f"config.abl.start_from={source!r} has not reached unlearning yet (no before_unlearning "
                       "checkpoint); finish that run first")
  step, state, meta = restored
  saved.close()
  if distributed.is_primary():
    for name in ("isolation.npz", "isolation.json"):
      with wd.atomic(os.path.join(run.workdir, name)) as tmp:
        shutil.copy(os.path.join(source, name), tmp)
  distributed.barrier("start_from")
  logging.info("starting at unlearning from %s (its isolation and fine-tuned model, global epoch %d)", source, step)
  run.state = train.replicate(state, run.mesh)
  run.done, run.step = meta["global_epoch"], meta["global_step"]
  run.wall.update({k: v for k, v in meta["wall_time"].items() if k != "poison"})


def _restore(run: schedule.Run) -> None:
  """Moves `run` to its latest checkpoint, if any (or to config.abl.start_from's fine-tuned model)."""
  restored = run.checkpoints.restore_latest(like=train.to_host(run.state))
  if restored is None:
    if run.config.abl.start_from and run.config.defense.name == "abl":
      _start_from(run)
    return
  latest, state, meta = restored
  if "global_step" not in meta:
    raise WorkdirError(f"checkpoint {latest} in {run.workdir} was written by an older abl-jax; "
                       "use --overwrite to start over")
  run.state = train.replicate(state, run.mesh)
  run.done, run.step = meta["global_epoch"], meta["global_step"]
  run.wall.update({k: v for k, v in meta["wall_time"].items() if k != "poison"})
  logging.info("resuming %s from checkpoint %d (phase %s, epoch %d)", run.workdir, latest, meta["phase"], meta["epoch"])


def _initial_state(config: ml_collections.ConfigDict, model, image_shape: tuple[int, ...]) -> train.TrainState:
  """Fresh weights; every phase replaces the optimizer (train.sgd keeps one optimizer-state structure)."""
  tx = train.sgd(0.0, config.train.momentum, config.train.weight_decay)
  return train.create_train_state(model, tx, schedule.key_for(config, "init"), image_shape)


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
    results = wd.read_json(results_path)
    floor = config.attack.floor_model
    if floor and config.attack.name != "none" and results.get("floor_model") != floor:
      results = _add_floor(config, workdir, results)
    return results
  if not overwrite and os.path.exists(os.path.join(workdir, "config.json")):
    check_same_config(config, workdir)

  prep = prepare(config)
  fingerprints = data_fingerprints(prep)
  if config.defense.name == "abl":
    abl.num_isolated(len(prep.train), config.abl.isolation_ratio)  # Fail now, not after isolation training.
    height, width = prep.train.images.shape[1:3]
    factor = config.abl.gauge_downsample
    if config.abl.gauge_epochs and (height % factor or width % factor):
      raise ValueError(f"config.abl.gauge_downsample={factor} must divide the image size {height}x{width}")
    if config.abl.start_from:
      _check_start_from(config)
      wd.check_data(config.abl.start_from, fingerprints, write=False)
  wd.claim(config, workdir, overwrite)  # Only once the config has proved valid.
  wd.check_data(workdir, fingerprints, write=True)

  model = _model(config, prep.train)
  mesh = train.default_mesh()
  size = config.train.epoch_eval_size
  evaluation = schedule.Evaluation(prep.test, prep.poisoned_test, _subset(prep.test, size),
                                   _subset(prep.poisoned_test, size), prep.is_poisoned)
  run = schedule.Run(config, workdir, prep.train, evaluation, model, mesh,
                     train.replicate(_initial_state(config, model, prep.train.images.shape[1:]), mesh),
                     Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints),
                     metrics.Writer(workdir, enabled=distributed.is_primary()), {"poison": prep.seconds},
                     max_epochs=max_epochs)
  try:
    _restore(run)
    for step in schedule.schedule(config):
      step(run)
  except schedule.Interrupted as stop:
    distributed.barrier("interrupted")
    logging.info("%s", stop)
    return None
  finally:
    run.checkpoints.close()
    run.writer.close()

  t0 = time.perf_counter()
  results = _with_isolation(_final_metrics(config, run.predict(), prep, fingerprints), workdir)
  run.wall["evaluate"] = time.perf_counter() - t0
  results["wall_time"] = run.wall
  if distributed.is_primary():
    save_examples(workdir, prep, config.attack.target_label)
    curve = unlearning_curve(workdir)
    if curve:
      wd.write_json(os.path.join(workdir, "unlearning_curve.json"), {"curve": curve})
    wd.write_json(results_path, results)
  distributed.barrier("results")
  if not distributed.is_primary():  # The same metrics; the primary's file also has its wall times.
    results = wd.read_json(results_path)
  logging.info("results: %s", _summary(results))
  return results


def _add_floor(config: ml_collections.ConfigDict, workdir: str, results: dict[str, Any]) -> dict[str, Any]:
  """A finished run's results with config.attack.floor_model's ASR under its trigger added (results.json too)."""
  prep = prepare(config)
  fingerprints = data_fingerprints(prep)
  wd.check_data(workdir, fingerprints, write=False)
  results = {**results, **_floor(config.attack.floor_model, prep, fingerprints)}
  if distributed.is_primary():
    wd.write_json(os.path.join(workdir, "results.json"), results)
  distributed.barrier("floor")
  logging.info("%s: added the ASR of %s under this run's trigger to results.json: %.4f", workdir,
               config.attack.floor_model, results["floor_asr"])
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


def _final_metrics(config: ml_collections.ConfigDict, predict: train.Predict, prep: Prepared,
                   fingerprints: dict[str, str]) -> dict[str, Any]:
  """Every metric of results.json / eval.json, on the full test set."""
  out: dict[str, Any] = {"attack": config.attack.name, "defense": config.defense.name}
  out.update(evaluate.test_metrics(predict, prep.test, prep.poisoned_test, per_class=True))
  target = config.attack.target_label
  out["target_class_accuracy"] = (out["class_accuracy"][target]
                                  if config.attack.name != "none" and target < len(out["class_accuracy"]) else None)
  out.update(evaluate.train_metrics(predict, prep.train, prep.is_poisoned))
  out["num_train"], out["num_poisoned"], out["num_test"] = len(prep.train), int(prep.is_poisoned.sum()), len(prep.test)
  out["num_poisoned_test"] = 0 if prep.poisoned_test is None else len(prep.poisoned_test)
  if prep.cross_test is not None:  # input_aware: another image's trigger; wanet: the noise-mode warp.
    cross = evaluate.cross_trigger_metrics(predict, prep.cross_test, prep.is_cross)
    if config.attack.name == "wanet":  # Named as the attack names it.
      cross = {"noise_mode_accuracy": cross["cross_trigger_accuracy"], "num_noise_mode_train": cross["num_cross_train"]}
    out.update(cross)
  if config.attack.floor_model and prep.poisoned_test is not None:
    out.update(_floor(config.attack.floor_model, prep, fingerprints))
  out["isolation"] = None
  out["data"] = fingerprints
  out["config"] = wd.config_json(config)
  out["versions"] = {"python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jax.lib.__version__,
                     "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "devices": [str(d) for d in jax.local_devices()], "processes": jax.process_count(),
                     "global_devices": jax.device_count()}
  return out


def _floor(workdir: str, prep: Prepared, fingerprints: dict[str, str]) -> dict[str, Any]:
  """The ASR and untriggered target rate of the final model in `workdir` (config.attack.floor_model) under this
  run's trigger: what a model that never learned the backdoor shows, the floor of this run's ASR."""
  theirs = wd.read_json(os.path.join(workdir, "data.json")).get("test")
  if theirs != fingerprints["test"]:
    raise ValueError(f"config.attack.floor_model={workdir!r} was tested on another test set (data.json test "
                     f"{theirs} against {fingerprints['test']}); give a run on this run's data")
  predict = latest_predictor(workdir, prep.test.num_classes, prep.test.images.shape[1:])
  m = evaluate.test_metrics(predict, prep.test, prep.poisoned_test)
  return {"floor_model": workdir, "floor_asr": m["attack_success_rate"],
          "floor_untriggered_target_rate": m["untriggered_target_rate"]}


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
  fingerprints = data_fingerprints(prep)
  wd.check_data(workdir, fingerprints, write=False)
  model = _model(config, prep.train)
  latest, state, meta = ckpt.restore_latest(like=_initial_state(config, model, prep.train.images.shape[1:]))
  ckpt.close()
  offset = wd.logit_offset(workdir) if meta["phase"] in ("finetune", "finetune_relearned") else None
  predict = train.predictor(model, train.variables_of(state, offset), config.data.mean, config.data.std,
                            config.train.eval_batch_size)
  out = _final_metrics(config, predict, prep, fingerprints)
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
    out["suspected_labels"] = wd.suspected_labels(out["isolation"])
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
  if r.get("floor_asr") is not None:
    text += f" (the floor model's {r['floor_asr']:.4f})"
  if iso.get("precision") is not None:
    text += f", isolation precision {iso['precision']:.3f} recall {iso['recall'] or 0:.3f}"
  if r.get("suspected_labels") is not None:  # The defense's own verdict: read without the poison mask.
    text += f", suspected labels {', '.join(map(str, r['suspected_labels'])) or 'none'}"
  return text
