"""The training schedules, as a sequence of named steps over one run context.

    for step in schedule(config):   # no defense: [train]; the default defense: [isolation_training, isolate,
                                    #   gauge_training, give_back, regauge, finetune, unlearn]
      step(run)

A training step describes a `Phase` (examples, loss, optimizer, epochs) and hands it to `run_phase`, the one
epoch loop: resume, metrics, per-epoch evaluation, checkpoints. Adding a phase is one function here and one
line in `schedule`. The defense reads the training images, labels and its own scores only: the ground-truth
poison mask stays inside `Run.evaluation`, which computes metrics for the log and the results.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping

import flax
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from abl_jax import abl, data, distributed, evaluate, registry, train, workdir as wd
from abl_jax.checkpoint import Checkpointer
from abl_jax.data import Dataset
from abl_jax.metrics import Writer

PURPOSES = ("poison", "init", "data", "augment", "check")  # One PRNG key each, folded from config.seed.


def key_for(config: ml_collections.ConfigDict, purpose: str) -> jax.Array:
  """The PRNG key for one purpose, derived from config.seed."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), PURPOSES.index(purpose))


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The test sets and the ground truth: metrics for the log and the results, never inputs of the defense."""
  test: Dataset
  poisoned_test: Dataset | None
  epoch_test: Dataset  # The subset evaluated after each epoch (config.train.epoch_eval_size).
  epoch_poisoned_test: Dataset | None
  is_poisoned: np.ndarray

  def test_metrics(self, predict: train.Predict, full: bool) -> dict[str, float | None]:
    """CA, ASR and test losses on the whole test set (`full`) or on the per-epoch subset."""
    if full:
      return evaluate.test_metrics(predict, self.test, self.poisoned_test)
    return evaluate.test_metrics(predict, self.epoch_test, self.epoch_poisoned_test)

  def isolation_metrics(self, isolated: np.ndarray) -> dict[str, float | int | None]:
    """Precision and recall of an isolated set against the ground truth."""
    return evaluate.isolation_metrics(isolated, self.is_poisoned)


@dataclasses.dataclass
class Run:
  """Everything the steps of a schedule share; `state` is replicated on `mesh`."""
  config: ml_collections.ConfigDict
  workdir: str
  train: Dataset  # The (poisoned) training set: what the defender has.
  evaluation: Evaluation
  model: flax.linen.Module
  mesh: Mesh
  state: train.TrainState
  checkpoints: Checkpointer
  writer: Writer
  wall: dict[str, float]
  done: int = 0  # Global epochs finished (all phases), as checkpointed.
  step: int = 0  # Global training steps finished.
  cursor: int = 0  # The global epoch where the next phase starts.
  phases: int = 0  # Training phases met so far; a phase's index seeds its data order and augmentation.
  isolated: np.ndarray | None = None  # Indices isolated as suspected backdoor examples (ABL).
  pool: np.ndarray | None = None  # The suspicious pool fine-tuning leaves out (isolated included; ABL).
  returned: np.ndarray | None = None  # Pool examples given back to fine-tuning (config.abl.return_rule).
  left_out: np.ndarray | None = None  # Examples outside the pool fine-tuning leaves out (abl.flagged_rejected).
  labels: np.ndarray | None = None  # Fine-tuning's training labels where they differ (config.abl.kept_out).
  scores: np.ndarray | None = None  # Every training example's isolation loss (ABL).
  suspected: np.ndarray | None = None  # Examples the spectral rule adds to the pool, to be disowned (ABL).
  max_epochs: int | None = None  # Stop (checkpointed) after this many global epochs.
  logit_offset: np.ndarray | None = None  # Added to the final model's logits (config.abl.calibrate_flagged).
  triggers: np.ndarray | None = None  # [[2,] classes, H, W, C] each label's candidate trigger(s) (abl.candidate_*).

  def predict(self, probabilities: bool = False, features: bool = False) -> train.Predict:
    """The current model's (images, labels) -> (cross-entropy, prediction[, class probabilities][, features])."""
    c = self.config
    return train.predictor(self.model, train.variables_of(self.state, self.logit_offset), c.data.mean, c.data.std,
                           c.train.eval_batch_size, self.mesh, probabilities=probabilities, features=features)

  @contextlib.contextmanager
  def timed(self, key: str):
    """Adds the wall time of the block to wall[key] (results.json's wall_time)."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.wall[key] = self.wall.get(key, 0.0) + time.perf_counter() - t0

  def set_aside(self, name: str) -> None:
    """Saves the current model to WORKDIR/<name> (one Orbax checkpoint), apart from the run's checkpoints."""
    if distributed.is_primary():
      saved = Checkpointer(os.path.join(self.workdir, name), 1)
      saved.save(self.done, train.to_host(self.state), {"phase": name, "epoch": 0, "global_epoch": self.done,
                                                        "global_step": self.step, "wall_time": self.wall})
      saved.close()


class Interrupted(Exception):
  """The run stopped after `max_epochs` global epochs (checkpointed; rerun to resume)."""


@dataclasses.dataclass(frozen=True)
class Phase:
  """One training phase: which examples in which order, which loss, which optimizer, how long."""
  name: str
  epochs: int
  num_examples: int  # Examples per epoch (for the log and the optimizer schedule's length).
  order: Callable[[Run, jax.Array], np.ndarray]  # (run, key) -> one epoch's [steps, batch] training indices.
  loss_fn: train.LossFn
  lr: Callable[[int], optax.Schedule]  # Steps per epoch -> the learning rate schedule.
  batch_size: int
  augment: bool
  bn_train: bool = True  # False: BatchNorm in inference mode, statistics unchanged.
  eval_every: int = 1  # Evaluate on the per-epoch test subset every this many epochs (and after the last).
  after_epoch: Callable[[Run, dict[str, Any]], bool] | None = None  # Adds to the record; True stops the phase.
  fresh_weights: bool = False  # Start from freshly initialised weights (config.seed's init key), not the model.
  labels: np.ndarray | None = None  # Training labels of every example for this phase; None: the data's own.
  label_smoothing: float = 0.0  # Of the cross-entropy loss_fn receives (ordinary training phases only).
  mix_mode: str = "none"  # cutmix or mixup: each augmented image mixed with another of its batch (train.mix).
  mix_alpha: float = 1.0  # The mixing share's Beta(alpha, alpha).
  mix_epochs: int | None = None  # Mix in this many of the phase's first epochs only; None: in every one.
  loss_epochs: int | None = None  # loss_fn in this many of the phase's first epochs, then the batch-mean
  #                                 cross-entropy; None: loss_fn in every one.
  triggers: np.ndarray | None = None  # [classes, H, W, C]: candidate triggers added to other labels' images.
  trigger_share: float = 0.0  # Each image's probability of getting one (train.add_triggers).
  trigger_scale: tuple[float, float] = (1.0, 1.0)  # The range its factor is drawn from.
  downsample: int = 1  # Train (and evaluate) on the images averaged over blocks of this side (data.downsample).

  def steps_per_epoch(self) -> int:
    return -(-self.num_examples // self.batch_size)


def _downsampled(predict: train.Predict, factor: int) -> train.Predict:
  """`predict` on images averaged over blocks of side `factor` (data.downsample)."""
  if factor == 1:
    return predict
  return lambda images, labels: predict(data.downsample(images, factor), labels)


def run_phase(run: Run, phase: Phase) -> None:
  """Trains `phase` from where the run stands (skipped when done), evaluating and checkpointing every epoch."""
  c = run.config
  index, start, end = run.phases, run.cursor, run.cursor + phase.epochs
  run.phases, run.cursor = index + 1, end
  if run.done >= end:
    return
  steps = phase.steps_per_epoch()
  tx, rate = train.sgd(0.0, c.train.momentum, c.train.weight_decay), phase.lr(steps)  # The step takes the rate.
  if run.done == start:  # A new phase: fresh optimizer state, step 0.
    state = train.to_host(run.state)
    if phase.fresh_weights:
      state = train.create_train_state(run.model, tx, key_for(c, "init"), run.train.images.shape[1:])
    run.state = train.replicate(train.with_optimizer(state, tx), run.mesh)
  else:  # Resumed inside the phase: the checkpoint holds this phase's optimizer state.
    run.state = run.state.replace(tx=tx)
  images = data.downsample(run.train.images, phase.downsample)
  step_fns: dict[tuple[bool, bool], Callable] = {}

  def step_fn(mixing: bool, early: bool) -> Callable:
    if (mixing, early) not in step_fns:
      step_fns[mixing, early] = train.make_train_step(
          run.model, phase.loss_fn if early else abl.cross_entropy_loss, c.data.mean, c.data.std,
          momentum=c.train.momentum, weight_decay=c.train.weight_decay, augment_data=phase.augment,
          bn_train=phase.bn_train, label_smoothing=phase.label_smoothing,
          mix_mode=phase.mix_mode if mixing else "none", mix_alpha=phase.mix_alpha, triggers=phase.triggers,
          trigger_share=phase.trigger_share, trigger_scale=phase.trigger_scale, mesh=run.mesh)
    return step_fns[mixing, early]

  logging.info("phase %s: %d epochs on %d examples (%d steps of %d)", phase.name, phase.epochs, phase.num_examples,
               steps, phase.batch_size)
  for epoch in range(run.done - start, phase.epochs):
    t0 = time.perf_counter()
    data_key = jax.random.fold_in(jax.random.fold_in(key_for(c, "data"), index), epoch)
    aug_key = jax.random.fold_in(jax.random.fold_in(key_for(c, "augment"), index), epoch)
    order = phase.order(run, data_key)
    context = {"phase": phase.name, "epoch": epoch + 1}
    first = run.step
    labels = run.train.labels if phase.labels is None else phase.labels
    mixing = phase.mix_epochs is None or epoch < phase.mix_epochs
    early = phase.loss_epochs is None or epoch < phase.loss_epochs
    run.state, summary = train.run_epoch(
        step_fn(mixing, early), run.state, images, labels, order, aug_key, learning_rate=rate, mesh=run.mesh,
        log_every=c.train.log_every_steps, describe=f"{phase.name} epoch {epoch + 1}/{phase.epochs}",
        eta_steps_after=(phase.epochs - epoch - 1) * steps,
        on_log=lambda m: run.writer.write(first + m.pop("step"), {f"train/{k}": v for k, v in m.items()}, **context))
    run.step += len(order)
    run.wall[phase.name] = run.wall.get(phase.name, 0.0) + time.perf_counter() - t0
    run.done += 1
    record = {f"epoch/{k}": v for k, v in summary.items()}
    if phase.eval_every and ((epoch + 1) % phase.eval_every == 0 or epoch + 1 == phase.epochs):
      predict = _downsampled(run.predict(), phase.downsample)
      record.update({f"eval/{k}": v for k, v in run.evaluation.test_metrics(predict, full=False).items()})
    meta = {**context, "global_epoch": run.done, "global_step": run.step, "wall_time": run.wall}
    if phase.after_epoch is not None and phase.after_epoch(run, record) and epoch + 1 < phase.epochs:
      logging.info("%s stopped after epoch %d of %d", phase.name, epoch + 1, phase.epochs)
      run.done = meta["global_epoch"] = end  # The phase counts as finished: a resume does not go on.
      meta["stopped_at_epoch"] = epoch + 1
    run.writer.write(run.step, record, **context, global_epoch=run.done)
    run.writer.flush()
    if distributed.is_primary():
      run.checkpoints.save(run.done, train.to_host(run.state), meta)
    if run.max_epochs is not None and run.done >= run.max_epochs:
      raise Interrupted(f"stopped after {run.done} epochs (max_epochs); rerun to resume")
    if run.done >= end:
      break


SCORING = "scoring"  # wall_time's key for the defense's passes over the training set (scores, judgements, checks).


# --- The steps of the schedules. ------------------------------------------------------------------------------


def _all_examples(run: Run, key: jax.Array, batch_size: int) -> np.ndarray:
  return train.epoch_order(len(run.train), batch_size, key)


def train_baseline(run: Run) -> None:
  """No defense: ordinary training on every example (config.train.*)."""
  t = run.config.train

  def lr(steps_per_epoch: int) -> optax.Schedule:
    total = max(t.epochs * steps_per_epoch, 1)
    if t.schedule == "cosine":
      return optax.cosine_decay_schedule(t.learning_rate, total)
    if t.schedule == "step":
      return optax.piecewise_constant_schedule(t.learning_rate,
                                               {int(e * steps_per_epoch): 0.1 for e in t.lr_boundaries})
    return optax.constant_schedule(t.learning_rate)

  run_phase(run, Phase("train", t.epochs, len(run.train), lambda r, k: _all_examples(r, k, t.batch_size),
                       abl.cross_entropy_loss, lr, t.batch_size, t.augment, eval_every=t.eval_every_epochs,
                       label_smoothing=t.label_smoothing))


def _score_epoch(run: Run, record: dict[str, Any]) -> bool:
  """After each of the isolation phase's last config.abl.score_epochs epochs but the last: saves every example's
  loss (isolate scores the last epoch's model, the isolation model, in the pass that also takes its features)."""
  a = run.config.abl
  epoch = run.done - run.cursor + a.isolation_epochs  # This phase's epochs finished (cursor is its end).
  if a.score_epochs > 1 and a.isolation_epochs - a.score_epochs < epoch < a.isolation_epochs:
    # With fewer isolation epochs than score_epochs, every one is scored. Every process scores (one
    # computation over the mesh); the primary writes.
    with run.timed(SCORING):
      scores, _ = run.predict()(run.train.images, run.train.labels)
    if distributed.is_primary():
      wd.write_npz(_epoch_scores_path(run), **_earlier_epoch_scores(run), **{_epoch_key(epoch): scores})
    distributed.barrier("epoch_scores")
  return False


def _epoch_scores_path(run: Run) -> str:
  return os.path.join(run.workdir, "epoch_scores.npz")


def _epoch_key(epoch: int) -> str:
  return f"epoch_{epoch}"


def _earlier_epoch_scores(run: Run) -> dict[str, np.ndarray]:
  """The scored isolation epochs before the last one, by key (WORKDIR/epoch_scores.npz; empty if none)."""
  path = _epoch_scores_path(run)
  if not os.path.exists(path):
    return {}
  last = _epoch_key(run.config.abl.isolation_epochs)
  return {k: v for k, v in sorted(wd.load_npz(path).items()) if k != last}


def isolation_training(run: Run) -> None:
  """ABL's first phase: the local gradient ascent (or flooding) loss on every example, no augmentation."""
  a, t = run.config.abl, run.config.train
  run_phase(run, Phase("isolation", a.isolation_epochs, len(run.train),
                       lambda r, k: _all_examples(r, k, t.batch_size), abl.isolation_loss(a.loss, a.gamma),
                       lambda _: optax.constant_schedule(a.isolation_lr), t.batch_size, False,
                       eval_every=t.eval_every_epochs, after_epoch=_score_epoch))


def _trigger_bank(arrays: Mapping[str, np.ndarray], a: ml_collections.ConfigDict, path: str) -> np.ndarray | None:
  """Fine-tuning's candidate triggers from isolation.npz's `arrays`: [classes, H, W, C], with `abl.candidate_pool`
  [2, classes, H, W, C] (the label-wide and the pool candidates); None without `abl.candidate_triggers`."""
  if not a.candidate_triggers:
    return None
  if "candidate_triggers" not in arrays:
    raise wd.WorkdirError(f"{path} holds no candidate triggers but config.abl.candidate_triggers="
                          f"{a.candidate_triggers}; use --overwrite to start over")
  if a.candidate_pool:
    if "candidate_pool_triggers" not in arrays:
      raise wd.WorkdirError(f"{path} holds no pool candidate triggers but config.abl.candidate_pool=True; use "
                            "--overwrite to start over")
    return np.stack([arrays["candidate_triggers"], arrays["candidate_pool_triggers"]])
  return arrays["candidate_triggers"]


def isolate(run: Run) -> None:
  """Scores every training example with the isolation model and isolates the lowest losses (saved once)."""
  path = os.path.join(run.workdir, "isolation.npz")
  a = run.config.abl
  if os.path.exists(path):  # Isolated before an interruption, or copied by config.abl.start_from.
    saved = wd.load_npz(path)
    run.scores, run.isolated, run.suspected = saved["scores"], saved["isolated"], saved.get("suspected")
    run.triggers = _trigger_bank(saved, a, path)
    run.pool = _pool(run)
    return
  if run.done > run.cursor:
    raise wd.WorkdirError(f"{path} is missing but the checkpoint is past isolation; use --overwrite to start over")
  t0 = time.perf_counter()
  with run.timed(SCORING):
    scores, _, *features = run.predict(features=_spectral(a) or bool(a.candidate_triggers))(run.train.images,
                                                                                           run.train.labels)
    run.scores, run.isolated = scores, abl.isolate(scores, a.isolation_ratio)
    if a.candidate_triggers:
      triggers, tails = abl.candidate_triggers(run.train.images, run.train.labels, features[0],
                                               run.train.num_classes, a.spectral_tail, a.spectral_pursuit_dims)
    if _spectral(a):
      found = abl.spectral_outliers(features[0], run.train.labels, scores, run.train.num_classes, a.spectral_skew,
                                    a.spectral_tail, a.spectral_kurtosis, a.spectral_pursuit,
                                    a.spectral_pursuit_dims, a.spectral_bimodality,
                                    a.spectral_kurtosis_z if _defers(a) else 0.0)
  arrays = {}  # isolation.npz's arrays beyond the scores and the pool.
  if a.candidate_triggers:
    arrays = {"candidate_triggers": triggers,
              "candidate_tail": np.isin(np.arange(len(run.train)), np.concatenate(tails))}
    logging.info("candidate triggers (pursuit tails): %s examples by label, mean absolute change %s pixel levels",
                 [len(t) for t in tails],
                 np.round(np.abs(triggers).mean(axis=(1, 2, 3)).astype(float), 1).tolist())
  if _spectral(a):
    run.suspected = found.suspected
    arrays |= {"suspected": run.suspected, "spectral_skewness": found.skewness,
               "spectral_kurtosis": found.kurtosis, "spectral_projection": found.projection,
               "spectral_cut": found.cut, "spectral_pursuit_rank": found.pursuit_rank,
               "spectral_deferred": found.deferred, "spectral_kurtosis_scores": found.kurtosis_scores}
    logging.info("spectral signatures: skewness by label %s, kurtosis %s%s; flagged %s (split in two: %s%s), %d "
                 "examples to disown", np.round(found.skewness, 2).tolist(), np.round(found.kurtosis, 2).tolist(),
                 f", pursuit tail's loss rank {np.round(found.pursuit_rank, 2).tolist()}" if a.spectral_pursuit else "",
                 found.flagged.tolist() or "none", found.bimodal.tolist() or "none",
                 f"; pursued: {found.pursued.tolist() or 'none'}" if a.spectral_pursuit else "", len(run.suspected))
    if _defers(a):
      logging.info("spectral signatures: kurtosis outlier scores %s; split in two for the gauge to judge: %s",
                   np.round(found.kurtosis_scores, 2).tolist(), found.deferred.tolist() or "none")
  run.pool = _pool(run)
  if a.candidate_triggers and a.candidate_pool:
    pooled, pool_tails = abl.pool_candidate_triggers(run.train.images, run.train.labels, features[0], run.pool,
                                                     run.train.num_classes)
    arrays |= {"candidate_pool_triggers": pooled,
               "candidate_pool_tail": np.isin(np.arange(len(run.train)), np.concatenate(pool_tails))}
    logging.info("candidate triggers from the pool (smaller top-direction modes): %s examples by label, mean absolute "
                 "change %s pixel levels", [len(t) for t in pool_tails],
                 np.round(np.abs(pooled).mean(axis=(1, 2, 3)).astype(float), 1).tolist())
  run.triggers = _trigger_bank(arrays, a, path)
  isolated = run.isolated
  stats = run.evaluation.isolation_metrics(isolated)  # Metrics only: nothing below reads them.
  stats["threshold"] = float(scores[isolated[-1]])
  pool_stats = run.evaluation.isolation_metrics(run.pool)
  stats.update({"pool_rule": a.pool_rule, "pool_size": len(run.pool), "pool_precision": pool_stats["precision"],
                "pool_recall": pool_stats["recall"], "pool_threshold": float(np.max(scores[run.pool]))})
  share, label = abl.largest_label_share(run.pool, run.train.labels, run.train.num_classes)
  stats.update({"pool_largest_label_share": share, "pool_largest_label": label})
  if _spectral(a):
    stats.update({"spectral_labels": [int(k) for k in found.flagged],
                  "spectral_bimodal_labels": [int(k) for k in found.bimodal],
                  "spectral_pursued_labels": [int(k) for k in found.pursued],
                  "spectral_deferred_labels": [int(k) for k in found.deferred],
                  "spectral_skewness": [round(float(v), 3) for v in found.skewness],
                  "spectral_kurtosis": [round(float(v), 3) for v in found.kurtosis],
                  "spectral_suspected": len(run.suspected),
                  "spectral_suspected_poisoned":  # Metrics only.
                  run.evaluation.isolation_metrics(run.suspected)["num_poisoned_isolated"]})
  stats["seconds"] = time.perf_counter() - t0
  if distributed.is_primary():
    if a.score_epochs > 1:  # Every scored epoch in one file, the last one too (benchmarks read it).
      wd.write_npz(_epoch_scores_path(run), **_earlier_epoch_scores(run), **{_epoch_key(a.isolation_epochs): scores})
    # is_poisoned is saved for the report's histogram only; the steps read scores, isolated, pool and suspected.
    wd.write_npz(path, scores=scores, isolated=isolated, pool=run.pool, labels=run.train.labels,
                 is_poisoned=run.evaluation.is_poisoned, **arrays)
    wd.write_json(os.path.join(run.workdir, "isolation.json"), stats)
  distributed.barrier("isolation")
  run.writer.write(run.step, {f"isolation/{k}": v for k, v in stats.items() if k != "pool_rule"}, phase="isolate",
                   global_epoch=run.done)


def _spectral(a: ml_collections.ConfigDict) -> bool:
  """Whether spectral signatures (config.abl.spectral_skew, spectral_kurtosis, spectral_bimodality,
  spectral_pursuit) apply: their suspects are disowned through a judge that distills the pool."""
  return (bool(a.spectral_skew or a.spectral_kurtosis or a.spectral_bimodality or a.spectral_pursuit or _defers(a))
          and a.return_rule != "none" and a.kept_out == "distill")


def _defers(a: ml_collections.ConfigDict) -> bool:
  """Whether the kurtosis outlier test (config.abl.spectral_kurtosis_z) applies: a gauge judges its splits with the
  outlier label test."""
  return bool(a.spectral_kurtosis_z and a.gauge_epochs and registry.looks_for_outlier_labels(a))


def _pool(run: Run) -> np.ndarray:
  """The suspicious pool of config.abl.pool_rule, from the isolation scores (never the ground truth)."""
  a = run.config.abl
  scorings = [run.scores]  # The isolation model's: the last isolation epoch's.
  if a.score_epochs > 1:  # The losses after each of the last score_epochs epochs.
    scorings = list(_earlier_epoch_scores(run).values()) + scorings
  ranking = abl.pool_ranking(scorings, run.train.labels, a.pool_rule, a.class_quantile)
  pool = abl.suspicious_pool(ranking, run.isolated, a.pool_rule, a.pool_ratio)
  if len(pool) >= len(run.scores):
    raise ValueError(f"config.abl.pool_ratio={a.pool_ratio} leaves no example to fine-tune on "
                     f"(pool_rule={a.pool_rule!r}); use a smaller config.abl.pool_ratio")
  if run.suspected is not None and len(run.suspected):
    pool = np.union1d(pool, run.suspected)
    if len(pool) >= len(run.scores):
      raise ValueError(f"the spectral suspects (config.abl.spectral_skew={a.spectral_skew}, spectral_kurtosis="
                       f"{a.spectral_kurtosis}, spectral_bimodality={a.spectral_bimodality}) and the pool leave no "
                       "example to fine-tune on; set them to 0 or use a smaller config.abl.pool_ratio")
  return pool


def _retained(run: Run) -> np.ndarray:
  """The examples fine-tuning trains on: all but the suspicious pool, plus what was given back from it."""
  retained = np.setdiff1d(np.arange(len(run.train)), run.pool)
  if run.returned is not None:
    retained = np.union1d(retained, run.returned)
  if run.left_out is not None:
    retained = np.setdiff1d(retained, run.left_out)
  return retained


def _finetune_lr(a: ml_collections.ConfigDict, first_epoch: int) -> Callable[[int], optax.Schedule]:
  """Steps per epoch -> the fine-tuning learning rate, for a phase that starts `first_epoch` epochs into it."""

  def lr(steps_per_epoch: int) -> optax.Schedule:
    offset = first_epoch * steps_per_epoch  # The schedule runs over all finetune_epochs at this phase's pace.
    if a.finetune_schedule == "cosine":
      whole = optax.cosine_decay_schedule(a.finetune_lr, max(a.finetune_epochs * steps_per_epoch, 1))
    else:
      whole = optax.piecewise_constant_schedule(a.finetune_lr,
                                                {int(e * steps_per_epoch): 0.1 for e in a.finetune_lr_boundaries})
    return lambda step: whole(step + offset)

  return lr


def _order(run: Run, examples: np.ndarray, labels: np.ndarray | None,
           steps: int | None = None) -> Callable[[Run, jax.Array], np.ndarray]:
  """One epoch's batches of `examples`: each once, or class-balanced by label (config.abl.finetune_balance);
  `steps`: as many as the examples take, by default."""
  batch = run.config.train.batch_size
  if run.config.abl.finetune_balance:
    labels = run.train.labels if labels is None else labels
    classes = labels[examples] if labels.ndim == 1 else labels[examples].argmax(axis=1)
    return lambda r, k: examples[train.balanced_order(classes, batch, k, steps)]
  return lambda r, k: examples[train.epoch_order(len(examples), batch, k, steps)]


def _finetune_order(run: Run, retained: np.ndarray) -> Callable[[Run, jax.Array], np.ndarray]:
  """One fine-tuning epoch's batches, as `_order`, over the examples retained when the epoch starts (examples given
  back mid-way join; config.abl.flagged_doubted=return), in as many steps as `retained` takes."""
  steps = -(-len(retained) // run.config.train.batch_size)
  labels = np.array(run.train.labels if run.labels is None else run.labels)  # As judged when the phase starts.
  return lambda r, key: _order(r, _retained(r), labels, steps)(r, key)


def _finetune_phase(run: Run, name: str, first_epoch: int, epochs: int) -> Phase:
  a, t = run.config.abl, run.config.train
  retained = _retained(run)
  order = _finetune_order(run, retained) if a.flagged_doubted == "return" else _order(run, retained, run.labels)
  return Phase(name, epochs, len(retained), order, abl.cross_entropy_loss, _finetune_lr(a, first_epoch),
               t.batch_size, t.augment, eval_every=t.eval_every_epochs,
               fresh_weights=first_epoch == 0 and a.finetune_init == "scratch", labels=run.labels,
               label_smoothing=t.label_smoothing, mix_mode=a.finetune_mix, mix_alpha=a.finetune_mix_alpha,
               mix_epochs=max(a.finetune_mix_epochs - first_epoch, 0) if a.finetune_mix_epochs else None,
               triggers=run.triggers, trigger_share=a.candidate_triggers,
               trigger_scale=tuple(float(f) for f in a.candidate_scale))


def finetune(run: Run) -> None:
  """ABL's second phase: ordinary training on the examples outside the suspicious pool (config.abl.pool_*),
  up to config.abl.return_epoch when part of the pool is given back after it; with a gauge, the relearned check
  (config.abl.relearned_at) after its epoch."""
  a = run.config.abl
  split = a.return_rule != "none" and not a.gauge_epochs
  phase = _finetune_phase(run, "finetune", 0, a.return_epoch if split else a.finetune_epochs)
  check = relearned_epoch(a) if run.labels is not None and run.labels.ndim == 2 else 0
  if check:
    at = run.cursor + check
    if run.done >= at:  # Resumed past the check: its verdict, after the phase's order was drawn as before it.
      _relearned(run)
    phase = dataclasses.replace(phase, after_epoch=lambda r, record: r.done == at and _relearned(r, record))
  run_phase(run, phase)
  if check and a.relearned_then == "restart" and len(wd.load_npz(os.path.join(run.workdir, "relearned.npz"))[
      "relearned_labels"]):  # Stopped at the check: fine-tuning again from the isolation model, as judged now.
    if run.done == run.cursor:
      _restore_isolation_model(run)
    run_phase(run, _finetune_phase(run, "finetune_relearned", 0, a.finetune_epochs))
  if a.calibrate_flagged and a.gauge_epochs:
    _calibrate(run)


def _calibrate(run: Run) -> None:
  """Offsets the final model's logits of the labels the gauge flagged (config.abl.calibrate_flagged; saved in
  calibration.npz, or read from it where a run is resumed): fine-tuning saw few of their examples with their
  label, and without offsets the model predicts them less often than a typical label."""
  path = os.path.join(run.workdir, "calibration.npz")
  if os.path.exists(path):
    saved = wd.load_npz(path)
  else:
    judged = wd.load_npz(wd.followed_judgement(run.workdir))
    flagged = judged.get("outlier_labels", np.zeros(0, np.int64))
    offsets = np.zeros(run.train.num_classes)
    if len(flagged):
      with run.timed(SCORING):
        _, _, probs = run.predict(probabilities=True)(run.train.images, run.train.labels)
      offsets = abl.flagged_offsets(probs, run.train.labels, flagged, run.train.num_classes)
    saved = {"calibrated_labels": flagged, "logit_offset": offsets}
    logging.info("calibration: logit offsets %s for the flagged labels %s", np.round(offsets[flagged], 2).tolist(),
                 flagged.tolist() or "none")
    if distributed.is_primary():
      wd.write_npz(path, **saved)
      summary = os.path.join(run.workdir, "isolation.json")
      wd.write_json(summary, {**wd.read_json(summary), "calibrated_labels": [int(k) for k in flagged],
                              "logit_offset": [round(float(v), 4) for v in offsets]})
    distributed.barrier("calibrate")
  if len(saved["calibrated_labels"]):
    run.logit_offset = saved["logit_offset"]


def relearned_epoch(a: ml_collections.ConfigDict) -> int:
  """The fine-tuning epoch after which the relearned check runs (config.abl.relearned_at), 0 where it does not."""
  if not (a.relearned_at and a.gauge_epochs and registry.looks_for_outlier_labels(a) and a.finetune_epochs >= 2):
    return 0
  return min(max(1, round(a.relearned_at * a.finetune_epochs)), a.finetune_epochs - 1)


def _coherence_text(coherence: np.ndarray) -> str:
  """'label: learned / rest / typical' for each label whose coherence was measured."""
  return ", ".join(f"{k}: {coherence[0, k]:.2f} / {coherence[1, k]:.2f} / {coherence[2, k]:.2f}"
                   for k in np.flatnonzero(~np.isnan(coherence[0]))) or "none"


TRANSFER_IMAGES = 500  # Other labels' images the relearned check stamps (evenly spaced among those eligible).


def _transfer(run: Run, outside: np.ndarray, mine: np.ndarray, learned: np.ndarray, rejected: np.ndarray,
              own: np.ndarray, predicted: np.ndarray, label: int) -> tuple[float, float, int]:
  """The relearned check's trigger transfer of `label` (abl.transfer_shares: its learned rejected examples' mean
  image, less its unrejected examples', added to other labels' judge-backed, correctly predicted images outside
  the pool), its z-score among config.abl.relearned_draws random groups of as many unrejected examples (both NaN
  where there is nothing to stamp or compare with), and the images the model predicted for them. Masks and `own`
  (the judge's probability of the label) and `predicted` (the model's class) are over `outside`."""
  base = np.flatnonzero(mine & ~rejected)
  group = np.flatnonzero(mine & learned)
  others = np.flatnonzero(~mine & (own >= run.config.abl.own_above) & (predicted == run.train.labels[outside]))
  if not len(base) or not len(group) or not len(others):
    return float("nan"), float("nan"), 0
  others = others[np.linspace(0, len(others) - 1, min(len(others), TRANSFER_IMAGES)).astype(int)]
  images = lambda rows: run.train.images[outside[rows]].astype(np.float32)
  centre = images(base).mean(axis=0)
  key = jax.random.fold_in(key_for(run.config, "check"), label)
  draws = [np.asarray(jax.random.choice(jax.random.fold_in(key, d), base, (min(len(group), len(base)),),
                                        replace=False)) for d in range(run.config.abl.relearned_draws)]
  deltas = np.stack([images(rows).mean(axis=0) - centre for rows in [group, *draws]])
  shares = abl.transfer_shares(run.predict(), run.train.images[outside[others]], deltas, label)
  return float(shares[0]), abl.transfer_z(shares[0], shares[1:], len(others)), len(others) * (len(deltas) + 1)


def _relearned(run: Run, record: dict[str, Any] | None = None) -> bool:
  """Disowns, for the rest of fine-tuning, the judge's rejected examples of each label whose share of them the
  model being fine-tuned has learned stands out (an improbable count at the labels' pooled rate too), and whose
  learned ones' features align more than the rest's
  (config.abl.relearned_*; saved in relearned.npz, or read from it where a run is resumed). True (stop the
  phase) where a label is flagged and fine-tuning restarts (config.abl.relearned_then).

  The judge rejects some examples of every label (the hard ones) and fine-tuning learns few of them; a backdoor
  that the gauge's outlier test missed puts other classes' images under one label, and where fine-tuning learns
  its trigger it learns them together, well before the hard ones (docs/defense.md, session 18). The model's
  probabilities are taken with its momentary class bias removed (abl.prior_adjusted): mid-way through
  fine-tuning it favours some classes, and would seem to have learned their hard examples.
  """
  a = run.config.abl
  path = os.path.join(run.workdir, "relearned.npz")
  judged = wd.load_npz(wd.followed_judgement(run.workdir))
  if "outside_rejected" not in judged:
    raise wd.WorkdirError(f"{run.workdir}: the judgement holds no outside_rejected (made before "
                          "config.abl.relearned_at); set --config.abl.relearned_at=0 or use --overwrite")
  rejected, probabilities = judged["outside_rejected"], judged["outside_rejected_probabilities"]
  labels = run.train.labels
  if os.path.exists(path):
    saved = wd.load_npz(path)
  elif record is None:
    raise wd.WorkdirError(f"{path} is missing but the checkpoint is past it; use --overwrite to start over")
  else:
    taught = run.labels[rejected, labels[rejected]] > 0  # Not disowned already.
    if run.left_out is not None:
      taught &= ~np.isin(rejected, run.left_out)
    candidates = rejected[taught]
    outside = np.setdiff1d(np.arange(len(labels)), run.pool)
    with run.timed(SCORING):
      _, _, probs, features = run.predict(probabilities=True, features=True)(run.train.images[outside],
                                                                             labels[outside])
    adjusted, bias = abl.prior_adjusted(np.asarray(probs, np.float64), labels[outside], run.train.num_classes)
    rows = np.searchsorted(outside, candidates)
    probability = adjusted[rows, labels[candidates]]
    learned = candidates[probability >= a.relearned_above]
    counts = np.bincount(labels[outside], minlength=run.train.num_classes)
    learned_counts = np.bincount(labels[learned], minlength=run.train.num_classes)
    shares = learned_counts / np.maximum(counts, 1)
    scores = abl.outlier_scores(shares, counts, sampling=True)
    # Per label: its learned rejected examples, the rest of its rejected, and its typical examples (the judge
    # backs them, own_above, and fine-tuning has learned them).
    coherence = np.full((3, run.train.num_classes), np.nan)
    features = np.asarray(features, np.float64)
    own = np.exp(-np.asarray(judged["outside_gauge_loss"], np.float64))[outside]
    for k in np.flatnonzero(scores > a.class_outlier_z):
      mine = labels[outside] == k
      hit = mine & np.isin(outside, learned)
      rest = mine & np.isin(outside, candidates) & ~hit
      typical = mine & ~np.isin(outside, candidates) & (own >= a.own_above) & (adjusted[:, k] >= a.relearned_above)
      centre = features[mine & ~hit].mean(axis=0)
      coherence[:, k] = [abl.coherence(features[m] - centre) for m in (hit, rest, typical)]
    # A backdoor is learned through one feature, its trigger: its examples' features align more than the label's
    # own typical examples do, which share only the class's look; hard examples are learned each for its own
    # reason (docs/defense.md, sessions 18 and 19). A group of fewer than 2 has no coherence (NaN): without
    # typical examples there is nothing to tell the class's own look from a trigger by, so no flag; without other
    # rejected examples (fine-tuning learned them all) there is nothing against one (session 21).
    # A handful of learned examples in one label against none elsewhere is no outlier, whatever the normal
    # approximation of the score says: the count must be improbable at the pooled rate.
    improbable = abl.improbable_counts(learned_counts, counts, a.class_outlier_z)
    # With relearned_untypical=transfer, a label without typical examples (NaN) is left to the transfer test below.
    untypical = np.isnan(coherence[2]) & (a.relearned_untypical == "transfer")
    aligned = (coherence[0] > np.nan_to_num(coherence[1], nan=-np.inf)) & ((coherence[0] > coherence[2]) | untypical)
    # A trigger is an image feature: the mean image of a backdoor's learned examples, less the label's other
    # examples', carries it and sends other labels' images to the label; a clean label's hard examples' does no
    # more than as many of its other examples' (docs/defense.md, session 33).
    transfer, stamped = np.full((2, run.train.num_classes), np.nan), 0
    tested = ((scores > a.class_outlier_z) & improbable & aligned if a.relearned_tested == "outliers"
              else learned_counts >= 2)
    if a.relearned_draws:
      predicted = np.asarray(probs).argmax(axis=1)
      for k in np.flatnonzero(tested):
        with run.timed(SCORING):
          *transfer[:, k], count = _transfer(run, outside, labels[outside] == k, np.isin(outside, learned),
                                             np.isin(outside, candidates), own, predicted, int(k))
        stamped += count
    transferred = ~(transfer[1] <= a.class_outlier_z)  # NaN (not measured) passes.
    flagged = np.flatnonzero(tested & transferred)
    saved = {"relearned_labels": flagged, "relearned_shares": shares, "relearned_scores": scores,
             "relearned_improbable": improbable, "relearned_coherence": coherence,
             "relearned_learned": learned, "relearned_rejected": candidates[np.isin(labels[candidates], flagged)],
             "relearned_dropped": outside[:0], "relearned_candidates": candidates,
             "relearned_probability": probability, "relearned_raw_probability": np.asarray(probs)[rows,
                                                                                               labels[candidates]],
             "relearned_bias": bias, "relearned_transfer": transfer, "relearned_transfer_images": stamped}
    if a.flagged_doubted == "return" and "class_doubted" in judged:  # Left out so far: those it backs rejoin.
      doubted = judged["class_doubted"]
      saved["relearned_returned"] = doubted[adjusted[np.searchsorted(outside, doubted), labels[doubted]]
                                            >= a.own_above]
    if a.relearned_doubted == "drop" and len(flagged):  # The flagged labels' learned examples the judge doubts.
      own = np.exp(-np.asarray(judged["outside_gauge_loss"], np.float64))
      doubted = outside[np.isin(labels[outside], flagged) & (own[outside] >= a.disown_below)
                        & (own[outside] < a.own_above) & (run.labels[outside, labels[outside]] > 0)]
      if run.left_out is not None:
        doubted = np.setdiff1d(doubted, run.left_out)
      doubted_probability = adjusted[np.searchsorted(outside, doubted), labels[doubted]]
      saved["relearned_dropped"] = doubted[doubted_probability >= a.relearned_above]
    logging.info("relearned check: fine-tuning has learned %s of each label's examples outside the pool that the "
                 "judge rejected; outlier scores %s (coherence of the learned, of the other rejected, of the "
                 "typical, where above the cut-off: %s; trigger transfer and its z-score where measured: %s); "
                 "flagged %s, %d examples %s, %d left out",
                 np.round(shares, 3).tolist(), np.round(scores, 1).tolist(), _coherence_text(coherence),
                 ", ".join(f"{k}: {transfer[0, k]:.3f}, {transfer[1, k]:.1f}"
                           for k in np.flatnonzero(~np.isnan(transfer[0]))) or "none",
                 flagged.tolist() or "none",
                 len(saved["relearned_rejected"]), "trained toward 'not this label'" if a.flagged_rejected != "drop"
                 else "left out", len(saved["relearned_dropped"]))
    stats = {"relearned_labels": [int(k) for k in flagged],
             "relearned_scores": [round(float(v), 2) for v in scores],
             "relearned_coherence": [[None if np.isnan(v) else round(float(v), 3) for v in row] for row in coherence],
             "relearned_transfer": [[None if np.isnan(v) else round(float(v), 3) for v in row] for row in transfer]}
    for name in ("relearned_learned", "relearned_rejected", "relearned_dropped", "relearned_returned"):
      if name not in saved:
        continue
      stats.update({name: len(saved[name]),
                    f"{name}_poisoned": run.evaluation.isolation_metrics(saved[name])["num_poisoned_isolated"]})
    if distributed.is_primary():
      wd.write_npz(path, **saved)
      summary = os.path.join(run.workdir, "isolation.json")
      wd.write_json(summary, {**wd.read_json(summary), **stats})
    distributed.barrier("relearned")
    if record is not None:
      record["relearned/flagged"] = len(flagged)
  if "relearned_returned" in saved and run.left_out is not None:
    run.left_out = np.setdiff1d(run.left_out, saved["relearned_returned"])
  hit = saved["relearned_rejected"]
  run.labels[hit] = probabilities[np.searchsorted(rejected, hit)]
  abl.disowned(run.labels, labels, hit, np.inf)
  # Left out: a target of zeros adds nothing to the loss (the phase's order was drawn before the check).
  dropped = saved["relearned_dropped"]
  run.labels[np.union1d(dropped, hit) if a.flagged_rejected == "drop" else dropped] = 0.0
  return a.relearned_then == "restart" and len(saved["relearned_labels"]) > 0


def gauge_training(run: Run) -> None:
  """Trains a separate model from fresh weights outside the suspicious pool (config.abl.gauge_epochs): the
  judge of which pool examples fine-tuning gets back. The isolation model is kept for fine-tuning."""
  if run.done == run.cursor:
    run.set_aside("isolation_model")
  distributed.barrier("isolation_model")
  run_phase(run, _gauge_phase(run, "gauge", _retained(run), run.config.abl.gauge_epochs))


def _gauge_phase(run: Run, name: str, examples: np.ndarray, epochs: int) -> Phase:
  """A gauge: `epochs` from fresh weights on `examples` (their labels), cosine from finetune_lr."""
  a, t = run.config.abl, run.config.train
  loss = abl.SmallLoss(a.gauge_drop, a.gauge_drop_cap) if a.gauge_drop else abl.cross_entropy_loss
  loss_epochs = None
  if a.gauge_drop and a.gauge_drop_epochs:  # A second gauge that goes on from the first goes on after its epochs.
    loss_epochs = max(a.gauge_drop_epochs - (a.gauge_epochs if name == "regauge" and a.regauge_init == "gauge" else 0),
                      0)
  return Phase(name, epochs, len(examples), _order(run, examples, None), loss,
               lambda steps: optax.cosine_decay_schedule(a.finetune_lr, max(epochs * steps, 1)),
               t.batch_size, t.augment, eval_every=t.eval_every_epochs, fresh_weights=True,
               label_smoothing=t.label_smoothing, downsample=a.gauge_downsample, mix_mode=a.gauge_mix,
               mix_alpha=a.finetune_mix_alpha, loss_epochs=loss_epochs)


def give_back(run: Run) -> None:
  """Decides, from the judging model's predictions, what fine-tuning does with each pool example
  (config.abl.kept_out; saved in returned.npz), then restores the isolation model where a gauge judged."""
  a = run.config.abl
  path = os.path.join(run.workdir, "returned.npz")
  if os.path.exists(path):  # Decided before an interruption.
    saved = wd.load_npz(path)
    run.returned, run.labels = saved["returned"], saved["labels"] if "labels" in saved else None
    run.left_out = saved.get("left_out")
    if "split_suspected" in saved:
      run.suspected = np.union1d(run.suspected, saved["split_suspected"])
  elif run.done > run.cursor:
    raise wd.WorkdirError(f"{path} is missing but the checkpoint is past it; use --overwrite to start over")
  else:
    with run.timed(SCORING):
      _judge(run, path)
  if a.gauge_epochs and run.done == run.cursor:
    if a.regauge and a.regauge_init == "gauge" and len(wd.load_npz(path).get("outlier_labels", ())):
      run.set_aside("gauge_model")  # The second gauge goes on from it.
      distributed.barrier("gauge_model")
    if a.finetune_init != "gauge":  # Not from the gauge: from the isolation model (or fresh weights, which the
      _restore_isolation_model(run)  # phase draws).


def _restore_isolation_model(run: Run) -> None:
  """Makes the isolation model (set aside before the gauge) the run's current model."""
  _restore_set_aside(run, "isolation_model")


def _restore_set_aside(run: Run, name: str) -> None:
  """Makes the model set aside in WORKDIR/<name> (Run.set_aside) the run's current model."""
  saved = Checkpointer(os.path.join(run.workdir, name), 1)
  restored = saved.restore_latest(like=train.to_host(run.state))
  saved.close()
  if restored is None:
    raise wd.WorkdirError(f"{run.workdir}/{name} is missing; use --overwrite to start over")
  run.state = train.replicate(restored[1], run.mesh)


def regauge(run: Run) -> None:
  """Where the gauge found outlier labels (config.abl.class_outlier_z) and config.abl.regauge is on: trains a
  second gauge (config.abl.regauge_epochs) from fresh weights, or from the first gauge (config.abl.regauge_init),
  without the pool and the examples the first rejected in those labels, and judges again with it (regauged.npz);
  fine-tuning follows the second judgement. Does nothing otherwise.

  The first gauge learned those labels from examples of which many were other classes' images; trained without
  them, the second sees those labels' own images and rejects more of the backdoor examples left in them.
  """
  a = run.config.abl
  first = wd.load_npz(os.path.join(run.workdir, "returned.npz"))
  if not a.regauge or "outlier_labels" not in first or not len(first["outlier_labels"]):
    return
  excluded = functools.reduce(np.union1d, (run.pool, first["class_rejected"],
                                           first.get("split_suspected", run.pool[:0])))
  retained = np.setdiff1d(np.arange(len(run.train)), excluded)
  phase = _gauge_phase(run, "regauge", retained, regauge_epochs(a))
  if a.regauge_init == "gauge":
    if run.done == run.cursor:
      _restore_set_aside(run, "gauge_model")
    phase = dataclasses.replace(phase, fresh_weights=False)
  run_phase(run, phase)
  path = os.path.join(run.workdir, "regauged.npz")
  if os.path.exists(path):  # Judged before an interruption.
    saved = wd.load_npz(path)
    run.returned, run.labels, run.left_out = saved["returned"], saved["labels"], saved.get("left_out")
  elif run.done > run.cursor:
    raise wd.WorkdirError(f"{path} is missing but the checkpoint is past it; use --overwrite to start over")
  else:
    with run.timed(SCORING):
      _judge(run, path, prefix="regauge_", flag_among=first["outlier_labels"],
             also=first.get("pool_outlier_labels"))
  if run.done == run.cursor and a.finetune_init != "gauge":
    _restore_isolation_model(run)


def regauge_epochs(a: ml_collections.ConfigDict) -> int:
  """The second gauge's epochs (config.abl.regauge_epochs; 0: gauge_epochs from fresh weights, a third of them,
  at least 1, going on from the first gauge)."""
  if a.regauge_epochs:
    return a.regauge_epochs
  return a.gauge_epochs if a.regauge_init == "fresh" else max(1, round(a.gauge_epochs / 3))


def _judge(run: Run, path: str, prefix: str = "", flag_among: np.ndarray | None = None,
           also: np.ndarray | None = None) -> None:
  a = run.config.abl
  pool, labels = run.pool, run.train.labels[run.pool]
  loss, pred, probs = _judging(run)(run.train.images[pool], labels)
  confidence = probs.max(axis=1)  # The judge's probability of its prediction.
  agree = abl.agreeing(pool, pred, labels)
  kept_out = np.setdiff1d(pool, agree)
  run.returned, run.left_out = agree, None
  extra = {"judge_loss": loss, "judge_prediction": pred, "judge_confidence": confidence}
  if a.kept_out == "relabel":  # Disagreeing pool examples the judge is sure of train with its label.
    sure = pool[(pred != labels) & (confidence >= a.relabel_confidence)]
    run.labels = np.array(run.train.labels, copy=True)
    run.labels[pool] = pred
    run.returned = np.union1d(agree, sure)
    kept_out = np.setdiff1d(pool, run.returned)
    extra["labels"] = run.labels
    extra["relabelled"] = sure
  elif a.kept_out in ("distill", "distill_disagreeing"):  # Pool examples train toward the judge's probabilities:
    # every one, or only those whose label it disagrees with (the agreeing ones keep their labels).
    run.labels = np.eye(run.train.num_classes, dtype=np.float32)[run.train.labels]
    soft = pool if a.kept_out == "distill" else kept_out
    run.labels[soft] = probs[np.isin(pool, soft)]
    run.returned = pool
    kept_out = pool[:0]
    extra["labels"] = run.labels
    deferred = _deferred(run) if flag_among is None else None
    if a.contradict_factor or (a.class_outlier_z and a.disown_below) or deferred is not None:
      outside = _outside_gauge(run)
      extra["outside_gauge_loss"], extra["outside_gauge_prediction"] = outside.full_loss, outside.full_prediction
      own = outside.probabilities[np.arange(len(outside.examples)), run.train.labels[outside.examples]]
      extra["outside_rejected"] = outside.examples[own < a.disown_below]  # The relearned check's candidates.
      extra["outside_rejected_probabilities"] = outside.probabilities[own < a.disown_below]
      if a.contradict_factor:
        extra["contradicted"] = _contradicted(run, outside)
      if a.class_outlier_z and a.disown_below:
        if flag_among is None:  # The first gauge: the pool's outlier labels (the second judges them again).
          also = _pool_outliers(run, labels, probs[np.arange(len(pool)), labels], extra)
        extra.update(_class_rejected(run, outside, flag_among, also))
      if deferred is not None:
        extra["split_suspected"], extra["split_scores"] = _judged_split(run, outside, *deferred,
                                                                        extra.get("outlier_labels", []))
        run.suspected = np.union1d(run.suspected, extra["split_suspected"])
      if run.suspected is not None:  # Suspects outside the pool (a judged split) train toward this gauge's beliefs.
        hit = np.isin(outside.examples, run.suspected)
        run.labels[outside.examples[hit]] = outside.probabilities[hit]
    suspected = run.suspected if run.suspected is not None else soft[:0]
    if a.own_above < 1.0:  # The spectral rule's suspects are disowned below, never owned.
      extra["owned"] = abl.owned(run.labels, run.train.labels, np.setdiff1d(soft, suspected) if len(suspected)
                                 else soft, a.own_above)
    if "class_rejected" in extra:  # A flagged label's examples fine-tuning leaves out (abl.flagged_*).
      rules = {"class_rejected": a.flagged_rejected, "class_doubted": a.flagged_doubted}
      dropped = [extra[k] for k, rule in rules.items() if rule in ("drop", "return")]
      dropped += [extra["class_spared"]] if "class_spared" in extra else []
      if dropped:
        run.left_out = extra["left_out"] = functools.reduce(np.union1d, dropped)
    if a.disown_below:
      taught = soft
      for outside_taught in ("contradicted",) + (("class_rejected",) if a.flagged_rejected != "drop" else ()):
        taught = np.union1d(taught, extra.get(outside_taught, soft[:0]))
      taught = np.setdiff1d(taught, extra.get("class_spared", soft[:0]))
      extra["disowned"] = abl.disowned(run.labels, run.train.labels, taught, a.disown_below)
    if len(suspected):  # Whatever the gauge gives their label.
      extra["spectral_disowned"] = abl.disowned(run.labels, run.train.labels, suspected, np.inf)
      extra["disowned"] = np.union1d(extra.get("disowned", suspected[:0]), extra["spectral_disowned"])
    if a.unsure == "drop":  # The pool examples the gauge neither backs nor rejects stay out.
      sure = np.union1d(extra.get("owned", soft[:0]), extra.get("disowned", soft[:0]))
      kept_out = np.setdiff1d(soft, sure)
      if a.flagged_unsure != "drop" and len(extra.get("outlier_labels", ())):  # Like its doubted ones outside.
        kept = _unsure_kept(run, extra, probs[np.arange(len(pool)), labels])
        flagged = kept_out[np.isin(run.train.labels[kept_out], kept)]
        extra["flagged_unsure"] = abl.owned(run.labels, run.train.labels, flagged, 0.0)
        kept_out = np.setdiff1d(kept_out, flagged)
      run.returned = np.setdiff1d(pool, kept_out)
  stats = {f"kept_out_{k}": v for k, v in run.evaluation.isolation_metrics(kept_out).items()
           if k in ("precision", "recall")}  # Metrics only.
  stats["kept_out_size"] = len(kept_out)
  if "outlier_labels" in extra:
    stats["outlier_labels"] = [int(k) for k in extra["outlier_labels"]]
    stats["outlier_scores"] = [round(float(v), 2) for v in extra["outlier_scores"].max(axis=0)]  # Highest level's.
  if "split_suspected" in extra:
    stats["split_labels"] = sorted({int(k) for k in run.train.labels[extra["split_suspected"]]})
  if "pool_outlier_labels" in extra:
    stats["pool_outlier_labels"] = [int(k) for k in extra["pool_outlier_labels"]]
    stats["pool_outlier_scores"] = [round(float(v), 2) for v in extra["pool_outlier_scores"]]
  counted = ("contradicted", "class_rejected", "class_spared", "class_doubted", "left_out", "owned", "disowned",
             "spectral_disowned", "relabelled", "flagged_unsure", "split_suspected")
  for name, examples in [("returned", agree)] + [(k, extra[k]) for k in counted if k in extra]:
    stats.update({name: len(examples),
                  f"{name}_poisoned": run.evaluation.isolation_metrics(examples)["num_poisoned_isolated"]})
  logging.info("gave back %d of the %d pool examples to fine-tuning (%d of them relabelled); %d stay out",
               len(run.returned), len(pool), len(extra.get("relabelled", ())), len(kept_out))
  stats = {prefix + k: v for k, v in stats.items()}
  if distributed.is_primary():
    wd.write_npz(path, returned=run.returned, kept_out=kept_out, **extra)
    summary = os.path.join(run.workdir, "isolation.json")
    wd.write_json(summary, {**wd.read_json(summary), **stats})
  distributed.barrier("give_back")
  run.writer.write(run.step, {f"isolation/{k}": v for k, v in stats.items()}, phase=prefix + "give_back",
                   global_epoch=run.done)


def _deferred(run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """The labels the kurtosis outlier test split in two for the gauge to judge (config.abl.spectral_kurtosis_z),
  with every example's projection and each label's cut, from isolation.npz; None where there are none, or where
  outlier labels are not looked for (their test judges the sides)."""
  if not _defers(run.config.abl):
    return None
  saved = wd.load_npz(os.path.join(run.workdir, "isolation.npz"))
  labels = saved.get("spectral_deferred", np.zeros(0, np.int64))
  return (labels, saved["spectral_projection"], saved["spectral_cut"]) if len(labels) else None


def _judged_split(run: Run, outside: OutsideGauge, labels: np.ndarray, projection: np.ndarray,
                  cuts: np.ndarray, flagged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The examples of each deferred label on the side of its cut that the gauge gives the label less on average
  (over the label's examples outside the pool, which it trained on), where that side's share of examples the gauge
  rejects is an outlier among the labels' (at any level of class_outlier_below, as the outlier label test scores a
  label): suspects, disowned whatever the gauge says. A label the outlier test flagged (`flagged`) is left to it.
  Also each label's side scores, [levels, num_classes] (NaN where no side was judged)."""
  a = run.config.abl
  outside_labels = run.train.labels[outside.examples]
  own = outside.probabilities[np.arange(len(outside.examples)), outside_labels]
  levels = tuple(a.class_outlier_below) or (a.disown_below,)
  picked, side_scores = [], np.full((len(levels), run.train.num_classes), np.nan)
  for label in labels:
    if label in flagged:
      logging.info("label %d split in two: an outlier label, judged as one", label)
      continue
    mine = np.flatnonzero(run.train.labels == label)
    rows = np.flatnonzero(outside_labels == label)
    seen = projection[outside.examples[rows]] > cuts[label]
    if seen.all() or not seen.any():
      logging.info("label %d: one side of its split holds none of the examples the gauge trained on; not judged",
                   label)
      continue
    above = abl.judged_side(projection[outside.examples[rows]], cuts[label], own[rows])
    side = np.zeros(len(outside.examples), bool)
    side[rows[seen == above]] = True
    scores = side_scores[:, label] = abl.side_outlier_scores(own, outside_labels, side, label,
                                                             run.train.num_classes, levels)
    suspected = bool((scores > a.class_outlier_z).any())
    logging.info("label %d split in two: the gauge gives the label %.3f on average %s its cut, %.3f on the other "
                 "side; that side's outlier scores %s: %s", label, own[rows][seen == above].mean(),
                 "above" if above else "below", own[rows][seen != above].mean(), np.round(scores, 2).tolist(),
                 "suspected" if suspected else "not suspected")
    if suspected:
      picked.append(mine[(projection[mine] > cuts[label]) == above])
  return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64), side_scores


def _unsure_kept(run: Run, extra: dict[str, np.ndarray], pool_own: np.ndarray) -> np.ndarray:
  """The flagged labels whose unsure pool examples train with their label (config.abl.flagged_unsure): every one
  (keep), or those whose pool examples the gauge rejects in a smaller share than their examples outside the pool
  (auto); the shares go to `extra` (flagged_rejected_shares: pool, outside)."""
  a, flagged = run.config.abl, extra["outlier_labels"]
  outside = np.setdiff1d(np.arange(len(run.train.labels)), run.pool)
  shares = abl.rejected_shares(pool_own < a.disown_below, run.train.labels[run.pool],
                               np.isin(outside, extra["class_rejected"]), run.train.labels[outside], flagged)
  extra["flagged_rejected_shares"] = shares
  kept = flagged if a.flagged_unsure == "keep" else flagged[shares[0] < shares[1]]
  logging.info("flagged labels %s: the gauge rejects %s of their pool examples, %s of those outside it; the unsure "
               "pool examples of %s train with their label", flagged.tolist(), np.round(shares[0], 3).tolist(),
               np.round(shares[1], 3).tolist(), kept.tolist() or "none")
  return kept


def _judging(run: Run) -> train.Predict:
  """The judging model's (images, labels) -> (loss, prediction, probabilities): a gauge sees the images as it was
  trained on them (config.abl.gauge_downsample)."""
  a = run.config.abl
  return _downsampled(run.predict(probabilities=True), a.gauge_downsample if a.gauge_epochs else 1)


@dataclasses.dataclass(frozen=True)
class OutsideGauge:
  """The gauge's loss, prediction and probabilities on the examples outside the pool (`examples`), and its loss
  and prediction on every training example (NaN and -1 in the pool)."""
  examples: np.ndarray
  loss: np.ndarray
  prediction: np.ndarray
  probabilities: np.ndarray
  full_loss: np.ndarray
  full_prediction: np.ndarray


def _outside_gauge(run: Run) -> OutsideGauge:
  """The gauge's verdicts on the examples outside the pool, the ones it was trained on."""
  outside = np.setdiff1d(np.arange(len(run.train.labels)), run.pool)
  loss, pred, probs = _judging(run)(run.train.images[outside], run.train.labels[outside])
  full_loss = np.full(len(run.train.labels), np.nan, np.float32)
  full_pred = np.full(len(run.train.labels), -1, np.int64)
  full_loss[outside], full_pred[outside] = loss, pred
  return OutsideGauge(outside, np.asarray(loss), np.asarray(pred), np.asarray(probs), full_loss, full_pred)


def _contradicted(run: Run, outside: OutsideGauge) -> np.ndarray:
  """Examples outside the pool that the gauge, trained on them, contradicts where the isolation model fit them
  (config.abl.contradict_factor); they train toward the gauge's probabilities like the pool (run.labels).

  Flagged: the gauge predicts another class and gives the label at most 1/contradict_factor of the isolation
  model's probability for it (the isolation model's is exp(-score) of its last scoring). A backdoor the
  isolation model learned without fitting its examples first (input-aware) shows here: the gauge, trained for
  fewer epochs and without the pool, has not learned it.
  """
  labels = run.train.labels[outside.examples]
  hit = abl.contradicts(outside.loss, outside.prediction, labels, run.scores[outside.examples],
                        run.config.abl.contradict_factor)
  run.labels[outside.examples[hit]] = outside.probabilities[hit]
  logging.info("the gauge contradicts %d examples outside the pool; they train toward its probabilities", hit.sum())
  return outside.examples[hit]


def _pool_outliers(run: Run, labels: np.ndarray, own: np.ndarray, extra: dict[str, np.ndarray]) -> np.ndarray:
  """The labels whose pool examples (the spectral rule's suspects aside) the gauge rejects (under disown_below)
  unusually often (config.abl.pool_outlier_z; none where 0); each label's share and score go into `extra`.

  Where isolation found most of a low-rate backdoor, its examples are the pool's rejected ones, and the few it
  missed are outside the pool, too few to make their label an outlier there (docs/defense.md, session 20).
  """
  a = run.config.abl
  if not a.pool_outlier_z:
    return labels[:0]
  judged = ~np.isin(run.pool, run.suspected) if run.suspected is not None else np.ones(len(labels), bool)
  flagged, shares, scores = abl.outlier_labels(own[judged], labels[judged], run.train.num_classes, a.pool_outlier_z,
                                               (a.disown_below,))
  shares, scores = shares[0], scores[0]
  logging.info("the gauge gives %s of the pool's examples, by label, less than %g; outlier scores %s; flagged %s",
               np.round(shares, 3).tolist(), a.disown_below, np.round(scores, 1).tolist(), flagged.tolist() or "none")
  extra.update({"pool_outlier_shares": shares, "pool_outlier_scores": scores, "pool_outlier_labels": flagged})
  return flagged


def _class_rejected(run: Run, outside: OutsideGauge, among: np.ndarray | None = None,
                    also: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The labels whose examples outside the pool the gauge rejects unusually often (config.abl.class_outlier_z at
  any level of class_outlier_below; only labels in `among` where given; with those in `also`), and the examples of
  them it gives their label less than disown_below; those train toward the gauge's probabilities (run.labels), to
  be disowned like the pool's, or stay out of fine-tuning (config.abl.flagged_rejected). Returned by name, with
  each level's shares and outlier scores, as returned.npz keeps them.

  The second gauge (regauge) judges among the first's flagged labels only: it never saw the examples it was
  trained without, so the shares of every label shift, and a label the first found ordinary can then score near
  the cutoff by chance (docs/defense.md).
  """
  a = run.config.abl
  labels = run.train.labels[outside.examples]
  own = outside.probabilities[np.arange(len(labels)), labels]
  # () is the rule of the runs made before the levels: disown_below alone, scored without the sampling term.
  sampled = tuple(a.class_outlier_below)
  levels = sampled or (a.disown_below,)
  flagged, shares, scores = abl.outlier_labels(own, labels, run.train.num_classes, a.class_outlier_z, levels,
                                               sampling=bool(sampled))
  if sampled and a.class_outlier_ratio:  # At the loosest level, where every label has many rejected examples.
    loosest = int(np.argmax(levels))
    dominant = abl.dominant_label(shares[loosest], np.bincount(labels, minlength=run.train.num_classes),
                                  a.class_outlier_ratio, a.class_outlier_z)
    logging.info("the label whose share under %g is at least %g times every other label's: %s", levels[loosest],
                 a.class_outlier_ratio, dominant.tolist() or "none")
    flagged = np.union1d(flagged, dominant)
  if among is not None:
    flagged = np.intersect1d(flagged, among)
  if a.spectral_judged and run.suspected is not None and len(run.suspected):  # Known attacked: judged as well.
    flagged = np.union1d(flagged, np.unique(run.train.labels[run.suspected]))
  if also is not None:  # The pool's outlier labels (config.abl.pool_outlier_z).
    flagged = np.union1d(flagged, also)
  hit = (own < a.disown_below) & np.isin(labels, flagged)
  doubted = (own >= a.disown_below) & (own < a.own_above) & np.isin(labels, flagged)
  spared = abl.beyond_excess(own, labels, hit, flagged, a.disown_below) if a.flagged_rejected == "excess" else None
  if a.flagged_rejected in ("disown", "excess"):
    taught = hit if spared is None else hit & ~spared
    run.labels[outside.examples[taught]] = outside.probabilities[taught]
  for level, share, score in zip(levels, shares, scores):
    logging.info("the gauge gives %s of the examples outside the pool, by label, less than %g; outlier scores %s",
                 np.round(share, 3).tolist(), level, np.round(score, 1).tolist())
  if spared is None:
    logging.info("outlier labels: %s; %d examples %s", flagged.tolist() or "none", hit.sum(),
                 "trained toward 'not this label'" if a.flagged_rejected == "disown" else "left out of fine-tuning")
  else:
    logging.info("outlier labels: %s; of their %d rejected examples, the %d beyond their labels' expected clean "
                 "count trained toward 'not this label', %d left out of fine-tuning", flagged.tolist() or "none",
                 hit.sum(), (hit & ~spared).sum(), spared.sum())
  extra = {"outlier_labels": flagged, "class_rejected": outside.examples[hit],
           "class_doubted": outside.examples[doubted], "outlier_levels": np.array(levels),
           "outlier_shares": shares, "outlier_scores": scores}
  if spared is not None:
    extra["class_spared"] = outside.examples[spared]
  return extra


def finetune_returned(run: Run) -> None:
  """The rest of fine-tuning (config.abl.return_epoch to finetune_epochs), the given-back examples included."""
  a = run.config.abl
  run_phase(run, _finetune_phase(run, "finetune_returned", a.return_epoch, a.finetune_epochs - a.return_epoch))


def joint_pool(scores: np.ndarray, isolated: np.ndarray, exclude_ratio: float) -> np.ndarray:
  """The examples joint unlearning descends on: neither isolated nor among the lowest `exclude_ratio` scores."""
  if exclude_ratio * len(scores) <= len(isolated):
    return np.setdiff1d(np.arange(len(scores)), isolated)
  # Low isolation loss = suspect: examples too suspect to descend on (the backdoor examples isolation
  # missed) but too many to ascend on are left out.
  ratio = exclude_ratio
  pool = np.setdiff1d(np.arange(len(scores)), abl.isolate(scores, ratio))
  logging.info("joint unlearning descends on %d retained examples (the lowest-loss %.0f%% left out, "
               "config.abl.joint_exclude_ratio)", len(pool), 100 * ratio)
  return pool


def joint_order(isolated: np.ndarray, pool: np.ndarray, isolated_batch: int, pool_batch: int,
                key: jax.Array) -> np.ndarray:
  """[steps, isolated_batch + pool_batch]: each row a batch of isolated examples, then one of pool examples."""
  k_iso, k_pool = jax.random.split(key)
  iso = isolated[train.epoch_order(len(isolated), isolated_batch, k_iso)]
  steps = len(iso)
  ret = pool[np.resize(np.asarray(jax.random.permutation(k_pool, len(pool))), steps * pool_batch)]
  return np.concatenate([iso, ret.reshape(steps, pool_batch)], axis=1)


def _isolated_metrics(run: Run) -> tuple[dict[str, float], np.ndarray]:
  """Loss and accuracy on the isolated examples with their training labels (what a defender has)."""
  labels = run.train.labels[run.isolated]
  ce, pred = run.predict()(run.train.images[run.isolated], labels)
  return {"unlearning/isolated_loss": float(np.mean(ce)),
          "unlearning/isolated_accuracy": float(np.mean(pred == labels))}, pred


def _before_unlearning(run: Run) -> bool:
  """Records the fine-tuned model's metrics on the full test set and saves it (config.abl.start_from reuses it);
  true when the stopping rule already holds (nothing left to unlearn)."""
  record = {f"eval/{k}": v for k, v in run.evaluation.test_metrics(run.predict(), full=True).items()}
  record["eval/full_test_set"] = 1
  stop = _unlearning_check(run, record)
  run.writer.write(run.step, record, phase="unlearning", epoch=0, global_epoch=run.done)
  run.set_aside("before_unlearning")
  return stop


def _retained_accuracy(run: Run, labels: np.ndarray, per_class: int = 500) -> float:
  """Accuracy on retained (outside the pool) training examples with the isolated set's labels, in its mix."""
  retained = _retained(run)
  classes, counts = np.unique(labels, return_counts=True)
  accuracies, predict = [], run.predict()  # One predictor: the model's variables placed once.
  for c in classes:
    pick = retained[run.train.labels[retained] == c][:per_class]
    if not len(pick):
      accuracies.append(0.0)
      continue
    _, pred = predict(run.train.images[pick], run.train.labels[pick])
    accuracies.append(float(np.mean(pred == c)))
  return float(np.dot(accuracies, counts) / counts.sum())


def _unlearning_check(run: Run, record: dict[str, Any]) -> bool:
  """Adds the isolated set's metrics to `record`; true when the defender's stopping rule fires."""
  metrics, pred = _isolated_metrics(run)
  record.update(metrics)
  a = run.config.abl
  labels = run.train.labels[run.isolated]
  reference = None
  if a.unlearning_stop == "retained_accuracy":
    reference = record["unlearning/retained_accuracy"] = _retained_accuracy(run, labels)
  # The rule receives the isolated examples' predictions and training labels and the model's accuracy on
  # ordinary training examples of those labels: never the poison mask.
  stop = abl.stop_unlearning(pred, labels, a.unlearning_stop, a.stop_accuracy, reference)
  record["unlearning/stopped"] = int(stop)
  return stop


def _skip_phase(run: Run, name: str, epochs: int) -> None:
  """Counts a phase of `epochs` as finished without training (checkpointed: a resume does not run it)."""
  logging.info("%s skipped: the stopping rule holds before its first epoch (config.abl.unlearning_stop)", name)
  run.phases += 1
  run.cursor += epochs
  run.done = run.cursor
  if distributed.is_primary():
    run.checkpoints.save(run.done, train.to_host(run.state),
                         {"phase": name, "epoch": 0, "global_epoch": run.done, "global_step": run.step,
                          "wall_time": run.wall, "stopped_at_epoch": 0})


def unlearn(run: Run) -> None:
  """ABL's last phase: unlearn the isolated examples (config.abl.unlearning_*, joint_*)."""
  a = run.config.abl
  if not a.unlearning_epochs:  # The phase counts, with nothing to train (and nothing to choose for it).
    run.phases += 1
    return
  isolated = run.isolated
  if a.unlearning_mode == "ascent":
    num, order = len(isolated), lambda r, k: isolated[train.epoch_order(len(isolated), a.unlearning_batch_size, k)]
    batch = a.unlearning_batch_size
  else:  # joint: each batch pairs isolated examples (forgotten) with retained ones (descended on).
    pool = joint_pool(run.scores, isolated, a.joint_exclude_ratio)
    num, batch = len(isolated), a.unlearning_batch_size  # Isolated examples per step; the pool's come on top.
    order = lambda r, k: joint_order(isolated, pool, a.unlearning_batch_size, a.joint_batch_size, k)
  if run.done == run.cursor:
    if _before_unlearning(run):  # Unlearn only what is still learned.
      _skip_phase(run, "unlearning", a.unlearning_epochs)
      return
  run_phase(run, Phase(
      "unlearning", a.unlearning_epochs, num, order,
      abl.unlearning_step_loss(a.unlearning_mode, a.unlearning_batch_size, a.joint_weight, a.unlearning_loss),
      lambda _: optax.constant_schedule(a.unlearning_lr), batch, False, bn_train=a.unlearning_bn == "train",
      eval_every=run.config.train.eval_every_epochs, after_epoch=_unlearning_check))


Step = Callable[[Run], None]


def schedule(config: ml_collections.ConfigDict) -> list[Step]:
  """The steps of the run `config` asks for, in order."""
  if config.defense.name == "none":
    return [train_baseline]
  if config.abl.return_rule != "none" and config.abl.gauge_epochs:
    return [isolation_training, isolate, gauge_training, give_back, regauge, finetune, unlearn]
  if config.abl.return_rule != "none":
    return [isolation_training, isolate, finetune, give_back, finetune_returned, unlearn]
  return [isolation_training, isolate, finetune, unlearn]
