"""The benchmark scripts run on tiny sizes and print sane figure lines (no timing is asserted)."""
import importlib.util
import json

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from abl_jax import metrics
from benchmarks import isolation, pipeline, step_profile, train_step

HAVE_TORCH = importlib.util.find_spec("torch") is not None


# The full training step is left out: compiling it takes most of a minute on a busy 2-core machine.
def test_train_step_forward_runs():
  torch_flag = ["--torch"] if HAVE_TORCH else []
  out = train_step.main(["--model=small_cnn", "--width=4", "--batch=4", "--part=forward", "--steps=1",
                         "--repeats=1", "--warmup=0", *torch_flag])
  assert out["jax_images_per_s"] > 0 and out["jax_compile_s"] >= 0
  if HAVE_TORCH:
    assert out["jax_over_torch"] > 0 and out["torch_params"] == out["jax_params"]


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is an optional benchmark dependency")
def test_torch_twins_match_parameter_counts():
  for model in train_step.models.MODELS:
    jax_model = train_step.models.create_model(model, 10)
    shapes = jax.eval_shape(lambda m=jax_model: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    net = train_step.torch_model(model)
    assert sum(p.numel() for p in net.parameters()) == train_step.param_count(shapes["params"]), model


def test_batch_norm_benchmark_runs():
  from benchmarks import batch_norm  # pylint: disable=import-outside-toplevel
  out = batch_norm.main(["--shape=2,4,4,8", "--calls=1", "--repeats=1"])
  assert out["shape"] == [2, 4, 4, 8]
  assert all(out[f"{k}_ms"] > 0 for k in ("sum_leading_axes", "channel_sum", "flax_batch_norm_fwd_bwd",
                                           "abl_jax_batch_norm_fwd_bwd"))


def test_isolation_runs():
  out = isolation.main(["--model=small_cnn", "--width=4", "--examples=8", "--batch=4", "--single=2", "--rounds=1"])
  assert out["examples"] == 8 and out["jax_batched_examples_per_s"] > 0 and out["speedup_over"] == "jax_batch1"


def test_pipeline_reads_a_run(tmp_path):
  (tmp_path / "results.json").write_text(json.dumps({"wall_time": {"poison": 1.0, "isolation": 2.0}, "num_train": 8}))
  (tmp_path / "isolation.json").write_text(json.dumps({"seconds": 0.5}))
  writer = metrics.Writer(str(tmp_path))
  writer.write(5, {"epoch/data_wait_share": 0.1, "epoch/images_per_s": 10.0}, phase="isolation", epoch=1)
  writer.write(10, {"epoch/data_wait_share": 0.3, "epoch/images_per_s": 30.0}, phase="isolation", epoch=2)
  writer.close()
  out = pipeline.read_run(str(tmp_path))
  assert out["phase_s"] == {"poison": 1.0, "isolation": 2.0, "scoring": 0.5}
  assert out["data_wait_share"] == {"isolation": 0.2} and out["train_images_per_s"] == {"isolation": 20.0}


def test_step_profile_groups_name_stacks_and_finds_the_thunks():
  assert step_profile.group_of("jit(step)/transpose(jvp(SmallCNN))/Conv_1/conv_general_dilated") == "conv backward"
  assert step_profile.group_of("jit(step)/jvp(SmallCNN)/BatchNorm_0/reduce_sum") == "batchnorm forward"
  assert step_profile.group_of("jit(step)/jvp(jit(log_softmax))/reduce_max") == "loss forward"
  assert step_profile.group_of("jit(step)/jvp(SmallCNN)/reduce_max") == "maxpool forward"
  assert step_profile.group_of("jit(step)/mul") == "update & rest"
  assert step_profile.torch_group("aten::convolution_backward") == "conv backward"
  assert step_profile.torch_group("aten::max_pool2d_with_indices") == "maxpool forward"

  from abl_jax.models.small_cnn import max_pool_2x2
  x = jnp.ones((2, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 4)) / 27

  def loss(w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(max_pool_2x2(jax.nn.relu(y)) ** 2)

  grad = jax.jit(jax.grad(loss))
  hlo = grad.lower(w).compile().as_text()
  by_group, times = step_profile.profile_groups(lambda n: [grad(w).block_until_ready() for _ in range(n)], hlo, 2)
  # The trace's thunk names are the module's instruction names (what the grouping relies on), and the
  # convolution of the gradient is found among them.
  assert times and set(times) <= set(step_profile.hlo_groups(hlo))
  assert by_group.get("conv backward", 0) > 0 and sum(by_group.values()) == pytest.approx(sum(times.values()))


def test_gpu_check_runs_every_part_on_tiny_sizes(tmp_path):
  from benchmarks import gpu_check
  out = gpu_check.main(["--tiny", f"--out={tmp_path / 'check.json'}"])
  saved = json.loads((tmp_path / "check.json").read_text())
  assert saved == json.loads(json.dumps(out))
  assert saved["environment"]["device_count"] == jax.device_count()
  assert set(saved["train_step"]) == {"bfloat16", "float32"}
  assert all(r["jax_images_per_s"] > 0 for r in saved["train_step"].values())
  assert saved["scoring"]["examples"] == 64 and saved["scoring"]["examples_per_s"] > 0
  row = saved["abl_badnets"]
  assert row["num_train"] == 1024 and 0.0 <= row["clean_accuracy"] <= 1.0 and 0.0 <= row["attack_success_rate"] <= 1.0
  assert row["isolation_precision"] is not None
  assert set(row["wall_time_s"]) >= {"isolation", "gauge", "finetune", "evaluate"}


def test_pool_analysis_recomputes_the_pool_and_counts_the_gauges_verdicts(tmp_path):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import pool_analysis  # pylint: disable=import-outside-toplevel
  labels = np.repeat(np.arange(2), 10)
  poisoned = np.zeros(20, bool)
  poisoned[[0, 1]] = True
  scores = np.linspace(1.0, 2.0, 20)
  scores[[0, 1]], scores[10] = 0.001, 0.01  # The two poisoned examples, then one clean of label 1, fit first.
  (tmp_path / "config.json").write_text(json.dumps({"abl": {"score_epochs": 1}}))
  np.savez(tmp_path / "epoch_scores.npz", epoch_1=scores)
  pool = np.array([0, 1, 10])
  np.savez(tmp_path / "isolation.npz", scores=scores, isolated=np.array([0]), pool=pool, labels=labels,
           is_poisoned=poisoned)
  outside = np.full(20, np.nan)
  outside[2:] = 5.0  # The gauge's loss outside the pool: every example is far above its isolation loss.
  prediction = np.full(20, -1)
  prediction[2:] = labels[2:]
  prediction[5] = 1  # Only example 5 is predicted as another class.
  np.savez(tmp_path / "returned.npz", judge_loss=-np.log([0.01, 0.04, 0.5]), outside_gauge_loss=outside,
           outside_gauge_prediction=prediction)
  rows = {(r["class_quantile"], r["pool_ratio"]): r for r in pool_analysis.pool_sweep(str(tmp_path))}
  assert rows[(0.8, 0.1)]["recall"] == 1.0 and rows[(0.8, 0.1)]["pool"] == 2  # Both poisons lowest in label 0.
  assert rows[(0.8, 0.15)]["pool"] == 3 and rows[(0.8, 0.15)]["largest_label_share"] == 0.2
  disown = {r["disown_below"]: r for r in pool_analysis.disown_sweep(str(tmp_path))}
  assert (disown[0.02]["disowned"], disown[0.02]["poisoned"]) == (1, 1)
  assert (disown[0.05]["disowned"], disown[0.05]["poisoned"]) == (2, 2)
  assert disown[0.2]["disowned"] == 2 and disown[0.2]["poisoned_in_pool"] == 2
  flagged = {r["contradict_factor"]: r for r in pool_analysis.contradiction_sweep(str(tmp_path))}
  assert flagged[20]["flagged"] == 1 and flagged[20]["poisoned"] == 0 and flagged[20]["clean"] == "1 of label 0"
  # A second saved epoch in which the poison is fit last in its label: ranked over it alone, the pool (the lowest
  # 20% of the set by rank within label, plus the isolated example 0) misses example 1; over both it holds both.
  later = np.linspace(1.0, 2.0, 20)
  later[[0, 1]] = 3.0
  (tmp_path / "config.json").write_text(json.dumps({"abl": {"score_epochs": 2, "pool_ratio": 0.2}}))
  np.savez(tmp_path / "epoch_scores.npz", epoch_1=scores, epoch_2=later)
  windows = {r["epochs"]: r for r in pool_analysis.epochs_sweep(str(tmp_path))}
  assert list(windows) == ["1-1", "1-2", "2-2"]
  assert windows["1-1"]["recall"] == 1.0 and windows["1-2"]["recall"] == 1.0
  assert windows["2-2"]["recall"] == 0.5 and windows["2-2"]["pool"] == 5


def test_outlier_levels_scores_a_runs_saved_verdicts_at_each_level(tmp_path):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import outlier_levels  # pylint: disable=import-outside-toplevel
  # 5 labels x 400 examples outside the pool (example 2000, label 0, is the pool). The gauge gives 30-60 hard
  # examples of each label 0.05 and 0-3 others 0.01; label 0 also has 24 poisoned it gives 0.01: no outlier
  # below 0.1 (share 0.16 against 0.08-0.155), a far one below 0.02 (0.06 against 0.0025-0.0075).
  labels = np.append(np.repeat(np.arange(5), 400), 0)
  own = np.full(2001, 0.9)
  for label, (hard, sure) in enumerate(zip([40, 30, 55, 45, 60], [0, 2, 3, 1, 2])):
    own[label * 400:label * 400 + hard] = 0.05
    own[label * 400 + hard:label * 400 + hard + sure] = 0.01
  own[100:124] = 0.01
  poisoned = np.zeros(2001, bool)
  poisoned[100:124] = True
  (tmp_path / "config.json").write_text(json.dumps({"abl": {"disown_below": 0.1}, "attack": {"target_label": 0}}))
  np.savez(tmp_path / "isolation.npz", pool=np.array([2000]), labels=labels, is_poisoned=poisoned)
  np.savez(tmp_path / "returned.npz", outside_gauge_loss=-np.log(own))
  r = outlier_levels.scores(str(tmp_path), (0.1, 0.02), sampling=True)
  assert r["target"] == 0 and r["rejected"] == [(24, 64), (24, 24)]
  assert r["scores"][0, 0] < 3.5 < r["scores"][1, 0]
  assert r["flagged"].tolist() == [0] and r["before"].tolist() == []  # Session 11's rule (0.1 alone) misses it.


def test_asr_floor_gives_the_runs_own_asr_for_its_target_and_checks_targets(runs):
  import smoke  # pylint: disable=import-outside-toplevel
  from abl_jax import experiment  # pylint: disable=import-outside-toplevel
  from benchmarks import asr_floor  # pylint: disable=import-outside-toplevel
  root, none, _ = runs
  config = smoke.config(defense__name="none")
  out = asr_floor.floor(str(root / "none"), experiment.prepare(config), "badnets", config.attack.target_label)
  assert out["asr"] == pytest.approx(none["attack_success_rate"])
  assert out["clean_images_classified_as_target"] == pytest.approx(none["untriggered_target_rate"])
  assert asr_floor.targets("", 3, 10) == [3] and asr_floor.targets("all", 3, 4) == [0, 1, 2, 3]
  assert asr_floor.targets("5,1", 0, 10) == [5, 1]
  with pytest.raises(ValueError, match=r"--targets: '10' is not a class \(0\.\.9\) or 'all'"):
    asr_floor.targets("2,10", 0, 10)
  with pytest.raises(ValueError, match=r"--targets: 'cat' is not a class"):
    asr_floor.targets("cat", 0, 10)


def test_spectral_stats_find_a_poisoned_cluster_and_features_feed_the_last_layer(runs):
  import numpy as np  # pylint: disable=import-outside-toplevel
  import smoke  # pylint: disable=import-outside-toplevel
  from abl_jax import checkpoint, experiment, train  # pylint: disable=import-outside-toplevel
  from benchmarks import spectral  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  features = rng.normal(size=(200, 4))
  labels = np.repeat([0, 1], 100)
  poisoned = np.zeros(200, bool)
  poisoned[:10] = True
  features[:10, 0] += 8.0  # Label 0's poisoned examples sit apart along one direction.
  rows = {r["label"]: r for r in spectral.label_stats(features, labels, poisoned)}
  assert rows[0]["poisoned"] == 10 and rows[0]["auroc"] == 1.0 and rows[0]["recall_at_1.5x"] == 1.0
  assert rows[0]["skewness"] > 2 and rows[0]["sv1_over_sv2"] > rows[1]["sv1_over_sv2"]
  assert rows[1]["auroc"] is None and rows[1]["recall_at_1.5x"] is None
  assert rows[0]["lda_auroc"] == 1.0 and rows[1]["lda_auroc"] is None  # Fitted on the mask: separates a shift of 8.
  # Poison apart along a direction of small variance: the top direction misses it, a discriminant does not.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(400, 3)) * np.array([5.0, 1.0, 1.0])
  mask = np.arange(400) < 200
  x[mask, 2] += 3.0
  assert spectral.lda_auroc(x, mask) > 0.95 > 0.7 > spectral._auroc(x[mask, 0], x[~mask, 0])  # pylint: disable=protected-access
  assert rows[0]["kurtosis"] > 5 and 2 < rows[1]["kurtosis"] < 4  # A 10% tail; a normal label (3).
  scores = np.arange(200.0)  # Label 0's poisoned examples have the lowest losses: its tail ranks first.
  rows = {r["label"]: r for r in spectral.label_stats(features, labels, poisoned, scores)}
  assert rows[0]["tail"] == 10 and rows[0]["tail_loss_rank"] == pytest.approx(0.045)
  assert rows[1]["tail"] == 1 and rows[1]["tail_loss_rank"] == pytest.approx(0.19)
  assert rows[0]["pursuit_tail_poisoned"] == 10 and rows[0]["pursuit_tail"] <= 12  # The shifted ten, fitted first,
  assert rows[0]["pursuit_rank"] < 0.06 and rows[1]["pursuit_rank"] > 0.3  # and a clean label's tail of the rest.
  # On a real run, the captured features through the last Dense layer give the model's own probabilities.
  root, _, _ = runs
  config = smoke.config()
  prep = experiment.prepare(config)
  model = experiment._model(config, prep.train)  # pylint: disable=protected-access
  last = max(int(step.name) for step in (root / "abl" / "checkpoints").iterdir() if step.name.isdigit())
  variables = checkpoint.restore_variables(str(root / "abl"), model, config, prep.train.images.shape[1:], step=last)
  images = prep.train.images[:64]
  got = spectral.penultimate(model, variables, images, config.data.mean, config.data.std, batch=32)
  dense = variables["params"]["Dense_0"]
  logits = got @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
  mesh = train.make_mesh()
  probs = train.predictor(model, variables, config.data.mean, config.data.std, 32, mesh, probabilities=True)(
      images, prep.train.labels[:64])[2]
  expected = np.exp(logits - logits.max(axis=1, keepdims=True))
  np.testing.assert_allclose(expected / expected.sum(axis=1, keepdims=True), probs, atol=1e-5)


def test_flagged_report_counts_each_fate_and_ranks_each_signal():
  from benchmarks import flagged  # pylint: disable=import-outside-toplevel
  # Label 0 flagged: 4 clean (0-3) and 4 poisoned (4-7); example 8 (label 1) is never reported.
  labels = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1])
  poisoned = np.arange(9) >= 4
  poisoned[8] = False
  pool = np.array([3, 7])  # In the pool: no gauge probability outside it.
  gauge = np.array([0.9, 0.6, 0.3, np.nan, 0.05, 0.02, 0.7, np.nan, 0.8])
  judged = {"outlier_labels": np.array([0]), "outside_gauge_loss": -np.log(gauge), "disowned": np.array([4, 5]),
            "kept_out": np.array([7]), "left_out": np.array([2]), "class_rejected": np.array([4, 5]),
            "judge_loss": -np.log(np.array([0.3, 0.05]))}  # The pool's: 3 unsure, 7 rejected.
  scores = {"epoch_5": np.array([0.5, 0.6, 0.7, 0.8, 0.1, 0.2, 0.9, 0.3, 0.4])}
  row, = flagged.label_report(labels, poisoned, pool, judged, scores, disown_below=0.1)
  assert (row["examples"], row["poisoned"], row["poisoned_in_pool"]) == (8, 4, 1)
  assert row["disowned"] == {"clean": 0, "poisoned": 2} and row["left_out"] == {"clean": 1, "poisoned": 1}
  assert row["kept"] == {"clean": 3, "poisoned": 1}
  # Rejected: 7 of the pool's 3 and 7; 4 and 5 of the six outside it. Unsure in the pool: 3, clean.
  assert row["rejected_share"] == {"pool": 0.5, "outside": pytest.approx(2 / 6)}
  assert row["pool_unsure"] == {"clean": 1, "poisoned": 0}
  # Outside the pool: clean 0-2, poisoned 4-6. Gauge: the poisoned 0.05, 0.02 under each of the clean 0.9, 0.6,
  # 0.3, and 0.7 under 0.9 alone: 7 of 9 pairs. Isolation loss: poisoned 0.1, 0.2, 0.9 against 0.5, 0.6, 0.7: 6 of 9.
  assert row["auroc_outside"]["gauge_probability"] == pytest.approx(7 / 9)
  assert row["auroc_outside"]["isolation_loss_epoch_5"] == pytest.approx(6 / 9)
  # Kept (gauge >= 0.1): clean 0-2, poisoned 6 (0.7 against 0.9, 0.6, 0.3: below one; loss 0.9, above all).
  assert row["kept_examples"] == {"clean": 3, "poisoned": 1}
  assert row["auroc_kept"]["gauge_probability"] == pytest.approx(1 / 3)
  assert row["auroc_kept"]["isolation_loss_epoch_5"] == 0.0
  assert flagged.auroc(np.array([1.0]), np.array([1.0])) == 0.5 and flagged.auroc(np.array([]), np.ones(2)) is None
  # Any label on request (a target nothing flagged): label 1 has one clean example, kept, and no poison to rank.
  other, = flagged.label_report(labels, poisoned, pool, judged, scores, disown_below=0.1, which=[1])
  assert other["label"] == 1 and other["kept"] == {"clean": 1, "poisoned": 0}
  assert other["auroc_outside"]["gauge_probability"] is None
  # A nearest-neighbour share as one more signal: the poisoned examples' (0.0) under every clean one's.
  knn = np.array([1.0, 0.5, 0.5, np.nan, 0.0, 0.0, 0.0, np.nan, np.nan])
  row, = flagged.label_report(labels, poisoned, pool, judged, scores, disown_below=0.1, knn=knn)
  assert row["auroc_outside"]["knn_share"] == 1.0 and row["auroc_kept"]["knn_share"] == 1.0


def test_knn_share_counts_the_own_label_among_the_nearest_others():
  from benchmarks import flagged  # pylint: disable=import-outside-toplevel
  # Two directions: examples 0-2 along x (labels 0, 0, 1), examples 3-4 along y (labels 0, 1); lengths differ.
  features = np.array([[1.0, 0.0], [2.0, 0.05], [3.0, -0.3], [0.0, 1.0], [0.1, 5.0]])
  labels = np.array([0, 0, 1, 0, 1])
  # Example 0's two nearest others are 1 and 2 (labels 0, 1); example 3's are 4 and one of x's (label 1, then 0).
  shares = flagged.knn_share(features, labels, np.array([0, 3]), k=2)
  assert shares[0] == 0.5 and shares[1] == 0.5
  # k=1: example 0's nearest is 1 (its label), example 3's is 4 (not its label); never itself.
  assert flagged.knn_share(features, labels, np.array([0, 3]), k=1).tolist() == [1.0, 0.0]


def test_flagged_regauge_scores_show_the_held_out_rejections_behind_the_second_gauges_score():
  from benchmarks import flagged  # pylint: disable=import-outside-toplevel
  labels = np.repeat(np.arange(10), 100)
  own = np.full(1000, 0.9)
  own[labels != 0] = np.where(np.arange(1000)[labels != 0] % 100 < 5, 0.01, 0.9)  # 5% of each label rejected...
  own[:30] = 0.01  # ... but 30% of label 0: the examples the first gauge rejected, which the second never saw.
  first = {"outlier_labels": np.array([0]), "class_rejected": np.arange(30), "outside_gauge_loss": -np.log(own)}
  second = {"outside_gauge_loss": -np.log(own)}
  s = flagged.regauge_scores(labels, first, second, (0.1,), 10)[0]
  assert s["first"] == s["second"] > 3.5  # Flagged, and "confirmed" by the same rejections...
  assert s["second_on_its_training_examples"] < 3.5  # ... which are all there is: without them, label 0 is ordinary.


def test_relearned_rescores_the_check_at_other_cut_offs(tmp_path):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import relearned  # pylint: disable=import-outside-toplevel
  # 4 labels x 10 examples, none in the pool. Candidates: 3 per label; label 2's three are learned at 0.85 (raw
  # 0.95), one of label 1's at 0.95 (raw 0.6).
  labels = np.repeat(np.arange(4), 10)
  candidates = np.array([1, 2, 3, 11, 12, 13, 21, 22, 23, 31, 32, 33])
  adjusted = np.array([0.1, 0.1, 0.1, 0.95, 0.1, 0.1, 0.85, 0.85, 0.85, 0.1, 0.1, 0.1])
  raw = np.where(adjusted == 0.95, 0.6, np.where(adjusted == 0.85, 0.95, 0.1))
  poisoned = np.isin(np.arange(40), [21, 22])
  np.savez(tmp_path / "isolation.npz", labels=labels, is_poisoned=poisoned, pool=np.array([], int))
  np.savez(tmp_path / "relearned.npz", relearned_labels=np.array([2]), relearned_rejected=np.array([21, 22, 23]),
           relearned_candidates=candidates, relearned_probability=adjusted, relearned_raw_probability=raw)
  (tmp_path / "config.json").write_text(json.dumps({"attack": {"name": "badnets", "target_label": 2}}))
  scores = relearned.rescored(labels, np.arange(40), candidates, adjusted, 0.8, 4)
  assert np.argmax(scores) == 2 and scores[2] > scores[1] > scores[0] == scores[3]
  # At 0.9 the adjusted probabilities put label 1 first; the raw ones label 2 at either cut-off.
  line = relearned.report(str(tmp_path), [0.8, 0.9])
  assert line.startswith(f"{tmp_path}: flagged [2] (target 2), acted on 3 (2 poisoned)")
  assert "raw 0.9: 2 (target)" in line and "adjusted 0.9: 1 " in line
  assert relearned.report(str(tmp_path / "none"), [0.8]) is None


@pytest.fixture(scope="module")
def judged_run(default_run):
  """A smoke run of the default defense (a gauge judges): conftest's, read only."""
  return default_run[0]


def test_cross_fit_halves_split_each_label_and_the_gauges_judge_every_poisoned_example(judged_run, tmp_path, capsys,
                                                                                         monkeypatch):
  import re  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import cross_fit  # pylint: disable=import-outside-toplevel
  labels = np.repeat(np.arange(3), [5, 4, 7])
  outside = np.array([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])  # Example 4 is in the pool.
  first, second = cross_fit.halves(outside, labels, seed=0)
  np.testing.assert_array_equal(np.union1d(first, second), outside)
  assert not len(np.intersect1d(first, second))
  assert np.bincount(labels[first], minlength=3).tolist() == [2, 2, 3]  # Half of each label, rounded down.
  monkeypatch.setattr(sys, "argv", ["cross_fit.py", str(judged_run), f"--out={tmp_path / 'xfit'}"])
  cross_fit.main()
  out = capsys.readouterr().out
  assert out.count("== ") == 2 and "gauge_b: test" in out
  iso = np.load(judged_run / "isolation.npz")
  poisoned_outside = int(np.setdiff1d(np.flatnonzero(iso["is_poisoned"]), iso["pool"]).size)
  judged = out.split("== cross-fitted")[1]
  counts = [int(n) for n in re.findall(r"'\w+': '\d+ / (\d+)'", judged)]
  assert sum(counts) == poisoned_outside  # Every poisoned example outside the pool got one fate.
  with pytest.raises(SystemExit, match="is not empty"):  # Nothing of an earlier measurement is overwritten.
    cross_fit.main()


def test_feature_units_rank_the_units_the_chosen_examples_raise_and_take_them_out_of_the_last_layer(
    judged_run, capsys, monkeypatch):
  import sys  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import feature_units  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  features = rng.normal(size=(100, 5))
  features[:10, 3] += 4.0  # The chosen examples raise unit 3.
  d = feature_units.unit_differences(features, np.arange(10))
  assert np.argmax(d) == 3 and d[3] > 3 > np.abs(np.delete(d, 3)).max()
  variables = {"params": {"Conv_0": {"kernel": np.ones((3, 3, 3, 5))},
                          "Dense_0": {"kernel": np.ones((5, 2)), "bias": np.zeros(2)}}}
  out = feature_units.without_units(variables, np.array([3, 1]))
  np.testing.assert_array_equal(out["params"]["Dense_0"]["kernel"].sum(axis=1), [2, 0, 2, 0, 2])
  assert variables["params"]["Dense_0"]["kernel"].sum() == 10  # The original is untouched.
  # A flagged label 1 whose 4 poisoned examples share the disowned examples' unit 3; the rest of it does not.
  labels = np.repeat([0, 1], 50)
  judged = {"disowned": np.arange(10), "labels": np.eye(2)[labels], "outlier_labels": np.array([1])}
  poisoned = np.zeros(100, bool)
  poisoned[[50, 51, 52, 53]] = True
  features[50:54, 3] += 4.0
  feature_units.direction_report(features, judged, labels, poisoned)
  line = capsys.readouterr().out.strip()
  assert line.startswith("label 1: 50 train with it (4 poisoned); AUROC along the direction 1.0; beyond the midpoint")
  assert line.endswith("(4 poisoned)")  # All four beyond it.
  monkeypatch.setattr(sys, "argv", ["feature_units.py", str(judged_run), "--zero=0,2"])
  feature_units.main()
  printed = capsys.readouterr().out
  assert "disowned" in printed and "poisoned vs clean" in printed
  assert "  0 units out: CA" in printed and "  2 units out: CA" in printed
  assert "changed (all but the disowned) 0.0000" in printed.split("  0 units out:")[1].splitlines()[0]
  # --final: the run's final model, whose CA with nothing taken out is the run's own.
  monkeypatch.setattr(sys, "argv", ["feature_units.py", str(judged_run), "--final", "--zero=0"])
  feature_units.main()
  final_ca = json.loads((judged_run / "results.json").read_text())["clean_accuracy"]
  assert f"  0 units out: CA {final_ca:.4f}" in capsys.readouterr().out


def test_pool_outliers_scores_the_pools_rejections_as_the_defense_does(tmp_path):
  import types  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from abl_jax import schedule  # pylint: disable=import-outside-toplevel
  from benchmarks import pool_outliers  # pylint: disable=import-outside-toplevel
  # A pool of 10 labels x 20 examples (examples 1000-1199); the gauge rejects 1-3 of each label's, 12 of label
  # 3's (10 of them poisoned), and 15 of label 5's, of which 14 are spectral suspects (not counted).
  labels = np.zeros(1200, int)
  pool = np.arange(1000, 1200)
  labels[pool] = np.repeat(np.arange(10), 20)
  own = np.full(200, 0.6)
  for label, n in enumerate([1, 2, 3, 12, 2, 1, 3, 2, 1, 2]):
    own[label * 20:label * 20 + n] = 0.05
  own[100:115] = 0.02
  poisoned = np.zeros(1200, bool)
  poisoned[1060:1070] = True
  suspected = np.arange(1101, 1115)
  (tmp_path / "config.json").write_text(json.dumps({"abl": {"disown_below": 0.1},
                                                    "attack": {"name": "badnets", "target_label": 3}}))
  np.savez(tmp_path / "isolation.npz", pool=pool, labels=labels, is_poisoned=poisoned, suspected=suspected)
  np.savez(tmp_path / "returned.npz", judge_loss=-np.log(own))
  line = pool_outliers.row(str(tmp_path), 3.5)
  assert "| 12 (10 poisoned), share 0.60 |" in line and line.endswith("| [3] |")
  assert pool_outliers.row(str(tmp_path / "nowhere"), 3.5) is None
  # The same scores as the defense's own test.
  run = types.SimpleNamespace(train=types.SimpleNamespace(num_classes=10), pool=pool, suspected=suspected,
                              config=ml_collections.ConfigDict({"abl": {"pool_outlier_z": 3.5, "disown_below": 0.1}}))
  extra = {}
  schedule._pool_outliers(run, labels[pool], own, extra)  # pylint: disable=protected-access
  _, _, scores = pool_outliers.pool_scores(labels[pool], own, ~np.isin(pool, suspected), 10, 0.1)
  np.testing.assert_allclose(scores, extra["pool_outlier_scores"])
  assert f"| {scores[3]:.1f} |" in line


def test_finetune_probe_keeps_the_frozen_units_out_of_the_last_layer_to_the_end(tmp_path):
  import os  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import smoke  # pylint: disable=import-outside-toplevel
  from abl_jax import checkpoint, experiment  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",  # The tests' steps.
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  proc = subprocess.run([sys.executable, "benchmarks/finetune_probes.py", "--probe=frozen_units", "--units=2",
                         "--config=configs/abl_badnets.py:smoke", f"--workdir={tmp_path / 'run'}"],
                        cwd=root, env=env, capture_output=True, text=True, timeout=600, check=True)
  units = [int(u) for u in re.search(r"probe: units \[(\d+), (\d+)\]", proc.stdout).groups()]
  config = smoke.default()
  prep = experiment.prepare(config)
  variables = checkpoint.restore_variables(str(tmp_path / "run"), experiment._model(config, prep.train), config,  # pylint: disable=protected-access
                                           prep.train.images.shape[1:])
  kernel = np.asarray(variables["params"]["Dense_0"]["kernel"])
  zero_rows = np.flatnonzero(~kernel.any(axis=1))
  assert sorted(zero_rows.tolist()) == sorted(units)  # Only those: the others trained on.


def test_candidate_trigger_adds_the_tails_mean_image_and_counts_the_labels_predictions():
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import candidate_trigger  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  labels = np.repeat([0, 1, 2], 300)
  images = rng.integers(0, 100, size=(900, 4, 4, 3)).astype(np.uint8)
  features = rng.normal(size=(900, 8))
  features[:30, 3] += 6.0  # A tenth of label 0 apart in the features,
  images[:30, 0, 0, :] = 255  # and carrying a bright corner pixel: the trigger.
  predict = lambda x: np.where(x[:, 0, 0, 0] > 150, 0, 9)  # Learned the trigger: the corner means label 0.
  rows = candidate_trigger.label_rises(predict, images, labels, features, 3, sample=400, dims=8)
  assert set(range(30)) <= set(rows[0]["tail"].tolist()) and len(rows[0]["tail"]) <= 35
  assert rows[0]["before"] == 0.0 and rows[0]["after"] == 1.0  # The tail's mean adds the corner: every image moves.
  assert rows[1]["after"] == rows[1]["before"] == 0.0 and rows[2]["after"] == 0.0  # Other labels' tails add none.
  assert rows[0]["change"] > rows[1]["change"]


def _fake_run(path, defense, phases, files=(), downsample=1):
  """A finished run's files as benchmarks/work.py reads them: `phases` [(phase, last global step), ...]."""
  path.mkdir()
  config = {"defense": {"name": defense}, "train": {"batch_size": 10},
            "abl": {"unlearning_batch_size": 5, "score_epochs": 2, "gauge_downsample": downsample}}
  (path / "config.json").write_text(json.dumps(config))
  (path / "results.json").write_text(json.dumps({"num_train": 100}))
  writer = metrics.Writer(str(path))
  for phase, step in phases:
    writer.write(step - 1, {"train/loss": 1.0}, phase=phase, epoch=1)
    writer.write(step, {"epoch/loss": 1.0}, phase=phase, epoch=1)
  writer.write(phases[-1][1], {"isolation/pool_size": 20}, phase="give_back")
  writer.close()
  np.savez(path / "isolation.npz", pool=np.arange(20))
  for name in files:
    np.savez(path / name, x=np.zeros(1))
  return str(path)


def test_work_counts_training_steps_gauges_and_passes(tmp_path):
  from benchmarks import work  # pylint: disable=import-outside-toplevel
  from abl_jax import cost  # pylint: disable=import-outside-toplevel
  none = _fake_run(tmp_path / "none", "none", [("train", 40)])
  phases = [("isolation", 20), ("gauge", 36), ("regauge", 40), ("finetune", 50), ("finetune_relearned", 66)]
  full = _fake_run(tmp_path / "full", "abl", phases, ("returned.npz", "regauged.npz", "relearned.npz"))
  small = _fake_run(tmp_path / "small", "abl", phases, ("returned.npz",), downsample=2)
  assert cost.phase_steps(full) == {"isolation": 20, "gauge": 16, "regauge": 4, "finetune": 10,
                                    "finetune_relearned": 16}
  out = work.main([full, none, "--gauge_step=0.5", "--pass_image=0.1"])
  # Training: (20 + 16 + 4 + 10 + 16) x 10 images; passes: 2 scorings + 2 judgements of 100, 80 outside the pool.
  assert out["defended"]["pass_images"] == 480 and out["none"]["total"] == 400
  assert out["ratio"] == pytest.approx((660 + 48) / 400)
  assert cost.ratio(full, none, 0.5, 0.1) == out["ratio"]
  np.savez(tmp_path / "full" / "relearned.npz", relearned_transfer_images=30)  # The check's transfer test.
  assert work.main([full, none, "--gauge_step=0.5", "--pass_image=0.1"])["defended"]["pass_images"] == 510
  out = work.main([small, none, "--gauge_step=0.5", "--pass_image=0.1"])
  # The gauges' 20 steps at half a step, one judgement at half a pass.
  assert out["defended"]["training"] == {"isolation": 200, "gauge": 80, "regauge": 20, "finetune": 100,
                                         "finetune_relearned": 160}
  assert out["ratio"] == pytest.approx((560 + 0.1 * (200 + 50)) / 400)
  with pytest.raises(SystemExit):
    work.main([full, str(tmp_path / "missing")])
  # Joint unlearning's steps carry the retained examples' batch on top of the isolated ones'.
  batch = cost.batch_size
  sizes = {"unlearning_batch_size": 5, "joint_batch_size": 7}
  assert batch({"abl": {**sizes, "unlearning_mode": "joint"}}, "unlearning") == 12
  assert batch({"abl": {**sizes, "unlearning_mode": "ascent"}}, "unlearning") == 5
  assert batch({"train": {"batch_size": 10}}, "finetune") == 10


def _isolation_file(workdir, kurtosis, poisoned_label=None, cut_labels=(), deferred=None):
  """A run folder whose isolation.npz holds only what benchmarks/kurtosis.py reads: 4 labels x 5 examples."""
  workdir.mkdir(parents=True)
  labels = np.repeat(np.arange(4), 5)
  cut = np.full(4, np.nan)
  cut[list(cut_labels)] = 0.0
  extra = {} if deferred is None else {"spectral_deferred": np.asarray(deferred, np.int64)}
  np.savez(workdir / "isolation.npz", spectral_kurtosis=np.asarray(kurtosis, np.float64), labels=labels,
           is_poisoned=labels == poisoned_label, spectral_cut=cut, **extra)
  return str(workdir)


def test_kurtosis_scores_each_label_and_names_what_the_test_defers(tmp_path, capsys):
  from benchmarks import kurtosis  # pylint: disable=import-outside-toplevel
  attacked = _isolation_file(tmp_path / "a" / "ia", [2.0, 3.0, 2.9, 3.1], poisoned_label=0, deferred=[0])
  _isolation_file(tmp_path / "a" / "ia_again", [2.0, 3.0, 2.9, 3.1], poisoned_label=0)  # The same isolation.
  flagged = _isolation_file(tmp_path / "b", [1.2, 3.0, 2.9, 3.1], poisoned_label=0, cut_labels=[0])
  clean = _isolation_file(tmp_path / "c", [2.8, 3.0, 2.6, 3.1])
  rows = kurtosis.main([str(tmp_path / "a"), flagged, clean])
  assert [r["workdir"] for r in rows] == [attacked, flagged, clean]  # One line per isolation model.
  # Minus the kurtosis: median -2.95, MAD 0.1, so label 0 scores 0.6745 x 0.95 / 0.1.
  np.testing.assert_allclose(rows[0]["scores"], np.round(abl_scores([2.0, 3.0, 2.9, 3.1]), 2))
  assert rows[0]["scores"][0] == pytest.approx(6.41) and rows[0]["deferred"] == [0] and rows[0]["attacked"] == [0]
  assert rows[1]["flagged"] == [0] and rows[1]["deferred"] == []  # Flagged by a spectral test: not deferred.
  assert rows[2]["attacked"] == [] and rows[2]["deferred"] == [] and rows[2]["highest_clean"] == 2
  assert rows[0]["flagged"] == []  # A deferred label's cut is not a flag.
  out = capsys.readouterr().out
  assert "3 isolation models; 10 labels without poison" in out
  with pytest.raises(SystemExit):
    kurtosis.main([clean, "--cutoff=0"])


def abl_scores(kurtosis):
  """The defense's kurtosis outlier scores for 4 labels of 5 examples."""
  from abl_jax import abl  # pylint: disable=import-outside-toplevel
  return abl.outlier_scores(-np.asarray(kurtosis), np.full(4, 5))


def test_gauge_epochs_scores_every_label_and_counts_the_attacked_labels_rejections():
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import gauge_epochs  # pylint: disable=import-outside-toplevel
  labels = np.repeat(np.arange(5), 100)
  own = np.full(500, 0.9)
  own[::10] = 0.05  # Every label's hard examples: 10 of 100 rejected.
  poisoned = np.zeros(500, bool)
  poisoned[400:450] = True  # Label 4: half poisoned, 48 of those 50 rejected, and one clean one more.
  own[400:448] = 0.01
  own[455] = 0.01
  row = gauge_epochs.judged(own, labels, poisoned, 5, (0.1, 0.02), 3.5, 0.1)
  assert row["target"] == 4 and row["flagged"] == [4]
  assert row["poisoned_rejected"] == "48 / 50" and row["clean_rejected"] == "6 / 50"  # 450, 455, 460, ..., 490.
  assert row["target_scores"][0] > 3.5 and row["highest_other"] < 3.5
  clean = gauge_epochs.judged(own, labels, np.zeros(500, bool), 5, (0.1,), 3.5, 0.1)
  assert "target" not in clean and len(clean["scores"][0]) == 5


def _judged_run(workdir, shares, flagged, poisoned_label=None, regauged=None):
  """A run folder with what benchmarks/outlier_ratio.py reads: 4 labels x 1,000 examples, example 0 the pool."""
  workdir.mkdir(parents=True)
  labels = np.repeat(np.arange(4), 1000)
  np.savez(workdir / "isolation.npz", labels=labels, pool=np.array([0]), is_poisoned=labels == poisoned_label)
  np.savez(workdir / "returned.npz", outlier_shares=np.array([shares, shares]), outlier_labels=np.array(flagged))
  if regauged is not None:
    np.savez(workdir / "regauged.npz", outlier_shares=np.array([regauged]), outlier_labels=np.array(flagged))
  (workdir / "config.json").write_text(json.dumps({"abl": {"class_outlier_z": 3.5}}))
  return str(workdir)


def test_outlier_ratio_names_the_flags_the_ratio_would_add(tmp_path, capsys):
  from benchmarks import outlier_ratio  # pylint: disable=import-outside-toplevel
  missed = _judged_run(tmp_path / "runs" / "wanet", [0.34, 0.05, 0.16, 0.14], [], poisoned_label=0)
  found = _judged_run(tmp_path / "runs" / "ia", [0.34, 0.05, 0.12, 0.14], [0], poisoned_label=0,
                      regauged=[0.40, 0.05, 0.12, 0.14])
  clean = _judged_run(tmp_path / "clean", [0.10, 0.05, 0.13, 0.14], [])
  rows = outlier_ratio.main([str(tmp_path / "runs"), clean])
  assert [r["workdir"] for r in rows] == [found, missed, clean]
  assert rows[1]["returned"] == {"top": 0, "ratio": 2.12, "flagged": [], "dominant": [0], "new": [0]}
  assert rows[0]["returned"]["new"] == [] and rows[0]["regauged"]["ratio"] == 2.86
  assert rows[2]["attacked"] == [] and rows[2]["returned"]["dominant"] == [] and rows[2]["returned"]["ratio"] == 1.08
  assert "3 runs; the top label is clean on 1, at most 1.08x the next; the ratio 1.6 adds a flag on 1" in (
      capsys.readouterr().out)
  assert outlier_ratio.main([missed, "--ratio=2.2"])[0]["returned"]["new"] == []
  with pytest.raises(SystemExit):
    outlier_ratio.main([clean, "--ratio=1"])
