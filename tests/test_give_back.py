"""Giving back the suspicious pool's agreeing examples mid fine-tuning, and class-balanced fine-tuning batches."""
import contextlib
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import smoke
from abl_jax import abl, checkpoint, data, experiment, plots, schedule, train, workdir
from abl_jax.checkpoint import Checkpointer

AGREE = dict(abl__pool_rule="ratio", abl__pool_ratio=0.2, abl__finetune_init="scratch",
             abl__finetune_schedule="cosine", abl__finetune_epochs=3, abl__return_rule="agree",
             abl__return_epoch=1, abl__unlearning_epochs=0)


def test_agreeing_keeps_the_pool_examples_predicted_with_their_label():
  pool = np.array([3, 8, 11, 20])
  returned = abl.agreeing(pool, predictions=np.array([1, 0, 4, 4]), labels=np.array([1, 2, 4, 0]))
  np.testing.assert_array_equal(returned, [3, 11])


def test_balanced_order_draws_every_label_equally_and_is_deterministic():
  labels = np.array([0] * 900 + [1] * 100)
  key = jax.random.PRNGKey(0)
  order = train.balanced_order(labels, 100, key)
  assert order.shape == (10, 100)
  share = np.mean(labels[order] == 1)
  assert 0.45 < share < 0.55  # Unbalanced draws would give 0.1.
  np.testing.assert_array_equal(order, train.balanced_order(labels, 100, key))


@pytest.mark.parametrize("kind, halfway, epoch_3", [("cosine", 0.05, 0.1 * (1 + np.cos(0.75 * np.pi)) / 2),
                                                     ("step", 0.1, 0.01)])
def test_finetune_lr_continues_the_schedule_after_the_give_back(kind, halfway, epoch_3):
  a = ml_collections.ConfigDict(dict(finetune_schedule=kind, finetune_lr=0.1, finetune_epochs=4,
                                     finetune_lr_boundaries=(3,)))
  whole, rest = schedule._finetune_lr(a, 0)(10), schedule._finetune_lr(a, 2)(10)
  for step in (0, 5, 9, 15):
    assert float(rest(step)) == pytest.approx(float(whole(20 + step)))
  assert float(rest(0)) == pytest.approx(halfway) and float(rest(10)) == pytest.approx(epoch_3)


class _Labels:
  """The part of a Dataset fine-tuning's order reads: its length and labels."""

  def __init__(self, labels):
    self.labels = np.asarray(labels)

  def __len__(self):
    return len(self.labels)


def _fake_run(labels, pool, balance=False):
  c = ml_collections.ConfigDict({
      "abl": dict(finetune_epochs=4, finetune_lr=0.1, finetune_schedule="cosine", finetune_lr_boundaries=(1,),
                  finetune_init="scratch", finetune_balance=balance, return_rule="agree", return_epoch=1,
                  gauge_epochs=0, finetune_mix="none", finetune_mix_alpha=1.0, finetune_mix_epochs=0,
                  flagged_doubted="keep", calibrate_flagged=False, candidate_triggers=0.0,
                  candidate_scale=(1.0, 1.0)),
      "train": dict(batch_size=8, augment=False, eval_every_epochs=1, label_smoothing=0.0)})
  return types.SimpleNamespace(config=c, pool=np.asarray(pool), returned=None, left_out=None, labels=None,
                               triggers=None, train=_Labels(labels))


def test_fine_tuning_splits_at_the_return_epoch_and_takes_the_returned_examples_back(monkeypatch):
  phases = []
  monkeypatch.setattr(schedule, "run_phase", lambda run, phase: phases.append(phase))
  run = _fake_run(np.zeros(50), np.arange(0, 50, 5))
  schedule.finetune(run)
  run.returned = np.array([0, 10])
  schedule.finetune_returned(run)
  first, rest = phases
  assert (first.epochs, rest.epochs) == (1, 3) and first.fresh_weights and not rest.fresh_weights
  key = jax.random.PRNGKey(0)
  outside = set(range(50)) - set(range(0, 50, 5))
  assert set(first.order(run, key).ravel()) == outside and first.num_examples == 40
  assert set(rest.order(run, key).ravel()) == outside | {0, 10} and rest.num_examples == 42


def test_fine_tuning_with_flagged_doubted_return_draws_the_given_back_examples_from_the_next_epoch(monkeypatch):
  phases = []
  monkeypatch.setattr(schedule, "run_phase", lambda run, phase: phases.append(phase))
  labels = np.repeat([0, 1], 100)
  run = _fake_run(labels, np.arange(0, 20), balance=True)
  run.config.abl.flagged_doubted = "return"
  run.left_out = np.arange(20, 60)  # Label 0's doubted examples, out of fine-tuning so far.
  schedule.finetune(run)
  key = jax.random.PRNGKey(2)
  before = phases[0].order(run, key)
  run.left_out = np.arange(40, 60)  # The relearned check gave 20-39 back.
  after = phases[0].order(run, key)
  assert before.shape == after.shape == (-(-140 // 8), 8)  # The phase's steps, as it was planned.
  assert before.min() >= 60 and set(np.unique(after[after < 60])) <= set(range(20, 40)) and (after < 40).any()


def test_balanced_fine_tuning_draws_retained_examples_of_every_label_equally(monkeypatch):
  phases = []
  monkeypatch.setattr(schedule, "run_phase", lambda run, phase: phases.append(phase))
  labels = np.repeat([0, 1], 100)
  run = _fake_run(labels, np.arange(0, 80), balance=True)  # The pool took 80 of label 0's 100.
  schedule.finetune(run)
  order = phases[0].order(run, jax.random.PRNGKey(1))
  assert order.min() >= 80
  assert 0.4 < np.mean(labels[order] == 0) < 0.6  # 20 of label 0 against 100 of label 1, drawn equally.


@pytest.mark.parametrize("epoch", [0, 3, 5])
def test_return_epoch_out_of_range_names_the_field(epoch, tmp_path):
  with pytest.raises(ValueError, match=rf"config\.abl\.return_epoch={epoch} must be in \[1, 3\)"):
    experiment.train_and_evaluate(smoke.config(**{**AGREE, "abl__return_epoch": epoch}), str(tmp_path))
  assert not (tmp_path / "config.json").exists()


def test_return_rule_name_is_checked(tmp_path):
  with pytest.raises(ValueError, match=r"config\.abl\.return_rule='all' is unknown; allowed: none, agree"):
    experiment.train_and_evaluate(smoke.config(**{**AGREE, "abl__return_rule": "all"}), str(tmp_path))


@pytest.fixture(scope="module")
def given_back(tmp_path_factory):
  out = tmp_path_factory.mktemp("given_back")
  return out, experiment.train_and_evaluate(smoke.config(**AGREE), str(out))


def test_give_back_splits_the_pool_and_is_reported(given_back):
  out, results = given_back
  pool = np.load(out / "isolation.npz")["pool"]
  saved = np.load(out / "returned.npz")
  np.testing.assert_array_equal(np.union1d(saved["returned"], saved["kept_out"]), pool)
  assert not np.intersect1d(saved["returned"], saved["kept_out"]).size
  iso = results["isolation"]
  assert iso["kept_out_size"] == len(saved["kept_out"]) and iso["returned"] == len(saved["returned"])
  assert iso["kept_out_recall"] > 0.9  # The smoke backdoor is not predicted by the model trained without it.
  assert results["attack_success_rate"] < 0.3


def test_give_back_resumes_like_an_uninterrupted_run(given_back, tmp_path):
  _, results = given_back
  # 2 isolation epochs + 1 fine-tuning epoch: stops right before the give-back.
  assert experiment.train_and_evaluate(smoke.config(**AGREE), str(tmp_path), max_epochs=3) is None
  assert not (tmp_path / "returned.npz").exists()
  resumed = experiment.train_and_evaluate(smoke.config(**AGREE), str(tmp_path))
  assert resumed["clean_accuracy"] == results["clean_accuracy"]
  assert resumed["attack_success_rate"] == results["attack_success_rate"]
  np.testing.assert_array_equal(np.load(tmp_path / "returned.npz")["returned"],
                                np.load(given_back[0] / "returned.npz")["returned"])


def _trained(tmp_path_factory, name: str, overrides: dict):
  """(workdir, results) of one smoke run with `overrides`, trained once per module."""
  out = tmp_path_factory.mktemp(name)
  return out, experiment.train_and_evaluate(smoke.config(**overrides), str(out))


GAUGE = dict(abl__pool_rule="ratio", abl__pool_ratio=0.2, abl__finetune_schedule="cosine", abl__finetune_epochs=2,
             abl__return_rule="agree", abl__gauge_epochs=2, abl__kept_out="relabel", abl__unlearning_epochs=0)


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
  """BadNets smoke: a gauge judges the 20% pool; fine-tuning continues the isolation model, relabelled."""
  return _trained(tmp_path_factory, "judged", GAUGE)


def test_relabel_trains_every_pool_example_with_the_gauges_label(judged):
  out, results = judged
  saved, iso = np.load(out / "returned.npz"), np.load(out / "isolation.npz")
  labels, pool = saved["labels"], iso["pool"]
  outside = np.setdiff1d(np.arange(len(labels)), pool)
  np.testing.assert_array_equal(labels[outside], iso["labels"][outside])  # Only the pool is relabelled...
  changed = np.flatnonzero(labels != iso["labels"])
  np.testing.assert_array_equal(changed, saved["relabelled"])  # ...where the gauge disagreed.
  np.testing.assert_array_equal(labels[pool], saved["judge_prediction"])
  assert len(saved["kept_out"]) == 0 and len(saved["returned"]) == len(pool)  # relabel_confidence 0: all.
  # The gauge never learned the trigger: it gives (nearly) every pooled backdoor example another label.
  assert iso["is_poisoned"][changed].sum() >= 0.9 * iso["is_poisoned"][pool].sum()
  assert results["attack_success_rate"] < 0.2


def _assert_resumes_like(results, config, workdir, max_epochs, saved, unsaved):
  """Stops `config` after `max_epochs` (`saved` written, `unsaved` not yet), resumes, and compares to `results`."""
  assert experiment.train_and_evaluate(config, str(workdir), max_epochs=max_epochs) is None
  assert (workdir / saved).exists() and not (workdir / unsaved).exists()
  resumed = experiment.train_and_evaluate(config, str(workdir))
  assert resumed["clean_accuracy"] == results["clean_accuracy"]
  assert resumed["attack_success_rate"] == results["attack_success_rate"]


def test_gauge_resumes_like_an_uninterrupted_run(judged, tmp_path):
  _, results = judged
  # 2 isolation epochs + 1 gauge epoch: stops inside the gauge, the isolation model saved aside.
  _assert_resumes_like(results, smoke.config(**GAUGE), tmp_path, 3, saved="isolation_model", unsaved="returned.npz")


def test_gauge_mix_mixes_both_gauges_images_and_not_the_isolation_models():
  run = types.SimpleNamespace(config=smoke.config(abl__gauge_mix="cutmix", abl__finetune_mix_alpha=0.4,
                                                  abl__gauge_downsample=2))
  for name in ("gauge", "regauge"):
    phase = schedule._gauge_phase(run, name, np.arange(10), 2)
    assert (phase.mix_mode, phase.mix_alpha, phase.mix_epochs, phase.downsample) == ("cutmix", 0.4, None, 2)
  assert schedule._gauge_phase(types.SimpleNamespace(config=smoke.config()), "gauge", np.arange(10),
                               2).mix_mode == "none"


def test_gauge_drop_trains_both_gauges_on_the_small_loss_share_and_nothing_else():
  run = types.SimpleNamespace(config=smoke.config(abl__gauge_drop=0.5, abl__gauge_drop_cap=0.25))
  for name in ("gauge", "regauge"):
    assert schedule._gauge_phase(run, name, np.arange(10), 2).loss_fn == abl.SmallLoss(0.5, 0.25)
  plain = types.SimpleNamespace(config=smoke.config())
  assert schedule._gauge_phase(plain, "gauge", np.arange(10), 2).loss_fn is abl.cross_entropy_loss
  early = types.SimpleNamespace(config=smoke.config(abl__gauge_drop=0.5, abl__gauge_drop_epochs=3,
                                                    abl__gauge_epochs=2, abl__regauge_init="fresh"))
  assert [schedule._gauge_phase(early, name, np.arange(10), 2).loss_epochs for name in ("gauge", "regauge")] == [3, 3]
  early.config.abl.regauge_init = "gauge"  # Goes on after the first gauge's 2 epochs: in its first epoch only.
  assert [schedule._gauge_phase(early, name, np.arange(10), 2).loss_epochs for name in ("gauge", "regauge")] == [3, 1]


@pytest.mark.parametrize("fields, message", [
    ({"abl__gauge_drop": -0.1}, r"config\.abl\.gauge_drop=-0\.1 must be in \[0, 1\] \(0 = off\)"),
    ({"abl__gauge_drop": 0.2, "abl__gauge_drop_cap": 0.0}, r"config\.abl\.gauge_drop_cap=0\.0 must be in \(0, 1\]"),
    ({"abl__gauge_drop": 0.2, "abl__gauge_drop_epochs": -1},
     r"config\.abl\.gauge_drop_epochs=-1 must be an integer >= 0 \(0 = every gauge epoch\)"),
    ({"abl__gauge_drop": 1.0, "abl__gauge_drop_cap": 1.0},
     r"config\.abl\.gauge_drop=1 with config\.abl\.gauge_drop_cap=1 leaves every example out"),
])
def test_gauge_drop_is_checked(fields, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    experiment.train_and_evaluate(smoke.config(**{**GAUGE, **fields}), str(tmp_path))


def test_gauge_epochs_must_not_be_negative(tmp_path):
  with pytest.raises(ValueError, match=r"config\.abl\.gauge_epochs=-1 must be >= 0"):
    experiment.train_and_evaluate(smoke.config(**{**GAUGE, "abl__gauge_epochs": -1}), str(tmp_path))


def test_finetune_init_gauge_fine_tunes_the_gauge_not_the_isolation_model(tmp_path, monkeypatch):
  starts = {}
  run_phase = schedule.run_phase

  def spy(run, phase):
    if phase.name == "finetune":
      starts["finetune"] = train.to_host(run.state)
    run_phase(run, phase)

  monkeypatch.setattr(schedule, "run_phase", spy)
  config = smoke.config(**{**GAUGE, "abl__finetune_init": "gauge", "train__keep_checkpoints": 10})
  experiment.train_and_evaluate(config, str(tmp_path))
  like = starts["finetune"]
  gauge = Checkpointer(str(tmp_path / "checkpoints"), 10).restore(4, like)[0]  # 2 isolation + 2 gauge epochs.
  isolation = Checkpointer(str(tmp_path / "isolation_model"), 1).restore_latest(like)[1]
  same = lambda a, b: all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
  assert same(like.params, gauge.params) and same(like.batch_stats, gauge.batch_stats)
  assert not same(like.params, isolation.params)


def test_finetune_init_gauge_needs_a_gauge(tmp_path):
  with pytest.raises(ValueError, match=r"config\.abl\.finetune_init='gauge' needs a gauge: config\.abl\.gauge_epochs "
                                       r"> 0 and config\.abl\.return_rule='agree'"):
    experiment.train_and_evaluate(smoke.config(**{**GAUGE, "abl__finetune_init": "gauge", "abl__gauge_epochs": 0}),
                                  str(tmp_path))


def test_kept_out_name_is_checked(tmp_path):
  with pytest.raises(ValueError, match=r"config\.abl\.kept_out='unlearn' is unknown; allowed: drop, relabel"):
    experiment.train_and_evaluate(smoke.config(**{**GAUGE, "abl__kept_out": "unlearn"}), str(tmp_path))


def test_relabel_confidence_drops_the_disagreeing_examples_the_gauge_is_unsure_of(judged, tmp_path):
  out, _ = judged
  sure = smoke.config(**{**GAUGE, "abl__relabel_confidence": 0.3})
  experiment.train_and_evaluate(sure, str(tmp_path))
  saved = np.load(tmp_path / "returned.npz")
  confidence = dict(zip(np.load(out / "isolation.npz")["pool"], saved["judge_confidence"]))
  assert all(confidence[i] >= 0.3 for i in saved["relabelled"])
  assert all(confidence[i] < 0.3 for i in saved["kept_out"])
  assert len(saved["kept_out"]) > 0
  assert np.isin(saved["relabelled"], saved["returned"]).all()
  assert not np.isin(saved["kept_out"], saved["returned"]).any()


def test_cross_entropy_against_probability_targets():
  logits = np.array([[2.0, 0.0, -1.0]], np.float32)
  targets = np.array([[0.25, 0.75, 0.0]], np.float32)
  log_p = logits - np.log(np.exp(logits).sum())
  expected = -(targets * log_p).sum()
  assert float(train.cross_entropy(jax.numpy.asarray(logits), jax.numpy.asarray(targets))[0]) == pytest.approx(expected)
  one_hot = np.eye(3, dtype=np.float32)[[1]]
  assert float(train.cross_entropy(logits, one_hot)[0]) == pytest.approx(float(train.cross_entropy(logits, np.array([1]))[0]))


def test_distill_trains_the_pool_and_the_contradicted_toward_the_gauge_and_disowns_rejected_labels(tmp_path):
  config = smoke.config(**{**GAUGE, "abl__kept_out": "distill", "abl__disown_below": 0.05,
                           "abl__contradict_factor": 2.0, "abl__own_above": 1.0, "abl__unsure": "distill",
                           "abl__class_outlier_z": 0.0})
  r = experiment.train_and_evaluate(config, str(tmp_path))
  saved, iso = np.load(tmp_path / "returned.npz"), np.load(tmp_path / "isolation.npz")
  labels, pool, train_labels = saved["labels"], iso["pool"], iso["labels"]
  assert labels.shape == (len(train_labels), 10)
  contradicted = saved["contradicted"]
  assert len(contradicted) and not np.isin(contradicted, pool).any()
  plain = np.setdiff1d(np.setdiff1d(np.arange(len(labels)), pool), contradicted)
  np.testing.assert_array_equal(labels[plain], np.eye(10)[train_labels[plain]])
  taught = np.union1d(pool, contradicted)
  np.testing.assert_allclose(labels[taught].sum(axis=1), 1.0, rtol=1e-5)
  # The gauge's probability for each taught example's label: its loss on the pool, and outside it.
  own = np.exp(-np.concatenate([saved["judge_loss"], saved["outside_gauge_loss"][contradicted]]))
  order = np.concatenate([pool, contradicted])
  disowned = saved["disowned"]
  np.testing.assert_array_equal(disowned, np.sort(order[own < 0.05]))
  assert 0 < len(disowned) < len(taught)
  np.testing.assert_array_equal(labels[disowned, train_labels[disowned]], 0.0)
  kept = np.setdiff1d(pool, disowned)
  np.testing.assert_array_equal(labels[kept].argmax(axis=1), saved["judge_prediction"][np.isin(pool, kept)])
  assert len(saved["returned"]) == len(pool) and len(saved["kept_out"]) == 0
  summary = json.loads((tmp_path / "isolation.json").read_text())
  assert (summary["disowned"], summary["contradicted"]) == (len(disowned), len(contradicted))
  assert r["attack_success_rate"] < 0.5


def test_owned_examples_train_with_their_label_one_hot():
  targets = np.array([[0.60, 0.30, 0.10],   # The label (0) at 0.6: owned.
                      [0.30, 0.50, 0.20],   # Label 0 at 0.3: stays soft.
                      [0.10, 0.10, 0.80],   # Label 2 at 0.8, but not among the rows.
                      [0.05, 0.45, 0.50]])  # Label 1 at 0.45: soft.
  labels = np.array([0, 0, 2, 1])
  out = targets.copy()
  hit = abl.owned(out, labels, np.array([0, 1, 3]), 0.5)
  np.testing.assert_array_equal(hit, [0])
  np.testing.assert_array_equal(out[0], [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(out[1:], targets[1:])


def test_unsure_drop_keeps_out_the_pool_examples_neither_owned_nor_disowned(tmp_path):
  config = smoke.config(**{**GAUGE, "abl__kept_out": "distill", "abl__disown_below": 0.02, "abl__own_above": 0.08,
                           "abl__unsure": "drop"})
  experiment.train_and_evaluate(config, str(tmp_path))
  saved, iso = np.load(tmp_path / "returned.npz"), np.load(tmp_path / "isolation.npz")
  labels, pool, train_labels = saved["labels"], iso["pool"], iso["labels"]
  own = np.exp(-saved["judge_loss"])  # The gauge's probability for each pool example's label.
  owned, disowned, kept_out = saved["owned"], saved["disowned"], saved["kept_out"]
  np.testing.assert_array_equal(owned, np.sort(pool[own >= 0.08]))
  np.testing.assert_array_equal(disowned, np.sort(pool[own < 0.02]))
  np.testing.assert_array_equal(kept_out, np.sort(pool[(own >= 0.02) & (own < 0.08)]))
  assert len(owned) and len(disowned) and len(kept_out)
  np.testing.assert_array_equal(labels[owned], np.eye(10)[train_labels[owned]])
  np.testing.assert_array_equal(saved["returned"], np.union1d(owned, disowned))
  summary = json.loads((tmp_path / "isolation.json").read_text())
  assert (summary["owned"], summary["kept_out_size"]) == (len(owned), len(kept_out))


def test_spectral_outliers_flag_the_label_with_a_separate_minority_learned_first_and_pick_it():
  rng = np.random.default_rng(0)
  labels = np.repeat([0, 1, 2], 200)
  features = rng.normal(size=(600, 8))
  features[:20, 3] += 10.0  # 10% of label 0 share a feature the rest of it lacks,
  scores = rng.uniform(1.0, 2.0, size=600)
  scores[:20] = rng.uniform(0.0, 0.1, size=20)  # and the isolation model fits them first.
  found = abl.spectral_outliers(features, labels, scores, 3, skew=0.8, tail=3.0)
  np.testing.assert_array_equal(found.flagged, [0])
  suspected = found.suspected
  assert np.isin(np.arange(20), suspected).all() and len(suspected) <= 22 and (labels[suspected] == 0).all()
  assert found.skewness[0] > 2.0 and found.skewness[1] < 0.5 and found.skewness[2] < 0.5
  assert not len(found.bimodal) and found.kurtosis[1] > 2.5  # A normal label: about 3.
  features[:20, 3] -= 20.0  # The same cluster on the other side of the direction: found all the same.
  suspected = abl.spectral_outliers(features, labels, scores, 3, skew=0.8, tail=3.0).suspected
  assert np.isin(np.arange(20), suspected).all() and len(suspected) <= 22
  found = abl.spectral_outliers(features, labels, scores, 3, skew=5.0, tail=3.0)
  assert not len(found.flagged) and not len(found.suspected)
  # The same skewed tail, but the examples the isolation model fits worst (a clean label's hardest): not flagged.
  scores[:20] = rng.uniform(3.0, 4.0, size=20)
  found = abl.spectral_outliers(features, labels, scores, 3, skew=0.8, tail=3.0)
  assert not len(found.flagged) and not len(found.suspected) and found.skewness[0] > 2.0


def test_the_pursuit_test_finds_a_minority_off_the_top_direction_only_where_it_is_learned_first():
  rng = np.random.default_rng(0)
  labels = np.repeat([0, 1], 1000)
  features = rng.normal(size=(2000, 32)) * np.r_[6.0, 5.0, 4.0, np.ones(29)]  # Largest spread on units 0-2,
  features[900:1000, 5] += 4.0  # and a tenth of label 0 shares a shift on a unit of small spread.
  scores = rng.uniform(0.5, 2.0, size=2000)
  scores[900:1000] = rng.uniform(0.0, 0.3, size=100)  # The isolation model fits that tenth first.
  off = abl.spectral_outliers(features, labels, scores, 2, skew=0.8, tail=2.0, kurtosis_below=1.8)
  assert not len(off.flagged) and off.skewness[0] < 0.3 and np.isnan(off.pursuit_rank).all()  # Top direction: blind.
  found = abl.spectral_outliers(features, labels, scores, 2, skew=0.8, tail=2.0, kurtosis_below=1.8,
                                pursuit_rank=0.2, pursuit_dims=16)
  np.testing.assert_array_equal(found.flagged, [0])
  np.testing.assert_array_equal(found.pursued, [0])
  suspected = found.suspected
  assert np.isin(suspected, np.arange(900, 1000)).sum() >= 85 and np.isin(suspected, np.arange(900)).sum() <= 15
  np.testing.assert_array_equal(suspected, np.flatnonzero(found.projection[:1000] > found.cut[0]))  # Its direction.
  assert found.pursuit_rank[0] < 0.1 and found.pursuit_rank[1] > 0.2 and np.isnan(found.cut[1])
  _, skewness = abl.pursuit_direction(features[:1000], 16)
  assert skewness > 1.0  # What the top direction's 0.3 misses.
  scores[900:1000] = rng.uniform(2.0, 3.0, size=100)  # The same minority fitted worst: a clean label's hardest.
  found = abl.spectral_outliers(features, labels, scores, 2, skew=0.8, tail=2.0, kurtosis_below=1.8,
                                pursuit_rank=0.2, pursuit_dims=16)
  assert not len(found.flagged) and found.pursuit_rank[0] > 0.9


def test_spectral_outliers_split_a_label_in_two_and_suspect_the_half_learned_first():
  rng = np.random.default_rng(1)
  labels = np.repeat([0, 1, 2], 200)
  features = rng.normal(size=(600, 8))
  features[100:200, 5] += 8.0  # Half of label 0 carries a trigger: two equal modes (kurtosis near 1.2).
  scores = rng.uniform(1.0, 2.0, size=600)
  scores[100:200] = rng.uniform(0.0, 0.1, size=100)  # The isolation model fits the triggered half first.
  found = abl.spectral_outliers(features, labels, scores, 3, skew=0.8, tail=3.0, kurtosis_below=1.8)
  np.testing.assert_array_equal(found.flagged, [0])
  np.testing.assert_array_equal(found.bimodal, [0])
  np.testing.assert_array_equal(found.suspected, np.arange(100, 200))
  np.testing.assert_array_equal(np.flatnonzero(found.projection[:200] > found.cut[0]), np.arange(100, 200))
  assert np.isnan(found.cut[1:]).all()
  assert found.kurtosis[0] < 1.5 and found.kurtosis[1] > 2.5 and found.skewness[0] < 0.8  # Not skewed.
  scores[:200] = scores[:200][::-1].copy()  # Now the other half is learned first: it is the one suspected,
  found = abl.spectral_outliers(features, labels, scores, 3, skew=0.8, tail=3.0, kurtosis_below=1.8)
  np.testing.assert_array_equal(found.suspected, np.arange(100))
  np.testing.assert_array_equal(np.flatnonzero(found.projection[:200] > found.cut[0]), np.arange(100))  # right.
  assert not len(abl.spectral_outliers(features, labels, scores, 3, skew=0.8, tail=3.0).flagged)  # Test off.
  features[400:] = 1.0  # Label 2's features all the same (dead units): no spread, nothing to flag.
  found = abl.spectral_outliers(features, labels, scores, 3, skew=0.8, tail=3.0, kurtosis_below=1.8)
  assert 2 not in found.flagged and found.kurtosis[2] == 0.0 and found.skewness[2] == 0.0


def test_spectral_bimodality_splits_a_label_a_third_triggered_that_neither_other_test_flags():
  rng = np.random.default_rng(2)
  labels = np.repeat([0, 1, 2], 300)
  features = rng.normal(size=(900, 8))
  features[200:300, 5] += 4.0  # A third of label 0 carries a trigger: two modes in unequal shares.
  scores = rng.uniform(1.0, 2.0, size=900)
  scores[200:300] = rng.uniform(0.0, 0.1, size=100)  # The isolation model fits the triggered third first.
  found = abl.spectral_outliers(features, labels, scores, 3, skew=0.8, tail=3.0, kurtosis_below=1.8)
  coefficient = (found.skewness ** 2 + 1) / found.kurtosis
  # Too skewed for the kurtosis cut, too little for the skewness one: nothing flagged without the coefficient.
  assert found.kurtosis[0] > 1.8 and found.skewness[0] < 0.8 and not len(found.flagged)
  assert coefficient[0] > 5 / 9 and (coefficient[1:] < 0.45).all()
  found = abl.spectral_outliers(features, labels, scores, 3, skew=0.8, tail=3.0, kurtosis_below=1.8,
                                bimodality=5 / 9)
  np.testing.assert_array_equal(found.flagged, [0])
  np.testing.assert_array_equal(found.bimodal, [0])
  # The two-means cut between modes 4 standard deviations apart: 99 of the 100 triggered and 5 of the 200 others.
  assert np.isin(np.arange(200, 300), found.suspected).sum() == 99 and (found.suspected < 200).sum() == 5
  assert (found.suspected < 300).all()
  # A label skewed past spectral_skew is the skewness test's, whatever its coefficient: at skew=0.4 the
  # coefficient changes nothing.
  skewed = [abl.spectral_outliers(features, labels, scores, 3, skew=0.4, tail=1.5, kurtosis_below=1.8,
                                  bimodality=b) for b in (0.0, 5 / 9)]
  assert 0 in skewed[1].flagged and 0 not in skewed[1].bimodal
  np.testing.assert_array_equal(skewed[0].suspected, skewed[1].suspected)


def test_the_kurtosis_outlier_test_defers_a_label_whose_modes_are_too_close_for_the_kurtosis_cut():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(6), 1000)
  features = rng.normal(size=(6000, 8))
  features[500:1000, 5] += 3.0  # Half of label 0 carries a trigger 3 standard deviations off: kurtosis near 2.
  scores = rng.uniform(1.0, 2.0, size=6000)  # The isolation model fits neither half first.
  found = abl.spectral_outliers(features, labels, scores, 6, skew=0.8, tail=3.0, kurtosis_below=1.8, kurtosis_z=3.5)
  assert 1.8 < found.kurtosis[0] < 2.2 and (found.kurtosis[1:] > 2.5).all()
  assert found.kurtosis_scores[0] > 3.5 and (found.kurtosis_scores[1:] < 3.5).all()
  np.testing.assert_array_equal(found.deferred, [0])
  assert not len(found.flagged) and not len(found.suspected)  # The gauge chooses the side, later.
  above = found.projection[:1000] > found.cut[0]
  assert np.isnan(found.cut[1:]).all()
  # The two-means cut between the modes: 471 of the 500 triggered on one side with 29 of the others.
  assert {above[500:].sum(), above[:500].sum()} == {29, 471}
  assert not len(abl.spectral_outliers(features, labels, scores, 6, skew=0.8, tail=3.0,
                                       kurtosis_below=1.8).deferred)  # Off by default.
  # A label the kurtosis cut flags is split there, by the isolation losses, not deferred.
  found = abl.spectral_outliers(features, labels, scores, 6, skew=0.8, tail=3.0, kurtosis_below=2.5, kurtosis_z=3.5)
  np.testing.assert_array_equal(found.flagged, [0])
  assert not len(found.deferred) and len(found.suspected)


def test_judged_side_is_the_side_of_the_cut_the_gauge_gives_the_label_less():
  projection = np.array([-2.0, -1.0, 1.0, 2.0, 3.0])
  assert abl.judged_side(projection, 0.0, np.array([0.9, 0.7, 0.1, 0.3, 0.8]))  # 0.4 above, 0.8 below.
  assert not abl.judged_side(projection, 0.0, np.array([0.1, 0.3, 0.5, 0.6, 0.7]))
  assert not abl.judged_side(projection, 1.5, np.array([0.1, 0.3, 0.5, 0.6, 0.7]))  # 0.3 below 1.5, 0.65 above.


def test_side_outlier_scores_score_a_label_by_the_examples_of_one_side():
  # 4 labels x 10 examples; the gauge rejects (under 0.1) 1 of each label's 10, and 4 of label 2's 5 on one side.
  labels = np.repeat(np.arange(4), 10)
  own = np.full(40, 0.6)
  own[[0, 10, 20, 30]] = 0.05
  own[[21, 22, 23, 24]] = 0.05
  side = np.zeros(40, bool)
  side[20:25] = True
  scores = abl.side_outlier_scores(own, labels, side, 2, 4, (0.1,))
  np.testing.assert_allclose(scores, abl.outlier_labels(own[(labels != 2) | side], labels[(labels != 2) | side], 4,
                                                        3.5, (0.1,))[2][:, 2])
  _, shares, whole = abl.outlier_labels(own, labels, 4, 3.5, (0.1,))
  assert shares[0, 2] == 0.5 and scores[0] > whole[0, 2]  # 5 of 5 on the side against 5 of 10 in the label.
  assert (abl.side_outlier_scores(own, labels, ~side & (labels == 2), 2, 4, (0.1,)) < 0).all()  # The other side.


def test_a_deferred_split_suspects_the_side_the_gauge_rejects_where_the_side_is_an_outlier():
  own = np.full(40, 0.6, np.float32)
  own[[1, 11, 31]] = 0.05  # One rejected example in each other label.
  own[25:30] = [0.05, 0.02, 0.05, 0.01, 0.5]  # Label 2's examples 25-29: the gauge rejects 4 of them.
  run, _ = _four_label_run(own, suspected=np.zeros(0, np.int64))
  run.pool = np.array([0, 29])  # Example 29 is in the pool, on the rejected side: suspected with its side.
  projection = np.zeros(40)
  projection[20:30] = np.r_[-np.arange(1.0, 6.0), np.arange(1.0, 6.0)]
  cuts = np.full(4, np.nan)
  cuts[2] = 0.0
  split, scores = schedule._judged_split(run, schedule._outside_gauge(run), np.array([2]), projection, cuts,
                                         np.zeros(0))
  np.testing.assert_array_equal(split, np.arange(25, 30))
  assert (scores[:, 2] > 3.5).any() and np.isnan(np.delete(scores, 2, axis=1)).all()
  # Left to the outlier label test where it flagged the label.
  assert not len(schedule._judged_split(run, schedule._outside_gauge(run), np.array([2]), projection, cuts,
                                        np.array([2]))[0])
  own[20:25], own[25:30] = own[25:30].copy(), 0.6  # Now the side below the cut is the one rejected.
  run, _ = _four_label_run(own, suspected=np.zeros(0, np.int64))
  np.testing.assert_array_equal(schedule._judged_split(run, schedule._outside_gauge(run), np.array([2]), projection,
                                                       cuts, np.zeros(0))[0], np.arange(20, 25))
  own[20:25] = [0.3, 0.4, 0.05, 0.4, 0.3]  # Given less on average, but rejected no more often than elsewhere.
  run, _ = _four_label_run(own, suspected=np.zeros(0, np.int64))
  assert not len(schedule._judged_split(run, schedule._outside_gauge(run), np.array([2]), projection, cuts,
                                        np.zeros(0))[0])
  projection[20:25] = 1.0  # Every example outside the pool on one side: nothing to compare, nothing suspected.
  projection[25:29] = 2.0
  assert not len(schedule._judged_split(run, schedule._outside_gauge(run), np.array([2]), projection, cuts,
                                        np.zeros(0))[0])


def test_kurtosis_and_the_two_means_split_on_known_values():
  assert abl.kurtosis(np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(1.0)  # Two equal point masses.
  assert abl.kurtosis(np.linspace(0.0, 1.0, 100001)) == pytest.approx(1.8, abs=1e-3)  # Uniform.
  # {0, .5, 1} | {5, 9, 10}: within-group sums of squares 0.5 + 14, against 15.7 + 0.5 for {0, .5, 1, 5} | {9, 10}.
  assert abl.two_means_split(np.array([5.0, 0.0, 1.0, 9.0, 10.0, 0.5])) == 3.0
  assert abl.two_means_split(np.array([0.0, 0.1, 10.0, 10.2, 10.1])) == pytest.approx(5.05)


def test_lowest_rank_takes_each_examples_best_rank_over_the_scorings():
  first, second = np.array([0.1, 0.5, 0.9, 0.3]), np.array([0.8, 0.05, 0.7, 0.6])
  np.testing.assert_allclose(abl.lowest_rank([first, second]), np.array([0, 0, 2, 1]) / 4)


def test_score_epochs_ranks_the_pool_by_the_last_epochs_scores_within_each_label(tmp_path):
  config = smoke.config(**{**GAUGE, "abl__score_epochs": 5, "abl__pool_rule": "class_ratio",
                           "abl__class_quantile": 0.8})  # 2 isolation epochs.
  experiment.train_and_evaluate(config, str(tmp_path))
  saved, iso = np.load(tmp_path / "epoch_scores.npz"), np.load(tmp_path / "isolation.npz")
  assert sorted(saved.files) == ["epoch_1", "epoch_2"]
  np.testing.assert_allclose(saved["epoch_2"], iso["scores"], rtol=1e-6)
  normalised = [abl.class_normalised(saved[k], iso["labels"], 0.8) for k in ("epoch_1", "epoch_2")]
  expected = abl.suspicious_pool(abl.lowest_rank(normalised), iso["isolated"], "class_ratio", 0.2)
  np.testing.assert_array_equal(iso["pool"], expected)
  assert not np.array_equal(expected, abl.suspicious_pool(abl.lowest_rank([saved["epoch_1"], saved["epoch_2"]]),
                                                           iso["isolated"], "ratio", 0.2))


class _StopAfterIsolate(Exception):
  pass


def test_the_last_scored_epoch_shares_isolates_pass_over_the_training_set(tmp_path, monkeypatch):
  passes = []
  real_predictor, real_isolate = train.predictor, schedule.isolate

  def counting(*args, **kwargs):
    predict = real_predictor(*args, **kwargs)
    return lambda images, labels: passes.append(len(images)) or predict(images, labels)

  def isolate_then_stop(run):
    real_isolate(run)
    raise _StopAfterIsolate

  monkeypatch.setattr(train, "predictor", counting)
  monkeypatch.setattr(schedule, "isolate", isolate_then_stop)
  config = smoke.default(abl__score_epochs=2)  # 2 isolation epochs, spectral signatures on (features too).
  with pytest.raises(_StopAfterIsolate):
    experiment.train_and_evaluate(config, str(tmp_path))
  saved, iso = np.load(tmp_path / "epoch_scores.npz"), np.load(tmp_path / "isolation.npz")
  assert passes.count(len(iso["labels"])) == 2  # Epoch 1's scores; epoch 2's with the spectral features.
  assert sorted(saved.files) == ["epoch_1", "epoch_2"]
  np.testing.assert_array_equal(saved["epoch_2"], iso["scores"])
  assert not np.array_equal(saved["epoch_1"], saved["epoch_2"])


def test_score_epochs_out_of_range_names_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"config\.abl\.score_epochs=0 must be >= 1"):
    experiment.train_and_evaluate(smoke.config(**{**GAUGE, "abl__score_epochs": 0}), str(tmp_path))


def test_contradicted_examples_outside_the_pool_train_toward_the_gauge():
  labels = np.array([0, 1, 2, 0, 1, 2])
  scores = np.array([0.1, 0.1, 0.1, 2.0, 0.1, 0.1])  # The isolation model's loss on each example.
  # The gauge on the examples outside the pool (1 to 5): loss, prediction, probabilities.
  gauge_loss = np.array([3.0, 0.5, 3.0, 3.0, 1.0])
  gauge_pred = np.array([0, 2, 1, 0, 0])
  probs = np.full((5, 3), 0.1, np.float32)
  probs[np.arange(5), gauge_pred] = 0.8
  run = types.SimpleNamespace(
      train=types.SimpleNamespace(labels=labels, images=np.arange(6)), pool=np.array([0]), scores=scores,
      config=ml_collections.ConfigDict({"abl": {"contradict_factor": 10.0, "gauge_epochs": 1,
                                                "gauge_downsample": 1}}),
      labels=np.eye(3, dtype=np.float32)[labels],
      predict=lambda probabilities: lambda images, labels: (gauge_loss, gauge_pred, probs))
  # 1 and 4: another prediction and 3.0 - 0.1 >= log(10); 2: the label predicted; 3: the isolation model did
  # not fit it (3.0 - 2.0 < log(10)); 5: 1.0 - 0.1 < log(10).
  outside = schedule._outside_gauge(run)
  contradicted = schedule._contradicted(run, outside)
  np.testing.assert_array_equal(contradicted, [1, 4])
  np.testing.assert_array_equal(outside.full_loss[1:], gauge_loss)
  np.testing.assert_array_equal(outside.full_prediction, [-1, *gauge_pred])
  assert np.isnan(outside.full_loss[0])
  np.testing.assert_array_equal(run.labels[[1, 4]], probs[[0, 3]])
  np.testing.assert_array_equal(run.labels[[0, 2, 3, 5]], np.eye(3)[labels[[0, 2, 3, 5]]])


def test_outlier_labels_flag_the_label_the_gauge_rejects_far_more_often_than_the_others():
  # Shares of rejected examples per label (the gauge gives their label 0.05): 0.1, 0.12, 0.14, 0.16, 0.5 (label
  # 4), and label 5 has no examples.
  labels = np.repeat(np.arange(5), 50)
  own = np.full(250, 0.9)
  for label, n in enumerate([5, 6, 7, 8, 25]):
    own[label * 50:label * 50 + n] = 0.05
  flagged, shares, scores = abl.outlier_labels(own, labels, 6, 3.5, (0.1,), sampling=False)
  np.testing.assert_array_equal(flagged, [4])
  np.testing.assert_allclose(shares, [[0.1, 0.12, 0.14, 0.16, 0.5, 0.0]])
  # Median 0.14, MAD 0.02: label 4's modified z-score is 0.6745 * 0.36 / 0.02 = 12.1, label 3's 0.67.
  np.testing.assert_allclose(scores[0, [3, 4, 5]], [0.6745, 12.141, 0.0])
  assert len(abl.outlier_labels(own, labels, 6, 12.2, (0.1,), sampling=False)[0]) == 0
  np.testing.assert_array_equal(abl.outlier_labels(own, labels, 6, 0.6, (0.1,), sampling=False)[0], [3, 4])
  # Equal shares (MAD 0) but one: the mean absolute deviation measures the spread instead.
  own[:] = 0.9
  for label, n in enumerate([5, 5, 5, 5, 20]):
    own[label * 50:label * 50 + n] = 0.05
  np.testing.assert_array_equal(abl.outlier_labels(own, labels, 6, 3.5, (0.1,), sampling=False)[0], [4])
  assert len(abl.outlier_labels(np.ones(250), labels, 6, 3.5, (0.1,), sampling=False)[0]) == 0


def test_outlier_scores_with_sampling_add_a_shares_binomial_spread():
  # Shares 0.01, 0.02, 0.03, 0.04, 0.1 of 100 examples each: median 0.03, MAD 0.01 (spread 0.01 / 0.6745),
  # pooled share 20 / 500 = 0.04.
  shares, counts = np.array([0.01, 0.02, 0.03, 0.04, 0.1]), np.full(5, 100)
  plain = abl.outlier_scores(shares, counts)
  sampled = abl.outlier_scores(shares, counts, sampling=True)
  scale = np.sqrt((0.01 / 0.6745) ** 2 + 0.04 * 0.96 / 100)
  np.testing.assert_allclose(plain[4], 0.6745 * 0.07 / 0.01)  # 4.7: an outlier by the plain score,
  np.testing.assert_allclose(sampled, (shares - 0.03) / scale)  # 2.8 once 7 more examples in 100 may be chance.
  assert plain[4] > 3.5 > sampled[4]
  np.testing.assert_allclose(abl.outlier_scores(shares, np.full(5, 100_000), sampling=True)[4], plain[4], rtol=1e-3)
  # Where most labels have none below a strict level (median and MAD 0), 3 examples in 100 are no outlier.
  sparse = np.array([0.03, 0.0, 0.0, 0.0, 0.0])
  assert abl.outlier_scores(sparse, counts)[0] > 3.5 > abl.outlier_scores(sparse, counts, sampling=True)[0]


def test_outlier_labels_flag_a_label_at_the_strict_level_where_its_rejections_stand_out():
  # 10 labels x 1,000 examples. Every label has 90-230 hard examples the gauge gives 0.05, and 10-17 it gives
  # 0.01; label 0 also holds 60 other-class images it gives 0.005 (a backdoor it has not learned).
  labels = np.repeat(np.arange(10), 1000)
  own = np.full(10_000, 0.9)
  for label, hard in enumerate([120, 200, 90, 230, 150, 180, 110, 210, 140, 160]):
    own[label * 1000:label * 1000 + hard] = 0.05
    own[label * 1000 + hard:label * 1000 + hard + 10 + label % 8] = 0.01
  own[200:260] = 0.005
  flagged, shares, scores = abl.outlier_labels(own, labels, 10, 3.5, (0.1, 0.02))
  np.testing.assert_array_equal(flagged, [0])
  assert scores[0, 0] < 3.5 < scores[1, 0]  # Not an outlier among the hard examples; far one among the sure ones.
  np.testing.assert_allclose(shares[:, 0], [0.19, 0.07])
  assert len(abl.outlier_labels(own, labels, 10, 3.5, (0.1,))[0]) == 0


def test_dominant_label_flags_the_label_rejected_far_more_than_the_hardest_clean_one():
  # WaNet 10%, seed 0 (session 40): airplane's share under 0.1 is twice the hardest clean label's, yet the easy
  # and hard clean labels spread the shares enough that its outlier score is 2.9, under the cut of 3.5.
  shares = np.array([0.337, 0.046, 0.163, 0.138, 0.140, 0.136, 0.058, 0.141, 0.060, 0.071])
  counts = np.full(10, 1000)
  assert abl.outlier_scores(shares, counts, sampling=True)[0] < 3.5
  np.testing.assert_array_equal(abl.dominant_label(shares, counts, 1.6, 3.5), [0])
  assert len(abl.dominant_label(shares, counts, 2.1, 3.5)) == 0  # 0.337 / 0.163 = 2.07.
  assert len(abl.dominant_label(shares, counts, 0.0, 3.5)) == 0  # Off.
  # The top of clean labels' shares (1.30 times the next) is no flag; nor is a label empty here.
  clean = np.array([0.09, 0.04, 0.152, 0.11, 0.117, 0.11, 0.07, 0.12, 0.06, 0.06])
  assert len(abl.dominant_label(clean, counts, 1.6, 3.5)) == 0
  assert len(abl.dominant_label(np.where(np.arange(10) == 2, 0.9, clean), np.where(np.arange(10) == 2, 0, counts),
                                1.6, 3.5)) == 0
  # A handful of examples is no flag however the ratio stands: 2 of 10 against 1 of 10 in each other label.
  few = np.full(10, 10)
  assert len(abl.dominant_label(np.r_[0.2, np.full(9, 0.1)], few, 1.6, 3.5)) == 0
  np.testing.assert_array_equal(abl.dominant_label(np.r_[0.2, np.full(9, 0.1)], few * 100, 1.6, 3.5), [0])


def test_beyond_excess_spares_the_rejected_examples_a_clean_label_would_have_the_least_sure_first():
  # Labels 1 and 2 (20 examples each) have 4 rejected (share 0.2); flagged label 0 has 7 rejected of 20: 4 are
  # what a clean label would have, so the 3 surest (lowest) are taught "not this label" and the 4 others spared.
  labels = np.repeat([0, 1, 2], 20)
  own = np.full(60, 0.8)
  own[:7] = [0.05, 0.001, 0.09, 0.002, 0.07, 0.003, 0.06]
  own[20:24] = own[40:44] = 0.02
  rejected = own < 0.1
  spared = abl.beyond_excess(own, labels, rejected & (labels == 0), np.array([0]), 0.1)
  np.testing.assert_array_equal(np.flatnonzero(spared), [0, 2, 4, 6])
  # No excess (as many rejected as the clean labels' share): every one spared; a label with none: nothing.
  np.testing.assert_array_equal(np.flatnonzero(abl.beyond_excess(own, labels, rejected & (labels == 1),
                                                                 np.array([1]), 0.1)), np.arange(20, 24))
  assert not abl.beyond_excess(own, labels, np.zeros(60, bool), np.array([0]), 0.1).any()


def _four_label_run(own: np.ndarray, suspected: np.ndarray | None):
  """A fake run of 4 labels x len(own) / 4 examples (example 0 the pool) whose gauge gives each example's label
  `own` and the rest evenly to the other labels; and those probabilities."""
  labels = np.repeat(np.arange(4), len(own) // 4)
  probs = np.tile(((1 - own) / 3)[:, None], (1, 4)).astype(np.float32)
  probs[np.arange(len(own)), labels] = own
  run = types.SimpleNamespace(
      train=types.SimpleNamespace(labels=labels, images=np.arange(len(own)), num_classes=4), pool=np.array([0]),
      config=ml_collections.ConfigDict({"abl": {"class_outlier_z": 3.5, "disown_below": 0.1, "own_above": 0.5,
                                                "class_outlier_below": (0.1, 0.02), "class_outlier_ratio": 0.0,
                                                "flagged_rejected": "disown",
                                                "spectral_judged": False, "gauge_epochs": 1,
                                                "gauge_downsample": 1}}),
      suspected=suspected, labels=np.eye(4, dtype=np.float32)[labels],
      predict=lambda probabilities: lambda images, lab: (-np.log(own[images]), probs[images].argmax(1),
                                                          probs[images]))
  return run, probs


def test_class_rejected_disowns_only_the_outlier_labels_rejected_examples_outside_the_pool():
  # 4 labels x 10 examples; example 0 is the pool. The gauge gives the label 0.05 (rejected) to 2 examples of
  # each label but label 2, where it rejects 8.
  labels = np.repeat(np.arange(4), 10)
  own = np.full(40, 0.6, np.float32)
  for label, n in enumerate([2, 2, 8, 2]):
    own[label * 10 + 1:label * 10 + 1 + n] = 0.05
  own[29], own[39] = 0.3, 0.3  # Doubted (in [disown_below, own_above)): label 2's counts, label 3's does not.
  run, probs = _four_label_run(own, suspected=np.array([10]))
  outside = schedule._outside_gauge(run)
  found = schedule._class_rejected(run, outside)
  flagged, rejected = found["outlier_labels"], found["class_rejected"]
  np.testing.assert_array_equal(flagged, [2])
  np.testing.assert_array_equal(found["outlier_levels"], [0.1, 0.02])
  np.testing.assert_allclose(found["outlier_shares"][:, 2], [0.8, 0.0])  # Label 2: 8 of its 10 below 0.1.
  np.testing.assert_array_equal(rejected, np.arange(21, 29))
  np.testing.assert_array_equal(found["class_doubted"], [29])  # A flagged label's only.
  np.testing.assert_array_equal(run.labels[rejected], probs[rejected])
  untouched = np.setdiff1d(np.arange(40), rejected)
  np.testing.assert_array_equal(run.labels[untouched], np.eye(4)[labels[untouched]])
  # The second gauge judges among the first's flagged labels only: label 2 is not among [1], so nothing changes.
  run.labels = np.eye(4, dtype=np.float32)[labels]
  again = schedule._class_rejected(run, outside, among=np.array([1]))
  assert len(again["outlier_labels"]) == 0 and len(again["class_rejected"]) == 0
  np.testing.assert_array_equal(run.labels, np.eye(4)[labels])
  # Left out instead (flagged_rejected=drop): the same examples found, their labels untouched.
  run.config.abl.flagged_rejected = "drop"
  np.testing.assert_array_equal(schedule._class_rejected(run, outside)["class_rejected"], rejected)
  np.testing.assert_array_equal(run.labels, np.eye(4)[labels])
  # excess: the other labels reject 6 of their 29 examples outside the pool, so label 2 would have 2 rejected if
  # clean; its 6 surest are taught "not this label", the 2 it gives the most are spared (left out in _judge).
  run.config.abl.flagged_rejected = "excess"
  rows = np.searchsorted(outside.examples, rejected)  # Example i sits at row i - 1 (example 0 is the pool).
  outside.probabilities[rows, 2] = [0.09, 0.01, 0.02, 0.03, 0.08, 0.04, 0.05, 0.06]
  found = schedule._class_rejected(run, outside)
  np.testing.assert_array_equal(found["class_rejected"], rejected)
  np.testing.assert_array_equal(found["class_spared"], [21, 25])
  taught = np.setdiff1d(rejected, [21, 25])
  np.testing.assert_array_equal(run.labels[taught], outside.probabilities[np.searchsorted(outside.examples, taught)])
  np.testing.assert_array_equal(run.labels[[21, 25]], np.eye(4)[[2, 2]])
  run.labels = np.eye(4, dtype=np.float32)[labels]
  run.config.abl.flagged_rejected = "drop"
  # spectral_judged: label 1, which spectral signatures flagged (example 10 suspected), is judged too, in the
  # second judgement as well, where the outlier test does not find it.
  run.config.abl.spectral_judged = True
  found = schedule._class_rejected(run, outside)
  np.testing.assert_array_equal(found["outlier_labels"], [1, 2])
  np.testing.assert_array_equal(found["class_rejected"], np.concatenate([[11, 12], rejected]))
  np.testing.assert_array_equal(schedule._class_rejected(run, outside, among=np.array([1]))["outlier_labels"], [1])


def test_class_rejected_flags_the_dominant_label_that_the_outlier_score_misses():
  # 4 labels x 100 examples (example 0 the pool); the gauge rejects 10, 30, 35 and 80 of labels 0-3's examples
  # outside it: label 3's share scores 2.5 at 0.1 (under the cut of 3.5), and is 2.29 times label 2's.
  own = np.full(400, 0.6, np.float32)
  for label, n in enumerate([10, 30, 35, 80]):
    own[label * 100 + 1:label * 100 + 1 + n] = 0.05
  run, _ = _four_label_run(own, suspected=None)
  run.config.abl.class_outlier_below = (0.1,)
  outside = schedule._outside_gauge(run)
  assert len(schedule._class_rejected(run, outside)["outlier_labels"]) == 0
  run.config.abl.class_outlier_ratio = 2.0
  found = schedule._class_rejected(run, outside)
  np.testing.assert_array_equal(found["outlier_labels"], [3])
  np.testing.assert_allclose(found["outlier_scores"][0, 3], 2.49, atol=0.01)
  np.testing.assert_array_equal(found["class_rejected"], np.arange(301, 381))
  run.config.abl.class_outlier_below = (0.02, 0.1)  # Levels in any order: the ratio is taken at the loosest.
  np.testing.assert_array_equal(schedule._class_rejected(run, outside)["outlier_labels"], [3])
  run.config.abl.class_outlier_ratio = 2.5
  assert len(schedule._class_rejected(run, outside)["outlier_labels"]) == 0


def test_pool_outliers_flag_the_label_whose_pool_examples_the_gauge_rejects_unusually_often():
  # 10 labels x 20 pool examples; the gauge rejects (under 0.1) 1-3 of each label's, 12 of label 3's (a backdoor
  # isolation found), and all of label 5's suspects, which the spectral rule disowns anyway and are not counted.
  labels = np.repeat(np.arange(10), 20)
  own = np.full(200, 0.6)
  for label, n in enumerate([1, 2, 3, 12, 2, 1, 3, 2, 1, 2]):
    own[label * 20:label * 20 + n] = 0.05
  own[100:115] = 0.02
  run = types.SimpleNamespace(
      train=types.SimpleNamespace(num_classes=10), pool=np.arange(1000, 1200), suspected=np.arange(1101, 1115),
      config=ml_collections.ConfigDict({"abl": {"pool_outlier_z": 3.5, "disown_below": 0.1}}))
  extra = {}
  np.testing.assert_array_equal(schedule._pool_outliers(run, labels, own, extra), [3])
  np.testing.assert_allclose(extra["pool_outlier_shares"][[3, 5]], [0.6, 1 / 6])  # Label 5: 1 of its 6 counted.
  np.testing.assert_array_equal(extra["pool_outlier_labels"], [3])
  run.suspected = None  # Counted, label 5 (15 of 20 rejected) is an outlier too.
  np.testing.assert_array_equal(schedule._pool_outliers(run, labels, own, {}), [3, 5])
  run.config.abl.pool_outlier_z = 0.0  # Off: nothing flagged, nothing recorded.
  extra = {}
  assert len(schedule._pool_outliers(run, labels, own, extra)) == 0 and not extra


def test_a_pool_outlier_label_is_judged_outside_the_pool_where_its_share_there_is_ordinary():
  labels = np.repeat(np.arange(4), 10)
  own = np.full(40, 0.6, np.float32)
  own[[11, 21, 31, 32]] = 0.05  # One or two rejected per label outside the pool: no outlier there.
  run, probs = _four_label_run(own, suspected=None)
  outside = schedule._outside_gauge(run)
  assert len(schedule._class_rejected(run, outside)["outlier_labels"]) == 0
  found = schedule._class_rejected(run, outside, also=np.array([1]))
  np.testing.assert_array_equal(found["outlier_labels"], [1])
  np.testing.assert_array_equal(found["class_rejected"], [11])
  np.testing.assert_array_equal(run.labels[11], probs[11])
  # The second judgement (among the first's flagged labels) keeps the pool's outlier label.
  again = schedule._class_rejected(run, outside, among=np.array([1]), also=np.array([1]))
  np.testing.assert_array_equal(again["outlier_labels"], [1])


def test_a_run_disowns_the_excess_of_the_outlier_labels_rejected_examples_outside_the_pool(tmp_path):
  config = smoke.config(**{**GAUGE, "abl__kept_out": "distill", "abl__disown_below": 0.1, "abl__class_outlier_z": 1.0,
                           "abl__flagged_rejected": "excess"})
  experiment.train_and_evaluate(config, str(tmp_path))
  saved, iso = np.load(tmp_path / "returned.npz"), np.load(tmp_path / "isolation.npz")
  pool, train_labels = iso["pool"], iso["labels"]
  outside = np.setdiff1d(np.arange(len(train_labels)), pool)
  own = np.exp(-saved["outside_gauge_loss"][outside])
  rejected = own < 0.1
  expected_labels, _, scores = abl.outlier_labels(own, train_labels[outside], 10, 1.0, (0.1, 0.05, 0.02))
  np.testing.assert_allclose(saved["outlier_scores"], scores, rtol=1e-5, atol=1e-6)
  summary = json.loads((tmp_path / "isolation.json").read_text())
  assert len(expected_labels) and summary["outlier_labels"] == expected_labels.tolist()
  class_rejected = saved["class_rejected"]
  hit = rejected & np.isin(train_labels[outside], expected_labels)
  np.testing.assert_array_equal(class_rejected, outside[hit])
  assert summary["class_rejected"] == len(class_rejected)
  # flagged_rejected=excess: the rejected beyond a clean label's count are disowned, the rest left out of
  # fine-tuning with their labels.
  spared = outside[abl.beyond_excess(own, train_labels[outside], hit, expected_labels, 0.1)]
  taught = np.setdiff1d(class_rejected, spared)
  assert len(spared) and len(taught)
  np.testing.assert_array_equal(saved["class_spared"], spared)
  np.testing.assert_array_equal(saved["left_out"], spared)
  assert np.isin(taught, saved["disowned"]).all() and not np.isin(spared, saved["disowned"]).any()
  np.testing.assert_array_equal(saved["labels"][taught, train_labels[taught]], 0.0)
  plain = np.setdiff1d(outside, taught)
  np.testing.assert_array_equal(saved["labels"][plain], np.eye(10)[train_labels[plain]])
  assert summary["class_spared"] == summary["left_out"] == len(spared)


SPECTRAL = {**GAUGE, "abl__kept_out": "distill", "abl__disown_below": 0.1, "abl__own_above": 0.5,
            "abl__spectral_skew": 0.01, "abl__spectral_tail": 1.0, "abl__spectral_kurtosis": 0.0}


def test_spectral_suspects_join_the_pool_and_are_disowned_whatever_the_gauge_says(tmp_path):
  # A skewness of 0.01 flags every label whose examples beyond 1 robust deviation the isolation model fits better
  # than the rest of the label (the synthetic set has such labels on this seed).
  config = smoke.config(**SPECTRAL)
  experiment.train_and_evaluate(config, str(tmp_path), max_epochs=3)  # Stops inside the gauge, after isolation.
  iso = np.load(tmp_path / "isolation.npz")
  suspected, pool, train_labels, scores = iso["suspected"], iso["pool"], iso["labels"], iso["scores"]
  summary = json.loads((tmp_path / "isolation.json").read_text())
  assert len(suspected) and summary["spectral_suspected"] == len(suspected)
  assert summary["spectral_labels"] == sorted(set(train_labels[suspected].tolist()))
  assert len(summary["spectral_skewness"]) == 10 and not summary["spectral_bimodal_labels"]
  projection, cut = iso["spectral_projection"], iso["spectral_cut"]
  for label in summary["spectral_labels"]:
    mine = np.flatnonzero(train_labels == label)
    tail = np.isin(mine, suspected)
    assert np.median(scores[mine[tail]]) < np.median(scores[mine[~tail]])
    np.testing.assert_array_equal(tail, projection[mine] > cut[label])  # The saved cut gives the suspects.
  assert np.isnan(cut[np.setdiff1d(np.arange(10), summary["spectral_labels"])]).all()
  assert np.isin(suspected, pool).all()
  experiment.train_and_evaluate(config, str(tmp_path))  # Resumed: the pool is rebuilt with the suspects in it.
  saved = np.load(tmp_path / "returned.npz")
  np.testing.assert_array_equal(np.load(tmp_path / "isolation.npz")["pool"], pool)
  np.testing.assert_array_equal(saved["spectral_disowned"], suspected)
  assert np.isin(suspected, saved["disowned"]).all() and not np.isin(suspected, saved["owned"]).any()
  np.testing.assert_array_equal(saved["labels"][suspected, train_labels[suspected]], 0.0)
  assert np.isin(suspected, saved["returned"]).all()  # Disowned examples train (toward "not this label").
  assert str(tmp_path / "spectral.png") in plots.write_run_plots(str(tmp_path))  # The projections and cuts.
  with open(tmp_path / "spectral.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_spectral_kurtosis_splits_labels_and_disowns_the_half_with_the_lower_isolation_losses(tmp_path):
  # A cutoff of 2.99 flags almost every label of the synthetic set (kurtosis under a normal's 3) as split in two.
  config = smoke.config(**{**SPECTRAL, "abl__spectral_skew": 0.0, "abl__spectral_kurtosis": 2.99})
  experiment.train_and_evaluate(config, str(tmp_path), max_epochs=3)
  iso = np.load(tmp_path / "isolation.npz")
  suspected, scores, train_labels = iso["suspected"], iso["scores"], iso["labels"]
  summary = json.loads((tmp_path / "isolation.json").read_text())
  bimodal = summary["spectral_bimodal_labels"]
  assert bimodal and bimodal == summary["spectral_labels"] and len(iso["spectral_kurtosis"]) == 10
  assert all(k <= 2.99 for k in np.asarray(summary["spectral_kurtosis"])[bimodal])
  assert np.isin(suspected, iso["pool"]).all() and set(train_labels[suspected]) == set(bimodal)
  for label in bimodal:
    mine = np.flatnonzero(train_labels == label)
    half = np.isin(mine, suspected)
    assert 0 < half.sum() < len(mine) and np.median(scores[mine[half]]) <= np.median(scores[mine[~half]])
    np.testing.assert_array_equal(half, iso["spectral_projection"][mine] > iso["spectral_cut"][label])
  experiment.train_and_evaluate(config, str(tmp_path))
  saved = np.load(tmp_path / "returned.npz")
  np.testing.assert_array_equal(saved["spectral_disowned"], suspected)
  assert not np.isin(suspected, saved["owned"]).any()


def test_the_pursuit_test_disowns_its_suspects_and_records_each_labels_tail_rank(tmp_path):
  # A rank cut-off of 0.45 flags the synthetic labels whose pursuit tail the isolation model fits better than most.
  config = smoke.config(**{**SPECTRAL, "abl__spectral_skew": 0.0, "abl__spectral_pursuit": 0.45,
                           "abl__spectral_pursuit_dims": 4})
  experiment.train_and_evaluate(config, str(tmp_path), max_epochs=3)
  iso = np.load(tmp_path / "isolation.npz")
  suspected, scores, train_labels, ranks = iso["suspected"], iso["scores"], iso["labels"], iso["spectral_pursuit_rank"]
  summary = json.loads((tmp_path / "isolation.json").read_text())
  pursued = summary["spectral_pursued_labels"]
  assert pursued and pursued == summary["spectral_labels"] and set(train_labels[suspected]) == set(pursued)
  np.testing.assert_array_equal(np.flatnonzero(ranks < 0.45), pursued)  # Every label ranked; the low ones flagged.
  for label in pursued:
    mine = np.flatnonzero(train_labels == label)
    tail = np.isin(mine, suspected)
    np.testing.assert_array_equal(tail, iso["spectral_projection"][mine] > iso["spectral_cut"][label])
    assert np.median(abl.within_rank(scores[mine])[tail]) == pytest.approx(ranks[label])
  assert np.isin(suspected, iso["pool"]).all()
  experiment.train_and_evaluate(config, str(tmp_path))
  saved = np.load(tmp_path / "returned.npz")
  np.testing.assert_array_equal(saved["spectral_disowned"], suspected)


DEFERRED = {**SPECTRAL, "abl__spectral_skew": 0.0, "abl__spectral_kurtosis_z": 0.01, "abl__class_outlier_z": 2.0}


def _every_side_an_outlier(label_probability, labels, side, label, num_classes, levels):
  """abl.side_outlier_scores for a synthetic set too small for a side to stand out: every judged side does."""
  return np.full(len(levels), 10.0)


@pytest.fixture(scope="module")
def deferred(tmp_path_factory):
  """A smoke run whose kurtosis outlier test (at a low cut-off) splits labels for the gauge to judge, where every
  side judged stands out (the test of a side's score is above)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(abl, "side_outlier_scores", _every_side_an_outlier)
    return _trained(tmp_path_factory, "deferred", DEFERRED)


def test_a_deferred_label_loses_the_side_of_its_cut_the_gauge_gives_it_less(deferred):
  out, _ = deferred
  iso, saved = np.load(out / "isolation.npz"), np.load(out / "returned.npz")
  summary = json.loads((out / "isolation.json").read_text())
  labels, projection, cut = iso["labels"], iso["spectral_projection"], iso["spectral_cut"]
  split, scores = saved["split_suspected"], saved["split_scores"]
  deferred_labels = summary["spectral_deferred_labels"]
  np.testing.assert_array_equal(deferred_labels, np.flatnonzero(iso["spectral_kurtosis_scores"] > 0.01))
  assert not len(iso["suspected"]) and np.isfinite(cut[deferred_labels]).all()
  judged = np.flatnonzero(np.isfinite(scores).all(axis=0))
  outliers = summary["outlier_labels"]
  # The outlier test's labels are left to it; the others are judged where both sides hold examples outside the pool.
  assert len(judged) and outliers and set(judged) <= set(deferred_labels) - set(outliers)
  assert summary["split_labels"] == sorted(set(labels[split].tolist())) == judged.tolist()
  own = np.exp(-saved["outside_gauge_loss"])  # NaN in the pool.
  for label in judged:
    mine = np.flatnonzero(labels == label)
    side = np.isin(mine, split)
    above = projection[mine] > cut[label]
    assert (side == above).all() or (side == ~above).all()  # One whole side of the cut,
    seen = ~np.isnan(own[mine])
    assert np.mean(own[mine][seen & side]) < np.mean(own[mine][seen & ~side])  # the one the gauge gives less.
  assert summary["split_suspected"] == len(split)
  np.testing.assert_array_equal(saved["spectral_disowned"], split)  # Disowned whatever the gauge says,
  np.testing.assert_array_equal(saved["labels"][split, labels[split]], 0.0)
  assert not np.isin(split, saved["owned"]).any()
  outside = np.setdiff1d(split, iso["pool"])  # those outside the pool toward the gauge's other beliefs.
  assert len(outside)
  np.testing.assert_allclose(saved["labels"][outside].sum(axis=1), 1.0, rtol=1e-5)
  assert set(judged) <= set(json.loads((out / "results.json").read_text())["suspected_labels"])
  regauged = np.load(out / "regauged.npz")  # The second gauge (outlier labels flagged) disowns the same split.
  np.testing.assert_array_equal(regauged["spectral_disowned"], split)


def test_a_deferred_split_resumes_like_an_uninterrupted_run(deferred, tmp_path, monkeypatch):
  _, results = deferred
  monkeypatch.setattr(abl, "side_outlier_scores", _every_side_an_outlier)
  # 2 isolation + 2 gauge epochs + 1 of fine-tuning: stops after the give-back.
  _assert_resumes_like(results, smoke.config(**DEFERRED), tmp_path, 5, saved="returned.npz", unsaved="results.json")


def test_spectral_skew_is_not_applied_where_the_judge_does_not_distill_the_pool(tmp_path):
  config = smoke.config(**{**SPECTRAL, "abl__kept_out": "relabel"})
  experiment.train_and_evaluate(config, str(tmp_path), max_epochs=3)
  assert "suspected" not in np.load(tmp_path / "isolation.npz").files
  assert "spectral_labels" not in json.loads((tmp_path / "isolation.json").read_text())


@pytest.mark.parametrize("field, value, message", [
    ("abl__spectral_skew", -0.5, r"config\.abl\.spectral_skew=-0\.5 must be 0 \(off\) or > 0"),
    ("abl__spectral_tail", 0.0, r"config\.abl\.spectral_tail=0\.0 must be > 0"),
    ("abl__spectral_kurtosis", 3.0, r"config\.abl\.spectral_kurtosis=3\.0 must be 0 \(off\) or in \(1, 3\)"),
    ("abl__spectral_bimodality", 0.3, r"config\.abl\.spectral_bimodality=0\.3 must be 0 \(off\) or in \(1/3, 1\]"),
    ("abl__spectral_pursuit", 1.0, r"config\.abl\.spectral_pursuit=1\.0 must be 0 \(off\) or in \(0, 1\)"),
    ("abl__spectral_kurtosis_z", -1.0, r"config\.abl\.spectral_kurtosis_z=-1\.0 must be 0 \(off\) or > 0"),
    ("abl__spectral_pursuit_dims", 1, r"config\.abl\.spectral_pursuit_dims=1 must be an integer >= 2"),
])
def test_spectral_fields_are_checked(field, value, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    experiment.train_and_evaluate(smoke.config(**{**SPECTRAL, field: value}), str(tmp_path))


DROP = {**GAUGE, "abl__kept_out": "distill", "abl__disown_below": 0.1, "abl__class_outlier_z": 1.0,
        "abl__flagged_rejected": "drop"}


@pytest.fixture(scope="module")
def dropped(tmp_path_factory):
  """A smoke run whose gauge flags an outlier label and leaves its rejected examples out of fine-tuning."""
  return _trained(tmp_path_factory, "dropped", DROP)


def test_flagged_rejected_drop_leaves_the_rejected_examples_out_with_their_labels(dropped):
  out, _ = dropped
  saved, iso = np.load(out / "returned.npz"), np.load(out / "isolation.npz")
  train_labels, rejected = iso["labels"], saved["class_rejected"]
  assert len(saved["outlier_labels"]) and len(rejected)
  np.testing.assert_array_equal(saved["left_out"], rejected)
  assert not np.isin(rejected, saved["disowned"]).any()  # Not taught "not this label": not taught at all.
  np.testing.assert_array_equal(saved["labels"][rejected], np.eye(10)[train_labels[rejected]])
  summary = json.loads((out / "isolation.json").read_text())
  assert summary["left_out"] == summary["class_rejected"] == len(rejected)
  # What fine-tuning draws from: every example outside the pool but those, and the pool's given-back ones.
  run = types.SimpleNamespace(train=iso["labels"], pool=iso["pool"], returned=saved["returned"],
                              left_out=saved["left_out"])
  retained = schedule._retained(run)
  outside = np.setdiff1d(np.arange(len(train_labels)), iso["pool"])
  np.testing.assert_array_equal(retained, np.union1d(np.setdiff1d(outside, rejected), saved["returned"]))


def test_flagged_doubted_drop_leaves_out_a_flagged_labels_examples_the_gauge_neither_backs_nor_rejects(tmp_path):
  config = smoke.config(**{**DROP, "abl__flagged_rejected": "disown", "abl__own_above": 0.5,
                           "abl__flagged_doubted": "drop"})
  experiment.train_and_evaluate(config, str(tmp_path))
  saved, iso = np.load(tmp_path / "returned.npz"), np.load(tmp_path / "isolation.npz")
  own = np.exp(-saved["outside_gauge_loss"].astype(np.float64))  # The gauge's probability of the label; NaN in the pool.
  flagged = np.isin(iso["labels"], saved["outlier_labels"]) & ~np.isnan(own)
  doubted = np.flatnonzero(flagged & (own >= 0.1) & (own < 0.5))
  assert len(doubted) and len(saved["class_rejected"])
  np.testing.assert_array_equal(saved["class_doubted"], doubted)
  np.testing.assert_array_equal(saved["left_out"], doubted)  # The rejected ones are still disowned, not left out.
  assert np.isin(saved["class_rejected"], saved["disowned"]).all()
  summary = json.loads((tmp_path / "isolation.json").read_text())
  assert summary["class_doubted"] == summary["left_out"] == len(doubted)


def test_flagged_unsure_keep_gives_a_flagged_labels_unsure_pool_examples_their_label(tmp_path):
  # own_above 0.9, unsure=drop: the pool's examples the gauge gives 0.1-0.9 stay out, but a flagged label's train
  # with their label, as its doubted examples outside the pool do (flagged_doubted=keep).
  base = {**DROP, "abl__flagged_rejected": "disown", "abl__own_above": 0.9, "abl__unsure": "drop",
          "abl__pool_rule": "class_ratio"}
  judged = 2 + 2 + 1  # Stopped one epoch after isolation and the gauge: their judgement (returned.npz) is written.
  for unsure in ("drop", "keep"):
    experiment.train_and_evaluate(smoke.config(**base, abl__flagged_unsure=unsure), str(tmp_path / unsure),
                                  max_epochs=judged)
  dropped, kept = np.load(tmp_path / "drop" / "returned.npz"), np.load(tmp_path / "keep" / "returned.npz")
  iso = np.load(tmp_path / "keep" / "isolation.npz")
  pool, train_labels = iso["pool"], iso["labels"]
  own = np.exp(-kept["judge_loss"].astype(np.float64))  # The gauge's probability of each pool example's label.
  unsure = pool[(own >= 0.1) & (own < 0.9) & np.isin(train_labels[pool], kept["outlier_labels"])]
  assert len(unsure) and len(dropped["kept_out"]) > len(unsure)
  np.testing.assert_array_equal(kept["flagged_unsure"], unsure)
  np.testing.assert_array_equal(dropped["kept_out"], np.union1d(kept["kept_out"], unsure))
  assert not np.isin(train_labels[kept["kept_out"]], kept["outlier_labels"]).any()
  assert np.isin(unsure, kept["returned"]).all()
  np.testing.assert_array_equal(kept["labels"][unsure], np.eye(10)[train_labels[unsure]])
  summary = json.loads((tmp_path / "keep" / "isolation.json").read_text())
  assert summary["flagged_unsure"] == len(unsure) and summary["kept_out_size"] == len(kept["kept_out"])
  # auto: only the labels whose pool examples the gauge rejects in a smaller share than those outside the pool.
  experiment.train_and_evaluate(smoke.config(**base, abl__flagged_unsure="auto"), str(tmp_path / "auto"),
                                max_epochs=judged)
  auto = np.load(tmp_path / "auto" / "returned.npz")
  flagged, shares = auto["outlier_labels"], auto["flagged_rejected_shares"]
  np.testing.assert_array_equal(auto["judge_loss"], kept["judge_loss"])  # The same judgement as the run above.
  outside = np.setdiff1d(np.arange(len(train_labels)), pool)
  share = lambda rejected: np.mean(rejected) if len(rejected) else np.nan  # NaN: no examples of the label there.
  expected = [[share(own[train_labels[pool] == label] < 0.1) for label in flagged],
              [share(np.isin(outside[train_labels[outside] == label], auto["class_rejected"])) for label in flagged]]
  np.testing.assert_allclose(shares, expected)
  chosen = flagged[shares[0] < shares[1]]
  np.testing.assert_array_equal(auto["flagged_unsure"], unsure[np.isin(train_labels[unsure], chosen)])
  np.testing.assert_array_equal(auto["kept_out"], np.setdiff1d(dropped["kept_out"], auto["flagged_unsure"]))
  assert "flagged_rejected_shares" not in dropped.files


def test_flagged_unsure_is_checked(tmp_path):
  with pytest.raises(ValueError, match=r"config\.abl\.flagged_unsure='back' is unknown; allowed: drop, keep, auto"):
    experiment.train_and_evaluate(smoke.config(**{**DROP, "abl__flagged_unsure": "back"}), str(tmp_path))


# own_above 0.3: on the smoke data the model being fine-tuned backs none of the doubted examples at 0.5 after its
# first epoch.
RETURN = {**DROP, "abl__flagged_rejected": "disown", "abl__own_above": 0.3, "abl__flagged_doubted": "return",
          "abl__calibrate_flagged": True}


@pytest.fixture(scope="module")
def returned_doubted(tmp_path_factory):
  """A smoke run whose flagged label's doubted examples rejoin fine-tuning at the relearned check, its logit
  calibrated after fine-tuning."""
  return _trained(tmp_path_factory, "returned_doubted", RETURN)


def test_flagged_doubted_return_gives_back_at_the_relearned_check_what_the_model_backs(returned_doubted):
  out, _ = returned_doubted
  saved, checked = np.load(out / "regauged.npz"), np.load(out / "relearned.npz")
  doubted, returned = saved["class_doubted"], checked["relearned_returned"]
  np.testing.assert_array_equal(saved["left_out"], doubted)  # Out of fine-tuning until the check...
  assert 0 < len(returned) < len(doubted) and np.isin(returned, doubted).all()  # ...where some rejoin.
  assert json.loads((out / "isolation.json").read_text())["relearned_returned"] == len(returned)


def test_flagged_offsets_give_each_flagged_label_the_median_share_of_the_others():
  rng = np.random.default_rng(0)
  probabilities = rng.dirichlet(np.ones(4), size=200)
  probabilities[:, 2] *= 0.1  # The model rarely predicts label 2...
  probabilities /= probabilities.sum(axis=1, keepdims=True)
  labels = np.repeat([0, 1, 2, 3], [40, 50, 70, 40])  # ...which holds 70 of the 200 labels.
  offsets = abl.flagged_offsets(probabilities, labels, np.array([2]), 4)
  assert offsets[[0, 1, 3]].tolist() == [0, 0, 0] and offsets[2] > 0
  shifted = probabilities * np.exp(offsets)
  shifted /= shifted.sum(axis=1, keepdims=True)
  assert shifted[:, 2].mean() == pytest.approx(0.2, abs=1e-9)  # The median of 40, 50 and 40 of 200.
  both = abl.flagged_offsets(probabilities, labels, np.array([1, 2]), 4)
  shifted = probabilities * np.exp(both)
  shifted /= shifted.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(shifted[:, [1, 2]].mean(axis=0), [0.2, 0.2], atol=1e-6)
  assert not abl.flagged_offsets(probabilities, labels, np.array([], int), 4).any()


def test_calibrate_flagged_offsets_the_final_models_logits_and_eval_applies_them(returned_doubted):
  out, results = returned_doubted
  config = smoke.config(**RETURN)
  saved = np.load(out / "calibration.npz")
  flagged = np.load(out / "regauged.npz")["outlier_labels"]
  assert len(flagged)
  np.testing.assert_array_equal(saved["calibrated_labels"], flagged)
  others = np.setdiff1d(np.arange(10), flagged)
  assert saved["logit_offset"][flagged].all() and not saved["logit_offset"][others].any()
  # The results are the calibrated model's: --mode=eval and a restore of the final model apply the offsets too.
  evaluated = experiment.evaluate_checkpoint(config, str(out))
  assert evaluated["clean_accuracy"] == results["clean_accuracy"]
  assert evaluated["clean_test_loss"] == results["clean_test_loss"]
  prep = experiment.prepare(config)
  model = experiment._model(config, prep.train)
  variables = checkpoint.restore_variables(str(out), model, config, prep.train.images.shape[1:])
  np.testing.assert_array_equal(variables[train.LOGIT_OFFSET], saved["logit_offset"].astype(np.float32))
  raw = {k: v for k, v in variables.items() if k != train.LOGIT_OFFSET}
  predict = lambda v: train.predictor(model, v, config.data.mean, config.data.std, 64)(prep.test.images,
                                                                                     prep.test.labels)[0]
  assert np.mean(predict(variables)) == pytest.approx(results["clean_test_loss"], rel=1e-6)
  assert np.mean(predict(raw)) != pytest.approx(results["clean_test_loss"], rel=1e-6)


def test_flagged_doubted_return_and_calibration_resume_like_an_uninterrupted_run(returned_doubted, tmp_path):
  _, results = returned_doubted
  # Stopped right after the check (2 isolation + 2 gauge + 1 second gauge + 1 of fine-tuning's 2 epochs): the
  # given-back examples train in the last epoch, and the calibration follows, as in the uninterrupted run.
  _assert_resumes_like(results, smoke.config(**RETURN), tmp_path, 6, saved="relearned.npz", unsaved="calibration.npz")
  assert json.loads((tmp_path / "results.json").read_text())["clean_test_loss"] == results["clean_test_loss"]


def test_flagged_rejected_drop_resumes_like_an_uninterrupted_run(dropped, tmp_path):
  out, results = dropped
  # 2 isolation + 2 gauge + 1 second gauge epoch + 1 of fine-tuning's 2: stops inside fine-tuning, after the
  # second judgement (the one fine-tuning follows).
  _assert_resumes_like(results, smoke.config(**DROP), tmp_path, 6, saved="regauged.npz", unsaved="results.json")
  # The examples left out stay out after the restart: the same training, to the last digit of the test loss.
  assert json.loads((tmp_path / "results.json").read_text())["clean_test_loss"] == results["clean_test_loss"]
  # A run without a second judgement resumes from the first's: give_back restores what it left out.
  run = types.SimpleNamespace(workdir=str(out), done=7, cursor=4,
                              config=ml_collections.ConfigDict({"abl": {"gauge_epochs": 2}}))
  schedule.give_back(run)
  np.testing.assert_array_equal(run.left_out, np.load(out / "returned.npz")["left_out"])


def test_calibrate_flagged_with_unlearning_return_without_the_check_and_unknown_names_are_refused(tmp_path):
  with pytest.raises(ValueError, match=r"config\.abl\.calibrate_flagged=True .* needs config\.abl\.unlearning_epochs=0 "
                     r"\(got 2\)"):
    experiment.train_and_evaluate(smoke.config(**{**DROP, "abl__calibrate_flagged": True,
                                                  "abl__unlearning_epochs": 2}), str(tmp_path))
  with pytest.raises(ValueError, match=r"config\.abl\.flagged_doubted='back' is unknown; allowed: keep, drop, return"):
    experiment.train_and_evaluate(smoke.config(**{**DROP, "abl__flagged_doubted": "back"}), str(tmp_path))
  with pytest.raises(ValueError, match=r"config\.abl\.flagged_doubted='return' .* relearned check, which does not "
                     r"run here \(config\.abl\.relearned_at=0\.0, config\.abl\.finetune_epochs=2\)"):
    experiment.train_and_evaluate(smoke.config(**{**RETURN, "abl__relearned_at": 0.0}), str(tmp_path))


def test_flagged_rejected_name_is_checked(tmp_path):
  with pytest.raises(ValueError,
                     match=r"config\.abl\.flagged_rejected='keep' is unknown; allowed: disown, drop, excess"):
    experiment.train_and_evaluate(smoke.config(**{**DROP, "abl__flagged_rejected": "keep"}), str(tmp_path))


REGAUGE = {**GAUGE, "abl__kept_out": "distill", "abl__disown_below": 0.1, "abl__class_outlier_z": 1.0,
           "abl__regauge": True}


@pytest.fixture(scope="module")
def regauged(tmp_path_factory):
  """A smoke run whose gauge flags an outlier label, so that a second gauge judges again."""
  return _trained(tmp_path_factory, "regauged", REGAUGE)


def test_regauge_trains_a_second_gauge_without_the_rejected_and_fine_tuning_follows_it(regauged):
  out, _ = regauged
  first, second = np.load(out / "returned.npz"), np.load(out / "regauged.npz")
  assert len(first["outlier_labels"]) and len(first["class_rejected"])
  assert np.isin(second["outlier_labels"], first["outlier_labels"]).all()  # It judges the first's labels only.
  phases = [json.loads(line).get("phase") for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert phases.count("regauge") >= 2 and phases.index("regauge") < phases.index("finetune")
  # The second judgement is a judgement of its own (another model's losses), recorded under regauge_ keys.
  assert not np.array_equal(first["judge_loss"], second["judge_loss"])
  summary = json.loads((out / "isolation.json").read_text())
  assert summary["regauge_disowned"] == len(second["disowned"]) and summary["disowned"] == len(first["disowned"])
  # The run's verdict names the labels the second judgement flagged (and any spectral flag).
  results = json.loads((out / "results.json").read_text())
  assert results["suspected_labels"] == sorted({*second["outlier_labels"].tolist(), *summary.get("spectral_labels", [])})
  assert results["suspected_labels"]
  # Fine-tuning trains on what the second gauge gave back, toward its targets: the examples it left out are
  # never drawn, and a disowned example's label has no share.
  iso = np.load(out / "isolation.npz")
  kept_out = second["kept_out"]
  assert np.isin(kept_out, iso["pool"]).all()
  disowned = second["disowned"]
  np.testing.assert_array_equal(second["labels"][disowned, iso["labels"][disowned]], 0.0)


def test_regauge_resumes_like_an_uninterrupted_run(regauged, tmp_path):
  _, results = regauged
  # 2 isolation + 2 gauge epochs + the second gauge's 1: stops before the second judgement, which the resumed run
  # makes with the second gauge's checkpoint.
  _assert_resumes_like(results, smoke.config(**REGAUGE), tmp_path, 5, saved="gauge_model", unsaved="regauged.npz")


def _regauge_epochs(out):
  """The epochs the run in `out` trained its second gauge, and its global epochs in all."""
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  return (sorted({r["epoch"] for r in records if r.get("phase") == "regauge" and "epoch" in r}),
          max(r.get("global_epoch", 0) for r in records))


def test_regauge_epochs_0_is_a_third_of_the_gauges_going_on_and_all_of_them_from_fresh_weights(regauged, tmp_path):
  out, _ = regauged
  assert _regauge_epochs(out) == ([1], 2 + 2 + 1 + 2)  # Isolation, gauge, second gauge, fine-tuning.
  experiment.train_and_evaluate(smoke.config(**{**REGAUGE, "abl__regauge_init": "fresh"}), str(tmp_path))
  assert _regauge_epochs(tmp_path) == ([1, 2], 2 + 2 + 2 + 2)
  # The same first judgement, a second by another gauge.
  first, default = np.load(tmp_path / "returned.npz"), np.load(out / "returned.npz")
  np.testing.assert_array_equal(first["class_rejected"], default["class_rejected"])
  assert not np.array_equal(np.load(tmp_path / "regauged.npz")["judge_loss"], np.load(out / "regauged.npz")["judge_loss"])


def test_the_second_gauge_goes_on_from_the_first(tmp_path, monkeypatch):
  starts = {}
  run_phase = schedule.run_phase

  def spy(run, phase):
    if phase.name in ("regauge", "finetune"):
      starts[phase.name] = (train.to_host(run.state), phase.fresh_weights)
    run_phase(run, phase)

  monkeypatch.setattr(schedule, "run_phase", spy)
  config = smoke.config(**{**REGAUGE, "train__keep_checkpoints": 10})
  experiment.train_and_evaluate(config, str(tmp_path))
  like, fresh = starts["regauge"]
  assert not fresh
  first = Checkpointer(str(tmp_path / "checkpoints"), 10).restore(4, like)[0]  # 2 isolation + 2 gauge epochs.
  aside = Checkpointer(str(tmp_path / "gauge_model"), 1).restore_latest(like)[1]
  same = lambda a, b: all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
  assert same(like.params, first.params) and same(aside.params, first.params)
  # Fine-tuning still starts from the isolation model.
  isolation = Checkpointer(str(tmp_path / "isolation_model"), 1).restore_latest(like)[1]
  assert same(starts["finetune"][0].params, isolation.params)


def test_gauge_downsample_trains_and_judges_the_gauges_on_block_averaged_images(tmp_path, monkeypatch):
  shapes, losses, step_losses = [], [], {}
  run_epoch, make_train_step = train.run_epoch, train.make_train_step

  def spy(step, state, images, *args, describe="", **kwargs):
    shapes.append((describe.split(" epoch")[0], images.shape[1:3]))
    losses.append((describe, step_losses[id(step)]))
    return run_epoch(step, state, images, *args, describe=describe, **kwargs)

  def spy_make(model, loss_fn, *args, **kwargs):
    step = make_train_step(model, loss_fn, *args, **kwargs)
    step_losses[id(step)] = loss_fn
    return step

  monkeypatch.setattr(train, "run_epoch", spy)
  monkeypatch.setattr(train, "make_train_step", spy_make)
  # With the small-loss gauge in its first epoch only (abl.gauge_drop_epochs).
  config = smoke.config(**{**REGAUGE, "abl__gauge_downsample": 2, "train__keep_checkpoints": 10,
                           "abl__gauge_drop": 0.25, "abl__gauge_drop_epochs": 1})
  experiment.train_and_evaluate(config, str(tmp_path))
  assert dict(shapes) == {"isolation": (32, 32), "gauge": (16, 16), "regauge": (16, 16), "finetune": (32, 32)}
  small = {d for d, loss in losses if isinstance(loss, abl.SmallLoss)}
  assert small == {"gauge epoch 1/2"}  # The second gauge goes on after the first's 2 epochs: every example.
  assert {loss for d, loss in losses if d.startswith("gauge epoch 2") or d.startswith("regauge")} == {
      abl.cross_entropy_loss}
  # The first judgement is the first gauge's (checkpoint 4: 2 isolation + 2 gauge epochs) on 16x16 images.
  prep = experiment.prepare(config)
  model = experiment._model(config, prep.train)  # pylint: disable=protected-access
  variables = checkpoint.restore_variables(str(tmp_path), model, config, prep.train.images.shape[1:],
                                           "checkpoints", 4)
  predict = train.predictor(model, variables, config.data.mean, config.data.std, config.train.eval_batch_size)
  first, pool = np.load(tmp_path / "returned.npz"), np.load(tmp_path / "isolation.npz")["pool"]
  outside = np.setdiff1d(np.arange(len(prep.train)), pool)
  loss, _ = predict(data.downsample(prep.train.images[outside], 2), prep.train.labels[outside])
  np.testing.assert_allclose(first["outside_gauge_loss"][outside], loss, rtol=1e-5, atol=1e-6)
  loss, _ = predict(prep.train.images[outside], prep.train.labels[outside])
  assert not np.allclose(first["outside_gauge_loss"][outside], loss, rtol=1e-3)


@pytest.mark.parametrize("factor, message", [
    (0, r"config\.abl\.gauge_downsample=0 must be an integer >= 1"),
    (3, r"config\.abl\.gauge_downsample=3 must divide the image size 32x32"),
])
def test_gauge_downsample_is_checked(factor, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    experiment.train_and_evaluate(smoke.config(**{**GAUGE, "abl__gauge_downsample": factor}), str(tmp_path))


def test_regauge_init_name_is_checked(tmp_path):
  with pytest.raises(ValueError, match=r"config\.abl\.regauge_init='first' is unknown; allowed: fresh, gauge"):
    experiment.train_and_evaluate(smoke.config(**{**REGAUGE, "abl__regauge_init": "first"}), str(tmp_path))


@pytest.mark.parametrize("field", ["regauge_epochs", "relearned_draws"])
def test_epoch_and_draw_counts_must_not_be_negative(field, tmp_path):
  with pytest.raises(ValueError, match=rf"config\.abl\.{field}=-1 must be >= 0"):
    experiment.train_and_evaluate(smoke.config(**{**REGAUGE, f"abl__{field}": -1}), str(tmp_path))


def test_regauge_does_nothing_without_an_outlier_label(tmp_path):
  config = smoke.config(**{**REGAUGE, "abl__class_outlier_z": 1000.0})
  experiment.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "regauged.npz").exists()
  phases = {json.loads(line).get("phase") for line in (tmp_path / "metrics.jsonl").read_text().splitlines()}
  assert "regauge" not in phases and "finetune" in phases


@pytest.mark.parametrize("at, epochs, expected", [(0.5, 4, 2), (0.5, 2, 1), (0.9, 4, 3), (0.01, 60, 1),
                                                  (0.5, 1, 0), (0.0, 4, 0)])
def test_relearned_epoch_lies_inside_fine_tuning(at, epochs, expected):
  a = smoke.default().abl
  a.relearned_at, a.finetune_epochs = at, epochs
  assert schedule.relearned_epoch(a) == expected
  a.class_outlier_z = 0.0  # No outlier labels looked for: no check.
  assert schedule.relearned_epoch(a) == 0


def _relearned_run(workdir, learned, extra=(), rows=None):
  """4 labels x 10 examples, example 0 the pool. The judge rejected examples 1-3 of every label (label 0: 1-2,
  example 3 is left out), and `extra` (its probability of their label 0.05), and backs the rest (0.9); examples
  31-33 are disowned already. The fine-tuned model gives the label `learned`, and the features `rows` (default:
  _features)."""
  labels = np.repeat(np.arange(4), 10)
  rejected = np.union1d([1, 2, 3, 11, 12, 13, 21, 22, 23, 31, 32, 33], np.asarray(extra, int))
  probabilities = np.full((len(rejected), 4), 0.3, np.float32)
  probabilities[np.arange(len(rejected)), labels[rejected]] = 0.05
  probabilities /= probabilities.sum(axis=1, keepdims=True)
  targets = np.eye(4, dtype=np.float32)[labels]
  targets[31:34] = [0.5, 0.5, 0.0, 0.0]
  own = np.full(40, 0.9)
  own[rejected] = 0.05
  np.savez(workdir / "returned.npz", outside_rejected=rejected, outside_rejected_probabilities=probabilities,
           outside_gauge_loss=-np.log(own))
  (workdir / "isolation.json").write_text("{}")
  run = types.SimpleNamespace(
      workdir=str(workdir), pool=np.array([0]), labels=targets, left_out=np.array([3]),
      timed=lambda key: contextlib.nullcontext(),
      train=types.SimpleNamespace(labels=labels, images=np.arange(40), num_classes=4),
      config=ml_collections.ConfigDict({"abl": {"class_outlier_z": 1.4, "relearned_above": 0.8, "own_above": 0.5,
                                                "relearned_doubted": "keep", "relearned_then": "continue",
                                                "relearned_draws": 0, "relearned_tested": "outliers",
                                                "relearned_untypical": "skip",
                                                "flagged_rejected": "disown", "flagged_doubted": "keep"}}),
      evaluation=types.SimpleNamespace(isolation_metrics=lambda e: {"num_poisoned_isolated": int(np.sum(e >= 20))}),
      predict=lambda probabilities=False, features=False: lambda images, lab: (
          -np.log(learned[images]), lab, _probabilities(learned[images], lab, 4),
          (_features(learned) if rows is None else rows)[images]))
  return run, rejected, probabilities


def _features(learned):
  """Features where the examples learned at 0.9 or more share a direction, the rest point anywhere."""
  rows = np.random.default_rng(0).normal(size=(len(learned), 8))
  rows[learned >= 0.9, 0] += 10.0
  return rows


def _probabilities(own, labels, num_classes):
  """Rows giving each label `own` and the rest evenly to the other classes."""
  rows = np.tile(((1 - own) / (num_classes - 1))[:, None], (1, num_classes))
  rows[np.arange(len(own)), labels] = own
  return rows


def test_prior_adjusted_removes_a_models_momentary_class_bias():
  # Labels 0, 0, 1, 1; the model gives class 0 a mean of 0.75 against its share 0.5 (bias 1.5), class 1 0.25.
  probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
  adjusted, bias = abl.prior_adjusted(probabilities, np.array([0, 0, 1, 1]), 2)
  np.testing.assert_allclose(bias, [1.5, 0.5])
  np.testing.assert_allclose(adjusted[0], [0.6 / 0.8, 0.2 / 0.8])  # 0.9 / 1.5, 0.1 / 0.5, renormalised.
  np.testing.assert_allclose(adjusted[2], [0.4 / 1.2, 0.8 / 1.2])  # Class 1's examples now lean to their label.


def test_relearned_check_disowns_the_rejected_examples_of_the_label_fine_tuning_learns_them_in(tmp_path):
  # Fine-tuning has learned (>= 0.8) examples 21-23, all of label 2's rejected ones, and example 11 of label 1,
  # and label 2's typical examples 24-26 (backed; their features point anywhere).
  learned = np.full(40, 0.5)
  learned[[11, 21, 22, 23]] = 0.97
  learned[[24, 25, 26]] = 0.85
  learned[[3, 31, 32, 33]] = 0.99  # 3 is left out and 31-33 disowned already: not candidates.
  run, rejected, probabilities = _relearned_run(tmp_path, learned)
  record = {}
  assert schedule._relearned(run, record) is False
  assert record == {"relearned/flagged": 1}
  saved = np.load(tmp_path / "relearned.npz")
  np.testing.assert_array_equal(saved["relearned_labels"], [2])
  np.testing.assert_array_equal(saved["relearned_learned"], [11, 21, 22, 23])
  np.testing.assert_allclose(saved["relearned_shares"], [0, 0.1, 0.3, 0])  # Over each label outside the pool.
  np.testing.assert_array_equal(saved["relearned_rejected"], [21, 22, 23])
  # Toward the judge's probabilities, their label's share removed; every other target unchanged.
  expected = probabilities[6:9].copy()
  expected[:, 2] = 0
  np.testing.assert_allclose(run.labels[21:24], expected / expected.sum(axis=1, keepdims=True))
  others = np.setdiff1d(np.arange(40), [21, 22, 23, 31, 32, 33])
  np.testing.assert_array_equal(run.labels[others], np.eye(4)[run.train.labels[others]])
  summary = json.loads((tmp_path / "isolation.json").read_text())
  assert summary["relearned_labels"] == [2] and summary["relearned_rejected"] == 3
  assert summary["relearned_rejected_poisoned"] == 3 and summary["relearned_learned"] == 4
  # A resumed run reads the verdict back (its model is another by then) and disowns the same examples.
  resumed, _, _ = _relearned_run(tmp_path, np.full(40, 0.99))
  assert schedule._relearned(resumed) is False
  np.testing.assert_array_equal(resumed.labels, run.labels)
  (tmp_path / "relearned.npz").unlink()
  with pytest.raises(Exception, match="relearned.npz is missing but the checkpoint is past it"):
    schedule._relearned(resumed)


def test_relearned_check_flags_no_label_for_a_count_chance_gives_often(tmp_path):
  # Label 2 alone has learned examples (21, 22: 2 of its 10, none elsewhere): its outlier score is far above the
  # cut-off and its 2 learned ones align, but at the pooled rate (2 of 39) chance gives a label 2 or more of 10
  # with probability 0.09, above the normal tail beyond 1.4 (0.08).
  learned = np.full(40, 0.5)
  learned[[21, 22]] = 0.97
  learned[[24, 25, 26]] = 0.85
  run, _, _ = _relearned_run(tmp_path, learned)
  assert schedule._relearned(run, {}) is False
  saved = np.load(tmp_path / "relearned.npz")
  assert saved["relearned_scores"][2] > 1.4 and not saved["relearned_improbable"][2]
  assert len(saved["relearned_labels"]) == 0 and len(saved["relearned_rejected"]) == 0


def test_improbable_counts_are_exact_binomial_tails_at_the_pooled_rate():
  counts = np.full(10, 800)
  # 2 hits in one label, none elsewhere: P(X >= 2) at the rate 2 / 8000 is 0.0175, above the normal tail beyond
  # 3.5 (0.000233); 5 hits: 0.00017, below it.
  assert not abl.improbable_counts(np.array([0, 2, 0, 0, 0, 0, 0, 0, 0, 0]), counts, 3.5).any()
  np.testing.assert_array_equal(abl.improbable_counts(np.array([0, 5, 0, 0, 0, 0, 0, 0, 0, 0]), counts, 3.5),
                                np.arange(10) == 1)
  # A label with 40 against about 10 each elsewhere is improbable; the others are not.
  hits = np.array([40, 10, 12, 8, 9, 11, 10, 9, 12, 10])
  np.testing.assert_array_equal(abl.improbable_counts(hits, counts, 3.5), np.arange(10) == 0)
  assert not abl.improbable_counts(np.zeros(10, int), counts, 3.5).any()


def test_relearned_check_gives_back_the_doubted_examples_the_model_being_fine_tuned_backs(tmp_path):
  # flagged_doubted=return: label 1's doubted examples 14-17 were left out of fine-tuning; the model being
  # fine-tuned now backs 14 and 15 (0.95; the prior-adjusted probability of their label at least own_above) and
  # not 16 and 17 (0.1). The first two rejoin fine-tuning; example 3, left out for another reason, stays out.
  learned = np.full(40, 0.5)
  learned[[14, 15]] = 0.95
  learned[[16, 17]] = 0.1
  run, _, _ = _relearned_run(tmp_path, learned)
  run.config.abl.flagged_doubted = "return"
  run.left_out = np.array([3, 14, 15, 16, 17])
  judged = dict(np.load(tmp_path / "returned.npz"))
  np.savez(tmp_path / "returned.npz", **judged, class_doubted=np.array([14, 15, 16, 17]))
  assert schedule._relearned(run, {}) is False
  np.testing.assert_array_equal(np.load(tmp_path / "relearned.npz")["relearned_returned"], [14, 15])
  np.testing.assert_array_equal(run.left_out, [3, 16, 17])
  assert json.loads((tmp_path / "isolation.json").read_text())["relearned_returned"] == 2
  # A resumed run gives back the same examples, whatever its model says by then.
  resumed, _, _ = _relearned_run(tmp_path, np.full(40, 0.01))
  resumed.config.abl.flagged_doubted = "return"
  resumed.left_out = np.array([3, 14, 15, 16, 17])
  schedule._relearned(resumed)
  np.testing.assert_array_equal(resumed.left_out, [3, 16, 17])
  # Without the option nothing is given back.
  (tmp_path / "relearned.npz").unlink()
  kept, _, _ = _relearned_run(tmp_path, learned)
  kept.config.abl.flagged_doubted = "drop"
  kept.left_out = np.array([3, 14, 15, 16, 17])
  schedule._relearned(kept, {})
  np.testing.assert_array_equal(kept.left_out, [3, 14, 15, 16, 17])


def test_coherence_is_the_mean_cosine_of_every_two_rows():
  assert abl.coherence(np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])) == pytest.approx(1 / 3)
  assert np.isnan(abl.coherence(np.array([[1.0, 0.0]])))


@pytest.mark.parametrize("aligned, flagged", [("learned", [2]), ("rest", []), ("typical", []), ("no typical", [])])
def test_relearned_check_keeps_a_label_whose_learned_examples_align_more_than_its_other_examples(aligned, flagged,
                                                                                             tmp_path):
  # Fine-tuning has learned label 2's rejected examples 21-23. Their features share a direction (a trigger
  # learned); or the other rejected 24-26 share one instead (hard examples learned each its own way); or the
  # label's typical examples 24-26 (backed and learned) align more still (hits of the class's own look); or the
  # label has no typical examples to compare with (no evidence: no flag).
  learned = np.full(40, 0.5)
  learned[[21, 22, 23]] = 0.97
  if aligned == "learned":  # Typical examples, pointing anywhere.
    learned[[27, 28, 29]] = 0.97
  features = np.random.default_rng(1).normal(size=(40, 8))
  extra = [24, 25, 26]
  if aligned in ("learned", "no typical"):
    features[[21, 22, 23], 0] += 10.0
  elif aligned == "rest":  # 27-29 balance 24-26, so that the label's centre (without the learned) stays near 0.
    features[[24, 25, 26], 0] += 10.0
    features[[27, 28, 29], 0] -= 10.0
  else:
    extra = []
    learned[[24, 25, 26]] = 0.97
    features[[21, 22, 23], 0] += 10.0
    features[[24, 25, 26], 1] += 20.0
    features[[27, 28, 29], 1] -= 20.0
  run, _, _ = _relearned_run(tmp_path, learned, extra=extra, rows=features)
  schedule._relearned(run, {})
  saved = np.load(tmp_path / "relearned.npz")
  assert saved["relearned_scores"][2] > 1.5  # The share alone would flag it either way.
  np.testing.assert_array_equal(saved["relearned_labels"], flagged)
  learned_rejected, rest, typical = saved["relearned_coherence"][:, 2]
  # The groups there are to compare with (fewer than 2 have no coherence), and how they compare.
  assert np.isnan(rest) == (aligned == "typical") and np.isnan(typical) == (aligned in ("rest", "no typical"))
  if aligned in ("learned", "no typical"):
    assert learned_rejected > rest
  if aligned == "learned":
    assert learned_rejected > typical
  if aligned == "rest":
    assert learned_rejected < rest
  if aligned == "typical":
    assert learned_rejected < typical


@pytest.mark.parametrize("untypical, z, flagged", [("skip", 10.0, []), ("transfer", 10.0, [2]), ("transfer", 1.0, [])])
def test_relearned_untypical_leaves_a_label_without_typical_examples_to_the_transfer_test(untypical, z, flagged,
                                                                                        tmp_path, monkeypatch):
  # Label 2's learned rejected examples 21-23 align and no example of it is typical (the judge cannot recognise the
  # label): session 21's rule does not flag it (skip); with transfer, its trigger transfer decides.
  learned = np.full(40, 0.5)
  learned[[21, 22, 23]] = 0.97
  features = np.random.default_rng(1).normal(size=(40, 8))
  features[[21, 22, 23], 0] += 10.0
  run, _, _ = _relearned_run(tmp_path, learned, extra=[24, 25, 26], rows=features)
  run.config.abl.update({"relearned_draws": 20, "relearned_untypical": untypical})
  calls = []
  monkeypatch.setattr(schedule, "_transfer", lambda run, outside, mine, *rest: calls.append(rest[-1]) or (0.3, z, 99))
  schedule._relearned(run, {})
  saved = np.load(tmp_path / "relearned.npz")
  assert np.isnan(saved["relearned_coherence"][2, 2])  # No typical examples.
  assert calls == ([2] if untypical == "transfer" else [])
  np.testing.assert_array_equal(saved["relearned_labels"], flagged)


def test_relearned_untypical_transfer_needs_the_transfer_test(tmp_path):
  with pytest.raises(ValueError,
                     match=r"config\.abl\.relearned_untypical='transfer' .* config\.abl\.relearned_draws=0"):
    experiment.train_and_evaluate(smoke.config(**{**REGAUGE, "abl__relearned_draws": 0,
                                                  "abl__relearned_untypical": "transfer"}), str(tmp_path))
  with pytest.raises(ValueError,
                     match=r"config\.abl\.relearned_untypical='always' is unknown; allowed: skip, transfer"):
    experiment.train_and_evaluate(smoke.config(**{**REGAUGE, "abl__relearned_untypical": "always"}), str(tmp_path))


def test_relearned_check_flags_nothing_where_fine_tuning_learns_as_many_rejected_examples_in_every_label(tmp_path):
  learned = np.full(40, 0.5)
  learned[[2, 12, 22, 32]] = 0.9
  run, _, _ = _relearned_run(tmp_path, learned)
  before = run.labels.copy()
  schedule._relearned(run, {})
  assert len(np.load(tmp_path / "relearned.npz")["relearned_labels"]) == 0
  np.testing.assert_array_equal(run.labels, before)


RELEARNED = {**REGAUGE, "abl__regauge": False, "abl__relearned_at": 0.5, "abl__relearned_above": 0.05,
             "abl__class_outlier_z": 0.5, "abl__relearned_then": "continue",
             "abl__own_above": 0.15}  # So that the smoke gauge backs some typical examples of each label.


@pytest.fixture(scope="module")
def relearned(tmp_path_factory):
  """A smoke run whose relearned check flags a label after the first of its 2 fine-tuning epochs, with the labels
  each fine-tuning epoch trained toward."""
  seen = []
  run_epoch = train.run_epoch

  def spy(step_fn, state, images, labels, order, *args, **kwargs):
    seen.append((kwargs.get("describe", ""), np.array(labels, copy=True)))
    return run_epoch(step_fn, state, images, labels, order, *args, **kwargs)

  patch = pytest.MonkeyPatch()
  patch.setattr(train, "run_epoch", spy)
  try:
    out, results = _trained(tmp_path_factory, "relearned", RELEARNED)
  finally:
    patch.undo()
  return out, results, [labels for describe, labels in seen if describe.startswith("finetune")]


def test_a_run_disowns_what_the_relearned_check_flags_for_the_rest_of_fine_tuning(relearned):
  out, results, finetuned = relearned
  saved = np.load(out / "relearned.npz")
  hit = saved["relearned_rejected"]
  assert len(saved["relearned_labels"]) and len(hit)
  labels = np.load(out / "isolation.npz")["labels"]
  first, second = finetuned
  np.testing.assert_array_equal(first[hit, labels[hit]], 1.0)  # Before the check: trained with their label.
  np.testing.assert_array_equal(second[hit, labels[hit]], 0.0)  # After it: toward "not this label".
  unchanged = np.setdiff1d(np.arange(len(labels)), hit)
  np.testing.assert_array_equal(second[unchanged], first[unchanged])
  assert set(saved["relearned_labels"].tolist()) <= set(results["suspected_labels"])
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["relearned/flagged"] for r in records if "relearned/flagged" in r] == [len(saved["relearned_labels"])]


def test_relearned_check_resumes_like_an_uninterrupted_run(relearned, tmp_path):
  _, results, _ = relearned
  # 2 isolation + 2 gauge + 1 fine-tuning epoch (the check after it): stops past the check, which a resume reads.
  _assert_resumes_like(results, smoke.config(**RELEARNED), tmp_path, 5, saved="relearned.npz", unsaved="results.json")


@pytest.mark.parametrize("field, value, message", [
    ("relearned_at", 1.0, r"config\.abl\.relearned_at=1\.0 must be in \[0, 1\)"),
    ("relearned_above", 0.0, r"config\.abl\.relearned_above=0\.0 must be in \(0, 1\]")])
def test_relearned_fields_are_checked(field, value, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    experiment.train_and_evaluate(smoke.config(**{**RELEARNED, f"abl__{field}": value}), str(tmp_path))


def test_relearned_doubted_drop_leaves_out_the_flagged_labels_learned_examples_the_judge_doubts(tmp_path):
  # Label 2's examples 24-26 are doubted by the judge (0.3); fine-tuning has learned 24 and 25, example 26 not,
  # and the label's typical examples 27-29 (backed; their features point anywhere).
  learned = np.full(40, 0.5)
  learned[[11, 21, 22, 23, 24, 25, 14]] = 0.9
  learned[[27, 28, 29]] = 0.85
  run, _, _ = _relearned_run(tmp_path, learned)
  judged = dict(np.load(tmp_path / "returned.npz"))
  own = np.exp(-judged["outside_gauge_loss"])
  own[[24, 25, 26, 14]] = 0.3  # 14: doubted and learned, but label 1 is not flagged.
  np.savez(tmp_path / "returned.npz", **{**judged, "outside_gauge_loss": -np.log(own)})
  run.config.abl.update({"relearned_doubted": "drop", "disown_below": 0.1, "own_above": 0.5})
  schedule._relearned(run, {})
  saved = np.load(tmp_path / "relearned.npz")
  np.testing.assert_array_equal(saved["relearned_labels"], [2])
  np.testing.assert_array_equal(saved["relearned_dropped"], [24, 25])
  np.testing.assert_array_equal(run.labels[[24, 25]], 0.0)  # No share of the loss.
  np.testing.assert_array_equal(run.labels[[14, 26]], np.eye(4)[[1, 2]])


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
  """The relearned run, fine-tuning started again from the isolation model where the check flags a label."""
  return _trained(tmp_path_factory, "restarted", {**RELEARNED, "abl__relearned_then": "restart"})


def test_every_file_a_defended_run_writes_is_an_output_overwrite_removes(restarted):
  out, _ = restarted
  assert {"returned.npz", "relearned.npz", "isolation_model", "data.json"} <= set(os.listdir(out))
  assert set(os.listdir(out)) <= set(workdir.OUTPUTS)


def test_relearned_restart_fine_tunes_again_from_the_isolation_model_after_a_flag(restarted, relearned):
  out, results = restarted
  assert len(np.load(out / "relearned.npz")["relearned_labels"])
  np.testing.assert_array_equal(np.load(out / "relearned.npz")["relearned_rejected"],
                                np.load(relearned[0] / "relearned.npz")["relearned_rejected"])  # The same check.
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  epochs = [(r["phase"], r["epoch"]) for r in records if r.get("phase", "").startswith("finetune") and "epoch" in r
            and "epoch/loss" in r]
  assert epochs == [("finetune", 1), ("finetune_relearned", 1), ("finetune_relearned", 2)]
  # The stopped fine-tuning counts whole (2 epochs, 1 trained), so that a resume does not go on with it.
  assert max(r.get("global_epoch", 0) for r in records) == 2 + 2 + 2 + 2
  assert results["clean_accuracy"] != relearned[1]["clean_accuracy"]


def test_relearned_restart_resumes_like_an_uninterrupted_run(restarted, tmp_path):
  _, results = restarted
  config = smoke.config(**{**RELEARNED, "abl__relearned_then": "restart"})
  # Stopped at the check (epoch 5, counted as 6), and once more inside the second fine-tuning.
  _assert_resumes_like(results, config, tmp_path, 5, saved="relearned.npz", unsaved="results.json")
  _assert_resumes_like(results, config, tmp_path / "again", 7, saved="relearned.npz", unsaved="results.json")


def test_a_labels_candidate_trigger_is_what_its_pursuit_tail_shares():
  rng = np.random.default_rng(2)
  labels = np.repeat([0, 1], 500)
  images = rng.integers(60, 200, size=(1000, 6, 6, 3)).astype(np.uint8)
  features = rng.normal(size=(1000, 24)) * np.r_[6.0, 5.0, 4.0, np.ones(21)]
  images[400:500, 4:, 4:] = 255  # A tenth of label 0 carries a white corner patch,
  features[400:500, 7] += 5.0  # which its features show on a unit of small spread.
  deltas, tails = abl.candidate_triggers(images, labels, features, 3, tail=2.0, dims=16)
  assert deltas.shape == (3, 6, 6, 3) and deltas.dtype == np.float32
  assert np.isin(tails[0], np.arange(400, 500)).sum() >= 85 and len(tails[0]) <= 115
  patch = np.zeros((6, 6, 3), bool)
  patch[4:, 4:] = True
  assert deltas[0][patch].mean() > 80 and np.abs(deltas[0][~patch]).max() < 25  # The patch, not the rest.
  assert np.abs(deltas[1]).mean() < 10 and np.all(deltas[1][patch] < 40)  # Label 1: noise.
  assert not len(tails[2]) and not deltas[2].any()  # No examples: no trigger.


def test_candidate_triggers_are_saved_at_isolation_and_given_to_fine_tuning_after_a_resume(tmp_path, monkeypatch):
  from benchmarks import spectral  # pylint: disable=import-outside-toplevel
  # With the pool's candidates too (abl.candidate_pool): fine-tuning gets both per label.
  config = smoke.config(**{**SPECTRAL, "abl__candidate_triggers": 0.5, "abl__spectral_pursuit_dims": 4,
                           "abl__candidate_pool": True})
  assert experiment.train_and_evaluate(config, str(tmp_path), max_epochs=3) is None  # Stopped after isolation.
  saved = np.load(tmp_path / "isolation.npz")["candidate_triggers"]
  _, prep, model, variables = spectral.restored(str(tmp_path))
  features = train.predictor(model, variables, config.data.mean, config.data.std, config.train.eval_batch_size,
                             features=True)(prep.train.images, prep.train.labels)[2]
  expected, tails = abl.candidate_triggers(prep.train.images, prep.train.labels, features, prep.train.num_classes,
                                           config.abl.spectral_tail, config.abl.spectral_pursuit_dims)
  np.testing.assert_allclose(saved, expected, atol=1e-3)
  np.testing.assert_array_equal(np.flatnonzero(np.load(tmp_path / "isolation.npz")["candidate_tail"]),
                                np.sort(np.concatenate(tails)))
  assert np.abs(saved).max() > 1
  isolation = np.load(tmp_path / "isolation.npz")
  pooled, pool_tails = abl.pool_candidate_triggers(prep.train.images, prep.train.labels, features, isolation["pool"],
                                                   prep.train.num_classes)
  np.testing.assert_allclose(isolation["candidate_pool_triggers"], pooled, atol=1e-3)
  np.testing.assert_array_equal(np.flatnonzero(isolation["candidate_pool_tail"]), np.sort(np.concatenate(pool_tails)))
  damaged = tmp_path.parent / "no_pool_candidates"  # A copy whose isolation.npz lacks the pool's candidates.
  shutil.copytree(tmp_path, damaged)
  workdir.write_npz(str(damaged / "isolation.npz"),
                    **{k: v for k, v in isolation.items() if k != "candidate_pool_triggers"})
  with pytest.raises(workdir.WorkdirError, match=r"isolation\.npz holds no pool candidate triggers but "
                                                 r"config\.abl\.candidate_pool=True; use --overwrite"):
    experiment.train_and_evaluate(config, str(damaged))
  given = []
  make = train.make_train_step
  monkeypatch.setattr(train, "make_train_step",
                      lambda *args, **kw: given.append((kw.get("triggers"), kw.get("trigger_share"))) or make(*args,
                                                                                                                **kw))
  experiment.train_and_evaluate(config, str(tmp_path))  # Resumed: fine-tuning reads them from isolation.npz.
  shares = [share for triggers, share in given if triggers is not None]
  assert shares and set(shares) == {0.5}
  np.testing.assert_array_equal(next(t for t, _ in given if t is not None),
                                np.stack([saved, isolation["candidate_pool_triggers"]]))
  assert any(t is None for t, _ in given)  # The gauge trains without them.
  assert str(tmp_path / "candidates.png") in plots.write_run_plots(str(tmp_path))


def test_a_labels_pool_candidate_is_what_the_smaller_mode_of_its_pool_examples_shares():
  rng = np.random.default_rng(4)
  labels = np.repeat([0, 1, 2], 300)
  images = rng.integers(60, 200, size=(900, 6, 6, 3)).astype(np.uint8)
  features = rng.normal(size=(900, 8))
  images[:30, :2, :2] = 250  # 30 of label 0, all in its pool, carry a patch
  features[:30, 3] += 8.0  # and a feature far from the rest of its pool.
  pool = np.r_[0:150, 300:450, 600:602]  # Half of labels 0 and 1, two of label 2.
  deltas, tails = abl.pool_candidate_triggers(images, labels, features, pool, 3)
  np.testing.assert_array_equal(tails[0], np.arange(30))  # The smaller mode of label 0's pool examples.
  expected = images[:30].astype(np.float32).mean(0) - images[30:150].astype(np.float32).mean(0)
  np.testing.assert_allclose(deltas[0], expected, atol=1e-4)  # Against the rest of its pool examples.
  assert deltas[0][:2, :2].min() > 40 and np.abs(deltas[0][2:]).max() < 25  # The patch.
  assert np.all(tails[1] < 450) and np.all(tails[1] >= 300) and len(tails[1]) <= 75  # Label 1's pool only.
  assert not len(tails[2]) and not deltas[2].any()  # Fewer than 3 pool examples: none.


def test_candidate_triggers_share_is_checked(tmp_path):
  with pytest.raises(ValueError, match=r"config\.abl\.candidate_triggers=1\.5 must be 0 \(off\) or in \(0, 1\]"):
    experiment.train_and_evaluate(smoke.config(**{**SPECTRAL, "abl__candidate_triggers": 1.5}), str(tmp_path))
  with pytest.raises(ValueError, match=r"config\.abl\.candidate_scale=\(2\.0, 1\.0\) must be two numbers \(low, high\) "
                                       r"with 0 < low <= high"):
    experiment.train_and_evaluate(smoke.config(**{**SPECTRAL, "abl__candidate_scale": (2.0, 1.0)}), str(tmp_path))
  with pytest.raises(ValueError, match=r"config\.abl\.candidate_scale=\(0\.0, 1\.0\) must be"):
    experiment.train_and_evaluate(smoke.config(**{**SPECTRAL, "abl__candidate_scale": (0.0, 1.0)}), str(tmp_path))
  with pytest.raises(ValueError, match=r"config\.abl\.candidate_pool=True .* config\.abl\.candidate_triggers=0 adds"):
    experiment.train_and_evaluate(smoke.config(**{**SPECTRAL, "abl__candidate_triggers": 0.0,
                                                  "abl__candidate_pool": True}), str(tmp_path))


def test_stamped_adds_a_delta_rounded_and_clipped():
  images = np.array([[[[10, 250, 0]]]], np.uint8)
  np.testing.assert_array_equal(abl.stamped(images, np.array([[[2.6, 10.0, -3.0]]])), [[[[13, 255, 0]]]])



def test_transfer_shares_are_the_shares_each_delta_sends_to_the_label_less_the_share_without():
  # A model that predicts label 1 where the first pixel is above 100, else 0. Of 4 images, one is there already.
  def predict(images, labels):
    return np.zeros(len(images)), (images[:, 0, 0, 0] > 100).astype(int)
  images = np.zeros((4, 2, 2, 1), np.uint8)
  images[0, 0, 0, 0] = 150
  deltas = np.zeros((3, 2, 2, 1))
  deltas[0, 0, 0, 0] = 200.0  # Every image goes to 1: 3 of 4 more.
  deltas[2, 0, 0, 0] = -100.0  # The one there leaves.
  np.testing.assert_allclose(abl.transfer_shares(predict, images, deltas, 1), [0.75, 0.0, -0.25])
  np.testing.assert_allclose(abl.transfer_shares(predict, images, deltas, 0), [-0.75, 0.0, 0.25])


def test_transfer_z_is_a_z_score_whose_spread_is_at_least_one_images_share():
  assert abl.transfer_z(0.5, np.array([0.1, 0.3]), 100) == pytest.approx(3.0)  # Mean 0.2, spread 0.1.
  assert abl.transfer_z(0.05, np.array([0.01, 0.01]), 100) == pytest.approx(4.0)  # Spread 0: one image, 0.01.
  assert np.isnan(abl.transfer_z(0.5, np.zeros(0), 100))


def _transfer_run(label_pixel):
  """4 labels x 10 examples of 2x2 images, all outside the pool; a model that predicts 2 where the top-left pixel is
  above 100, else 0. Label 2's examples 21-23 carry 255 there (a trigger), and with `label_pixel` so do its others."""
  labels = np.repeat(np.arange(4), 10)
  images = np.zeros((40, 2, 2, 1), np.uint8)
  images[20:30, 0, 0, 0] = 255 if label_pixel else 0
  images[21:24, 0, 0, 0] = 255
  model = lambda x, y: (np.zeros(len(x)), np.where(x[:, 0, 0, 0] > 100, 2, 0))
  return types.SimpleNamespace(
      train=types.SimpleNamespace(images=images, labels=labels),
      config=ml_collections.ConfigDict({"seed": 0, "abl": {"own_above": 0.5, "relearned_draws": 10}}),
      predict=lambda probabilities=False, features=False: model), labels


@pytest.mark.parametrize("label_pixel, share, z", [(False, 1.0, 30.0), (True, 0.0, 0.0)])
def test_relearned_transfer_sends_other_labels_images_to_a_label_by_its_learned_examples_trigger(label_pixel, share,
                                                                                                 z):
  # Label 2's learned rejected examples 21-23 carry a pixel the model sends to 2: their mean image less its
  # unrejected examples' (20, 25-29) sends all 30 other labels' images there, as many random unrejected examples'
  # none (spread 0: one image's share, 1/30). Where every label-2 example carries it, it is the class's own look:
  # the difference, and the transfer, are 0.
  run, labels = _transfer_run(label_pixel)
  rejected = np.isin(np.arange(40), [21, 22, 23, 24])
  got = schedule._transfer(run, np.arange(40), labels == 2, np.isin(np.arange(40), [21, 22, 23]), rejected,
                           np.full(40, 0.9), labels, 2)
  assert got == pytest.approx((share, z, 30 * 12))  # Unstamped, the learned group's, 10 random groups'.


@pytest.mark.parametrize("transfer, flagged", [((0.3, 10.0, 99), [2]), ((0.05, 1.0, 99), [])])
def test_relearned_check_flags_a_label_only_where_its_learned_examples_transfer_a_trigger(transfer, flagged,
                                                                                          tmp_path, monkeypatch):
  learned = np.full(40, 0.5)
  learned[[21, 22, 23]] = 0.97
  learned[[27, 28, 29]] = 0.97  # Typical examples, pointing anywhere: the coherence test passes.
  run, _, _ = _relearned_run(tmp_path, learned)
  run.config.abl.relearned_draws = 20
  calls = []
  monkeypatch.setattr(schedule, "_transfer", lambda run, outside, mine, *rest: calls.append(rest[-1]) or transfer)
  schedule._relearned(run, {})
  saved = np.load(tmp_path / "relearned.npz")
  assert calls == [2]  # Measured only for the label the other tests flag.
  np.testing.assert_array_equal(saved["relearned_labels"], flagged)
  np.testing.assert_allclose(saved["relearned_transfer"][:, 2], transfer[:2])
  assert saved["relearned_transfer_images"] == 99
  assert np.isnan(saved["relearned_transfer"][:, [0, 1, 3]]).all()
  assert json.loads((tmp_path / "isolation.json").read_text())["relearned_transfer"][1][2] == transfer[1]


def test_relearned_tested_learned_flags_every_label_with_two_learned_examples_on_its_transfer_alone(tmp_path,
                                                                                                    monkeypatch):
  # Label 1 has 2 learned rejected examples (11, 12), label 2 has 3 (21-23), label 0 one (1): labels 1 and 2 are
  # tested whatever their outlier scores, and label 1's transfer stands out.
  learned = np.full(40, 0.5)
  learned[[1, 11, 12, 21, 22, 23]] = 0.97
  run, _, _ = _relearned_run(tmp_path, learned)
  run.config.abl.update({"relearned_draws": 20, "relearned_tested": "learned"})
  z = {1: 10.0, 2: 0.0}
  calls = []
  monkeypatch.setattr(schedule, "_transfer",
                      lambda run, outside, mine, *rest: calls.append(rest[-1]) or (0.1, z[rest[-1]], 99))
  schedule._relearned(run, {})
  assert calls == [1, 2]
  np.testing.assert_array_equal(np.load(tmp_path / "relearned.npz")["relearned_labels"], [1])


def test_relearned_tested_learned_needs_the_transfer_test(tmp_path):
  with pytest.raises(ValueError, match=r"config\.abl\.relearned_tested='learned' .* config\.abl\.relearned_draws=0"):
    experiment.train_and_evaluate(smoke.config(**{**REGAUGE, "abl__relearned_draws": 0,
                                                  "abl__relearned_tested": "learned"}), str(tmp_path))
