"""Unlearning modes: loss signs, the defender's stopping rule, frozen BatchNorm, curves, start_from."""
import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smoke
from abl_jax import abl, experiment, models, schedule, train


def test_ascent_and_joint_losses_on_a_hand_checked_batch():
  ce = jnp.array([1.0, 2.0, 3.0, 4.0])
  assert float(abl.neg_ce_loss(ce)) == pytest.approx(-2.5)
  # Isolated first: -(1 + 2) / 2 + 0.5 * (3 + 4) / 2 = -1.5 + 1.75.
  assert float(abl.joint_unlearning_loss(ce, 2, 0.5)) == pytest.approx(0.25)
  grad = jax.grad(lambda c: abl.unlearning_step_loss("joint", 2, 0.5)(c))(ce)
  np.testing.assert_allclose(grad, [-0.5, -0.5, 0.25, 0.25])  # Ascend on isolated, descend on retained.
  grad = jax.grad(lambda c: abl.unlearning_step_loss("ascent", 2, 0.5)(c))(ce)
  np.testing.assert_allclose(grad, [-0.25] * 4)
  # complement: p(label) = exp(-ce); ce = ln 2 -> p = 1/2 -> -log(1 - 1/2) = ln 2, and its gradient ascends CE.
  assert float(abl.complement_loss(jnp.array([np.log(2.0)]))) == pytest.approx(np.log(2.0), rel=1e-5)
  g_confident, g_unlearned = jax.grad(lambda c: abl.complement_loss(c))(jnp.array([1e-3, 5.0])) * 2
  assert g_confident < -100 and -0.01 < g_unlearned < 0  # Strong while learned, fading once unlearned.
  loss = abl.unlearning_step_loss("joint", 1, 2.0, "complement")(jnp.array([np.log(2.0), 3.0]))
  assert float(loss) == pytest.approx(np.log(2.0) + 6.0, rel=1e-5)
  with pytest.raises(ValueError, match=r"config\.abl\.unlearning_loss='kl' is unknown; allowed: neg_ce, complement"):
    abl.unlearning_step_loss("ascent", 1, 1.0, "kl")
  with pytest.raises(ValueError, match=r"config\.abl\.unlearning_mode='erase' is unknown; allowed: ascent, joint"):
    abl.unlearning_step_loss("erase", 2, 1.0)


def test_stopping_rule_sees_only_isolated_predictions_and_labels():
  labels = np.zeros(10, np.int32)
  assert not abl.stop_unlearning(labels, labels, "isolated_accuracy", 0.1)  # Still predicts the labels.
  flipped = np.array([3] * 9 + [0])
  assert abl.stop_unlearning(flipped, labels, "isolated_accuracy", 0.1)  # 10% left: stop.
  assert not abl.stop_unlearning(flipped, labels, "isolated_accuracy", 0.0)
  assert not abl.stop_unlearning(flipped, labels, "none", 0.5)
  # What it receives is all it can read: no mask, no test set, no state.
  assert list(inspect.signature(abl.stop_unlearning).parameters) == [
      "isolated_predictions", "isolated_labels", "rule", "threshold", "reference_accuracy"]


def test_retained_accuracy_rule_compares_with_ordinary_examples_of_the_same_labels():
  labels = np.zeros(10, np.int32)
  half = np.array([0] * 5 + [3] * 5)
  assert abl.stop_unlearning(half, labels, "retained_accuracy", 0.1, reference_accuracy=0.45)  # 0.5 <= 0.55
  assert not abl.stop_unlearning(labels, labels, "retained_accuracy", 0.1, reference_accuracy=0.7)  # 1.0: learned
  with pytest.raises(ValueError, match="retained_accuracy"):
    abl.stop_unlearning(half, labels, "retained_accuracy", 0.1)


@pytest.mark.parametrize("bn_train", [True, False])
def test_frozen_batchnorm_keeps_statistics(bn_train):
  model = models.create_model("small_cnn", 10, 4)
  state = train.create_train_state(model, train.sgd(0.1, 0.9, 0.0), jax.random.PRNGKey(0), (8, 8, 3))
  step = train.make_train_step(model, abl.neg_ce_loss, (0.5,) * 3, (0.25,) * 3, momentum=0.9, weight_decay=0.0,
                               augment_data=False, bn_train=bn_train)
  n = jax.local_device_count()
  images = np.random.default_rng(0).integers(0, 256, (4 * n, 8, 8, 3), dtype=np.uint8)
  labels = np.zeros((4 * n,), np.int32)
  before = jax.device_get(state.batch_stats)
  new, _ = step(train.replicate(state), train.put_batch(images), train.put_batch(labels),
                train.replicate(jax.random.PRNGKey(1)), train.replicate(np.float32(0.1)))
  after = train.to_host(new).batch_stats
  same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), before, after))
  assert all(same) != bn_train  # Frozen: every statistic unchanged; train mode: they move.
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), state.params,
                                         train.to_host(new).params))
  assert not all(changed)  # The weights still learn (unlearn) either way.


def test_joint_batches_put_the_isolated_examples_first():
  isolated, pool = np.arange(100, 110), np.arange(0, 100)
  order = schedule.joint_order(isolated, pool, 4, 6, jax.random.PRNGKey(0))
  assert order.shape == (3, 10)  # ceil(10 / 4) steps of 4 isolated + 6 retained.
  iso_part, ret_part = order[:, :4], order[:, 4:]
  assert np.isin(iso_part, isolated).all() and np.isin(ret_part, pool).all()
  assert set(iso_part.ravel()) == set(isolated)
  assert len(set(ret_part.ravel())) == 18  # Distinct pool examples within an epoch.
  # The loss reads the first 4 of each batch as the isolated ones.
  ce = jnp.arange(10.0)
  assert float(abl.unlearning_step_loss("joint", 4, 1.0, "neg_ce")(ce)) == pytest.approx(-1.5 + 6.5)


def _variant(root, **overrides):
  return smoke.config(abl__start_from=str(root / "abl"), **overrides)


PAPER = dict(abl__unlearning_mode="ascent", abl__unlearning_loss="neg_ce", abl__joint_exclude_ratio=0.0)
STOP = dict(**PAPER, abl__unlearning_epochs=8, abl__unlearning_stop="isolated_accuracy", abl__stop_accuracy=0.2)


@pytest.fixture(scope="module")
def variants(runs, tmp_path_factory):
  """Unlearning variants started from the session's ABL smoke run (its isolation and fine-tuned model)."""
  root, _, base = runs
  out = tmp_path_factory.mktemp("unlearning")
  joint = experiment.train_and_evaluate(
      _variant(root, abl__unlearning_mode="joint", abl__unlearning_loss="neg_ce", abl__unlearning_bn="frozen",
               abl__unlearning_lr=0.0075),
      str(out / "joint"))
  stopped = experiment.train_and_evaluate(_variant(root, **STOP), str(out / "stop"))
  return root, out, base, joint, stopped


def test_curve_is_written_from_before_unlearning_to_the_end(runs):
  root, _, base = runs
  with open(root / "abl" / "unlearning_curve.json") as f:
    curve = json.load(f)["curve"]
  assert [c["epoch"] for c in curve] == [0, 1, 2, 3]
  assert curve[0]["attack_success_rate"] > 0.7  # The backdoor before unlearning...
  assert base["attack_success_rate"] < curve[0]["attack_success_rate"] - 0.3  # ...and much less after it.
  assert base["unlearning"]["before"]["attack_success_rate"] == curve[0]["attack_success_rate"]
  assert curve[0]["isolated_accuracy"] > curve[-1]["isolated_accuracy"]


def test_start_from_reuses_isolation_and_the_fine_tuned_model(variants):
  root, out, base, joint, _ = variants
  for run in ("joint", "stop"):
    np.testing.assert_array_equal(np.load(out / run / "isolation.npz")["isolated"],
                                  np.load(root / "abl" / "isolation.npz")["isolated"])
  assert joint["unlearning"]["before"] == base["unlearning"]["before"]
  assert joint["unlearning"]["mode"] == "joint" and joint["unlearning"]["epochs_run"] == 3
  assert joint["attack_success_rate"] < 0.5  # The joint mode unlearns the backdoor too.


def test_start_from_refuses_a_run_of_another_experiment(runs, tmp_path):
  root, _, _ = runs
  with pytest.raises(experiment.WorkdirError, match=r"ran a different experiment \(config\.abl\.gamma"):
    experiment.train_and_evaluate(_variant(root, abl__gamma=0.3), str(tmp_path))
  assert not os.path.exists(tmp_path / "config.json")  # Refused before claiming the workdir.


def test_stopping_rule_ends_unlearning_early_and_resume_keeps_it(variants):
  root, out, _, _, stopped = variants
  at = stopped["unlearning"]["stopped_at_epoch"]
  assert at is not None and at < 8
  assert stopped["unlearning"]["epochs_run"] == at
  with open(out / "stop" / "unlearning_curve.json") as f:
    curve = json.load(f)["curve"]
  assert curve[-1]["isolated_accuracy"] <= 0.2 < curve[-2]["isolated_accuracy"]
  os.remove(out / "stop" / "results.json")  # As if interrupted after the last checkpoint.
  again = experiment.train_and_evaluate(_variant(root, **STOP), str(out / "stop"))
  assert again["unlearning"]["epochs_run"] == at  # No epochs after the stop.
  assert again["clean_accuracy"] == pytest.approx(stopped["clean_accuracy"], abs=1e-6)


def test_curves_plot_one_line_per_run(variants, tmp_path):
  from abl_jax import plots, report
  root, out, *_ = variants
  runs = {"ascent": str(root / "abl"), "joint": str(out / "joint")}
  path = plots.unlearning_curves(runs, str(tmp_path / "curves.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 10_000
  rows = report.unlearning_table(runs).splitlines()
  assert len(rows) == 4 and rows[2].startswith("| ascent |") and rows[3].startswith("| joint |")
  joint = json.load(open(out / "joint" / "results.json"))
  assert f"| {joint['clean_accuracy']:.4f} | {joint['attack_success_rate']:.4f} |" in rows[3]


def test_joint_pool_leaves_out_the_lowest_isolation_scores(tmp_path):
  scores = np.arange(100, dtype=np.float32)[::-1].copy()  # Example 99 has the lowest loss.
  pool = schedule.joint_pool(scores, np.array([99]), 0.2)
  np.testing.assert_array_equal(pool, np.arange(80))  # Examples 80..99 (lowest 20% of losses) left out.
  np.testing.assert_array_equal(schedule.joint_pool(scores, np.array([99]), 0.0), np.arange(99))
