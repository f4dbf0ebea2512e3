"""The airbench model (whitening layer, shapes, a real training step, a smoke run) and label smoothing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smoke
from abl_jax import abl, experiment, models, plots, train
from abl_jax.models import airbench


def _correlated_images(n=64, size=12, seed=0):
  """Images whose neighbouring pixels and channels are strongly correlated (far from white)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, size + 1, size + 1, 3))
  x = x[:, 1:, 1:] + 0.8 * x[:, :-1, :-1]  # Neighbouring pixels share noise.
  mix = np.array([[1.0, 0.6, 0.3], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
  return (x @ mix + 0.5).astype(np.float32)


def _second_moment(p):
  p = np.asarray(p, np.float64)
  return p.T @ p / len(p)


def test_whitening_filters_whiten_the_patches():
  x = _correlated_images()
  raw = _second_moment(airbench.patches(x))
  assert raw.shape == (12, 12) and np.abs(raw - np.eye(12)).max() > 0.5  # Far from white before.
  filters = models.whitening_filters(x, eps=0.0, chunk=10)  # Chunks: the moment is summed over them.
  assert filters.shape == (2, 2, 3, 12) and filters.dtype == np.float32
  whitened = _second_moment(airbench.patches(x) @ filters.reshape(12, 12))
  np.testing.assert_allclose(whitened, np.eye(12), atol=1e-4)
  # eps shrinks each direction by eigenvalue / (eigenvalue + eps) and keeps them uncorrelated.
  eigenvalues = np.linalg.eigvalsh(raw)[::-1]
  damped = _second_moment(airbench.patches(x) @ models.whitening_filters(x, eps=0.1).reshape(12, 12))
  np.testing.assert_allclose(damped, np.diag(eigenvalues / (eigenvalues + 0.1)), atol=1e-4)


def test_whitening_filters_match_the_model_layer_and_signs_are_canonical():
  x = _correlated_images(n=8)
  filters = models.whitening_filters(x)
  np.testing.assert_array_equal(filters, models.whitening_filters(x[::-1]))  # Order-free, deterministic.
  flat = filters.reshape(12, 12)
  assert np.all(flat[np.argmax(np.abs(flat), axis=0), np.arange(12)] > 0)
  # The conv of the model computes the same projections of each patch as the flat matrix product.
  y = jax.lax.conv_general_dilated(x, filters, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 12), airbench.patches(x) @ flat, rtol=1e-4, atol=1e-4)


def test_shapes_parameters_and_the_whitening_variable():
  filters = models.whitening_filters(_correlated_images(n=8))
  model = models.create_model("airbench", 10, 16, whitening=filters)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  # whitening bias 24; convs 9*(24*16 + 16*16 + 16*64 + 3*64*64) = 125,568; BN biases 16+16+4*64;
  # Dense 64*10 (no bias).
  assert sum(a.size for a in jax.tree.leaves(variables["params"])) == 24 + 125_568 + 288 + 640
  np.testing.assert_array_equal(variables["batch_stats"]["whitening"], filters)
  assert "whitening" not in variables["params"]
  # Without filters: identity ones (un-whitened patches); a checkpoint restores the run's filters into them.
  plain = models.create_model("airbench", 10, 16).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                                                       train=False)
  np.testing.assert_array_equal(plain["batch_stats"]["whitening"].reshape(12, 12), np.eye(12))
  with pytest.raises(ValueError, match=r"Airbench.whitening holds 144 values; images with 1 channels need 16"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), train=False)


def test_cross_entropy_label_smoothing_by_hand():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
  labels = jnp.array([0, 1])
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  s = 0.3
  targets = np.full((2, 3), s / 3) + (1 - s) * np.eye(3)[[0, 1]]
  np.testing.assert_allclose(train.cross_entropy(logits, labels, s), -(targets * np.log(p)).sum(-1), rtol=1e-6)
  np.testing.assert_allclose(train.cross_entropy(logits, labels), -np.log(p[[0, 1], [0, 1]]), rtol=1e-6)


def test_a_training_step_keeps_the_filters_and_smooths_only_the_loss():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 8).astype(np.int32)
  mean, std = (0.5,) * 3, (0.25,) * 3
  filters = models.whitening_filters((images / 255.0 - 0.5) / 0.25)
  model = models.create_model("airbench", 10, 4, whitening=filters)
  state = train.create_train_state(model, train.sgd(0.1, 0.9, 1e-3), jax.random.PRNGKey(0), (16, 16, 3))
  before = jax.device_get(state)
  x = train.preprocess(jnp.asarray(images), mean, std)
  logits, _ = model.apply(train.variables_of(state), x, train=True, mutable=["batch_stats"])
  step = train.make_train_step(model, abl.cross_entropy_loss, mean, std, momentum=0.9, weight_decay=1e-3,
                               augment_data=False, label_smoothing=0.2)
  state, metrics = step(train.replicate(state), train.put_batch(images), train.put_batch(labels),
                        train.replicate(jax.random.PRNGKey(1)), train.replicate(np.float32(0.1)))
  np.testing.assert_allclose(metrics["loss"], np.mean(train.cross_entropy(logits, labels, 0.2)), rtol=1e-5)
  np.testing.assert_allclose(metrics["ce"], np.mean(train.cross_entropy(logits, labels)), rtol=1e-5)
  assert not np.isclose(metrics["loss"], metrics["ce"])
  after = jax.device_get(state)
  np.testing.assert_array_equal(after.batch_stats["whitening"], filters)  # Not trained, not decayed.
  assert not np.allclose(after.batch_stats["ConvBN_0"]["BatchNorm_0"]["mean"],
                         before.batch_stats["ConvBN_0"]["BatchNorm_0"]["mean"])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), after.params, before.params)
  assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("override, message", [
    (dict(train__label_smoothing=1.0), r"config\.train\.label_smoothing=1\.0 must be in \[0, 1\)"),
    (dict(train__label_smoothing=-0.1), r"config\.train\.label_smoothing=-0\.1 must be in \[0, 1\)"),
    (dict(model__width=-4), r"config\.model\.width=-4 must be >= 0"),
])
def test_bad_recipe_values_are_refused(override, message):
  with pytest.raises(ValueError, match=message):
    experiment.validate(smoke.config(**override))


def test_fast_variant_picks_the_model_and_recipe():
  from configs import abl_badnets, abl_sig, common
  fast, cpu = abl_badnets.get_config("fast"), abl_badnets.get_config("cpu")
  assert (fast.model.name, fast.model.width, fast.train.label_smoothing) == ("airbench", 16, 0.2)
  assert (fast.data.train_size, fast.abl.isolation_epochs) == (cpu.data.train_size, cpu.abl.isolation_epochs)
  assert abl_sig.get_config("fast").abl.isolation_epochs == abl_sig.get_config("cpu").abl.isolation_epochs == 5
  assert cpu.train.label_smoothing == 0.0 and common.base_config().train.label_smoothing == 0.0


def test_abl_smoke_run_with_airbench(tmp_path):
  config = smoke.config(model__name="airbench", model__width=4, train__label_smoothing=0.2,
                        abl__isolation_epochs=1, abl__finetune_epochs=1, abl__unlearning_epochs=1)
  results = experiment.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= results["clean_accuracy"] <= 1.0 and results["isolation"]["num_isolated"] > 0
  assert results["config"]["model"]["name"] == "airbench"
  # A model built without the filters (the report's pictures) restores the run's from the checkpoint.
  prep = experiment.prepare(config)
  pred = plots.predict_latest(str(tmp_path), prep.test.images, prep.test.num_classes)
  assert np.mean(pred == prep.test.labels) == pytest.approx(results["clean_accuracy"])
