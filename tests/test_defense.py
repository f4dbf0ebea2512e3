"""The suspicious pool, fine-tuning without it (from the isolation model or fresh weights), per-class accuracy."""
import json
import types

import jax
import ml_collections
import numpy as np
import pytest

import smoke
from abl_jax import abl, data, evaluate, experiment, schedule


def test_pool_isolated_rule_is_the_isolated_set():
  np.testing.assert_array_equal(abl.suspicious_pool(np.zeros(10), np.array([7, 2]), "isolated", 0.5), [2, 7])


def test_pool_ratio_rule_takes_the_lowest_scores_and_the_isolated_ones():
  scores = np.array([0.9, 0.01, 0.5, 0.001, 0.3, 0.2, 0.8, 0.7, 0.6, 0.4])
  np.testing.assert_array_equal(abl.suspicious_pool(scores, np.array([3]), "ratio", 0.3), [1, 3, 5])
  np.testing.assert_array_equal(abl.suspicious_pool(scores, np.array([3, 1]), "ratio", 0.0), [1, 3])


def test_pool_ratio_rule_finds_planted_backdoor_scores():
  rng = np.random.default_rng(0)
  scores = rng.uniform(0.1, 3.0, 1000)
  planted = rng.choice(1000, 100, replace=False)
  scores[planted] = rng.uniform(1e-5, 1e-3, 100)  # Backdoor examples: learned far better than clean ones.
  pool = abl.suspicious_pool(scores, abl.isolate(scores, 0.01), "ratio", 0.2)
  assert len(pool) == 200 and np.isin(planted, pool).all()


def test_class_ratio_rule_sees_the_backdoor_through_a_class_biased_isolation_model():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 250)
  # Class 3 is fit a thousand times better than the others (a biased model), spread as widely as the
  # backdoor examples; class 0 holds 25 planted backdoor examples.
  scores = np.exp(rng.normal(0.0, np.where(labels == 3, 1.5, 0.5))) * np.where(labels == 3, 1e-3, 1.0)
  planted = np.arange(25)
  scores[planted] = np.exp(rng.normal(np.log(1e-3), 0.5, 25))
  plain = abl.suspicious_pool(abl.pool_ranking([scores], labels, "ratio", 0.5), planted[:5], "ratio", 0.05)
  normalised = abl.suspicious_pool(abl.pool_ranking([scores], labels, "class_ratio", 0.5), planted[:5],
                                   "class_ratio", 0.05)
  assert np.isin(planted, plain).sum() < 25 and (labels[plain] == 3).sum() > 20  # Mostly class 3's easy examples.
  assert np.isin(planted, normalised).all() and len(normalised) == 50


def test_class_quantile_above_the_poison_share_keeps_a_mostly_poisoned_label_suspect():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(4), 200)
  scores = np.exp(rng.normal(0.0, 0.5, 800))
  planted = np.arange(120)  # 60% of label 0, learned a thousand times better than its clean rest.
  scores[planted] = np.exp(rng.normal(np.log(1e-3), 1.0, 120))
  recall = {q: np.isin(planted, abl.suspicious_pool(abl.pool_ranking([scores], labels, "class_ratio", q),
                                                    planted[:1], "class_ratio", 0.2)).mean() for q in (0.5, 0.8)}
  assert recall[0.5] < 0.75 and recall[0.8] == 1.0  # The median of label 0 is a poisoned example's score.


def test_class_ratio_measures_each_scoring_within_its_label():
  labels = np.repeat(np.arange(2), 4)
  # Epoch 1 fits label 1 a hundred times better than label 0; epoch 2 does the opposite; example 0 is lowest
  # within its label in both.
  first = np.array([0.01, 0.5, 0.6, 0.7, 0.001, 0.002, 0.003, 0.004])
  second = np.array([0.0001, 0.001, 0.002, 0.003, 0.5, 0.6, 0.7, 0.8])
  ranking = abl.pool_ranking([first, second], labels, "class_ratio", 1.0)
  assert np.argsort(ranking, kind="stable")[0] == 0 and ranking[0] == 0.0
  np.testing.assert_allclose(abl.pool_ranking([first], labels, "class_ratio", 1.0)[:4],
                             np.log(first[:4] / 0.7))
  np.testing.assert_allclose(abl.pool_ranking([first, second], labels, "ratio", 0.5),
                             abl.lowest_rank([first, second]))


@pytest.mark.parametrize("rule, ratio, message", [
    ("gmm", 0.2, r"config\.abl\.pool_rule='gmm' is unknown; allowed: isolated, ratio, class_ratio"),
    ("ratio", 1.0, r"config\.abl\.pool_ratio=1\.0 must be in \[0, 1\)"),
    ("ratio", -0.1, r"config\.abl\.pool_ratio=-0\.1 must be in \[0, 1\)"),
])
def test_pool_bad_rule_or_ratio(rule, ratio, message):
  with pytest.raises(ValueError, match=message):
    abl.suspicious_pool(np.zeros(10), np.array([0]), rule, ratio)


def test_rejected_shares_compare_a_labels_pool_with_the_rest_of_it():
  pool_rejected = np.array([True, False, False, False, True, True])
  pool_labels = np.array([3, 3, 3, 3, 5, 5])
  outside_rejected = np.array([True, True, False, False, False, True])
  outside_labels = np.array([3, 3, 3, 3, 7, 7])
  shares = abl.rejected_shares(pool_rejected, pool_labels, outside_rejected, outside_labels, np.array([3, 5, 7]))
  np.testing.assert_allclose(shares, [[0.25, 1.0, np.nan], [0.5, np.nan, 0.5]])


def test_disowned_examples_lose_their_label_and_keep_the_gauges_other_beliefs():
  targets = np.array([[0.02, 0.78, 0.20],   # A trigger's label (0) kept at the floor: disowned.
                      [0.60, 0.30, 0.10],   # The gauge agrees: kept.
                      [0.04, 0.48, 0.48],   # Below 0.05 but not among the gauge-taught rows: kept.
                      [0.30, 0.10, 0.60]], np.float32)  # Label 1 at 0.10: above the threshold.
  labels = np.array([0, 0, 0, 1])
  out = targets.copy()
  hit = abl.disowned(out, labels, np.array([0, 1, 3]), 0.05)
  np.testing.assert_array_equal(hit, [0])
  np.testing.assert_allclose(out[0], [0.0, 0.78 / 0.98, 0.20 / 0.98], rtol=1e-6)
  np.testing.assert_array_equal(out[1:], targets[1:])
  assert len(abl.disowned(targets.copy(), labels, np.array([0, 1, 2, 3]), 0.0)) == 0  # Off.


@pytest.mark.parametrize("field, value, message", [
    ("abl__pool_rule", "knee", r"config\.abl\.pool_rule='knee' is unknown"),
    ("abl__pool_ratio", 1.5, r"config\.abl\.pool_ratio=1\.5 must be in \[0, 1\)"),
    ("abl__class_quantile", 0.0, r"config\.abl\.class_quantile=0\.0 must be in \(0, 1\]"),
    ("abl__contradict_factor", 0.5, r"config\.abl\.contradict_factor=0\.5 must be 0 \(off\) or >= 1"),
    ("abl__class_outlier_z", -1.0, r"config\.abl\.class_outlier_z=-1\.0 must be 0 \(off\) or > 0"),
    ("abl__class_outlier_ratio", 0.5, r"config\.abl\.class_outlier_ratio=0\.5 must be 0 \(off\) or > 1"),
    ("abl__pool_outlier_z", -1.0, r"config\.abl\.pool_outlier_z=-1\.0 must be 0 \(off\) or > 0"),
    ("abl__class_outlier_below", (0.1, 1.0),
     r"config\.abl\.class_outlier_below=\(0\.1, 1\.0\) must hold levels in \(0, 1\) \(or be \(\) for disown_below"),
    ("abl__disown_below", 1.0, r"config\.abl\.disown_below=1\.0 must be in \[0, 1\)"),
    ("abl__finetune_init", "random",
     r"config\.abl\.finetune_init='random' is unknown; allowed: isolation, scratch, gauge"),
    ("abl__finetune_schedule", "linear", r"config\.abl\.finetune_schedule='linear' is unknown; allowed: step, cosine"),
    ("abl__finetune_mix", "cutout", r"config\.abl\.finetune_mix='cutout' is unknown; allowed: none, cutmix, mixup"),
    ("abl__gauge_mix", "cutout", r"config\.abl\.gauge_mix='cutout' is unknown; allowed: none, cutmix, mixup"),
    ("abl__finetune_mix_alpha", 0.0, r"config\.abl\.finetune_mix_alpha=0\.0 must be > 0"),
    ("abl__finetune_mix_epochs", -1, r"config\.abl\.finetune_mix_epochs=-1 must be >= 0 \(0 = every epoch\)"),
])
def test_new_fields_are_checked_before_any_work(field, value, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    experiment.train_and_evaluate(smoke.config(**{field: value}), str(tmp_path))
  assert not (tmp_path / "config.json").exists()


def test_mixing_stays_in_the_first_fine_tuning_epochs_it_is_given():
  run = _fake_run(50, np.arange(0, 50, 5))
  run.config.abl.finetune_mix = "cutmix"
  assert schedule._finetune_phase(run, "finetune", 0, 2).mix_epochs is None  # 0: every epoch mixes.
  run.config.abl.finetune_mix_epochs = 1
  phase = schedule._finetune_phase(run, "finetune", 0, 2)
  assert (phase.mix_mode, phase.mix_epochs) == ("cutmix", 1)
  assert schedule._finetune_phase(run, "finetune", 2, 2).mix_epochs == 0  # The part after a split: none.


def _fake_run(n, pool, **abl_fields):
  c = ml_collections.ConfigDict({
      "abl": dict(finetune_epochs=2, finetune_lr=0.1, finetune_schedule="cosine", finetune_lr_boundaries=(1,),
                  finetune_init="scratch", finetune_balance=False, return_rule="none", gauge_epochs=0,
                  finetune_mix="none", finetune_mix_alpha=1.0, finetune_mix_epochs=0, flagged_doubted="keep",
                  calibrate_flagged=False, candidate_triggers=0.0, candidate_scale=(1.0, 1.0), **abl_fields),
      "train": dict(batch_size=8, augment=False, eval_every_epochs=1, label_smoothing=0.2)})
  return types.SimpleNamespace(config=c, pool=np.asarray(pool), returned=None, left_out=None, labels=None,
                               triggers=None, train=np.zeros(n))


def test_finetune_never_sees_the_pool_and_starts_from_fresh_weights(monkeypatch):
  phases = []
  monkeypatch.setattr(schedule, "run_phase", lambda run, phase: phases.append(phase))
  run = _fake_run(50, np.arange(0, 50, 5))
  schedule.finetune(run)
  (phase,) = phases
  order = phase.order(run, jax.random.PRNGKey(0))
  assert phase.num_examples == 40 and phase.fresh_weights and phase.label_smoothing == 0.2
  assert set(order.ravel()) == set(range(50)) - set(range(0, 50, 5))
  lr = phase.lr(5)  # cosine over 2 epochs of 5 steps: from finetune_lr to 0.
  assert float(lr(0)) == pytest.approx(0.1) and float(lr(10)) == pytest.approx(0.0, abs=1e-9)


def test_pool_leaving_nothing_to_fine_tune_on_names_the_field(monkeypatch):
  monkeypatch.setattr(abl, "suspicious_pool", lambda ranking, isolated, rule, ratio: np.arange(len(ranking)))
  run = types.SimpleNamespace(config=ml_collections.ConfigDict({"abl": {"pool_rule": "ratio", "pool_ratio": 0.9,
                                                                       "score_epochs": 1, "class_quantile": 0.5}}),
                              workdir="",
                              scores=np.zeros(10), isolated=np.array([0]), suspected=None,
                              train=types.SimpleNamespace(labels=np.zeros(10)))
  with pytest.raises(ValueError, match=r"config\.abl\.pool_ratio=0\.9 leaves no example to fine-tune on"):
    schedule._pool(run)
  # A pool that leaves examples, filled up by the spectral suspects: the message names their fields.
  monkeypatch.setattr(abl, "suspicious_pool", lambda ranking, isolated, rule, ratio: np.arange(5))
  run.config.abl.update({"spectral_skew": 0.8, "spectral_kurtosis": 1.8, "spectral_bimodality": 0.5})
  run.suspected = np.arange(5, 10)
  message = (r"spectral suspects \(config\.abl\.spectral_skew=0\.8, spectral_kurtosis=1\.8, "
             r"spectral_bimodality=0\.5\)")
  with pytest.raises(ValueError, match=message):
    schedule._pool(run)
  run.suspected = np.arange(4, 8)
  np.testing.assert_array_equal(schedule._pool(run), np.arange(8))


def test_class_accuracy():
  acc = evaluate.class_accuracy(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 4)
  assert acc == [0.5, 0.5, 1.0, None]


def test_untriggered_target_rate_is_the_asr_without_the_trigger():
  # Image i's first pixel encodes what the fake model predicts for it.
  def images(preds):
    out = np.zeros((len(preds), 2, 2, 1), np.uint8)
    out[:, 0, 0, 0] = preds
    return out
  predict = lambda x, y: (np.zeros(len(y)), x[:, 0, 0, 0].astype(np.int64))
  names = ("a", "b", "c")
  test = data.Dataset(images([0, 0, 1, 2, 0]), np.array([0, 1, 1, 2, 2]), names)  # 2 of 4 non-target -> 0.
  triggered = data.Dataset(images([0, 0, 0, 2]), np.zeros(4, np.int64), names)
  out = evaluate.test_metrics(predict, test, triggered)
  assert out["untriggered_target_rate"] == 0.5 and out["attack_success_rate"] == 0.75
  assert out["clean_accuracy"] == 0.6
  assert evaluate.test_metrics(predict, test, None)["untriggered_target_rate"] is None


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
  """The BadNets smoke run (10% poisoned) fine-tuned from fresh weights without the lowest-loss 20%."""
  out = tmp_path_factory.mktemp("pooled")
  results = experiment.train_and_evaluate(
      smoke.config(abl__pool_rule="ratio", abl__pool_ratio=0.2, abl__finetune_init="scratch",
                   abl__finetune_schedule="cosine", abl__finetune_epochs=4,
                   abl__unlearning_stop="retained_accuracy", abl__stop_accuracy=0.1), str(out))
  return out, results


def test_pool_is_saved_and_reported(pooled):
  out, results = pooled
  saved = np.load(out / "isolation.npz")
  n = len(saved["scores"])
  assert len(saved["pool"]) == int(0.2 * n) and np.isin(saved["isolated"], saved["pool"]).all()
  assert np.max(saved["scores"][saved["pool"]]) <= np.min(np.delete(saved["scores"], saved["pool"]))
  iso = results["isolation"]
  assert iso["pool_size"] == len(saved["pool"]) and iso["pool_recall"] > 0.9  # Smoke poison: learned first.
  share = np.bincount(saved["labels"][saved["pool"]], minlength=10) / np.bincount(saved["labels"], minlength=10)
  assert iso["pool_largest_label_share"] == pytest.approx(share.max())
  assert iso["pool_largest_label"] == int(np.argmax(share))


def test_fine_tuning_without_the_pool_does_not_learn_the_backdoor(runs, pooled):
  _, results = pooled
  _, _, paper_default = runs
  # The default (isolation model, the other 95%) keeps the backdoor; fresh weights without the pool do not.
  assert paper_default["unlearning"]["before"]["attack_success_rate"] > 0.7
  assert results["unlearning"]["before"]["attack_success_rate"] < 0.3


def test_results_carry_per_class_accuracy(runs, pooled):
  _, none, _ = runs
  for r in (none, pooled[1]):
    assert len(r["class_accuracy"]) == 10
    assert r["target_class_accuracy"] == r["class_accuracy"][r["config"]["attack"]["target_label"]]
    assert np.mean(r["class_accuracy"]) == pytest.approx(r["clean_accuracy"], abs=0.1)


def test_pictures_show_the_pool_per_class(pooled):
  from abl_jax import plots
  out, _ = pooled
  written = [p.split("/")[-1] for p in plots.write_run_plots(str(out))]
  assert written == ["curves.png", "isolation.png", "scores_per_class.png", "candidates.png"]
  with open(out / "scores_per_class.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_shows_the_target_class_accuracy(pooled):
  from abl_jax import report
  out, results = pooled
  row = report.load_row(str(out), "badnets_abl")
  assert row["target_class_accuracy"] == results["target_class_accuracy"]
  assert len(row["class_accuracy"]) == 10


def test_unlearning_is_skipped_when_nothing_is_left_to_unlearn(pooled):
  out, results = pooled
  # Fresh weights without the pool never fit the isolated (backdoor) examples' labels: no unlearning epoch.
  assert results["unlearning"]["stopped_at_epoch"] == 0 and results["unlearning"]["epochs_run"] == 0
  assert results["clean_accuracy"] == pytest.approx(results["unlearning"]["before"]["clean_accuracy"], abs=1e-6)
  (out / "results.json").unlink()  # As if interrupted after the last checkpoint: the skip is not undone.
  again = experiment.train_and_evaluate(
      smoke.config(abl__pool_rule="ratio", abl__pool_ratio=0.2, abl__finetune_init="scratch",
                   abl__finetune_schedule="cosine", abl__finetune_epochs=4,
                   abl__unlearning_stop="retained_accuracy", abl__stop_accuracy=0.1), str(out))
  assert again["unlearning"]["epochs_run"] == 0
  assert again["clean_accuracy"] == pytest.approx(results["clean_accuracy"], abs=1e-6)


def test_unlearning_runs_while_the_isolated_examples_are_still_fit(runs, tmp_path):
  root, _, _ = runs
  # The paper's fine-tuning keeps the backdoor: the isolated examples are fit far better than ordinary ones.
  r = experiment.train_and_evaluate(
      smoke.config(abl__start_from=str(root / "abl"), abl__unlearning_stop="retained_accuracy",
                   abl__stop_accuracy=0.0), str(tmp_path))
  assert r["unlearning"]["epochs_run"] > 0
  curve = json.loads((tmp_path / "unlearning_curve.json").read_text())["curve"]
  assert not curve[0]["stopped"] and curve[0]["isolated_accuracy"] > 0.9
